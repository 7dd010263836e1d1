// The one switch over LSTM / GRU / RNN of the CPU loops: a row's gate update, forward
// and backward, the mode as a constant for code built per mode (with_mode), and where
// each mode adds its biases. Every loop (stepwise, fused, decode) calls these, so a new
// mode or element type is added here once.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels.h"

namespace rnnfast {

// Forward gate update of units [0, n) of one row (gate q of unit j at q * H + j).
// gi, gh: input and recurrent pre-activations; h_prev: the state the step started from
// (GRU); c: the running cell state (LSTM), updated in place, and also stored to c_save
// when that is not null; ws: the row's gates, kept for backward (LSTM may pass gi);
// h_out: the new state.
template <typename T>
inline void gate_forward(int64_t mode, const T* gi, const T* gh, const T* h_prev, T* c, T* c_save, T* ws, T* h_out,
                         int64_t n, int64_t H) {
  switch (mode) {
    case LSTM:
      lstm_fwd(gi, gh, c, ws, c_save != nullptr ? c_save : c, h_out, n, H);
      if (c_save != nullptr) std::memcpy(c, c_save, n * sizeof(T));
      return;
    case GRU:
      return gru_fwd(gi, gh, h_prev, ws, h_out, n, H);
    default:
      return rnn_fwd(gi, gh, h_out, mode == RNN_RELU, n);
  }
}

// f(std::integral_constant<int64_t, mode>{}): the mode as a constant, for code instantiated per mode (the
// fused loop's step tiles).
template <typename F>
inline decltype(auto) with_mode(int64_t mode, F&& f) {
  switch (mode) {
    case LSTM:
      return f(std::integral_constant<int64_t, LSTM>{});
    case GRU:
      return f(std::integral_constant<int64_t, GRU>{});
    case RNN_TANH:
      return f(std::integral_constant<int64_t, RNN_TANH>{});
    default:
      TORCH_CHECK(mode == RNN_RELU, "rnnfast: unknown mode ", mode);
      return f(std::integral_constant<int64_t, RNN_RELU>{});
  }
}

// Backward gate update of units [0, n) of one row. ws: the gates the forward saved;
// c, c_prev: the row's cell state after and before the step (LSTM); h_prev: the state
// before the step (GRU); h: the state after it (RNN); dh: the gradient w.r.t. the row's
// output (GRU overwrites it with its direct part); dc: the running cell gradient (LSTM);
// dgi, dgh: the pre-activation gradients (dgh only for GRU, others write dgi alone).
template <typename T>
inline void gate_backward(int64_t mode, const T* ws, const T* c, const T* c_prev, const T* h_prev, const T* h, T* dh,
                          T* dc, T* dgi, T* dgh, int64_t n, int64_t H) {
  switch (mode) {
    case LSTM:
      return lstm_bwd(ws, c, c_prev, dh, dc, dgi, n, H);
    case GRU:
      return gru_bwd(ws, h_prev, dh, dgi, dgh, n, H);
    default:
      return rnn_bwd(h, dh, dgi, mode == RNN_RELU, n);
  }
}

// The biases as the loops add them, (input side, recurrent side), undefined where none:
// the input projection takes b_ih + b_hh, except for GRU, whose b_hn sits inside
// r * (W_hn h + b_hn) and so stays with the recurrent product.
inline std::pair<at::Tensor, at::Tensor> split_biases(int64_t mode, const at::Tensor& b_ih, const at::Tensor& b_hh) {
  if (!b_ih.defined()) return {};
  if (mode == GRU) return {b_ih, b_hh};
  if (b_ih.scalar_type() == at::kBFloat16) return {b_ih.to(at::kFloat) + b_hh.to(at::kFloat), at::Tensor()};  // one rounding
  return {b_ih + b_hh, at::Tensor()};
}

}  // namespace rnnfast
