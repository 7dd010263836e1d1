// The host code of the cuda backend, over ATen: forward and backward of one layer
// and direction (the operators rnnfast::layer_fwd / layer_bwd) as a time loop, and
// the decode of a whole stack, with each step's gate update handed to a Steps
// callback. The CUDA
// binding (layer.cpp) passes the kernel launchers of step.cu; the CPU emulation
// test (tests/cuda_emulate.cpp) runs the same element functions on the host, so
// this loop is tested without a GPU.
//
// Forward: the input projection of every step is one GEMM; each step one GEMM for
// the recurrent product into a preallocated buffer and one gate update. Backward
// walks the steps in reverse, one gate gradient and one GEMM per step, and forms
// the input and weight gradients as single GEMMs over all steps. float16/bfloat16
// keep the LSTM cell state and the gradient carries in float32; the GEMMs are
// ATen's, so TF32 follows torch's flag.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <tuple>
#include <vector>

#include "../cpu/cache.h"
#include "../cpu/checks.h"
#include "kernels.h"

namespace rnnfast::cuda {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

inline int64_t gates_of(int64_t mode) { return mode == LSTM ? 4 : (mode == GRU ? 3 : 1); }

inline DType dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK(false, "rnnfast cuda backend: dtype ", t, " is not supported (float32, float64, float16, "
                         "bfloat16 are)");
  }
}

// Accumulators, the cell state and gradient carries: float, or double for double.
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_tensor(const Tensor& t, const Tensor& x, const char* name, int64_t dim) {
  TORCH_CHECK(t.device() == x.device(), "rnnfast cuda backend: ", name, " must be on ", x.device(),
              " like the input, got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "rnnfast cuda backend: ", name, " has dtype ", t.scalar_type(),
              " but the input has dtype ", x.scalar_type());
  TORCH_CHECK(t.dim() == dim, "rnnfast cuda backend: ", name, " must be ", dim, "-D, got ", t.dim(), "-D");
}

inline void check_shape(const Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK(t.sizes() == expected, "rnnfast cuda backend: ", name, " has shape ", t.sizes(), ", expected ",
              expected);
}

// The state each step started from, (T, B, K), from the states after each step and
// the initial one. In reverse, rows that join at step t (inactive at t + 1) start
// from the initial state: one copy per distinct sequence length.
inline Tensor previous_states(const Tensor& all, const Tensor& init, const std::vector<int64_t>& bs, bool reverse) {
  const int64_t T = all.size(0);
  Tensor prev = at::empty_like(all);
  const int64_t first = reverse ? T - 1 : 0;
  prev[first].copy_(init);
  if (T > 1) prev.narrow(0, reverse ? 0 : 1, T - 1).copy_(all.narrow(0, reverse ? 1 : 0, T - 1));
  if (reverse) {
    for (int64_t t = 0; t + 1 < T; ++t) {
      const int64_t joined = bs[t] - bs[t + 1];
      if (joined > 0) prev[t].narrow(0, bs[t + 1], joined).copy_(init.narrow(0, bs[t + 1], joined));
    }
  }
  return prev;
}

inline void* ptr(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// Runs one step's gate kernel, or a decode step, (or their emulation) over the rows of the args.
struct Steps {
  c10::DeviceType device;
  std::function<void(int mode, DType, const StepFwdArgs&)> fwd;
  std::function<void(int mode, DType, const StepBwdArgs&)> bwd;
  std::function<void(int mode, DType, const DecodeArgs&)> decode;
};

inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layer_fwd(
    const Steps& steps, int64_t mode, const Tensor& x_, const OptTensor& batch_sizes, const Tensor& h0_,
    const OptTensor& c0_, const Tensor& w_ih_, const Tensor& w_hh_, const OptTensor& b_ih, const OptTensor& b_hh,
    const OptTensor& w_hr_, bool reverse, bool save) {
  TORCH_CHECK(mode >= LSTM && mode <= RNN_RELU, "rnnfast: unknown mode ", mode);
  TORCH_CHECK(x_.device().type() == steps.device, "rnnfast cuda backend: the input must be a ", steps.device,
              " tensor, got ", x_.device());
  check_tensor(x_, x_, "input", 3);
  check_tensor(h0_, x_, "h0", 2);
  check_tensor(w_ih_, x_, "weight_ih", 2);
  check_tensor(w_hh_, x_, "weight_hh", 2);
  const DType dt = dtype_code(x_.scalar_type());
  const int64_t T = x_.size(0), B = x_.size(1), I = x_.size(2), G = gates_of(mode);
  const int64_t H = w_hh_.size(0) / G, P = h0_.size(1);
  const bool proj = present(w_hr_), packed = present(batch_sizes), lstm = mode == LSTM, gru = mode == GRU;
  TORCH_CHECK(!proj || lstm, "rnnfast: proj_size is only supported for LSTM");
  TORCH_CHECK(!lstm || present(c0_), "rnnfast: LSTM needs c0");
  check_shape(w_ih_, {G * H, I}, "weight_ih");
  check_shape(w_hh_, {G * H, proj ? P : H}, "weight_hh");
  check_shape(h0_, {B, proj ? P : H}, "h0");
  if (lstm) {
    check_tensor(*c0_, x_, "c0", 2);
    check_shape(*c0_, {B, H}, "c0");
  }
  if (proj) {
    check_tensor(*w_hr_, x_, "weight_hr", 2);
    check_shape(*w_hr_, {P, H}, "weight_hr");
  }
  for (const OptTensor* b : {&b_ih, &b_hh}) {
    if (present(*b)) {
      check_tensor(**b, x_, "bias", 1);
      check_shape(**b, {G * H}, "bias");
    }
  }
  const std::vector<int64_t> bs = step_sizes(batch_sizes, T, B);

  const Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const auto opts = x.options();
  // input projection of every step, (T, B, G*H); GRU keeps b_hh apart for r * (W_hn h + b_hn)
  const Tensor x2 = x.view({T * B, I});
  Tensor gi = present(b_ih) ? at::addmm(gru ? *b_ih : *b_ih + *b_hh, x2, w_ih.t()) : at::mm(x2, w_ih.t());
  gi = gi.view({T, B, G * H});
  const Tensor b_hh_c = gru && present(b_hh) ? b_hh->contiguous() : Tensor();

  auto make = [&](at::IntArrayRef size) { return packed ? at::zeros(size, opts) : at::empty(size, opts); };
  Tensor out = make({T, B, P});
  Tensor h = h0_.contiguous().clone();
  Tensor c = lstm ? c0_->to(acc_type(x.scalar_type()), false, true).contiguous() : Tensor();
  Tensor ws1 = (lstm || gru) && save ? make({T, B, 4 * H}) : Tensor();
  Tensor ws2 = lstm && (save || proj) ? make({proj ? 2 : 1, T, B, H}) : Tensor();
  const Tensor w_hr = proj ? w_hr_->contiguous() : Tensor();
  Tensor gh = at::empty({B, G * H}, opts);

  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    const int64_t n = bs[t];
    if (n == 0) continue;
    Tensor gh_n = gh.narrow(0, 0, n);
    at::mm_out(gh_n, h.narrow(0, 0, n), w_hh.t());
    StepFwdArgs a{};
    a.n = n;
    a.H = H;
    a.gi = gi[t].data_ptr();
    a.gh = gh.data_ptr();
    a.b_hh = ptr(b_hh_c);
    a.h_state = proj ? nullptr : h.data_ptr();
    a.c = ptr(c);
    a.h_out = proj ? ws2[1][t].data_ptr() : out[t].data_ptr();
    a.ws = ws1.defined() ? ws1[t].data_ptr() : nullptr;
    a.cs = save && lstm ? ws2[0][t].data_ptr() : nullptr;
    steps.fwd(static_cast<int>(mode), dt, a);
    if (proj) {
      Tensor o = out[t].narrow(0, 0, n);
      at::mm_out(o, ws2[1][t].narrow(0, 0, n), w_hr.t());
      h.narrow(0, 0, n).copy_(o);
    }
  }
  const Tensor none = at::empty({0}, opts);
  return {out, h, lstm ? c.to(x.scalar_type()) : none, save && ws1.defined() ? ws1 : none,
          save && lstm ? ws2 : none};
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_bwd(
    const Steps& steps, int64_t mode, const Tensor& x_, const OptTensor& batch_sizes, const Tensor& h0,
    const OptTensor& c0, const Tensor& w_ih_, const Tensor& w_hh_, const OptTensor& w_hr_, bool has_bias, bool reverse,
    const Tensor& out, const Tensor& ws1, const Tensor& ws2, const Tensor& grad_out, const Tensor& grad_hn,
    const Tensor& grad_cn) {
  TORCH_CHECK(mode >= LSTM && mode <= RNN_RELU, "rnnfast: unknown mode ", mode);
  TORCH_CHECK(x_.device().type() == steps.device, "rnnfast cuda backend: the input must be a ", steps.device,
              " tensor, got ", x_.device());
  const DType dt = dtype_code(x_.scalar_type());
  const int64_t T = x_.size(0), B = x_.size(1), I = x_.size(2), G = gates_of(mode);
  const int64_t H = w_hh_.size(0) / G, P = h0.size(1);
  const bool proj = present(w_hr_), packed = present(batch_sizes), lstm = mode == LSTM, gru = mode == GRU;
  TORCH_CHECK(mode >= RNN_TANH || (ws1.dim() == 3 && ws1.size(2) == 4 * H),
              "rnnfast: layer_bwd needs what layer_fwd saves (save=True)");
  TORCH_CHECK(!lstm || (ws2.dim() == 4 && ws2.size(0) == (proj ? 2 : 1)),
              "rnnfast: layer_bwd needs what layer_fwd saves (save=True)");
  for (const Tensor* t : {&h0, &w_ih_, &w_hh_, &out, &grad_out, &grad_hn}) {
    check_tensor(*t, x_, "a saved tensor or gradient", t->dim());
  }
  check_shape(out, {T, B, P}, "output");
  check_shape(grad_out, {T, B, P}, "grad_output");
  check_shape(grad_hn, {B, P}, "grad_h_n");
  if (lstm) {
    check_tensor(*c0, x_, "c0", 2);
    check_shape(grad_cn, {B, H}, "grad_c_n");
  }
  const std::vector<int64_t> bs = step_sizes(batch_sizes, T, B);

  const Tensor x = x_.contiguous(), go = grad_out.contiguous(), w_hh = w_hh_.contiguous();
  const auto opts = x.options();
  const auto acc = acc_type(x.scalar_type());
  const Tensor none = at::empty({0}, opts);
  auto make = [&](at::IntArrayRef size) { return packed ? at::zeros(size, opts) : at::empty(size, opts); };
  const Tensor h_prev = previous_states(out, h0.contiguous(), bs, reverse);
  const Tensor cs = lstm ? ws2[0] : Tensor();
  const Tensor c_prev = lstm ? previous_states(cs, c0->contiguous(), bs, reverse) : Tensor();
  // gradient carries: dh reaches h_t (the projected state), dh_cell the cell's h before projection
  Tensor dh = grad_hn.to(acc, false, true).contiguous();
  Tensor dc = lstm ? grad_cn.to(acc, false, true).contiguous() : Tensor();
  Tensor dh_cell = proj ? at::zeros({B, H}, opts.dtype(acc)) : dh;
  Tensor dgi = make({T, B, G * H});
  Tensor dgh = gru ? make({T, B, G * H}) : dgi;
  Tensor dh_proj = proj ? make({T, B, P}) : Tensor();
  const Tensor w_hr = proj ? w_hr_->contiguous() : Tensor();

  for (int64_t s = T - 1; s >= 0; --s) {
    const int64_t t = reverse ? T - 1 - s : s;
    const int64_t n = bs[t];
    if (n == 0) continue;
    Tensor dh_act = dh.narrow(0, 0, n);
    if (proj) {  // through the projection: out = W_hr h_cell
      Tensor dp = dh_proj[t].narrow(0, 0, n);
      dp.copy_(dh_act + go[t].narrow(0, 0, n));
      dh_act.zero_();
      dh_cell.narrow(0, 0, n).copy_(at::mm(dp, w_hr));
    }
    StepBwdArgs a{};
    a.n = n;
    a.H = H;
    a.ws = lstm || gru ? ws1[t].data_ptr() : nullptr;
    a.cs = lstm ? cs[t].data_ptr() : nullptr;
    a.c_prev = lstm ? c_prev[t].data_ptr() : nullptr;
    a.h_prev = h_prev[t].data_ptr();
    a.h_t = out[t].data_ptr();
    a.g_out = proj ? nullptr : go[t].data_ptr();
    a.dh = dh_cell.data_ptr();
    a.dc = ptr(dc);
    a.dgi = dgi[t].data_ptr();
    a.dgh = dgh[t].data_ptr();
    steps.bwd(static_cast<int>(mode), dt, a);
    // the recurrent path: dh_{t-1} += dgh_t W_hh (in place when the carry has the input's dtype)
    const Tensor dgh_t = dgh[t].narrow(0, 0, n);
    if (acc == x.scalar_type()) {
      dh_act.addmm_(dgh_t, w_hh);
    } else {
      dh_act.add_(at::mm(dgh_t, w_hh));
    }
  }
  const Tensor x2 = x.view({T * B, I}), dgi2 = dgi.view({T * B, G * H}), dgh2 = dgh.view({T * B, G * H});
  Tensor dx = at::mm(dgi2, w_ih_.contiguous()).view({T, B, I});
  Tensor dw_ih = at::mm(dgi2.t(), x2);
  Tensor dw_hh = at::mm(dgh2.t(), h_prev.view({T * B, P}));
  Tensor db_ih = has_bias ? dgi2.sum(0) : none;
  Tensor db_hh = has_bias ? (gru ? dgh2.sum(0) : db_ih.clone()) : none;
  Tensor dw_hr = proj ? at::mm(dh_proj.view({T * B, P}).t(), ws2[1].reshape({T * B, H})) : none;
  return {dx, dh.to(x.scalar_type()), lstm ? dc.to(x.scalar_type()) : none, dw_ih, dw_hh, db_ih, db_hh, dw_hr};
}

// Decode weights: biases as one (2, G*H) tensor per layer ([b_ih; b_hh], zeros
// without bias) and contiguous copies of weights that are not contiguous (else
// undefined: the caller's tensors are used, and never kept alive here).
struct DecodeWeights {
  std::vector<Tensor> bias;
  std::vector<Tensor> copies;
};

inline WeightCache<DecodeWeights>& decode_cache() {
  static WeightCache<DecodeWeights> cache;
  return cache;
}

// Every layer of a unidirectional stack over T steps of B <= kDecodeMaxB rows, no
// autograd: one decode step per layer and step, states in new (L, B, H) tensors.
inline std::tuple<Tensor, Tensor, OptTensor> decode(const Steps& steps, int64_t mode,
                                                    const std::vector<Tensor>& weights, int64_t num_layers,
                                                    bool has_bias, const Tensor& x_, const Tensor& h0_,
                                                    const OptTensor& c0_) {
  TORCH_CHECK(mode >= LSTM && mode <= RNN_RELU, "rnnfast: unknown mode ", mode);
  TORCH_CHECK(x_.device().type() == steps.device, "rnnfast cuda decode: the input must be a ", steps.device,
              " tensor, got ", x_.device());
  check_tensor(x_, x_, "input", 3);
  check_tensor(h0_, x_, "h0", 3);
  const DType dt = dtype_code(x_.scalar_type());
  const bool lstm = mode == LSTM;
  const int64_t per = has_bias ? 4 : 2, G = gates_of(mode);
  const int64_t T = x_.size(0), B = x_.size(1), H = h0_.size(2), L = num_layers;
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(weights.size()) == per * L, "rnnfast cuda decode: expected ", per * L,
              " weights, got ", weights.size());
  TORCH_CHECK(B <= kDecodeMaxB, "rnnfast cuda decode: at most ", kDecodeMaxB, " rows, got a batch of ", B);
  check_shape(h0_, {L, B, H}, "h0");
  TORCH_CHECK(!lstm || present(c0_), "rnnfast: LSTM needs c0");
  if (lstm) {
    check_tensor(*c0_, x_, "c0", 3);
    check_shape(*c0_, {L, B, H}, "c0");
  }
  for (int64_t l = 0; l < L; ++l) {
    check_tensor(weights[l * per], x_, "weight_ih", 2);
    check_shape(weights[l * per], {G * H, l == 0 ? x_.size(2) : H}, "weight_ih");
    check_tensor(weights[l * per + 1], x_, "weight_hh", 2);
    check_shape(weights[l * per + 1], {G * H, H}, "weight_hh");
    for (int64_t k = 2; k < per; ++k) {
      check_tensor(weights[l * per + k], x_, "bias", 1);
      check_shape(weights[l * per + k], {G * H}, "bias");
    }
  }
  const DecodeWeights dw = decode_cache().get(weights, 0, [&] {
    at::NoGradGuard no_grad;
    DecodeWeights w;
    for (int64_t l = 0; l < L; ++l) {
      const Tensor& w_ih = weights[l * per];
      w.bias.push_back(has_bias ? at::stack({weights[l * per + 2], weights[l * per + 3]}).contiguous()
                                : at::zeros({2, G * H}, w_ih.options()));
      for (int64_t k = 0; k < 2; ++k) {
        const Tensor& wk = weights[l * per + k];
        w.copies.push_back(wk.is_contiguous() ? Tensor() : wk.contiguous());
      }
    }
    return w;
  });
  const Tensor x = x_.contiguous(), h0 = h0_.contiguous();
  const Tensor c0 = lstm ? c0_->contiguous() : Tensor();
  const auto opts = x.options();
  Tensor out = at::empty({T, B, H}, opts);
  Tensor mid = L > 1 ? at::empty({T, B, H}, opts) : Tensor();
  Tensor h_n = at::empty({L, B, H}, opts);
  Tensor c_n = lstm ? at::empty({L, B, H}, opts) : Tensor();
  const int64_t esize = x.element_size();
  auto at_row = [esize](const Tensor& t, int64_t offset) {
    return static_cast<void*>(static_cast<char*>(t.data_ptr()) + offset * esize);
  };

  Tensor in = x;
  int64_t in_size = x.size(2);
  for (int64_t l = 0; l < L; ++l) {
    // alternate between `mid` and `out` so that the last layer writes `out`
    const Tensor& dst = ((L - 1 - l) % 2 == 0) ? out : mid;
    const Tensor& w_ih = dw.copies[2 * l].defined() ? dw.copies[2 * l] : weights[l * per];
    const Tensor& w_hh = dw.copies[2 * l + 1].defined() ? dw.copies[2 * l + 1] : weights[l * per + 1];
    for (int64_t t = 0; t < T; ++t) {
      DecodeArgs a{};
      a.B = B;
      a.I = in_size;
      a.H = H;
      a.w_ih = w_ih.data_ptr();
      a.w_hh = w_hh.data_ptr();
      a.bias = dw.bias[l].data_ptr();
      a.x = at_row(in, t * B * in_size);
      a.h_in = t == 0 ? at_row(h0, l * B * H) : at_row(dst, (t - 1) * B * H);
      a.h_out = at_row(dst, t * B * H);
      a.h_out2 = t == T - 1 ? at_row(h_n, l * B * H) : nullptr;
      a.c_in = lstm ? (t == 0 ? at_row(c0, l * B * H) : at_row(c_n, l * B * H)) : nullptr;
      a.c_out = lstm ? at_row(c_n, l * B * H) : nullptr;
      steps.decode(static_cast<int>(mode), dt, a);
    }
    in = dst;
    in_size = H;
  }
  if (T == 0) {
    h_n.copy_(h0);
    if (lstm) c_n.copy_(c0);
  }
  return {out, h_n, lstm ? OptTensor(c_n) : c10::nullopt};
}

}  // namespace rnnfast::cuda
