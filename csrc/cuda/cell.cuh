// The cell math of the CUDA kernels, one (row, hidden unit) element at a time:
// storage <-> accumulator conversion, the activations, the forward and backward
// step of each mode, and the one switch from (mode, dtype) codes to template
// arguments. No torch headers, so the kernels compile in seconds; host-callable
// too (g++ with the CUDA include folder), so tests/cuda_emulate.cpp runs the same
// element functions and the same host loop (loop.h) on the CPU.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kernels.h"

#ifdef __CUDACC__
#define RNNFAST_HD __host__ __device__ __forceinline__
#else
#define RNNFAST_HD inline
#endif

namespace rnnfast::cuda {

// Storage type T, accumulator type Acc<T> (float, double for double).
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

RNNFAST_HD float load(const float* p) { return *p; }
RNNFAST_HD double load(const double* p) { return *p; }
RNNFAST_HD float load(const __half* p) { return __half2float(*p); }
RNNFAST_HD float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

RNNFAST_HD void store(float* p, float v) { *p = v; }
RNNFAST_HD void store(double* p, double v) { *p = v; }
RNNFAST_HD void store(__half* p, float v) { *p = __float2half_rn(v); }
RNNFAST_HD void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

RNNFAST_HD float sigmoid(float x) {
#ifdef __CUDA_ARCH__
  return 1.f / (1.f + __expf(-x));
#else
  return 1.f / (1.f + ::expf(-x));
#endif
}
RNNFAST_HD double sigmoid(double x) { return 1.0 / (1.0 + ::exp(-x)); }
RNNFAST_HD float tanh_(float x) { return ::tanhf(x); }
RNNFAST_HD double tanh_(double x) { return ::tanh(x); }

#ifdef __CUDACC__
__host__ __device__
#endif
constexpr int gate_count(int mode) { return mode == LSTM ? 4 : (mode == GRU ? 3 : 1); }

// Calls f.template operator()<T, MODE>() for the runtime (mode, dtype): the one
// place where the codes become types.
template <typename F>
void dispatch(int mode, DType dtype, F&& f) {
  auto by_mode = [&](auto tag) {
    using T = decltype(tag);
    switch (mode) {
      case LSTM: return f.template operator()<T, LSTM>();
      case GRU: return f.template operator()<T, GRU>();
      case RNN_TANH: return f.template operator()<T, RNN_TANH>();
      default: return f.template operator()<T, RNN_RELU>();
    }
  };
  switch (dtype) {
    case DType::F32: return by_mode(float{});
    case DType::F64: return by_mode(double{});
    case DType::F16: return by_mode(__half{});
    default: return by_mode(__nv_bfloat16{});
  }
}

// Forward step of element idx = b * H + j (see StepFwdArgs).
template <typename T, int MODE>
RNNFAST_HD void step_fwd_elem(const StepFwdArgs& a, int64_t idx) {
  constexpr int G = gate_count(MODE);
  using A = Acc<T>;
  const int64_t H = a.H, b = idx / H, j = idx - b * H;
  const T* gi = static_cast<const T*>(a.gi) + b * G * H + j;
  const T* gh = static_cast<const T*>(a.gh) + b * G * H + j;
  const int64_t hj = b * H + j;
  A h;
  if constexpr (MODE == LSTM) {
    const A i = sigmoid(load(gi) + load(gh));
    const A f = sigmoid(load(gi + H) + load(gh + H));
    const A g = tanh_(load(gi + 2 * H) + load(gh + 2 * H));
    const A o = sigmoid(load(gi + 3 * H) + load(gh + 3 * H));
    A* c = static_cast<A*>(a.c) + hj;
    const A c_new = f * *c + i * g;
    *c = c_new;
    h = o * tanh_(c_new);
    if (a.ws != nullptr) {
      T* ws = static_cast<T*>(a.ws) + b * 4 * H + j;
      store(ws, i);
      store(ws + H, f);
      store(ws + 2 * H, g);
      store(ws + 3 * H, o);
      store(static_cast<T*>(a.cs) + hj, c_new);
    }
  } else if constexpr (MODE == GRU) {
    const T* bh = static_cast<const T*>(a.b_hh);
    const A b_r = bh ? load(bh + j) : A(0), b_z = bh ? load(bh + H + j) : A(0), b_n = bh ? load(bh + 2 * H + j) : A(0);
    const A r = sigmoid(load(gi) + load(gh) + b_r);
    const A z = sigmoid(load(gi + H) + load(gh + H) + b_z);
    const A ghn = load(gh + 2 * H) + b_n;
    const A n = tanh_(load(gi + 2 * H) + r * ghn);
    const A h_prev = load(static_cast<const T*>(a.h_state) + hj);
    h = (A(1) - z) * n + z * h_prev;
    if (a.ws != nullptr) {
      T* ws = static_cast<T*>(a.ws) + b * 4 * H + j;
      store(ws, r);
      store(ws + H, z);
      store(ws + 2 * H, n);
      store(ws + 3 * H, ghn);
    }
  } else {
    const A pre = load(gi) + load(gh);
    h = MODE == RNN_TANH ? tanh_(pre) : (pre < A(0) ? A(0) : pre);
  }
  store(static_cast<T*>(a.h_out) + hj, h);
  if (a.h_state != nullptr) store(static_cast<T*>(a.h_state) + hj, h);
}

// Backward step of element idx = b * H + j (see StepBwdArgs).
template <typename T, int MODE>
RNNFAST_HD void step_bwd_elem(const StepBwdArgs& a, int64_t idx) {
  using A = Acc<T>;
  constexpr int G = gate_count(MODE);
  const int64_t H = a.H, b = idx / H, j = idx - b * H, hj = b * H + j;
  A* dh_p = static_cast<A*>(a.dh) + hj;
  const A dh = *dh_p + (a.g_out ? load(static_cast<const T*>(a.g_out) + hj) : A(0));
  T* dgi = static_cast<T*>(a.dgi) + b * G * H + j;
  if constexpr (MODE == LSTM) {
    const T* ws = static_cast<const T*>(a.ws) + b * 4 * H + j;
    const A i = load(ws), f = load(ws + H), g = load(ws + 2 * H), o = load(ws + 3 * H);
    const A c = load(static_cast<const T*>(a.cs) + hj), c_prev = load(static_cast<const T*>(a.c_prev) + hj);
    const A tc = tanh_(c);
    A* dc_p = static_cast<A*>(a.dc) + hj;
    const A dc = *dc_p + dh * o * (A(1) - tc * tc);
    store(dgi, dc * g * i * (A(1) - i));
    store(dgi + H, dc * c_prev * f * (A(1) - f));
    store(dgi + 2 * H, dc * i * (A(1) - g * g));
    store(dgi + 3 * H, dh * tc * o * (A(1) - o));
    *dc_p = dc * f;
    *dh_p = A(0);
  } else if constexpr (MODE == GRU) {
    const T* ws = static_cast<const T*>(a.ws) + b * 4 * H + j;
    const A r = load(ws), z = load(ws + H), n = load(ws + 2 * H), ghn = load(ws + 3 * H);
    const A h_prev = load(static_cast<const T*>(a.h_prev) + hj);
    const A dn = dh * (A(1) - z) * (A(1) - n * n);
    const A dz = dh * (h_prev - n) * z * (A(1) - z);
    const A dr = dn * ghn * r * (A(1) - r);
    T* dgh = static_cast<T*>(a.dgh) + b * G * H + j;
    store(dgi, dr);
    store(dgi + H, dz);
    store(dgi + 2 * H, dn);
    store(dgh, dr);
    store(dgh + H, dz);
    store(dgh + 2 * H, dn * r);
    *dh_p = dh * z;
  } else {
    const A h = load(static_cast<const T*>(a.h_t) + hj);
    store(dgi, MODE == RNN_TANH ? dh * (A(1) - h * h) : (h <= A(0) ? A(0) : dh));
    *dh_p = A(0);
  }
}

// The cell update of decode row b, unit j, from its gate pre-activations (biases
// included) gi = W_ih x + b_ih and gh = W_hh h_in + b_hh (see DecodeArgs).
template <typename T, int MODE, typename A>
RNNFAST_HD void decode_elem(const DecodeArgs& a, const A* gi, const A* gh, int64_t b, int64_t j) {
  const int64_t hj = b * a.H + j;
  A h;
  if constexpr (MODE == LSTM) {
    const A i = sigmoid(gi[0] + gh[0]), f = sigmoid(gi[1] + gh[1]);
    const A g = tanh_(gi[2] + gh[2]), o = sigmoid(gi[3] + gh[3]);
    const A c = f * load(static_cast<const T*>(a.c_in) + hj) + i * g;
    store(static_cast<T*>(a.c_out) + hj, c);
    h = o * tanh_(c);
  } else if constexpr (MODE == GRU) {
    const A r = sigmoid(gi[0] + gh[0]), z = sigmoid(gi[1] + gh[1]);
    const A n = tanh_(gi[2] + r * gh[2]);
    h = (A(1) - z) * n + z * load(static_cast<const T*>(a.h_in) + hj);
  } else {
    const A pre = gi[0] + gh[0];
    h = MODE == RNN_TANH ? tanh_(pre) : (pre < A(0) ? A(0) : pre);
  }
  store(static_cast<T*>(a.h_out) + hj, h);
  if (a.h_out2 != nullptr) store(static_cast<T*>(a.h_out2) + hj, h);
}

// Blocks of kThreads threads covering `count` elements, one per thread.
constexpr int kThreads = 256;
inline unsigned blocks_for(int64_t count) { return static_cast<unsigned>((count + kThreads - 1) / kThreads); }

}  // namespace rnnfast::cuda
