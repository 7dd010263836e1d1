// One recurrent layer, one direction, over a whole (optionally packed) sequence:
// forward and backward, registered as the operators rnnfast::layer_fwd / layer_bwd.
//
// float32 without proj_size on AVX-512 CPUs, and bfloat16 without proj_size on AVX512-BF16
// CPUs, run the fused loops of recurrent.cpp. The outputs and states take h0's dtype: bfloat16
// input with float32 states (autocast's GRU, packed LSTM, LSTMCell, GRUCell) runs its products
// in bfloat16 and returns float32. float16, and bfloat16 on CPUs without AVX512-BF16, run the
// float32 loops on widened copies (widen, below). Everything else (float64, proj_size, narrower CPUs;
// bfloat16 there runs in float32, its products in bfloat16 on AVX512-BF16 CPUs) runs the stepwise loop here:
// one GEMM projects the input of every step; each step adds one GEMM call for the
// recurrent term and one fused pointwise pass. Its backward walks the steps in
// reverse with fused gate gradients and forms the weight gradients as single GEMMs
// over all steps at the end.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <numeric>
#include <tuple>
#include <vector>

#include "checks.h"
#include "dispatch.h"
#include "kernels.h"
#include "layer.h"

namespace rnnfast {
namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

// Rows per parallel chunk so that each chunk has enough elements to pay for a thread.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)); }

// State before each step: h_prev[t] is the state step t started from. Rows of a
// reverse packed sequence that were inactive at t + 1 still hold the initial state.
Tensor previous_states(const Tensor& all, const Tensor& init, const std::vector<int64_t>& bs, bool reverse) {
  const int64_t T = all.size(0);
  Tensor prev = at::empty_like(all);
  if (!reverse) {
    prev[0].copy_(init);
    if (T > 1) prev.narrow(0, 1, T - 1).copy_(all.narrow(0, 0, T - 1));
    return prev;
  }
  prev[T - 1].copy_(init);
  for (int64_t t = 0; t + 1 < T; ++t) {
    const int64_t m = bs[t + 1], B = all.size(1);
    if (m > 0) prev[t].narrow(0, 0, m).copy_(all[t + 1].narrow(0, 0, m));
    if (m < B) prev[t].narrow(0, m, B - m).copy_(init.narrow(0, m, B - m));
  }
  return prev;
}

// bfloat16 where the fused bfloat16 loops do not run (no AVX512-BF16, proj_size), and float16 always:
// the float32 loops on widened copies, results rounded back to the dtypes of the tensors they belong
// to; the float32 fused loop packs bfloat16 and float16 weights itself (once, into its cache; widened
// copies would be new tensors each call, packed again each call), and so do the stepwise loop's
// bfloat16 products (weight_product) on AVX512-BF16 CPUs. What the forward saves is float32 either way.
Tensor widen(const Tensor& t) { return t.defined() && widened_dtype(t.scalar_type()) ? t.to(at::kFloat) : t; }
OptTensor widen(const OptTensor& t) { return present(t) ? OptTensor(widen(*t)) : t; }
Tensor narrow_to(const Tensor& t, const Tensor& like) { return t.to(like.scalar_type()); }

// A step's recurrent product (and projection) runs with the GEMV kernel when the
// batch is tiny or the product is: the GEMV reads the weight once per row, so past
// two rows a GEMM call (which reads it once per step) pays for its overhead.
constexpr int64_t kGemvMaxRows = 2;
constexpr int64_t kSmallStep = int64_t(1) << 16;
bool gemv_step(int64_t rows, int64_t macs) { return rows <= kGemvMaxRows || macs <= kSmallStep; }

// The stepwise loop's weight products, a @ w^T (transposed: a @ w) (+ bias): on the weights as they are,
// or with low (bfloat16 on AVX512-BF16 CPUs, the loop itself in float32) in bfloat16 over the weights'
// cached panels, float32 sums (bf16_product): widened weights and float32 GEMMs ran bfloat16 LSTM
// proj_size at 0.41-0.95x torch.nn's bfloat16 (bench/results/2026-12-07-cpu-amd-bf16-proj-ab.md).
Tensor weight_product(bool low, const Tensor& a, const Tensor& w, bool transposed,
                      const OptTensor& bias = c10::nullopt) {
  return low ? bf16_product(a, w, transposed, bias) : matmul_nt(a, transposed ? w.t() : w, bias);
}
// The weight gradients, a @ b^T over all steps' rows with both read transposed: ATen's GEMM (bfloat16 with
// low). oneDNN's linear (matmul_nt) took these layouts 1.0-2.7x as long on the AMD EPYC, 11-22x at one input
// feature (bench/results/2026-12-07-cpu-amd-stepwise-bwd-ab.md).
Tensor outer_product(bool low, const Tensor& a, const Tensor& b) {
  return low ? at::mm(a.to(at::kBFloat16), b.to(at::kBFloat16).t()) : at::mm(a, b.t());
}

// A packed sequence's rows that its steps run, as one matrix, and back to (T, B, ...) with zeros past each
// sequence's end: the stepwise loop's products over all steps (input projection, dx, weight gradients)
// take those rows alone, as torch.nn's do (LSTM proj_size packed training, lengths 1-T: T5 B48 H1024
// bfloat16 0.82x -> 1.00x torch.nn, float32 0.96x -> 1.22x, T100 B64 H256 1.27x -> 1.70x;
// bench/results/2026-12-07-cpu-amd-packed-stepwise-ab.md). Unpacked, or every sequence full: every row.
struct StepRows {
  const std::vector<int64_t>& bs;
  int64_t T, B;
  bool compact = std::accumulate(bs.begin(), bs.end(), int64_t(0)) < T * B;

  Tensor of(const Tensor& steps) const {
    return compact ? pack_steps(steps, bs) : steps.reshape({T * B, steps.size(2)});
  }
  Tensor back(const Tensor& rows) const { return compact ? pad_steps(rows, bs, B) : rows.view({T, B, rows.size(1)}); }
};

// the stepwise loop: one GEMM call per step (double, proj_size, CPUs without AVX-512; low: bfloat16's
// products, see weight_product); bs: batch_sizes' steps (step_sizes); it computes what backward needs
// either way and returns it only with save
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> stepwise_fwd(int64_t mode, const Tensor& x_,
                                                                const OptTensor& batch_sizes,
                                                                const std::vector<int64_t>& bs, const Tensor& h0_,
                                                                const OptTensor& c0_, const Tensor& w_ih_,
                                                                const Tensor& w_hh_, const OptTensor& b_ih,
                                                                const OptTensor& b_hh, const OptTensor& w_hr_,
                                                                bool reverse, bool save, bool low) {
  const int64_t T = x_.size(0), B = x_.size(1), G = gate_count(mode);
  const int64_t H = w_hh_.size(0) / G, P = h0_.size(1);
  const bool proj = present(w_hr_), packed = present(batch_sizes), lstm = mode == LSTM;
  const Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const auto [b_in, b_rec] =
      split_biases(mode, present(b_ih) ? *b_ih : Tensor(), given(b_hh));
  // input projection of every step, (T, B, G*H)
  const StepRows rows{bs, T, B};
  Tensor gi = rows.back(weight_product(low, rows.of(x), w_ih, false, b_in.defined() ? OptTensor(b_in) : c10::nullopt));

  const auto opts = x.options();
  Tensor out = packed ? at::zeros({T, B, P}, opts) : at::empty({T, B, P}, opts);
  Tensor h = h0_.contiguous().clone();
  Tensor c = lstm ? c0_->contiguous().clone() : at::empty({0}, opts);
  Tensor ws1 = mode == GRU ? at::empty({T, B, 4 * H}, opts) : (lstm ? gi : at::empty({0}, opts));
  Tensor ws2 = lstm ? (packed ? at::zeros({proj ? 2 : 1, T, B, H}, opts) : at::empty({proj ? 2 : 1, T, B, H}, opts))
                    : at::empty({0}, opts);
  const Tensor w_hr = proj ? w_hr_->contiguous() : Tensor();
  // (the GEMV kernel reads the weights in the loop's dtype: not for bfloat16 products)
  const bool small = !low && gemv_step(B, B * G * H * P), small_proj = !low && proj && gemv_step(B, B * H * P);
  Tensor gh = small ? at::empty({B, G * H}, opts) : Tensor();
  const Tensor cs = lstm ? ws2[0] : Tensor();
  const Tensor hp = proj ? ws2[1] : Tensor();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnfast_layer_fwd", [&] {
    const Rows<scalar_t> gi_r(gi), out_r(out), cs_r(cs), hp_r(hp), ws1_r(ws1);
    for (int64_t s = 0; s < T; ++s) {
      const int64_t t = reverse ? T - 1 - s : s;
      const int64_t n = bs[t];
      if (n == 0) continue;
      if (small) {
        const scalar_t* bias = b_rec.defined() ? b_rec.data_ptr<scalar_t>() : nullptr;
        gemv_rows<scalar_t, scalar_t>(h.data_ptr<scalar_t>(), n, P, w_hh.data_ptr<scalar_t>(), G * H, bias,
                                      gh.data_ptr<scalar_t>());
      } else {
        gh = weight_product(low, h.narrow(0, 0, n), w_hh, false, b_rec.defined() ? OptTensor(b_rec) : c10::nullopt)
                 .contiguous();
      }
      const scalar_t* ghs = gh.data_ptr<scalar_t>();
      scalar_t* hs = h.data_ptr<scalar_t>();
      at::parallel_for(0, n, row_grain(G * H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          scalar_t* h_out = proj ? hp_r(t, b) : out_r(t, b);
          scalar_t* c_state = lstm ? c.data_ptr<scalar_t>() + b * H : nullptr;
          gate_forward(mode, gi_r(t, b), ghs + b * G * H, hs + b * P, c_state, lstm ? cs_r(t, b) : nullptr,
                       lstm ? gi_r(t, b) : ws1_r(t, b), h_out, H, H);
          if (!proj) std::memcpy(hs + b * P, h_out, P * sizeof(scalar_t));
        }
      });
      if (proj && small_proj) {
        gemv_rows<scalar_t, scalar_t>(hp_r(t, 0), n, H, w_hr.data_ptr<scalar_t>(), P, nullptr, out_r(t, 0));
        std::memcpy(hs, out_r(t, 0), n * P * sizeof(scalar_t));
      } else if (proj) {
        const Tensor o = weight_product(low, hp[t].narrow(0, 0, n), w_hr, false);
        out[t].narrow(0, 0, n).copy_(o);
        h.narrow(0, 0, n).copy_(o);
      }
    }
  });
  const Tensor none = at::empty({0}, opts);
  return {out, h, c, save ? ws1 : none, save ? ws2 : none};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> stepwise_bwd(
    int64_t mode, const Tensor& x_, const OptTensor& batch_sizes, const std::vector<int64_t>& bs, const Tensor& h0,
    const OptTensor& c0, const Tensor& w_ih_, const Tensor& w_hh_, const OptTensor& w_hr_, bool has_bias,
    bool reverse, const Tensor& out, const Tensor& ws1, const Tensor& ws2, const Tensor& grad_out,
    const Tensor& grad_hn, const Tensor& grad_cn, bool low, const Needs& needs) {
  const int64_t T = x_.size(0), B = x_.size(1), G = gate_count(mode);
  const int64_t H = w_hh_.size(0) / G, P = h0.size(1);
  const bool proj = present(w_hr_), packed = present(batch_sizes), lstm = mode == LSTM, gru = mode == GRU;
  const Tensor x = x_.contiguous(), go = grad_out.contiguous();
  const auto opts = x.options();
  const Tensor none = at::empty({0}, opts);
  auto make = [&](at::IntArrayRef size) { return packed ? at::zeros(size, opts) : at::empty(size, opts); };
  const Tensor cs = lstm ? ws2[0] : Tensor();
  Tensor dh = grad_hn.contiguous().clone();
  Tensor dc = lstm ? grad_cn.contiguous().clone() : none;
  Tensor dgi = make({T, B, G * H});
  Tensor dgh = gru ? make({T, B, G * H}) : dgi;
  const Tensor h_prev = previous_states(out, h0.contiguous(), bs, reverse);
  const Tensor hp = proj ? ws2[1] : Tensor();
  const Tensor c_prev = lstm ? previous_states(cs, c0->contiguous(), bs, reverse) : Tensor();
  // gradient w.r.t. the projected output, for dW_hr
  Tensor dh_proj = proj && needs.dw ? make({T, B, P}) : Tensor();
  const bool small = !low && gemv_step(B, B * G * H * P), small_proj = !low && proj && gemv_step(B, B * H * P);
  // the transposed weights as contiguous copies for the GEMV kernel; GEMM calls read them in place (a
  // transposed copy of a (2048, 128) matrix took ~0.75 ms here)
  const Tensor w_hh_t = small ? w_hh_.t().contiguous() : Tensor();
  const Tensor w_hr_t = small_proj ? w_hr_->t().contiguous() : Tensor();
  Tensor dhp = small_proj ? at::empty({B, H}, opts) : Tensor();
  Tensor dh_rec = small ? at::empty({B, P}, opts) : Tensor();

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnfast_layer_bwd", [&] {
    const Rows<scalar_t> ws1_r(ws1), cs_r(cs), c_prev_r(c_prev), h_prev_r(h_prev), out_r(out), dgi_r(dgi), dgh_r(dgh);
    for (int64_t s = T - 1; s >= 0; --s) {
      const int64_t t = reverse ? T - 1 - s : s;
      const int64_t n = bs[t];
      if (n == 0) continue;
      Tensor dh_act = dh.narrow(0, 0, n);
      dh_act.add_(go[t].narrow(0, 0, n));
      if (proj) {
        if (needs.dw) dh_proj[t].narrow(0, 0, n).copy_(dh_act);
        if (small_proj) {
          gemv_rows<scalar_t, scalar_t>(dh_act.data_ptr<scalar_t>(), n, P, w_hr_t.data_ptr<scalar_t>(), H, nullptr,
                                    dhp.data_ptr<scalar_t>());
        } else {
          dhp = weight_product(low, dh_act, *w_hr_, true).contiguous();
        }
      }
      const Tensor& d_src = proj ? dhp : dh;
      at::parallel_for(0, n, row_grain(G * H), [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          gate_backward(mode, ws1_r(t, b), cs_r(t, b), c_prev_r(t, b), h_prev_r(t, b), out_r(t, b),
                        d_src.data_ptr<scalar_t>() + b * H, lstm ? dc.data_ptr<scalar_t>() + b * H : nullptr,
                        dgi_r(t, b), dgh_r(t, b), H, H);
        }
      });
      if (s == 0 && !needs.dh0) break;  // dh0 = dgh W_hh: not asked for
      if (small) {
        gemv_rows<scalar_t, scalar_t>(dgh_r(t, 0), n, G * H, w_hh_t.data_ptr<scalar_t>(), P, nullptr,
                        dh_rec.data_ptr<scalar_t>());
      } else {
        dh_rec = weight_product(low, dgh[t].narrow(0, 0, n), w_hh_, true);
      }
      const Tensor dh_rec_act = dh_rec.narrow(0, 0, n);
      if (gru) {
        dh_act.add_(dh_rec_act);
      } else {
        dh_act.copy_(dh_rec_act);
      }
    }
  });
  if (!needs.dh0) dh.zero_();
  // what is not asked for comes back zero, as from the fused loop: no GEMM over all steps for it (an LSTM
  // proj_size's first layer on data: dx; frozen weights: the weight gradients)
  const StepRows rows{bs, T, B};
  const Tensor dgi_rows = rows.of(dgi), dgh_rows = gru ? rows.of(dgh) : dgi_rows;
  Tensor dx = needs.dx ? rows.back(weight_product(low, dgi_rows, w_ih_, true)) : at::zeros_like(x);
  Tensor db_ih = has_bias ? dgi_rows.sum(0) : none;
  Tensor db_hh = has_bias ? (gru ? dgh_rows.sum(0) : db_ih.clone()) : none;
  if (!needs.dw) {
    auto zero = [&](const Tensor& w) { return at::zeros(w.sizes(), opts); };
    return {dx, dh, dc, zero(w_ih_), zero(w_hh_), db_ih, db_hh, proj ? zero(*w_hr_) : none};
  }
  // Sums over all steps, dgi^T x: both operands read transposed in place, and the result comes out in
  // the weight's own layout
  Tensor dw_ih = outer_product(low, dgi_rows.t(), rows.of(x).t());
  Tensor dw_hh = outer_product(low, dgh_rows.t(), rows.of(h_prev).t());
  Tensor dw_hr = proj ? outer_product(low, rows.of(dh_proj).t(), rows.of(hp).t()) : none;
  return {dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh, dw_hr};
}

// Off the fused loops the stepwise loop's weight products run in bfloat16 for bfloat16 input on
// AVX512-BF16 CPUs (bf16), the weights as they are; else in float32, the weights widened.
bool bf16_products(const Tensor& x) { return x.scalar_type() == at::kBFloat16 && kHasAvx512Bf16; }
template <typename W>
W for_products(const W& w, bool bf16) { return bf16 ? w : widen(w); }

// The operators run in the dtypes they are given, whatever autocast is on around them (a backward called
// inside the autocast block, a direct call): the stepwise loop's products go through ATen, whose GEMMs autocast
// would otherwise take to bfloat16 after a float32 forward.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layer_fwd(int64_t mode, const Tensor& x_,
                                                             const OptTensor& batch_sizes, const Tensor& h0_,
                                                             const OptTensor& c0_, const Tensor& w_ih_,
                                                             const Tensor& w_hh_, const OptTensor& b_ih,
                                                             const OptTensor& b_hh, const OptTensor& w_hr_,
                                                             bool reverse, bool save) {
  const NoAutocast no_autocast;
  check_layer_fwd(mode, x_, batch_sizes, h0_, c0_, w_ih_, w_hh_, b_ih, b_hh, w_hr_);
  const bool proj = present(w_hr_), packed = present(batch_sizes), lstm = mode == LSTM;
  const std::vector<int64_t> bs = step_sizes(batch_sizes, x_.size(0), x_.size(1));

  const Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  if (widened_dtype(x.scalar_type()) && !fused_loop_supported(x, proj)) {
    const Tensor xf = widen(x);
    if (!proj && fused_loop_supported(xf, false)) {  // the float32 fused loop packs the weights as they are
      const auto [out, h, c, ws1, ws2] =
          fused_layer_fwd(mode, xf, bs, packed, widen(h0_), lstm ? widen(*c0_) : Tensor(), w_ih, w_hh,
                          given(b_ih), given(b_hh), reverse, save);
      return {narrow_to(out, h0_), narrow_to(h, h0_), narrow_to(c, h0_), ws1, ws2};
    }
    const bool bf16 = bf16_products(x);
    const auto [out, h, c, ws1, ws2] =
        stepwise_fwd(mode, xf, batch_sizes, bs, widen(h0_), widen(c0_), for_products(w_ih, bf16),
                     for_products(w_hh, bf16), widen(b_ih), widen(b_hh), for_products(w_hr_, bf16), reverse, save,
                     bf16);
    return {narrow_to(out, h0_), narrow_to(h, h0_), narrow_to(c, h0_), ws1, ws2};
  }
  if (fused_loop_supported(x, proj)) {
    return fused_layer_fwd(mode, x, bs, packed, h0_, lstm ? *c0_ : Tensor(), w_ih, w_hh, given(b_ih), given(b_hh),
                           reverse, save);
  }
  return stepwise_fwd(mode, x, batch_sizes, bs, h0_, c0_, w_ih, w_hh, b_ih, b_hh, w_hr_, reverse, save, false);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> layer_bwd(
    int64_t mode, const Tensor& x_, const OptTensor& batch_sizes, const Tensor& h0, const OptTensor& c0,
    const Tensor& w_ih_, const Tensor& w_hh_, const OptTensor& w_hr_, bool has_bias, bool reverse, const Tensor& out,
    const Tensor& ws1, const Tensor& ws2, const Tensor& grad_out, const Tensor& grad_hn, const Tensor& grad_cn,
    bool need_dx, bool need_dh0, bool need_dw) {
  const NoAutocast no_autocast;
  const Needs needs{need_dx, need_dh0, need_dw};
  check_layer_bwd(mode, x_, batch_sizes, h0, c0, w_ih_, w_hh_, w_hr_, has_bias, out, ws1, ws2, grad_out, grad_hn,
                  grad_cn);
  const std::vector<int64_t> bs = step_sizes(batch_sizes, x_.size(0), x_.size(1));
  if (widened_dtype(x_.scalar_type()) && !fused_loop_supported(x_, present(w_hr_))) {
    const Tensor none = at::empty({0}, x_.options()), xf = widen(x_);
    const bool bf16 = bf16_products(x_);
    if (!present(w_hr_) && fused_loop_supported(xf, false)) {  // the float32 fused loop, weights as they are
      const bool lstm = mode == LSTM;
      const auto [dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh] = fused_layer_bwd(
          mode, xf.contiguous(), bs, present(batch_sizes),
          widen(h0).contiguous(), lstm ? widen(*c0).contiguous() : Tensor(), w_ih_.contiguous(), w_hh_.contiguous(),
          has_bias, reverse, widen(out), ws1, ws2, widen(grad_out).contiguous(), widen(grad_hn), widen(grad_cn),
          needs);
      return {narrow_to(dx, x_),          narrow_to(dh0, h0),         lstm ? narrow_to(dc0, *c0) : none, dw_ih, dw_hh,
              has_bias ? db_ih : none, has_bias ? db_hh : none, none};  // absent ones empty in x's dtype
    }
    const auto [dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh, dw_hr] =
        stepwise_bwd(mode, xf, batch_sizes, bs, widen(h0), widen(c0), for_products(w_ih_, bf16),
                     for_products(w_hh_, bf16), for_products(w_hr_, bf16), has_bias, reverse, widen(out), ws1, ws2,
                     widen(grad_out), widen(grad_hn), widen(grad_cn), bf16, needs);
    // absent gradients as the fused loop returns them: empty, in x's dtype
    auto back = [&](const Tensor& t, const OptTensor& like, bool there = true) {
      return there && present(like) ? narrow_to(t, *like) : none;
    };
    return {narrow_to(dx, x_),       narrow_to(dh, h0),
            back(dc, c0),            narrow_to(dw_ih, w_ih_),
            narrow_to(dw_hh, w_hh_), back(db_ih, w_ih_, has_bias),
            back(db_hh, w_ih_, has_bias), back(dw_hr, w_hr_)};
  }
  const bool proj = present(w_hr_), packed = present(batch_sizes), lstm = mode == LSTM;
  const Tensor x = x_.contiguous(), go = grad_out.contiguous();
  const Tensor none = at::empty({0}, x.options());
  if (fused_loop_supported(x, proj)) {
    const auto [dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh] =
        fused_layer_bwd(mode, x, bs, packed, h0.contiguous(), lstm ? c0->contiguous() : none, w_ih_, w_hh_, has_bias,
                        reverse, out, ws1, ws2, go, grad_hn, grad_cn, needs);
    return {dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, none};
  }
  return stepwise_bwd(mode, x_, batch_sizes, bs, h0, c0, w_ih_, w_hh_, w_hr_, has_bias, reverse, out, ws1, ws2,
                      grad_out, grad_hn, grad_cn, false, needs);
}

}  // namespace

TORCH_LIBRARY(rnnfast, m) {
  m.def(
      "layer_fwd(int mode, Tensor x, Tensor? batch_sizes, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool reverse, bool save) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def(
      "layer_bwd(int mode, Tensor x, Tensor? batch_sizes, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, "
      "Tensor? w_hr, bool has_bias, bool reverse, Tensor out, Tensor ws1, Tensor ws2, Tensor grad_out, "
      "Tensor grad_hn, Tensor grad_cn, bool need_dx=True, bool need_dh0=True, bool need_dw=True) -> (Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

static_assert(std::is_same_v<decltype(layer_fwd), LayerFwdSignature>);
static_assert(std::is_same_v<decltype(layer_bwd), LayerBwdSignature>);

TORCH_LIBRARY_IMPL(rnnfast, CPU, m) {
  m.impl("layer_fwd", &layer_fwd);
  m.impl("layer_bwd", &layer_bwd);
}

}  // namespace rnnfast
