// Inference fast path for short sequences and small batches: every layer in one
// call, no autograd, weights packed once as [W_ih | W_hh] rows and cached until
// a parameter changes (new tensor, new storage or an in-place update).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "cache.h"
#include "checks.h"
#include "kernels.h"

namespace rnnfast {
namespace {

using at::Tensor;

struct Packed {
  std::vector<Tensor> w;     // per layer: (G*H, I_l + H), rows [W_ih | W_hh]
  std::vector<Tensor> bias;  // per layer: (2, G*H) = [b_ih; b_hh], zeros without bias
};

Packed pack(const std::vector<Tensor>& weights, int64_t num_layers, bool has_bias) {
  const int64_t per = has_bias ? 4 : 2;
  Packed p;
  at::NoGradGuard no_grad;
  for (int64_t l = 0; l < num_layers; ++l) {
    const Tensor& w_ih = weights[l * per];
    const Tensor& w_hh = weights[l * per + 1];
    p.w.push_back(at::cat({w_ih, w_hh}, 1).contiguous());
    p.bias.push_back(has_bias ? at::stack({weights[l * per + 2], weights[l * per + 3]}).contiguous()
                              : at::zeros({2, w_ih.size(0)}, w_ih.options()));
  }
  return p;
}

WeightCache<Packed> cache;

// gi = W_ih x + b_ih and gh = W_hh h + b_hh for each of B rows.
template <typename T>
void project(const Tensor& w, const Tensor& bias, const T* x, int64_t in, const T* h, int64_t H, int64_t B, T* gi,
             T* gh) {
  const int64_t rows = w.size(0), ld = w.size(1);
  const T* W = w.data_ptr<T>();
  const T* bi = bias.data_ptr<T>();
  const T* bh = bi + rows;
  const int64_t grain = std::max<int64_t>(8, (int64_t(1) << 17) / std::max<int64_t>(ld * B, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t b = 0; b < B; ++b) {
      T* gib = gi + b * rows;
      T* ghb = gh + b * rows;
      dot_rows(W + r0 * ld, ld, r1 - r0, x + b * in, in, gib + r0, 1);
      dot_rows(W + r0 * ld + in, ld, r1 - r0, h + b * H, H, ghb + r0, 1);
      for (int64_t r = r0; r < r1; ++r) {
        gib[r] += bi[r];
        ghb[r] += bh[r];
      }
    }
  });
}

std::tuple<Tensor, Tensor, c10::optional<Tensor>> decode(int64_t mode, const std::vector<Tensor>& weights,
                                                          int64_t num_layers, bool has_bias, const Tensor& x_,
                                                          const Tensor& h0, const c10::optional<Tensor>& c0) {
  check_decode(mode, weights, num_layers, has_bias, x_, h0, c0);
  const Packed p = cache.get(weights, 0, [&] { return pack(weights, num_layers, has_bias); });
  const bool lstm = mode == LSTM, gru = mode == GRU;
  const Tensor x = x_.contiguous();
  const int64_t T = x.size(0), B = x.size(1), H = h0.size(2), G = gate_count(mode);
  Tensor h_n = h0.contiguous().clone();
  Tensor c_n = lstm ? c0->contiguous().clone() : Tensor();
  const auto opts = x.options();
  Tensor out = at::empty({T, B, H}, opts);
  Tensor mid = num_layers > 1 ? at::empty({T, B, H}, opts) : Tensor();
  Tensor scratch = at::empty({2 + (gru ? 1 : 0), B, 4 * H}, opts);

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnfast_decode", [&] {
    scalar_t* gi = scratch.data_ptr<scalar_t>();
    scalar_t* gh = gi + B * 4 * H;
    scalar_t* ws = gh + B * 4 * H;
    const scalar_t* in = x.data_ptr<scalar_t>();
    int64_t in_size = x.size(2);
    for (int64_t l = 0; l < num_layers; ++l) {
      // alternate between `mid` and `out` so that the last layer writes `out`
      Tensor& dst = ((num_layers - 1 - l) % 2 == 0) ? out : mid;
      scalar_t* o = dst.data_ptr<scalar_t>();
      scalar_t* h = h_n.data_ptr<scalar_t>() + l * B * H;
      scalar_t* c = lstm ? c_n.data_ptr<scalar_t>() + l * B * H : nullptr;
      for (int64_t t = 0; t < T; ++t) {
        project<scalar_t>(p.w[l], p.bias[l], in + t * B * in_size, in_size, h, H, B, gi, gh);
        for (int64_t b = 0; b < B; ++b) {
          scalar_t* ob = o + (t * B + b) * H;
          if (lstm) {
            lstm_fwd(gi + b * G * H, gh + b * G * H, c + b * H, gi + b * G * H, c + b * H, ob, H, H);
          } else if (gru) {
            gru_fwd(gi + b * G * H, gh + b * G * H, h + b * H, ws + b * 4 * H, ob, H, H);
          } else {
            rnn_fwd(gi + b * G * H, gh + b * G * H, ob, mode == RNN_RELU, H);
          }
          std::memcpy(h + b * H, ob, H * sizeof(scalar_t));
        }
      }
      in = o;
      in_size = H;
    }
  });
  return {out, h_n, lstm ? c10::optional<Tensor>(c_n) : c10::nullopt};
}

}  // namespace

}  // namespace rnnfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rnnfast CPU kernels; the autograd-aware entry points are torch.ops.rnnfast.*";
  m.def("has_fused_loop", [] { return rnnfast::kHasAvx512; },
        "Whether float32 layers run the fused AVX-512 loop (else the stepwise loop).");
  m.def("decode", &rnnfast::decode,
        "Inference over all layers of a unidirectional stack for short sequences and small batches.");
}
