// Device helpers shared by the CUDA kernels: storage <-> accumulator conversion,
// the activations, and the one switch from (mode, dtype) codes to template
// arguments. No torch headers, so these files compile in seconds.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels.h"

namespace rnnfast::cuda {

// Storage type T, accumulator type Acc<T> (float, double for double).
template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ double load(const double* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(double* p, double v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }
__device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }

__host__ __device__ constexpr int gate_count(int mode) { return mode == LSTM ? 4 : (mode == GRU ? 3 : 1); }

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

// Blocks of kThreads threads covering `count` elements, one per thread.
constexpr int kThreads = 256;
inline unsigned blocks_for(int64_t count) { return static_cast<unsigned>((count + kThreads - 1) / kThreads); }

}  // namespace rnnfast::cuda
