// Decode: one launch per layer and step for up to kDecodeMaxB rows. A warp owns
// one hidden unit j: it reads the G weight rows of j (input and recurrent part)
// once, dots them with every row's x and h_in, reduces across the warp and applies
// the cell (decode_elem of cell.cuh), so the weights stream from memory once per
// step whatever B is.
#include "cell.cuh"

namespace rnnfast::cuda {
namespace {

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kMaxB = static_cast<int>(kDecodeMaxB);

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// acc[g][b] += sum_k w[g*H + j][k] * v[b][k] over this lane's share of k.
template <typename T, int G, typename A>
__device__ __forceinline__ void dot_rows(const T* w, int64_t H, int64_t j, int64_t K, const T* v, int64_t B,
                                         int lane, A (&acc)[G][kMaxB]) {
  // unrolled so that several iterations' loads are in flight: with one warp per unit
  // the loop is bound by memory latency, not bandwidth
#pragma unroll 4
  for (int64_t k = lane; k < K; k += kWarp) {
    A wk[G];
#pragma unroll
    for (int g = 0; g < G; ++g) wk[g] = load(w + (g * H + j) * K + k);
#pragma unroll
    for (int b = 0; b < kMaxB; ++b) {
      if (b < B) {
        const A vb = load(v + b * K + k);
#pragma unroll
        for (int g = 0; g < G; ++g) acc[g][b] += wk[g] * vb;
      }
    }
  }
}

template <typename T, int MODE>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock) decode_kernel(DecodeArgs a) {
  constexpr int G = gate_count(MODE);
  using A = Acc<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t j = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  if (j >= a.H) return;  // whole warps leave together: the shuffles below stay full-warp
  const int64_t H = a.H;
  A ax[G][kMaxB] = {}, ah[G][kMaxB] = {};
  dot_rows<T, G>(static_cast<const T*>(a.w_ih), H, j, a.I, static_cast<const T*>(a.x), a.B, lane, ax);
  dot_rows<T, G>(static_cast<const T*>(a.w_hh), H, j, H, static_cast<const T*>(a.h_in), a.B, lane, ah);
  const T* bias = static_cast<const T*>(a.bias);
#pragma unroll
  for (int b = 0; b < kMaxB; ++b) {
    if (b >= a.B) break;
    A gi[G], gh[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      gi[g] = warp_sum(ax[g][b]) + load(bias + g * H + j);
      gh[g] = warp_sum(ah[g][b]) + load(bias + (G + g) * H + j);
    }
    if (lane == 0) decode_elem<T, MODE>(a, gi, gh, b, j);
  }
}

struct LaunchDecode {
  const DecodeArgs& a;
  Stream stream;
  template <typename T, int MODE>
  void operator()() const {
    const unsigned blocks = static_cast<unsigned>((a.H + kWarpsPerBlock - 1) / kWarpsPerBlock);
    decode_kernel<T, MODE><<<blocks, kWarp * kWarpsPerBlock, 0, stream>>>(a);
  }
};

}  // namespace

void decode_step(int mode, DType dtype, const DecodeArgs& a, Stream stream) {
  if (a.B > 0 && a.H > 0) dispatch(mode, dtype, LaunchDecode{a, stream});
}

}  // namespace rnnfast::cuda
