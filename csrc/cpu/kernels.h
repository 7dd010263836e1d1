// Fused pointwise gate kernels and the small-batch GEMV of the CPU backend.
//
// The kernels are compiled three times (AVX-512, AVX2+FMA and baseline x86-64) and picked at run
// time; float's activations are accurate to ~3e-7, double's to a few ulp of 1 (exp_d).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace rnnfast {

// Mode ids: the index of the mode in rnnfast.backend.MODES (Python passes MODE_ID[mode]).
enum Mode : int64_t { LSTM = 0, GRU = 1, RNN_TANH = 2, RNN_RELU = 3 };

inline int64_t gate_count(int64_t mode) {
  return mode == LSTM ? 4 : mode == GRU ? 3 : 1;
}

// The CPU has AVX2 and FMA and RNNFAST_CPU_ISA does not cap them: float32 layers run the
// fused loop (on 8-lane registers).
extern const bool kHasAvx2;
// ... and AVX-512 (F, DQ, VL, BW): the widest build of the kernels and of the fused loop run.
extern const bool kHasAvx512;
// ... and AVX512-BF16 (vdpbf16ps): bfloat16 layers run the fused loop in bfloat16.
extern const bool kHasAvx512Bf16;
// ... and AMX-BF16 tiles, usable by this process: the bfloat16 loops' products run on them.
extern const bool kHasAmxBf16;
// RNNFAST_CPU_ISA is set, at any level: library paths that pick their own instructions (MKL) stay
// off, so that a capped run tests rnnfast's own kernels.
extern const bool kIsaCapped;
// One core's L1 data cache and L2 in bytes (32 KB and 512 KB where the system does not say): what
// the products' K blocks and the loops' splits and slabs are sized for.
int64_t l1d_bytes();
int64_t l2_bytes();

// Row kernels: units [0, n) of one batch row of one step, overloaded for float
// and double; gate q of unit j sits at q * H + j, so a caller may hand a kernel
// any slice of the units (pointers offset to its first unit).
// Forward: the input (gi, biases in) and recurrent (gh) pre-activations come
// separately; lstm_fwd writes the activated gates (i, f, g, o) to gates (gi itself
// is fine); gru_fwd saves r, z, n and W_hn h + b_hn in ws (4 gates) for backward.
// Backward: dh is the gradient w.r.t. the row's output (o * tanh(c) for LSTM);
// gru_bwd overwrites it with its direct part z * dh, the GEMM adds the rest.
#define RNNFAST_DECLARE(T)                                                                                \
  void lstm_fwd(const T* gi, const T* gh, const T* c_prev, T* gates, T* c_out, T* h_out, int64_t n,      \
                int64_t H);                                                                               \
  void gru_fwd(const T* gi, const T* gh, const T* h_prev, T* ws, T* h_out, int64_t n, int64_t H);        \
  void rnn_fwd(const T* gi, const T* gh, T* h_out, bool relu, int64_t n);                                \
  void lstm_bwd(const T* g, const T* c, const T* c_prev, const T* dh, T* dc, T* dg, int64_t n, int64_t H); \
  void gru_bwd(const T* ws, const T* h_prev, T* dh, T* dgi, T* dgh, int64_t n, int64_t H);               \
  void rnn_bwd(const T* h, const T* dh, T* dg, bool relu, int64_t n);
RNNFAST_DECLARE(float)
RNNFAST_DECLARE(double)
#undef RNNFAST_DECLARE

// res[r] = dot(w + r * ldw, v, n) for rows r < rows: the decode path's GEMV.
void dot_rows(const float* w, int64_t ldw, int64_t rows, const float* v, int64_t n, float* res, int64_t res_stride);
void dot_rows(const double* w, int64_t ldw, int64_t rows, const double* v, int64_t n, double* res,
              int64_t res_stride);
// The same over bfloat16 rows and vector, summed in float32 (vdpbf16ps where the CPU has it, else
// AVX2 FMAs on exactly widened lanes).
void dot_rows(const at::BFloat16* w, int64_t ldw, int64_t rows, const at::BFloat16* v, int64_t n, float* res,
              int64_t res_stride);

// c[r, j] (+)= sum_k a[r, k] w[j, k] (+ bias[j]) for rows r < n of a and j < N of w (row stride ldw): dot
// products along K, 8 rows of w and 2 of a at a time (16 chains, each sum's lanes reduced at the end), so
// that w is read once for every pair of a's rows; on AVX-512 CPUs only. The B side of a product with
// few outputs (gemm's, for an Elman layer of up to 8 units) and of GEMVs over two rows (dot_rows_batch).
void dot_pairs(const float* a, int64_t lda, int64_t n, const float* w, int64_t ldw, int64_t K, int64_t N,
               const float* bias, float* c, int64_t ldc, bool add);

// out[b * ldo + r] = dot(w + r * ldw, a + b * lda, K) (+ bias[r]) for rows r < rows of w and b < n: in
// float32 on AVX-512 w is read once for every pair of a's rows (dot_pairs), else once for every row.
template <typename E, typename A>
void dot_rows_batch(const E* a, int64_t lda, int64_t n, const E* w, int64_t ldw, int64_t K, int64_t rows,
                    const A* bias, A* out, int64_t ldo) {
  if constexpr (std::is_same_v<E, float> && std::is_same_v<A, float>) {
    if (kHasAvx512) return dot_pairs(a, lda, n, w, ldw, K, rows, bias, out, ldo, false);
  }
  for (int64_t b = 0; b < n; ++b) {
    A* o = out + b * ldo;
    dot_rows(w, ldw, rows, a + b * lda, K, o, 1);
    if (bias != nullptr) {
      for (int64_t r = 0; r < rows; ++r) o[r] += bias[r];
    }
  }
}

// out[b] = w @ a[b] (+ bias) for n rows: w (N, K) row-major in E, a (n, K) in E, sums in A (float32
// for bfloat16). Threads split the rows of w from 64K multiply-adds each: a product this small is
// bound by reading w, which one core reads at about half the speed two do. With it, and ATen's GEMM
// past two rows (matmul_nt), LSTM proj_size in the stepwise loop went from 0.50-0.87x torch.nn to
// 0.90-3x (2-core Xeon, bench/results/2026-12-06-cpu-proj-ab.md).
template <typename E, typename A>
void gemv_rows(const E* a, int64_t n, int64_t K, const E* w, int64_t N, const A* bias, A* out) {
  const int64_t grain = std::max<int64_t>(8, (int64_t(1) << 16) / std::max<int64_t>(K * n, 1));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    dot_rows_batch(a, K, n, w + r0 * K, K, K, r1 - r0, bias != nullptr ? bias + r0 : nullptr, out + r0, N);
  });
}

// Whether n values are all zero (-0 too): the initial state a module makes when hx is None. The
// products with it then are their biases alone (forward) and nothing (the weight gradients) where
// the other operand is finite (Panels::finite, all_finite); torch.nn runs them. Stops at the first
// block of values with a nonzero one.
template <typename E>
bool all_zero(const E* v, int64_t n) {
  // each value's bits but its sign, OR-ed over blocks (a loop the compiler vectorizes: std::all_of's
  // compare-and-branch took 4% of a call of 3 Elman layers at T1 B256 H200)
  using Bits = std::conditional_t<sizeof(E) == 8, uint64_t, std::conditional_t<sizeof(E) == 4, uint32_t, uint16_t>>;
  static_assert(sizeof(Bits) == sizeof(E));
  constexpr int64_t kBlock = 1024;
  for (int64_t i = 0; i < n; i += kBlock) {
    Bits any = 0;
    for (int64_t j = i, end = std::min(n, i + kBlock); j < end; ++j) {
      Bits b;
      std::memcpy(&b, v + j, sizeof(Bits));
      any |= static_cast<Bits>(b << 1);
    }
    if (any != 0) return false;
  }
  return true;
}

// Whether rows [0, n) of m values each (row stride ld; float, double or bfloat16) are all finite: only
// then are their products with zeros zero (0 x NaN and 0 x inf are NaN, in torch.nn's sums too). Exponent
// bits all ones, OR-ed per row (a loop the compiler vectorizes).
template <typename E>
bool all_finite(const E* v, int64_t n, int64_t m, int64_t ld) {
  static_assert(std::is_same_v<E, float> || std::is_same_v<E, double> || std::is_same_v<E, c10::BFloat16>);
  using Bits = std::conditional_t<sizeof(E) == 8, uint64_t, std::conditional_t<sizeof(E) == 4, uint32_t, uint16_t>>;
  constexpr Bits kExponent = sizeof(E) == 8   ? Bits(0x7ff0000000000000ull)
                             : sizeof(E) == 4 ? Bits(0x7f800000u)
                                              : Bits(0x7f80u);
  for (int64_t r = 0; r < n; ++r) {
    Bits bad = 0;
    for (int64_t j = 0; j < m; ++j) {
      Bits b;
      std::memcpy(&b, v + r * ld + j, sizeof(Bits));
      bad |= static_cast<Bits>((b & kExponent) == kExponent);
    }
    if (bad != 0) return false;
  }
  return true;
}

// dst[j] += src[j] for j < n, src float32 or bfloat16 (widened exactly).
void add_row(float* dst, const float* src, int64_t n);
void add_row(float* dst, const at::BFloat16* src, int64_t n);
// dst[j] = src[j] for j < n, widened exactly.
void widen_row(float* dst, const at::BFloat16* src, int64_t n);

// dst[j] = src[j] for j < n: a copy, or rounded to nearest even for bfloat16.
inline void round_row(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void round_row(double* dst, const double* src, int64_t n) { std::memcpy(dst, src, n * sizeof(double)); }
void round_row(at::BFloat16* dst, const float* src, int64_t n);

}  // namespace rnnfast

namespace rnnfast {

// Rows of a sequence by (step, batch row), its data pointer read once: a (T, B, W) tensor, or
// PackedSequence data (rows, W) whose step t begins at row starts[t] (T + 1 entries).
template <typename T>
struct Rows {
  T* data = nullptr;
  int64_t B = 0, W = 0;
  const int64_t* starts = nullptr;
  explicit Rows(const at::Tensor& t, const int64_t* packed_starts = nullptr) {
    if (t.defined() && (t.dim() == 3 || (t.dim() == 2 && packed_starts != nullptr))) {
      data = t.data_ptr<T>();
      B = t.dim() == 3 ? t.size(1) : 0;
      W = t.size(-1);
      starts = t.dim() == 2 ? packed_starts : nullptr;
    }
  }
  int64_t start(int64_t step) const { return starts != nullptr ? starts[step] : step * B; }
  T* operator()(int64_t step, int64_t b) const { return data + (start(step) + b) * W; }
};


// The gradients a backward is asked for (autograd's needs_input_grad): dx, dh0, and the weights'
// (dW_ih, dW_hh and the biases' together). One not asked for is left out of the products and comes
// back zero: a first layer's input (data) needs no dx, a zero h0 from hx None no dh0, frozen weights no
// dW. torch.nn's default loop (GRU, RNN, LSTM with proj_size) skips them the same way.
struct Needs {
  bool dx = true, dh0 = true, dw = true;
};

// One layer and direction on AVX2 or AVX-512 CPUs in float32, or bfloat16 with AVX512-BF16, without
// proj_size (recurrent.cpp); bfloat16 inputs may come with float32 weights and states
// (autocast; the outputs take h0's dtype): the same contract as the operators layer_fwd /
// layer_bwd, with the batch sizes unpacked; with save false the forward keeps nothing for
// backward (ws1, ws2 empty).
bool fused_loop_supported(const at::Tensor& x, bool proj);
// a @ w^T (transposed: a @ w) (+ bias), in float32, on AVX512-BF16 CPUs: a's rows rounded to bfloat16,
// w (float32 or bfloat16) packed once into bfloat16 panels, cached while it is unchanged, the sums
// float32, as in the fused loop; the products of the stepwise loop's bfloat16 calls (layer.cpp).
at::Tensor bf16_product(const at::Tensor& a, const at::Tensor& w, bool transposed,
                        const c10::optional<at::Tensor>& bias = c10::nullopt);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_layer_fwd(
    int64_t mode, const at::Tensor& x, const std::vector<int64_t>& bs, bool packed, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& b_ih,
    const at::Tensor& b_hh, bool reverse, bool save);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_layer_bwd(
    int64_t mode, const at::Tensor& x, const std::vector<int64_t>& bs, bool packed, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& w_ih, const at::Tensor& w_hh, bool has_bias, bool reverse,
    const at::Tensor& out, const at::Tensor& ws1, const at::Tensor& ws2, const at::Tensor& go,
    const at::Tensor& grad_hn, const at::Tensor& grad_cn, const Needs& needs);

// The multiply-add peak of this CPU in GFLOP/s on at::get_num_threads() threads, for the fused
// loop's float32 FMAs or bfloat16 products (vdpbf16ps, or AMX tiles where they run), timed over
// about `seconds`; 0 where the loop's instructions are missing. The bench's roof (bench/measure.py).
double peak_gflops(const std::string& dtype, double seconds);
// The instructions the fused loop's products run on at this dtype here ("" where it does not run).
const char* product_isa(const std::string& dtype);

// Whether torch has MKL and the CPU is Intel's: there MKL's sgemm is the fast GEMM (on AMD CPUs it takes
// slower paths, and oneDNN is several times faster).
bool mkl_on_intel();

// a @ w^T (+ bias) (+ add), like F.linear: ATen's GEMM (MKL's sgemm where torch has it) on Intel
// CPUs and for a few rows; else oneDNN for float32 (several times faster than MKL's sgemm on AMD
// CPUs, and as exact). a and w may be strided.
at::Tensor matmul_nt(const at::Tensor& a, const at::Tensor& w,
                     const c10::optional<at::Tensor>& bias = c10::nullopt,
                     const c10::optional<at::Tensor>& add = c10::nullopt);

}  // namespace rnnfast
