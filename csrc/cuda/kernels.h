// Launchers of the CUDA gate kernels (step.cu, decode.cu), callable from host C++
// without CUDA or torch headers: raw pointers, a dtype code and the stream to run
// on. The host code (loop.h) checks every shape, device and dtype before it calls
// them; the binding (layer.cpp) checks each launch (C10_CUDA_KERNEL_LAUNCH_CHECK).
#pragma once

#include <cstdint>

struct CUstream_st;

namespace rnnfast::cuda {

using Stream = CUstream_st*;  // cudaStream_t

// The element type of every dtype-typed pointer below. Accumulators, the LSTM cell
// state and the gradient carries are float (double for F64): "acc" pointers.
enum class DType : int { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

// Modes as in rnnfast.backend.MODES.
enum Mode : int { LSTM = 0, GRU = 1, RNN_TANH = 2, RNN_RELU = 3 };

// One forward step over rows [0, n). Row b reads gi + b*G*H (input projection,
// biases folded in except GRU's b_hh), gh + b*G*H (W_hh h_prev, no bias) and, for
// GRU, b_hh (G*H, may be null) and h_state (row stride H, the state being
// replaced); LSTM reads and replaces c (acc, row stride H). Writes h_out (row
// stride H) and, when not null, h_state; ws (4H per row: LSTM i,f,g,o; GRU r,z,n,
// W_hn h + b_hn) and cs (LSTM c_t, row stride H) when not null.
struct StepFwdArgs {
  int64_t n, H;
  const void* gi;
  const void* gh;
  const void* b_hh;
  void* h_state;
  void* c;
  void* h_out;
  void* ws;
  void* cs;
};

// One backward step over rows [0, n), the inverse of a forward step. dh (acc, row
// stride H) holds the gradient reaching h_t from later steps; g_out (row stride H,
// may be null) the output's; dh is replaced by the part that flows to h_{t-1}
// directly (GRU: z * dh, else 0), the recurrent GEMM adds the rest. LSTM reads ws,
// cs, c_prev and updates dc (acc); GRU reads ws and h_prev; RNN reads h_t. Writes
// dgi (G*H per row) and, for GRU, dgh (the recurrent pre-activation gradient, which
// differs from dgi in the n gate).
struct StepBwdArgs {
  int64_t n, H;
  const void* ws;
  const void* cs;
  const void* c_prev;
  const void* h_prev;
  const void* h_t;
  const void* g_out;
  void* dh;
  void* dc;
  void* dgi;
  void* dgh;
};

// One decode step of one layer for B <= kDecodeMaxB rows: gates from W_ih x + W_hh
// h_in + biases (w_ih (G*H, I), w_hh (G*H, H), bias (2, G*H) = [b_ih; b_hh], all
// contiguous), each weight row read once for all rows; writes h_out and, when not
// null, h_out2 (both (B, H)); LSTM reads c_in and writes c_out (may alias).
struct DecodeArgs {
  int64_t B, I, H;
  const void* w_ih;
  const void* w_hh;
  const void* bias;
  const void* x;
  const void* h_in;
  const void* c_in;
  void* h_out;
  void* h_out2;
  void* c_out;
};
constexpr int64_t kDecodeMaxB = 4;

void step_fwd(int mode, DType dtype, const StepFwdArgs& a, Stream stream);
void step_bwd(int mode, DType dtype, const StepBwdArgs& a, Stream stream);
void decode_step(int mode, DType dtype, const DecodeArgs& a, Stream stream);

}  // namespace rnnfast::cuda
