// Inference fast path for short sequences and small batches: every layer in one
// call, no autograd, weights packed once as [W_ih | W_hh] rows and cached until
// a parameter changes (new tensor, new storage or an in-place update).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <vector>

#include "cache.h"
#include "checks.h"
#include "dispatch.h"
#include "kernels.h"
#include "layer.h"

namespace rnnfast {
namespace {

using at::Tensor;

struct Packed {
  std::vector<Tensor> w;     // per layer: (G*H, I_l + P), rows [W_ih | W_hh], in the call's dtype
  std::vector<Tensor> bias;  // per layer: (2, G*H), the input and recurrent sides (split_biases), zeros if none
  std::vector<Tensor> w_hr;  // per layer with proj_size: (P, H), in the call's dtype
  std::vector<char> finite;  // per layer: W_hh has no NaN or infinity (set by decode_loop, which knows the type)
};

// The weights in dtype (bfloat16 rounded once from float32 weights under autocast); the biases
// in the dtype the sums run in.
Packed pack(int64_t mode, const std::vector<Tensor>& weights, int64_t num_layers, bool has_bias, bool proj,
            at::ScalarType dtype, at::ScalarType acc) {
  const int64_t per = weights_per_layer(has_bias, proj);
  Packed p;
  at::NoGradGuard no_grad;
  for (int64_t l = 0; l < num_layers; ++l) {
    const Tensor& w_ih = weights[l * per];
    const Tensor& w_hh = weights[l * per + 1];
    p.w.push_back(at::cat({w_ih, w_hh}, 1).to(dtype).contiguous());
    const auto [b_in, b_rec] =
        has_bias ? split_biases(mode, weights[l * per + 2], weights[l * per + 3]) : std::pair<Tensor, Tensor>();
    const Tensor zeros = at::zeros({w_ih.size(0)}, w_ih.options());
    p.bias.push_back(at::stack({b_in.defined() ? b_in : zeros, b_rec.defined() ? b_rec : zeros}).to(acc).contiguous());
    if (proj) p.w_hr.push_back(weights[l * per + per - 1].to(dtype).contiguous());
  }
  return p;
}

WeightCache<Packed> cache;

// gi = W_ih x + bias[0] and gh = W_hh h + bias[1] for each of B rows: weights and vectors in E,
// sums in A (float32 for bfloat16); h_zero: every h is zero (gh is the bias).
template <typename E, typename A>
void project(const Tensor& w, const Tensor& bias, const E* x, int64_t in, const E* h, int64_t H, int64_t B, A* gi,
             A* gh, bool h_zero) {
  const int64_t rows = w.size(0), ld = w.size(1);
  const E* W = w.data_ptr<E>();
  const A* bi = bias.data_ptr<A>();
  const A* bh = bi + rows;
  const int64_t grain = std::max<int64_t>(8, (int64_t(1) << 17) / std::max<int64_t>(ld * B, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    dot_rows_batch(x, in, B, W + r0 * ld, ld, in, r1 - r0, bi + r0, gi + r0, rows);
    if (!h_zero) return dot_rows_batch(h, H, B, W + r0 * ld + in, ld, H, r1 - r0, bh + r0, gh + r0, rows);
    for (int64_t b = 0; b < B; ++b) std::memcpy(gh + b * rows + r0, bh + r0, (r1 - r0) * sizeof(A));
  });
}

// The stack over elements E (inputs, weights, the outputs between layers) with states and
// sums in A, and the last layer's outputs and the returned states in h0's dtype O (E, or
// float beside bfloat16: autocast's float32 states); for bfloat16 a rounded copy of each
// layer's state (h_lo) feeds the products. With proj_size (LSTM, h0 P wide where c0 is H wide,
// as ATen tells them apart) each step's new cell output goes through W_hr into the state.
template <typename E, typename A, typename O>
std::tuple<Tensor, Tensor, c10::optional<Tensor>> decode_loop(int64_t mode, const std::vector<Tensor>& weights,
                                                               int64_t num_layers, bool has_bias, const Tensor& x,
                                                               const Tensor& h0, const c10::optional<Tensor>& c0) {
  constexpr bool low = !std::is_same_v<E, A>;
  const at::ScalarType et = x.scalar_type(), at_ = c10::CppTypeToScalarType<A>::value;
  const bool lstm = mode == LSTM;
  TORCH_CHECK(!lstm || c0.has_value(), "rnnfast decode: LSTM needs c0");
  const int64_t T = x.size(0), B = x.size(1), P = h0.size(2), H = lstm ? c0->size(2) : P, G = gate_count(mode);
  const bool proj = P != H;
  // a zero state's product is the bias alone only where W_hh (each w's last P columns) is finite: 0 x NaN is NaN
  const Packed p = cache.get(weights, low ? 1 : 0, [&] {
    Packed packed = pack(mode, weights, num_layers, has_bias, proj, et, at_);
    for (const Tensor& w : packed.w) {
      packed.finite.push_back(all_finite(w.data_ptr<E>() + w.size(1) - P, w.size(0), P, w.size(1)));
    }
    return packed;
  });
  TORCH_CHECK(p.w[0].size(1) == x.size(2) + P, "rnnfast decode: input size does not match the weights");
  Tensor h_n = h0.to(at_).contiguous().clone();
  Tensor c_n = lstm ? c0->to(at_).contiguous().clone() : Tensor();
  Tensor h_lo = low ? h0.to(et).contiguous().clone() : h_n;
  Tensor out = at::empty({T, B, P}, h0.options());
  const at::ScalarType ot = h0.scalar_type();
  if (B == 0) return {out, h_n.to(ot), lstm ? c10::optional<Tensor>(c_n.to(ot)) : c10::nullopt};  // no rows to copy
  // the outputs of the layers below the last, in turn (one reads the other)
  Tensor mid = num_layers > 1 ? at::empty({std::min<int64_t>(num_layers - 1, 2), T, B, P}, x.options()) : Tensor();
  // gi, gh, GRU's gates, the rows' new cell outputs (before W_hr)
  Tensor scratch = at::empty({3 * B * 4 * H + B * H}, x.options().dtype(at_));
  A* gi = scratch.data_ptr<A>();
  A* gh = gi + B * 4 * H;
  A* ws = gh + B * 4 * H;
  A* h_new = ws + B * 4 * H;
  Tensor h_new_lo = low && proj ? at::empty({B * H}, x.options()) : Tensor();  // what W_hr multiplies, rounded
  const E* in = x.data_ptr<E>();
  int64_t in_size = x.size(2);
  for (int64_t l = 0; l < num_layers; ++l) {
    const bool last = l + 1 == num_layers;
    E* o = last ? nullptr : mid.data_ptr<E>() + (l % 2) * T * B * P;
    O* o_last = last ? out.data_ptr<O>() : nullptr;
    A* h = h_n.data_ptr<A>() + l * B * P;
    E* hl = h_lo.data_ptr<E>() + l * B * P;
    A* c = lstm ? c_n.data_ptr<A>() + l * B * H : nullptr;
    for (int64_t t = 0; t < T; ++t) {
      project<E, A>(p.w[l], p.bias[l], in + t * B * in_size, in_size, hl, P, B, gi, gh,
                    t == 0 && p.finite[l] && all_zero(hl, B * P));
      for (int64_t b = 0; b < B; ++b) {
        gate_forward<A>(mode, gi + b * G * H, gh + b * G * H, h + b * H, lstm ? c + b * H : nullptr, nullptr,
                        lstm ? gi + b * G * H : ws + b * 4 * H, h_new + b * H, H, H);
      }
      if (proj) {
        const E* cell_out = nullptr;
        if constexpr (low) {
          round_row(h_new_lo.data_ptr<E>(), h_new, B * H);
          cell_out = h_new_lo.data_ptr<E>();
        } else {
          cell_out = h_new;
        }
        gemv_rows<E, A>(cell_out, B, H, p.w_hr[l].data_ptr<E>(), P, nullptr, h);
      } else {
        std::memcpy(h, h_new, B * H * sizeof(A));
      }
      if (last) {
        round_row(o_last + t * B * P, h, B * P);
      } else {
        round_row(o + t * B * P, h, B * P);
      }
      if (low) round_row(hl, h, B * P);
    }
    in = o;
    in_size = P;
  }
  return {out, h_n.to(ot), lstm ? c10::optional<Tensor>(c_n.to(ot)) : c10::nullopt};
}

std::tuple<Tensor, Tensor, c10::optional<Tensor>> decode(int64_t mode, const std::vector<Tensor>& weights,
                                                          int64_t num_layers, bool has_bias, const Tensor& x_,
                                                          const Tensor& h0, const c10::optional<Tensor>& c0) {
  check_decode(mode, weights, num_layers, has_bias, x_, h0, c0);
  const Tensor x = x_.contiguous();
  switch (x.scalar_type()) {
    case at::kBFloat16:
      if (h0.scalar_type() == at::kFloat) {  // autocast's float32 states
        return decode_loop<at::BFloat16, float, float>(mode, weights, num_layers, has_bias, x, h0, c0);
      }
      return decode_loop<at::BFloat16, float, at::BFloat16>(mode, weights, num_layers, has_bias, x, h0, c0);
    case at::kDouble:
      return decode_loop<double, double, double>(mode, weights, num_layers, has_bias, x, h0, c0);
    default:
      TORCH_CHECK(x.scalar_type() == at::kFloat, "rnnfast decode: unsupported dtype ", x.scalar_type());
      return decode_loop<float, float, float>(mode, weights, num_layers, has_bias, x, h0, c0);
  }
}

// One eager step of a cell: x (B, I), h and c (B, H); the decode path (inference on few rows,
// as the caller decides) or layer_fwd_eager (a C++ autograd node with save). Returns h' and c'
// (undefined, None in Python, but for LSTM). The views a step needs cost less here than in Python.
std::tuple<Tensor, Tensor> cell_eager(int64_t mode, const Tensor& x, const Tensor& h, const c10::optional<Tensor>& c,
                                      const Tensor& w_ih, const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                                      const c10::optional<Tensor>& b_hh, bool decode_path, bool save) {
  TORCH_CHECK(x.dim() == 2 && h.dim() == 2, "rnnfast cell_eager: x and h must be 2-D, got ", x.dim(), "-D and ",
              h.dim(), "-D");
  const bool has_bias = b_ih.has_value() && b_ih->defined();
  TORCH_CHECK(has_bias == (b_hh.has_value() && b_hh->defined()),
              "rnnfast cell_eager: bias_ih and bias_hh must both be given or both be None");
  if (decode_path) {
    std::vector<Tensor> weights{w_ih, w_hh};
    if (has_bias) weights.insert(weights.end(), {*b_ih, *b_hh});
    const auto [out, h_n, c_n] = decode(mode, weights, 1, has_bias, x.unsqueeze(0), h.unsqueeze(0),
                                        c.has_value() ? c10::optional<Tensor>(c->unsqueeze(0)) : c10::nullopt);
    return {h_n.select(0, 0), c_n.has_value() ? c_n->select(0, 0) : Tensor()};
  }
  const auto [out, h_n, c_n, ws1, ws2] =
      layer_fwd_eager(mode, x.unsqueeze(0), c10::nullopt, h, c, w_ih, w_hh, b_ih, b_hh, c10::nullopt, false, save,
                      /*out_seen=*/false);
  return {h_n, mode == LSTM ? c_n : Tensor()};
}

}  // namespace

}  // namespace rnnfast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rnnfast CPU kernels; the autograd-aware entry points are torch.ops.rnnfast.* and layer_fwd_eager";
  m.def("has_fused_loop", [] { return rnnfast::kHasAvx2; },
        "Whether float32 layers run the fused loop (AVX2 or AVX-512; else the stepwise loop).");
  m.def("has_bf16_loop", [] { return rnnfast::kHasAvx512Bf16; },
        "Whether bfloat16 layers run the fused loop with AVX512-BF16 or AMX products (else float32 on widened copies).");
  m.def("product_isa", &rnnfast::product_isa, "The instructions of the fused loop's products at a dtype here.",
        pybind11::arg("dtype"));
  m.def("peak_gflops", &rnnfast::peak_gflops, "The fused loop's multiply-add peak here, GFLOP/s (0: not built).",
        pybind11::arg("dtype"), pybind11::arg("seconds") = 0.3);
  m.def("decode", &rnnfast::decode,
        "Inference over all layers of a unidirectional stack for short sequences and small batches.");
  m.def("pad_packed", &rnnfast::pad_packed, "PackedSequence data to (T, B, ...), zeros past each row's end.");
  m.def("pack_padded", &rnnfast::pack_padded, "(T, B, ...) to PackedSequence data: the rows batch_sizes keeps.");
  m.def("layer_packed", &rnnfast::layer_packed,
        "One layer, one direction over PackedSequence data in inference: (output data, h_n, c_n).");
  m.def("cell_eager", &rnnfast::cell_eager,
        "One eager cell step, 2-D input and states: the decode path, or layer_fwd_eager.");
  m.def("stack_eager", &rnnfast::stack_eager,
        "A stack of layers and directions on unpadded input in one eager call: (output, h_n, c_n).");
  m.def("set_grads_with_graph", &rnnfast::set_grads_with_graph,
        "The Python function whose gradients layer_fwd_eager's backward returns when asked for a graph.");
  namespace py = pybind11;
  m.def("layer_fwd_eager", &rnnfast::layer_fwd_eager,
        "layer_fwd for eager calls: with save, its backward a C++ autograd node; without, the operator alone.",
        py::arg("mode"), py::arg("x"), py::arg("batch_sizes"), py::arg("h0"), py::arg("c0"), py::arg("w_ih"),
        py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("w_hr"), py::arg("reverse"), py::arg("save"),
        py::arg("out_seen") = true);
}
