// One layer and direction on AVX-512 or AVX2+FMA CPUs in float32 (or bfloat16 on AVX512-BF16
// CPUs), forward and backward, as one OpenMP parallel region each.
//
// Every product is one register-blocked tile kernel (6 rows x 64 columns, 24 zmm
// accumulators; 6 x 16 in 12 ymm on AVX2) over weights packed once into panels and cached
// until they change; bfloat16 products run on AMX tiles instead where the CPU has them (gemm_amx),
// and the float32 weight gradients through MKL's sgemm on Intel CPUs where torch has MKL (mkl).
// Each thread owns a slice of the hidden units (whole panels): per step it computes
// the recurrent pre-activations of its units a block of rows at a time and applies
// the gate update (the row kernels of kernels.h) while they are in cache, then waits
// at one barrier for the others (or each thread owns rows; see Split). Forwards on AVX-512
// fuse each step (step_product, fuses_steps): one tile sums a block of rows' input projection
// and recurrent product in registers and applies the cell update there. Else steps
// go in chunks of rows (chunk_steps): the forward projects a chunk's inputs for its own units
// before running its steps; the backward
// forms a chunk's dx, dW_ih and dW_hh right after its steps, while the gate gradients
// are in cache. No per-step library calls, allocations or thread start-ups, and
// no buffer that grows with T besides what torch.nn also returns or saves.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/Allocator.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/strides.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <cmath>
#include <string>
#include <memory>
#include <mutex>
#include <cstring>

#include "activations.h"
#include "cache.h"
#include "checks.h"
#include "dispatch.h"
#include "kernels.h"
#include "bf16_emulation.h"

namespace rnnfast {
namespace {

using at::Tensor;

using BF16 = at::BFloat16;

// AMX tiles as the bfloat16 products use them (see gemm_amx): 16 rows, 32 bfloat16 values of K.
constexpr int64_t kTileRows = 16, kTileK = 32;

// Rows of K per element of a panel's row: 1, or 2 for bfloat16 pairs (see Panels).
template <typename E>
constexpr int64_t kPair = std::is_same_v<E, BF16> ? 2 : 1;

// The row stride of a buffer of rows of n values of `bytes` each, 64 bytes past n: rows a power
// of two apart (4 KB at H 256) fall into the same L1 sets and evict each other (8-12% of a
// bfloat16 step at B 32).
int64_t padded_row(int64_t n, int64_t bytes) { return n + 64 / bytes; }

// The B side of a product, as panels of 16 * V columns of element type E (float, or
// bfloat16 for the bfloat16 loop): row k of panel nb starts at data + nb * pstride + k * ldb.
// bfloat16 panels hold rows in pairs, (k, k + 1) of a column side by side (the operand
// layout of vdpbf16ps), so there ldb steps from one pair to the next. Packed panels (pack)
// hold U units of each of G gates side by side, zero-padded; a plain row-major (K, N) matrix
// (direct) is one gate of 64. On AMX, packed bfloat16 panels are tiled instead: each tile of 16
// pairs of rows x 16 columns that gemm_amx loads is 1 KB of its own (see PanelTiles).
template <typename E>
struct Panels {
  Tensor w;     // the packed copy that data points into (undefined for a matrix read in place)
  Tensor bias;  // float (NB, 16 * V), packed like the columns, or undefined
  const E* data;
  const float* bias_data = nullptr;
  int64_t U, V, N, K, NB, ldb, pstride;
  bool tiled = false;  // in AMX tiles: only gemm_amx reads them
  // the forward's W_hh panels: no NaN or infinity in W_hh (set by forward_loop; true elsewhere)
  bool finite = true;
  // float32 weights of one gate of at most 8 units as (N, K) rows: the B side of gemm's dot products
  // (dot_pairs); else undefined
  Tensor rows;
  const float* rows_data = nullptr;

  int64_t bytes() const { return NB * pstride * int64_t(sizeof(E)); }  // all NB panels

  // The packed bias of panel nb (16 V floats), or null without one.
  const float* bias_of(int64_t nb) const { return bias_data != nullptr ? bias_data + nb * V * 16 : nullptr; }

  // Column offset in an output row (gate stride N) and live lanes of register v of panel nb.
  int64_t column(int64_t nb, int64_t v) const { return (v * 16) / U * N + nb * U + (v * 16) % U; }
  int64_t lanes(int64_t nb, int64_t v) const {
    return std::clamp<int64_t>(N - (nb * U + (v * 16) % U), 0, 16);
  }
};

// w: (G * N, K), the weights of G gates of N units each, in float32 or bfloat16 (read as float32
// and rounded once here); bias: (G * N) or undefined, kept in float32.
template <typename E>
Panels<E> pack(const Tensor& w_, const Tensor& bias, int64_t G, int64_t U) {
  const Tensor w = w_.to(at::kFloat);
  Panels<E> p;
  p.U = U;
  p.V = G * U / 16;
  p.N = w.size(0) / G;
  p.K = w.size(1);
  p.NB = (p.N + U - 1) / U;
  const int64_t pad = p.NB * U - p.N;
  const Tensor wg = at::constant_pad_nd(w.reshape({G, p.N, p.K}), {0, 0, 0, pad});
  p.w = wg.view({G, p.NB, U, p.K}).permute({1, 3, 0, 2}).contiguous().view({p.NB, p.K, G * U});
  if (bias.defined()) {
    const Tensor bg = at::constant_pad_nd(bias.to(at::kFloat).reshape({G, p.N}), {0, pad});
    p.bias = bg.view({G, p.NB, U}).permute({1, 0, 2}).contiguous().view({p.NB, G * U});
    p.bias_data = p.bias.template data_ptr<float>();
  }
  p.ldb = G * U;
  p.pstride = p.K * G * U;
  if constexpr (std::is_same_v<E, BF16>) {  // rows in pairs, K padded with zero rows to whole AMX tiles
    const int64_t K2 = (p.K + 2 * kTileRows - 1) / (2 * kTileRows) * kTileRows;
    p.w = at::constant_pad_nd(p.w, {0, 0, 0, 2 * K2 - p.K})
              .view({p.NB, K2, 2, G * U})
              .transpose(2, 3)
              .to(at::kBFloat16)
              .contiguous();
    p.ldb = 2 * G * U;
    p.pstride = 2 * K2 * G * U;
    if (kHasAmxBf16) {  // tile (k, v) whole: the tile loop ran 1.1-1.4x faster on rows 64 bytes apart than 256
      p.w = p.w.view({p.NB, K2 / kTileRows, kTileRows, p.V, 32}).transpose(2, 3).contiguous();
      p.tiled = true;
    }
  }
  p.data = p.w.template data_ptr<E>();
  if (std::is_same_v<E, float> && G == 1 && p.N <= 8) {
    p.rows = w.contiguous();
    p.rows_data = p.rows.template data_ptr<float>();
  }
  return p;
}

// A (K, N) row-major matrix with row stride ld, read in place (it must outlive the Panels); in
// bfloat16 its rows come in pairs, as interleave_pairs writes them.
template <typename E>
Panels<E> direct(const E* data, int64_t K, int64_t N, int64_t ld) {
  Panels<E> p;
  p.U = 64;
  p.V = 4;
  p.K = K;
  p.N = N;
  p.NB = (N + 63) / 64;
  p.data = data;
  p.ldb = kPair<E> * ld;
  p.pstride = kPair<E> * 64;
  return p;
}

// A (K, N) row-major matrix in pairs of rows in AMX tiles (K a multiple of 32), as interleave_pairs
// writes it.
Panels<BF16> direct_tiled(const BF16* data, int64_t K, int64_t N) {
  Panels<BF16> p = direct(data, K, N, N);
  p.pstride = K * 64;
  p.tiled = true;
  return p;
}

#define RNNFAST_TILE_INLINE inline __attribute__((always_inline, target("avx512f")))
#define RNNFAST_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define RNNFAST_BF16_INLINE inline __attribute__((always_inline)) RNNFAST_BF16_TARGET

// The accumulators of a tile start from the bias (or zero) and end in c, added to it with add.
template <int R, int V>
RNNFAST_TILE_INLINE void tile_start(__m512 (&acc)[R][V], const float* bias) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = bias != nullptr ? _mm512_loadu_ps(bias + 16 * v) : _mm512_setzero_ps();
  }
}

template <int R, int V>
RNNFAST_TILE_INLINE void tile_store(__m512 (&acc)[R][V], float* c, int64_t ldc, const int64_t* col,
                                    const __mmask16* mask, bool add) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      if (mask[v] == 0) continue;
      float* dst = c + r * ldc + col[v];
      __m512 y = acc[r][v];
      if (add) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask[v], dst));
      _mm512_mask_storeu_ps(dst, mask[v], y);
    }
  }
}

// The live lanes of a register into float32 or, each rounded once, into bfloat16.
RNNFAST_TILE_INLINE void store_lanes(float* dst, __mmask16 live, __m512 y) { _mm512_mask_storeu_ps(dst, live, y); }
RNNFAST_BF16_INLINE void store_lanes(BF16* dst, __mmask16 live, __m512 y) {
  _mm256_mask_storeu_epi16(dst, live, (__m256i)_mm512_cvtneps_pbh(y));
}

// The same into bfloat16 c, each sum rounded once (a product's whole sums: add false).
template <int R, int V>
RNNFAST_BF16_INLINE void tile_store(__m512 (&acc)[R][V], BF16* c, int64_t ldc, const int64_t* col,
                                    const __mmask16* mask, bool) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      if (mask[v] != 0) store_lanes(c + r * ldc + col[v], mask[v], acc[r][v]);
    }
  }
}

// Whether every column of a tile is live: its panel loads then need no masks (a masked load
// takes a port-0/5 uop beside its load, 4 of them per k against the 24 FMAs there).
template <int V>
RNNFAST_TILE_INLINE bool whole_columns(const __mmask16* mask) {
  bool whole = true;
  for (int v = 0; v < V; ++v) whole = whole && mask[v] == 0xffff;
  return whole;
}

template <int R, int V, bool TA, bool Whole>
RNNFAST_TILE_INLINE void tile_steps(__m512 (&acc)[R][V], const float* a, int64_t lda, int64_t K, const float* b,
                                    int64_t ldb, const __mmask16* mask) {
  for (int64_t k = 0; k < K; ++k) {
    __m512 w[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      w[v] = Whole ? _mm512_loadu_ps(b + k * ldb + v * 16) : _mm512_maskz_loadu_ps(mask[v], b + k * ldb + v * 16);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(TA ? a[r + k * lda] : a[r * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(x, w[v], acc[r][v]);
    }
  }
}

// acc[r][v] += sum_k a[r, k] * b[k, 16 v + l] for R rows; a[r, k] sits at a[r * lda + k], or
// a[r + k * lda] with TA (a transposed).
template <int R, int V, bool TA>
RNNFAST_TILE_INLINE void tile_sums(__m512 (&acc)[R][V], const float* a, int64_t lda, int64_t K, const float* b,
                                   int64_t ldb, const __mmask16* mask) {
  if (whole_columns<V>(mask)) {
    tile_steps<R, V, TA, true>(acc, a, lda, K, b, ldb, mask);
  } else {
    tile_steps<R, V, TA, false>(acc, a, lda, K, b, ldb, mask);
  }
}

// c[r, col[v] + l] (+)= sum_k a[r, k] * b[k, 16 v + l] (+ bias) for R rows, a as in tile_sums. 24
// accumulators in registers.
template <int R, int V, bool TA>
__attribute__((target("avx512f"))) void tile(const float* a, int64_t lda, int64_t K, const float* b, int64_t ldb,
                                             const float* bias, float* c, int64_t ldc, const int64_t* col,
                                             const __mmask16* mask, bool add) {
  __m512 acc[R][V];
  tile_start<R, V>(acc, bias);
  tile_sums<R, V, TA>(acc, a, lda, K, b, ldb, mask);
  tile_store<R, V>(acc, c, ldc, col, mask, add);
}

// One pair of rows of bfloat16 panels: a's pair broadcast, or with Whole false (the end of an
// odd K) a's last value and a zero, so that no row of a is read past its end; Masked: the panel
// loads take the columns' masks (see whole_columns).
template <int R, int V, bool Whole, bool Masked>
RNNFAST_BF16_INLINE void pair_step(__m512 (&acc)[R][V], const uint16_t* a, int64_t lda, const uint16_t* b,
                                   const __mmask16* mask) {
  __m512i w[V];
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) {
    w[v] = Masked ? _mm512_maskz_loadu_epi32(mask[v], b + v * 32) : _mm512_loadu_si512(b + v * 32);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    uint32_t pair = a[r * lda];
    if constexpr (Whole) std::memcpy(&pair, a + r * lda, 4);
    const __m512bh x = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, (__m512bh)w[v]);
  }
}

// The same sums over bfloat16 a and panels: each vdpbf16ps adds the products of a pair of rows,
// a[r, k] b[k, :] + a[r, k + 1] b[k + 1, :], into float32 accumulators. With TA, a is transposed in
// pairs (interleave_pairs of its columns, lda wide): a[r, k] at a[(k - k % 2) * lda + 2 * r + k % 2],
// each pair of a row side by side as by rows.
template <int R, int V, bool TA>
RNNFAST_BF16_INLINE void tile_sums(__m512 (&acc)[R][V], const BF16* a, int64_t lda, int64_t K, const BF16* b,
                                   int64_t ldb, const __mmask16* mask) {
  const uint16_t* a16 = reinterpret_cast<const uint16_t*>(a);
  const uint16_t* b16 = reinterpret_cast<const uint16_t*>(b);
  const int64_t rs = TA ? 2 : lda, ks = TA ? 2 * lda : 2;  // a's steps from row to row, pair to pair
  if (whole_columns<V>(mask)) {
    for (int64_t kk = 0; kk < K / 2; ++kk) pair_step<R, V, true, false>(acc, a16 + kk * ks, rs, b16 + kk * ldb, mask);
  } else {
    for (int64_t kk = 0; kk < K / 2; ++kk) pair_step<R, V, true, true>(acc, a16 + kk * ks, rs, b16 + kk * ldb, mask);
  }
  if (K % 2 == 1) pair_step<R, V, false, true>(acc, a16 + (K / 2) * ks, rs, b16 + (K / 2) * ldb, mask);
}

template <int R, int V, bool TA, typename C>
RNNFAST_BF16_TARGET void tile(const BF16* a, int64_t lda, int64_t K, const BF16* b, int64_t ldb, const float* bias,
                              C* c, int64_t ldc, const int64_t* col, const __mmask16* mask, bool add) {
  __m512 acc[R][V];
  tile_start<R, V>(acc, bias);
  tile_sums<R, V, TA>(acc, a, lda, K, b, ldb, mask);
  tile_store<R, V>(acc, c, ldc, col, mask, add);
}

// f(std::integral_constant<int, n>) for 0 < n <= N: a count as a constant (a tile's rows for the
// remainder of a panel's rows, a panel's live registers).
template <int N, typename F>
inline void with_count(int64_t n, F&& f) {
  if constexpr (N > 0) {
    if (n == N) return f(std::integral_constant<int, N>{});
    with_count<N - 1>(n, f);
  }
}

// ---- AVX2 + FMA: the float32 tile on CPUs without AVX-512 ---------------------------------
// One 16-column register of a panel (see Panels) for R rows, as two 8-lane halves: 2R
// accumulators (12 at R 6), the two halves of a panel row and a broadcast fit AVX2's 16
// registers. lanes: the register's live columns (0 < lanes <= 16); the others are neither
// read nor written.
#define RNNFAST_AVX2_INLINE inline __attribute__((always_inline, target("avx2,fma")))

RNNFAST_AVX2_INLINE __m256i half_mask(int64_t lanes) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(lanes)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

template <int R, bool TA, bool Whole>
RNNFAST_AVX2_INLINE void tile_steps_avx2(__m256 (&acc)[R][2], const float* a, int64_t lda, int64_t K, const float* b,
                                         int64_t ldb, __m256i m0, __m256i m1) {
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b + k * ldb;
    const __m256 w0 = Whole ? _mm256_loadu_ps(bk) : _mm256_maskload_ps(bk, m0);
    const __m256 w1 = Whole ? _mm256_loadu_ps(bk + 8) : _mm256_maskload_ps(bk + 8, m1);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m256 x = _mm256_broadcast_ss(TA ? a + r + k * lda : a + r * lda + k);
      acc[r][0] = _mm256_fmadd_ps(x, w0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(x, w1, acc[r][1]);
    }
  }
}

// c[r, l] (+)= sum_k a[r, k] * b[k, l] (+ bias[l]) for R rows and l < lanes; a as in tile.
template <int R, bool TA>
__attribute__((target("avx2,fma"))) void tile_avx2(const float* a, int64_t lda, int64_t K, const float* b,
                                                   int64_t ldb, const float* bias, float* c, int64_t ldc,
                                                   int64_t lanes, bool add) {
  const __m256i m0 = half_mask(lanes), m1 = half_mask(lanes - 8);
  __m256 acc[R][2];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    acc[r][0] = bias != nullptr ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    acc[r][1] = bias != nullptr ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
  }
  if (lanes == 16) {
    tile_steps_avx2<R, TA, true>(acc, a, lda, K, b, ldb, m0, m1);
  } else {
    tile_steps_avx2<R, TA, false>(acc, a, lda, K, b, ldb, m0, m1);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* dst = c + r * ldc;
    if (lanes == 16) {
      _mm256_storeu_ps(dst, add ? _mm256_add_ps(acc[r][0], _mm256_loadu_ps(dst)) : acc[r][0]);
      _mm256_storeu_ps(dst + 8, add ? _mm256_add_ps(acc[r][1], _mm256_loadu_ps(dst + 8)) : acc[r][1]);
    } else {
      const __m256 y0 = add ? _mm256_add_ps(acc[r][0], _mm256_maskload_ps(dst, m0)) : acc[r][0];
      const __m256 y1 = add ? _mm256_add_ps(acc[r][1], _mm256_maskload_ps(dst + 8, m1)) : acc[r][1];
      _mm256_maskstore_ps(dst, m0, y0);
      _mm256_maskstore_ps(dst + 8, m1, y1);
    }
  }
}

// Rows of K a product takes at a time: 32 KB of a 64-column panel (128 rows in float32, 256 in
// bfloat16), kept in L1 across the row tiles; but on AVX-512 with an L1 too small to hold them beside
// a's rows and the sums (under 48 KB), 256 rows either way, from L2, which in float32 halves the loads
// and stores of the sums between blocks: on a 32 KB L1 (AMD EPYC, Zen 4) 1.02x as fast in the median
// of 17 inference and 1.015x of 17 training shapes (0.98-1.05x); 512 rows in bfloat16 ran the same
// as 256 (bench/results/2026-12-07-cpu-amd-k-block-ab.md).
template <typename E>
int64_t k_block() {
  static const int64_t rows =
      kHasAvx512 && l1d_bytes() < (48 << 10) ? 256 : 32768 / (64 * int64_t(sizeof(E)));
  return rows;
}

// The blocks of a product over panels [nb0, nb1): for each panel, K in blocks of k_block rows,
// later blocks adding to the first's sums.
// f(nb, k0, kb, b, bias, add): b the block's first row of the panel, bias only for the first.
template <typename E, typename F>
void for_blocks(const Panels<E>& p, int64_t nb0, int64_t nb1, bool add, F&& f) {
  const int64_t KB = k_block<E>();
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const float* bias = p.bias_of(nb);
    for (int64_t k0 = 0; k0 < p.K; k0 += KB) {
      f(nb, k0, std::min(KB, p.K - k0), p.data + nb * p.pstride + k0 / kPair<E> * p.ldb,
        k0 == 0 ? bias : nullptr, add || k0 > 0);
    }
  }
}

// The sums that the next row tile adds to at its end (rows rows of c, at col of a panel's L registers),
// fetched while this tile runs its block of K, thousands of cycles: from L3 or memory they stall that end
// where the sums outgrow L2 (the weight gradients', 2 MB a thread at H512). In one process, switched call
// by call: 1.005x as fast in the median of 22 shapes (0.98-1.04x), LSTM H384 training 1.02x, bfloat16 H512
// under autocast 1.03x (bench/results/2026-12-07-cpu-amd-prefetch-sums-ab.md).
template <int L>
inline void prefetch_sums(const float* c, int64_t ldc, const int64_t* col, int64_t rows) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int v = 0; v < L; ++v) _mm_prefetch(reinterpret_cast<const char*>(c + r * ldc + col[v]), _MM_HINT_T0);
  }
}

// Where the registers of panel nb land in a row of sums (column, live lanes), and how many hold live
// columns: all V but in a one-gate layer's last panel (RNN H 8 has 1 of 4), whose dead registers would
// cost as many multiply-adds as live ones.
template <int V>
struct PanelColumns {
  int64_t col[V];
  __mmask16 mask[V];
  int live = V;
  template <typename E>
  PanelColumns(const Panels<E>& p, int64_t nb) {
    for (int64_t v = 0; v < V; ++v) {
      col[v] = p.column(nb, v);
      mask[v] = static_cast<__mmask16>((uint32_t(1) << p.lanes(nb, v)) - 1);
    }
    while (live > 1 && mask[live - 1] == 0) --live;
  }
};

// Rows [0, n) of c (row stride ldc) for panels [nb0, nb1): c (+)= a @ B (+ bias); c float32, or
// bfloat16 for bfloat16 operands (rounded sums: K one block, add false).
template <int V, int R, bool TA, typename E, typename C = float>
void product(const Panels<E>& p, int64_t nb0, int64_t nb1, const E* a, int64_t lda, int64_t n, C* c,
             int64_t ldc, bool add) {
  const int64_t rs = !TA ? lda : kPair<E>;  // from one row of a to the next (see tile)
  for_blocks(p, nb0, nb1, add, [&](int64_t nb, int64_t k0, int64_t kb, const E* b, const float* bias, bool add_k) {
    const PanelColumns<V> pc(p, nb);
    const int64_t* col = pc.col;
    const __mmask16* mask = pc.mask;
    const E* ak = a + (TA ? k0 * lda : k0);
    with_count<V>(pc.live, [&](auto regs) {
      constexpr int L = decltype(regs)::value;
      int64_t r = 0;
      for (; r + R <= n; r += R) {
        if constexpr (std::is_same_v<C, float>) {
          if (add_k) prefetch_sums<L>(c + (r + R) * ldc, ldc, col, std::min<int64_t>(R, n - r - R));
        }
        tile<R, L, TA>(ak + r * rs, lda, kb, b, p.ldb, bias, c + r * ldc, ldc, col, mask, add_k);
      }
      with_count<R - 1>(n - r, [&](auto rows) {
        tile<decltype(rows)::value, L, TA>(ak + r * rs, lda, kb, b, p.ldb, bias, c + r * ldc, ldc, col, mask, add_k);
      });
    });
  });
}

// ---- Fused steps: a step's products and cell update in one tile --------------------------------
// Where a fused step reads and writes the cells of its rows (row b of each at b times its width: H, or
// ws_width for the saved gates): the state the step starts from in float32 (GRU), the LSTM cell state
// (read and written), what is saved for backward (or null), the new state in float32, its rounded copy
// that the next product reads (E bfloat16; else null), and the output.
template <typename E, typename O>
struct StepRows {
  const float* h_prev;
  float* c;
  float* cs;
  float* gates;
  float* h;
  E* h_lo;
  O* out;
  int64_t H, ws_width;
};

// The new state h of units [u, u + 16) of row b, at their live lanes.
template <typename E, typename O>
RNNFAST_BF16_INLINE void put_state(const StepRows<E, O>& s, int64_t b, int64_t u, __mmask16 live, __m512 h) {
  store_lanes(s.h + b * s.H + u, live, h);
  if (s.h_lo != nullptr) store_lanes(s.h_lo + b * s.H + u, live, h);
  store_lanes(s.out + b * s.H + u, live, h);
}

// The cells of R rows (from row r of s) of a panel from their sums (biases and both products in): LSTM's
// registers are the gates i, f, g, o of 16 units, an Elman layer's 64 units, GRU's the gates r, z, n of 16
// units, n's the state's sums alone (the input's in n_x). Their update is activations.h's, as the row
// kernels run it.
template <int M, int R, int V, typename E, typename O>
RNNFAST_BF16_INLINE void step_cells(__m512 (&acc)[R][V], __m512 (&n_x)[R], const StepRows<E, O>& s, int64_t r,
                                    const int64_t* col, const __mmask16* mask) {
#pragma GCC unroll 8
  for (int q = 0; q < R; ++q) {
    const int64_t b = r + q;
    if constexpr (M == GRU) {
      static_assert(V == 3, "a GRU panel holds 3 gates");
      const int64_t u = col[0];  // gate v of these units at col[v] = v H + u
      const __mmask16 live = mask[0];
      Lanes rg = acc[q][0], z = acc[q][1], n;
      const Lanes h = gru_cell(rg, z, n_x[q], acc[q][2], _mm512_maskz_loadu_ps(live, s.h_prev + b * s.H + u), n);
      if (s.gates != nullptr) {  // r, z, n and W_hn h + b_hn, as gru_fwd saves them
        float* ws = s.gates + b * s.ws_width + u;
        store_lanes(ws, live, rg);
        store_lanes(ws + s.H, live, z);
        store_lanes(ws + 2 * s.H, live, n);
        store_lanes(ws + 3 * s.H, live, acc[q][2]);
      }
      put_state(s, b, u, live, h);
    } else if constexpr (M == LSTM) {
      static_assert(V == 4, "an LSTM panel holds 4 gates");
      const int64_t u = col[0];  // gate v of these units at col[v] = v H + u
      const __mmask16 live = mask[0];
      Lanes c, h;
      lstm_cell(acc[q][0], acc[q][1], acc[q][2], acc[q][3], _mm512_maskz_loadu_ps(live, s.c + b * s.H + u), c, h);
      store_lanes(s.c + b * s.H + u, live, c);
      if (s.cs != nullptr) store_lanes(s.cs + b * s.H + u, live, c);
      if (s.gates != nullptr) {
        for (int v = 0; v < 4; ++v) store_lanes(s.gates + b * s.ws_width + col[v], live, acc[q][v]);
      }
      put_state(s, b, u, live, h);
    } else {
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        if (mask[v] != 0) put_state(s, b, col[v], mask[v], elman_cell(acc[q][v], M == RNN_RELU));
      }
    }
  }
}

// R rows of a fused step for panel nb: the input projection of x's rows (I wide) and the recurrent product
// of h's (H wide; null for a first step from a zero state), biases in, summed in registers and handed to
// step_cells; GRU's n gate keeps the input's sums (n_x) apart from the state's, for r (W_hn h + b_hn).
// Instantiated for float too, whose code converts nothing to bfloat16 and so takes no AVX512-BF16
// instruction.
template <int M, int R, int V, typename E, typename O>
RNNFAST_BF16_TARGET void step_tile(const Panels<E>& pi, const Panels<E>& ph, int64_t nb, const E* x, const E* h,
                                   const StepRows<E, O>& s, int64_t r, const int64_t* col, const __mmask16* mask) {
  __m512 acc[R][V], n_x[R];
  tile_start<R, V>(acc, pi.bias_of(nb));
  tile_sums<R, V, false>(acc, x + r * pi.K, pi.K, pi.K, pi.data + nb * pi.pstride, pi.ldb, mask);
  if constexpr (M == GRU) {  // r and z add on the state's bias and sums; n starts them afresh
    const float* b_h = ph.bias_of(nb);
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      const __m512 bv = b_h != nullptr ? _mm512_loadu_ps(b_h + 16 * v) : _mm512_setzero_ps();
#pragma GCC unroll 8
      for (int q = 0; q < R; ++q) {
        if (v == 2) n_x[q] = acc[q][2];
        acc[q][v] = v == 2 ? bv : acc[q][v] + bv;
      }
    }
  }
  if (h != nullptr) tile_sums<R, V, false>(acc, h + r * s.H, s.H, ph.K, ph.data + nb * ph.pstride, ph.ldb, mask);
  step_cells<M>(acc, n_x, s, r, col, mask);
}

// Rows [0, n) of a fused step over panels [nb0, nb1) of the input (pi) and recurrent (ph) weights, packed
// alike: x and h as in step_tile, s where the cells go. On AVX-512 (bfloat16: AVX512-BF16 without AMX), from
// kFusedRows rows a thread (fuses_steps).
template <typename E, typename O>
void step_product(int64_t mode, const Panels<E>& pi, const Panels<E>& ph, int64_t nb0, int64_t nb1, const E* x,
                  const E* h, int64_t n, const StepRows<E, O>& s) {
  with_mode(mode, [&](auto m) {
    constexpr int M = decltype(m)::value;
    constexpr int V = M == GRU ? 3 : 4, R = 6;  // 24 accumulators (GRU: 18 and 6 of n_x)
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      const PanelColumns<V> pc(pi, nb);
      const auto rows_of = [&](auto regs) {
        constexpr int L = decltype(regs)::value;
        int64_t r = 0;
        for (; r + R <= n; r += R) step_tile<M, R, L>(pi, ph, nb, x, h, s, r, pc.col, pc.mask);
        with_count<R - 1>(n - r, [&](auto rows) {
          step_tile<M, decltype(rows)::value, L>(pi, ph, nb, x, h, s, r, pc.col, pc.mask);
        });
      };
      if constexpr (M == LSTM || M == GRU) {
        rows_of(std::integral_constant<int, V>{});
      } else {
        with_count<V>(pc.live, rows_of);
      }
    }
  });
}

// The same in float32 on AVX2: a block's panel registers one at a time (its 64 bytes of each
// row in L1 across the row tiles), 6 rows a tile.
template <bool TA>
void product_avx2(const Panels<float>& p, int64_t nb0, int64_t nb1, const float* a, int64_t lda, int64_t n,
                  float* c, int64_t ldc, bool add) {
  constexpr int R = 6;
  const int64_t rs = !TA ? lda : 1;
  for_blocks(p, nb0, nb1, add, [&](int64_t nb, int64_t k0, int64_t kb, const float* b, const float* bias, bool add_k) {
    const float* ak = a + (TA ? k0 * lda : k0);
    for (int64_t v = 0; v < p.V; ++v) {
      const int64_t lanes = p.lanes(nb, v);
      if (lanes == 0) continue;
      const float* bv = b + 16 * v;
      const float* bias_v = bias != nullptr ? bias + 16 * v : nullptr;
      float* cv = c + p.column(nb, v);
      int64_t r = 0;
      for (; r + R <= n; r += R) tile_avx2<R, TA>(ak + r * rs, lda, kb, bv, p.ldb, bias_v, cv + r * ldc, ldc, lanes, add_k);
      with_count<R - 1>(n - r, [&](auto rows) {
        tile_avx2<decltype(rows)::value, TA>(ak + r * rs, lda, kb, bv, p.ldb, bias_v, cv + r * ldc, ldc, lanes, add_k);
      });
    }
  });
}

// ---- AMX: the bfloat16 products on tiles --------------------------------------------------
// Tile registers as the products use them: tmm0-3 sums (16 rows x 16 floats each), tmm4-5 rows
// of a (16 rows x 32 values), tmm6-7 panel columns (16 pairs of rows x 16 columns, the layout
// bfloat16 panels already have). Tiles are 16 rows (rows_a: fewer rows of sums and of a for a
// product of fewer rows, whose tile products then take fewer cycles and read no row past a's
// end); a's rows and K past their ends come from a zero-padded copy, the panels' K is padded
// with zero pairs (pack).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  explicit TileConfig(int64_t rows_a = kTileRows) {
    for (int i = 0; i < 8; ++i) {
      colsb[i] = 64;
      rows[i] = static_cast<uint8_t>(i < 6 ? rows_a : kTileRows);
    }
  }
};

#define RNNFAST_AMX __attribute__((target("avx512f,avx512bw,amx-tile,amx-bf16")))

// Sum tile I (tmm0-3) starts from src (row stride ld floats; ld 0 repeats one row, a bias) or zero,
// and ends in dst (row stride ld floats).
template <int I>
inline __attribute__((always_inline)) RNNFAST_AMX void sum_start(const float* src, int64_t ld) {
  static_assert(I >= 0 && I < 4, "sum tiles are tmm0-3");
  if (src == nullptr) {
    if constexpr (I == 0) _tile_zero(0);
    if constexpr (I == 1) _tile_zero(1);
    if constexpr (I == 2) _tile_zero(2);
    if constexpr (I == 3) _tile_zero(3);
    return;
  }
  if constexpr (I == 0) _tile_loadd(0, src, ld * 4);
  if constexpr (I == 1) _tile_loadd(1, src, ld * 4);
  if constexpr (I == 2) _tile_loadd(2, src, ld * 4);
  if constexpr (I == 3) _tile_loadd(3, src, ld * 4);
}
template <int I>
inline __attribute__((always_inline)) RNNFAST_AMX void sum_end(float* dst, int64_t ld) {
  if constexpr (I == 0) _tile_stored(0, dst, ld * 4);
  if constexpr (I == 1) _tile_stored(1, dst, ld * 4);
  if constexpr (I == 2) _tile_stored(2, dst, ld * 4);
  if constexpr (I == 3) _tile_stored(3, dst, ld * 4);
}

// Where a sum tile starts from and ends in (see sum_start, sum_end).
struct SumTile {
  const float* from = nullptr;
  int64_t from_ld = 0;
  float* to = nullptr;
  int64_t to_ld = 0;
};

// The tiles of panel nb as amx_block loads them: tile (k, v) holds pairs of rows 16 k to 16 k + 15
// (K from 32 k) of columns 16 v to 16 v + 15, each pair of rows `stride` bytes after the one
// before: 1 KB whole where the panels are tiled, else 64 bytes of each of the panel's rows of pairs.
struct PanelTiles {
  const BF16* b;
  int64_t kstep, vstep, stride;
  PanelTiles(const Panels<BF16>& p, int64_t nb)
      : b(p.data + nb * p.pstride),
        kstep(p.tiled ? p.V * kTileRows * 32 : kTileRows * p.ldb),
        vstep(p.tiled ? kTileRows * 32 : 32),
        stride(p.tiled ? 64 : 2 * p.ldb) {}
  const BF16* operator()(int64_t k, int64_t v) const { return b + k * kstep + v * vstep; }
};

// The words of two rows a and b in pairs, a0 b0 a1 b1 ..., as _mm512_permutex2var_epi16 picks them
// from a's 32 values and b's (the first 32 of the order, then the next 32).
alignas(64) constexpr std::array<uint16_t, 64> kPairOrder = [] {
  std::array<uint16_t, 64> o{};
  for (int q = 0; q < 64; ++q) o[q] = static_cast<uint16_t>((q % 2) * 32 + q / 2);
  return o;
}();

// Rows [r0, r1) of a row-major bfloat16 matrix (row stride lds), r0 even, into dst's rows in pairs,
// the layout of bfloat16 panels (row r's value j beside row r + 1's): dst from direct (and so also a
// transposed a, see tile) or, on AMX, direct_tiled, whose 1 KB tiles also get the columns past N to
// the panel's end, as zeros. Rows from `live` on are zero (an odd end's partner, K's padding): a zero
// times a poisoned NaN would not vanish. On untiled pairs (rows 4 KB apart at G H 1024) a tile's 16
// rows share one L1 set and no prefetcher follows them across pages: tiles made bfloat16 LSTM H256
// B64 training 1.03x as fast, 2 layers 1.06x (2-core Xeon, interleaved runs).
__attribute__((target("avx512f,avx512bw"))) void interleave_pairs(const BF16* src, int64_t lds, int64_t r0,
                                                                  int64_t r1, int64_t live,
                                                                  const Panels<BF16>& dst) {
  const __m512i lo = _mm512_load_si512(kPairOrder.data()), hi = _mm512_load_si512(kPairOrder.data() + 32);
  const int64_t N = dst.N, end = dst.tiled ? dst.NB * 64 : N;
  const PanelTiles tiles(dst, 0);
  const int64_t pair_ld = tiles.stride / int64_t(sizeof(BF16));
  for (int64_t r = r0; r < r1; r += 2) {
    const BF16* a = src + r * lds;
    const BF16* b = a + lds;
    const bool has_a = r < live, has_b = r + 1 < std::min(r1, live);
    BF16* const d = const_cast<BF16*>(tiles(r / kTileK, 0)) + (r / 2 % kTileRows) * pair_ld;
    for (int64_t j = 0; j < end; j += 32) {
      const int64_t n = std::clamp<int64_t>(N - j, 0, 32);
      const __mmask32 cols = static_cast<__mmask32>((uint64_t(1) << n) - 1);
      const __m512i va = has_a ? _mm512_maskz_loadu_epi16(cols, a + j) : _mm512_setzero_si512();
      const __m512i vb = has_b ? _mm512_maskz_loadu_epi16(cols, b + j) : _mm512_setzero_si512();
      BF16* const at = d + j / 64 * dst.pstride + j % 64 / 16 * tiles.vstep;  // column tiles j / 16, + 1
      const uint64_t both = dst.tiled ? ~uint64_t(0) : (uint64_t(1) << (2 * n - 1) << 1) - 1;  // 2n words
      _mm512_mask_storeu_epi16(at, static_cast<__mmask32>(both), _mm512_permutex2var_epi16(va, lo, vb));
      _mm512_mask_storeu_epi16(at + tiles.vstep, static_cast<__mmask32>(both >> 32),
                               _mm512_permutex2var_epi16(va, hi, vb));
    }
  }
}

// MT row tiles of a (a_tile[mt], row stride lda values) times NT column tiles of a panel (from
// column tile v) over kt steps of 32 values of K, MT, NT <= 2. Sum tile (mt, nt) is
// tmm[mt * NT + nt], started and ended as sums[mt * NT + nt] says; a in tmm4-5, the panel in tmm6-7.
template <int MT, int NT>
RNNFAST_AMX void amx_block(const BF16* const* a_tile, int64_t lda, const PanelTiles& b, int64_t v, int64_t kt,
                           const SumTile* sums) {
  static_assert(MT <= 2 && NT <= 2, "four sum tiles (see gemm_amx)");
  constexpr int S = MT * NT;
  sum_start<0>(sums[0].from, sums[0].from_ld);
  if constexpr (S > 1) sum_start<1>(sums[1].from, sums[1].from_ld);
  if constexpr (S > 2) sum_start<2>(sums[2].from, sums[2].from_ld);
  if constexpr (S > 3) sum_start<3>(sums[3].from, sums[3].from_ld);
  const int64_t sa = lda * 2;  // bytes
  for (int64_t k = 0; k < kt; ++k) {
    _tile_loadd(4, a_tile[0] + k * kTileK, sa);
    _tile_loadd(6, b(k, v), b.stride);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (MT == 2) {
      _tile_loadd(5, a_tile[1] + k * kTileK, sa);
      if constexpr (NT == 2) _tile_dpbf16ps(2, 5, 6);  // tile (1, 0)
      if constexpr (NT == 1) _tile_dpbf16ps(1, 5, 6);
    }
    if constexpr (NT == 2) {
      _tile_loadd(7, b(k, v + 1), b.stride);
      _tile_dpbf16ps(1, 4, 7);
      if constexpr (MT == 2) _tile_dpbf16ps(3, 5, 7);
    }
  }
  sum_end<0>(sums[0].to, sums[0].to_ld);
  if constexpr (S > 1) sum_end<1>(sums[1].to, sums[1].to_ld);
  if constexpr (S > 2) sum_end<2>(sums[2].to, sums[2].to_ld);
  if constexpr (S > 3) sum_end<3>(sums[3].to, sums[3].to_ld);
}

// A buffered sum tile's start (16 rows, 64 floats apart): its first `rows` rows from c (row stride ldc,
// `lanes` live columns) where given, else the bias, else zero; the rows past them zero.
RNNFAST_AMX void block_start(float* start, int64_t rows, const float* c, int64_t ldc, int64_t lanes, const float* bias) {
  const __mmask16 mask = static_cast<__mmask16>((uint32_t(1) << lanes) - 1);
  for (int64_t r = 0; r < kTileRows; ++r) {
    __m512 y = _mm512_setzero_ps();
    if (r < rows && c != nullptr) y = _mm512_maskz_loadu_ps(mask, c + r * ldc);
    if (r < rows && c == nullptr && bias != nullptr) y = _mm512_loadu_ps(bias);
    _mm512_storeu_ps(start + r * 64, y);
  }
}

// c (+)= a @ B (+ bias) for rows [0, n) and panels [nb0, nb1) of bfloat16 panels on AMX tiles, 32
// rows of a at a time (in L1 across the panels). Every sum tile starts from c (add) or the bias: one
// of 16 whole rows and 16 live columns straight from c and back to it, the others (the last rows, a
// panel's columns past N) through a small float32 block, whence their live rows and columns reach c.
// A row's sum so takes the same order whatever its tile's rows (2 rows of a batch equal the batch's
// rows bit for bit, split by rows or by units).
RNNFAST_AMX void gemm_amx(const Panels<BF16>& p, int64_t nb0, int64_t nb1, const BF16* a, int64_t lda, int64_t n,
                          float* c, int64_t ldc, bool add) {
  if (n <= 0 || nb0 >= nb1) return;
  const int64_t kt = (p.K + kTileK - 1) / kTileK, kp = kt * kTileK, V = p.V;
  const int64_t tiles = (n + kTileRows - 1) / kTileRows, tile_rows = std::min(n, kTileRows);
  // a's row tiles: read in place where whole, else from a zero-padded copy
  thread_local std::vector<BF16> padded;
  thread_local std::vector<float> block;
  const bool in_place = p.K % kTileK == 0;
  const int64_t copied_from = !in_place ? 0 : n < kTileRows ? n : n / kTileRows * kTileRows;
  if (copied_from < n) {
    padded.resize((tiles * tile_rows - copied_from) * kp);
    for (int64_t r = copied_from; r < tiles * tile_rows; ++r) {
      BF16* row = padded.data() + (r - copied_from) * kp;
      const int64_t live = r < n ? p.K : 0;
      if (live > 0) std::memcpy(row, a + r * lda, live * sizeof(BF16));
      std::memset(static_cast<void*>(row + live), 0, (kp - live) * sizeof(BF16));
    }
  }
  block.resize(2 * kTileRows * 64);
  static const std::array<TileConfig, kTileRows + 1> configs = [] {
    std::array<TileConfig, kTileRows + 1> cs;
    for (int64_t m = 1; m <= kTileRows; ++m) cs[m] = TileConfig(m);
    return cs;
  }();
  _tile_loadconfig(&configs[tile_rows]);
  for (int64_t t = 0; t < tiles;) {
    // a pair of row tiles where both are read alike (in place, or from the copy), else one
    const bool pair = t + 1 < tiles && ((t + 2) * kTileRows <= copied_from || t * kTileRows >= copied_from);
    const int64_t mt = pair ? 2 : 1, r0 = t * kTileRows, rows = std::min(mt * kTileRows, n - r0);
    const BF16* at[2] = {r0 < copied_from ? a + r0 * lda : padded.data() + (r0 - copied_from) * kp, nullptr};
    const int64_t ld = r0 < copied_from ? lda : kp;
    if (pair) at[1] = at[0] + kTileRows * ld;
    float* const c_rows = c + r0 * ldc;
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      const PanelTiles b(p, nb);
      const float* bias = p.bias_of(nb);
      int64_t col[4];
      int64_t lanes[4];
      for (int64_t v = 0; v < V; ++v) {
        col[v] = p.column(nb, v);
        lanes[v] = p.lanes(nb, v);
      }
      bool buffered = false;
      auto sum = [&](int64_t i, int64_t v) {  // row tile t + i, column tile v
        SumTile st;
        if (lanes[v] == 16 && (i + 1) * kTileRows <= rows) {
          float* dst = c_rows + i * kTileRows * ldc + col[v];
          st.from = add ? dst : bias != nullptr ? bias + 16 * v : nullptr;
          st.from_ld = add ? ldc : 0;
          st.to = dst;
          st.to_ld = ldc;
        } else {  // from the same start as a whole tile's, so that no row's sum depends on its tile's rows
          float* start = block.data() + i * kTileRows * 64 + v * 16;
          block_start(start, std::clamp<int64_t>(rows - i * kTileRows, 0, kTileRows), add ? c_rows + i * kTileRows * ldc + col[v] : nullptr,
                      ldc, lanes[v], bias != nullptr ? bias + 16 * v : nullptr);
          st.from = st.to = start;
          st.from_ld = st.to_ld = 64;
          buffered = true;
        }
        return st;
      };
      // the column tiles with live columns (a prefix: a panel's last columns may lie past N), so
      // that no tile reads more than 15 columns past the last one
      int64_t live = 0;
      while (live < V && lanes[live] > 0) ++live;
      // a pair of row tiles by two column tiles where both are there: 4 tile loads for 4 products
      // (2 x 1: 3 for 2). On tiled panels, 2-core 2.6 GHz Xeon, bfloat16 LSTM H256 B64 backward,
      // three interleaved runs: the dh and dx products took 0.88-0.91x the cycles of 2 x 1, the
      // weight gradients' (then K of 256 rows; untiled panels) about the same. (Before the panels were
      // tiled, another 2-core Xeon ran 2 x 1 1.35x faster than 2 x 2.) One row tile: 1 x 2.
      for (int64_t v = 0; v < live; v += pair && v + 1 == live ? 1 : 2) {
        if (pair && v + 1 < live) {
          const SumTile s4[4] = {sum(0, v), sum(0, v + 1), sum(1, v), sum(1, v + 1)};
          amx_block<2, 2>(at, ld, b, v, kt, s4);
        } else if (pair) {
          const SumTile s2[2] = {sum(0, v), sum(1, v)};
          amx_block<2, 1>(at, ld, b, v, kt, s2);
        } else if (v + 1 < live) {
          const SumTile s2[2] = {sum(0, v), sum(0, v + 1)};
          amx_block<1, 2>(at, ld, b, v, kt, s2);
        } else {
          const SumTile s1[1] = {sum(0, v)};
          amx_block<1, 1>(at, ld, b, v, kt, s1);
        }
      }
      if (!buffered) continue;
      for (int64_t r = 0; r < rows; ++r) {  // the buffered tiles, as tile_store puts them
        const int64_t i = r / kTileRows;
        for (int64_t v = 0; v < V; ++v) {
          if (lanes[v] == 0 || (lanes[v] == 16 && (i + 1) * kTileRows <= rows)) continue;
          const __mmask16 mask = static_cast<__mmask16>((uint32_t(1) << lanes[v]) - 1);
          _mm512_mask_storeu_ps(c_rows + r * ldc + col[v], mask, _mm512_loadu_ps(block.data() + r * 64 + v * 16));
        }
      }
    }
    t += mt;
  }
  _tile_release();
}

// A product of at most 8 units of one gate over a long K (an Elman RNN's input projection) runs as dot
// products (dot_pairs): 16 lanes of K a multiply-add where the tile's had at most 8 live lanes, and a
// broadcast each.
constexpr int64_t kDotMinK = 128;

// c (+)= a @ B over rows [0, n) and panels [nb0, nb1); a as in tile. AVX-512: 24 accumulators,
// 6 rows of 4 registers or 8 rows of 3; AVX2 (float32): 6 rows of one register (two halves).
template <typename E>
void gemm(const Panels<E>& p, int64_t nb0, int64_t nb1, const E* a, int64_t lda, int64_t n, float* c, int64_t ldc,
          bool add, bool transposed_a = false) {
  if constexpr (std::is_same_v<E, BF16>) {
    if (kHasAmxBf16 && !transposed_a) return gemm_amx(p, nb0, nb1, a, lda, n, c, ldc, add);
    TORCH_CHECK(!p.tiled, "rnnfast: panels in AMX tiles take AMX products");
  }
  if constexpr (std::is_same_v<E, float>) {
    if (!kHasAvx512) {
      if (transposed_a) return product_avx2<true>(p, nb0, nb1, a, lda, n, c, ldc, add);
      return product_avx2<false>(p, nb0, nb1, a, lda, n, c, ldc, add);
    }
  }
  if constexpr (std::is_same_v<E, float>) {
    if (kHasAvx512 && p.rows_data != nullptr && !transposed_a && p.K >= kDotMinK && nb1 > nb0) {
      return dot_pairs(a, lda, n, p.rows_data, p.K, p.K, p.N, p.bias_data, c, ldc, add);
    }
  }
  if (transposed_a) {
    TORCH_CHECK(p.V == 4, "rnnfast: transposed products take 4-register panels");
    return product<4, 6, true>(p, nb0, nb1, a, lda, n, c, ldc, add);
  }
  if (p.V == 4) {
    product<4, 6, false>(p, nb0, nb1, a, lda, n, c, ldc, add);
  } else {
    product<3, 8, false>(p, nb0, nb1, a, lda, n, c, ldc, add);
  }
}

// c = a @ B over rows [0, n) and panels [nb0, nb1) of bfloat16 panels not in AMX tiles, a transposed in
// pairs (as gemm's transposed_a), straight into bfloat16 c, each float32 sum rounded once: for a K of one
// block (k_block rows), as the weight gradients of a short call are.
void gemm_rounded(const Panels<BF16>& p, int64_t nb0, int64_t nb1, const BF16* a, int64_t lda, int64_t n, BF16* c,
                  int64_t ldc) {
  TORCH_CHECK(p.K <= k_block<BF16>() && !p.tiled && p.V == 4,
              "rnnfast: gemm_rounded takes one block of 4-register panels");
  product<4, 6, true>(p, nb0, nb1, a, lda, n, c, ldc, false);
}

// c = the bias of panels [nb0, nb1) (zero without one) for `rows` rows (row stride ldc): their
// product with rows of zeros.
template <typename E>
void bias_rows(const Panels<E>& p, int64_t nb0, int64_t nb1, int64_t rows, float* c, int64_t ldc) {
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const float* panel_bias = p.bias_of(nb);
    for (int64_t v = 0; v < p.V; ++v) {
      const int64_t col = p.column(nb, v), lanes = p.lanes(nb, v);
      const float* bias = panel_bias != nullptr ? panel_bias + v * 16 : nullptr;
      for (int64_t r = 0; r < rows && lanes > 0; ++r) {
        float* dst = c + r * ldc + col;
        for (int64_t l = 0; l < lanes; ++l) dst[l] = bias != nullptr ? bias[l] : 0.f;
      }
    }
  }
}

// Rows a step goes through at a time (of B): two tiles of every panel, so that the block's rows of a
// and its outputs stay in L1/L2 between the product and the gate update; on AVX-512 float32 panels of 4
// registers (LSTM, RNN) up to 64 rows, so that each K block of a panel, loaded into L1, serves up to 11
// row tiles rather than 2: on a 2-core Xeon, in one process, LSTM H384-1024 inference 1.005-1.063x as
// fast, H512 training 1.03-1.04x, H256 1.00-1.03x (bench/results/2026-12-06-cpu-block-rows-ab.md).
constexpr int64_t kMaxBlockRows = 64;
template <typename E>
int64_t block_rows(const Panels<E>& p, int64_t B) {
  if (std::is_same_v<E, BF16> && kHasAmxBf16) return 2 * kTileRows;  // a pair of row tiles
  if (std::is_same_v<E, float> && kHasAvx512 && p.V == 4) return std::clamp<int64_t>(B, 1, kMaxBlockRows);
  return p.V == 4 || !kHasAvx512 ? 12 : 16;
}

// One step's recurrent product over a thread's panels [nb0, nb1) and rows [r0, r1), in slabs of
// panels that fill half of L2 (each `also` elements more where a fused step reads the input weights'
// panel beside it), each slab in blocks of RB rows: f(s0, s1, u0, cnt, r, rows) for
// panels [s0, s1), their units [u0, u0 + cnt), and rows [r, r + rows). Each panel is then read from
// L3 (or memory) once a step, not once per block of rows; a thread's whole share is one slab where
// it fits. Forward: LSTM H512 on a 512 KB L2 AVX2 EPYC 0.75x -> 0.87x torch.nn. Backward (dh): LSTM
// T100 B64 H512 float32 training on a 2 MB L2 Xeon, the dh products 62 -> 52 ms of a 373 ms step
// (bench/results/2026-12-06-cpu-f32-backward-ab.md).
template <typename E, typename F>
void for_slabs(const Panels<E>& p, int64_t nb0, int64_t nb1, int64_t r0, int64_t r1, int64_t RB, int64_t also, F&& f) {
  const int64_t slab = std::max<int64_t>(1, l2_bytes() / 2 / ((p.pstride + also) * int64_t(sizeof(E))));
  for (int64_t s0 = nb0; s0 < nb1; s0 += slab) {
    const int64_t s1 = std::min(nb1, s0 + slab);
    const int64_t u0 = std::min(p.N, s0 * p.U), cnt = std::min(p.N, s1 * p.U) - u0;
    for (int64_t r = r0; r < r1; r += RB) f(s0, s1, u0, cnt, r, std::min(RB, r1 - r));
  }
}

// Whether a forward runs fused steps (step_product) at `rows` rows a thread (split by_rows or not): each step
// projects its own inputs in the tiles of its recurrent product, and the cells take the sums from registers,
// so no pre-activations go through memory (the input's at LSTM B256 H768: 3 MB a step, beyond L2). In one
// process, switched call by call: LSTM and Elman 1.07x as fast in the median of 40 shapes (0.91-1.35x),
// LSTM H384-768 inference at B32-256 1.06-1.16x, which took it past torch.nn
// (bench/results/2026-12-08-cpu-amd-fused-steps-ab.md); GRU 1.00-1.43x in inference, 0.995-1.035x in
// training, its n gate's two sums kept apart (bench/results/2026-12-08-cpu-amd-fused-gru-ab.md). At 1 row a
// thread the chunk's projection over 50 steps' rows at once ran faster (fused 0.80-0.83x), at 2 0.91-1.02x;
// so did an Elman layer's, whose cell is one tanh, split by rows at 32 rows a thread and more (fused
// 0.89-1.02x, median 0.97x: each step reads all of W_ih for its rows, the chunk once for 4 steps' rows).
constexpr int64_t kFusedRows = 4, kElmanChunkedRows = 32;
template <typename E>
bool fuses_steps(const Panels<E>& p, int64_t mode, int64_t rows, bool by_rows) {
  const bool isa = std::is_same_v<E, float> ? kHasAvx512 && p.rows_data == nullptr : kHasAvx512Bf16 && !kHasAmxBf16;
  const bool elman_chunked = (mode == RNN_TANH || mode == RNN_RELU) && by_rows && rows >= kElmanChunkedRows;
  return isa && rows >= kFusedRows && !elman_chunked;
}

// Rows a fused step goes through at a time: as many as keep their inputs and states in a quarter of L2
// beside the slab's panels, in whole tiles of 6 (12-192 rows ran the same, within 2%).
template <typename E>
int64_t fused_block_rows(const Panels<E>& ph, const Panels<E>& pi, int64_t B) {
  const int64_t row_bytes = (ph.K + pi.K) * int64_t(sizeof(E));
  return std::clamp<int64_t>(l2_bytes() / 4 / row_bytes / 6 * 6, 6, std::max<int64_t>(B, 6));
}

// The units [u0, u0 + cnt) that thread tid of nt owns: whole panels, split evenly.
struct Share {
  int64_t nb0, nb1, u0, cnt;
  template <typename E>
  Share(const Panels<E>& p, int64_t nt, int64_t tid) {
    nb0 = p.NB * tid / nt;
    nb1 = p.NB * (tid + 1) / nt;
    u0 = std::min(p.N, nb0 * p.U);
    cnt = std::min(p.N, nb1 * p.U) - u0;
  }
};

// Rows [r0, r1) of n that thread tid of nt takes, in whole tiles of 6.
std::pair<int64_t, int64_t> row_share(int64_t n, int64_t nt, int64_t tid) {
  const int64_t tiles = (n + 5) / 6;
  return {std::min(n, tiles * tid / nt * 6), std::min(n, tiles * (tid + 1) / nt * 6)};
}

// Threads for a split by units: whole panels each, of 64 rows of K or more in all. Below that a
// thread's share of a step (under 4096 multiply-adds a row) costs less than the barrier: LSTM and GRU
// at H 32, B 1-5, on one thread 1.17-1.26x as fast in inference, 1.09-1.11x in training (2-core Xeon,
// bench/results/2026-12-06-cpu-small-threads-ab.md).
template <typename E>
int64_t threads_for(const Panels<E>& p) {
  return std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), p.NB, p.NB * p.K / 64}));
}

// How the loops split a step among threads. By rows: each thread runs every unit of its B / nt
// rows, with no step waiting on another and no state crossing cores; by units: each thread its
// panels of every row, one barrier a step. By rows where each thread has enough rows and the whole
// of W_hh, which each thread then reads every step, fits one core's L2. On a 2-core AVX-512 EPYC
// (1 MB L2), against torch.nn: LSTM bfloat16 inference B64 H256 0.74x -> 1.07x, B8 0.97x -> 1.44x,
// float32 training B32 H128 0.86x -> 1.17x; GRU B32 H128 1.77x -> 3.42x. By units stayed ahead at
// 2 rows a thread (by rows took 1.13x its time at B4) and where W_hh outgrew L2 (1.21x at float32
// H1024 B8, 1.07x at H512 B16). On AMX tiles (16 rows) by units stayed ahead up to 8 rows a thread
// (2-core Xeon, bfloat16 LSTM H256 inference B8 1.42x vs 0.87x torch.nn, B16 1.10x vs 0.91x) and
// fell behind from 12 (B24 0.99x vs 1.27x, B32 H128 1.14x vs 1.98x). A single step (a cell's) goes
// by units: it has its one barrier either way, and each thread then reads half of the weights
// (LSTMCell B8 H256 inference 1.39x, training 1.08x; GRUCell 1.27x, 1.09x; 2-core Xeon); but by rows
// from kOneStepRows rows a thread, which amortise each thread's read of all of W_hh, where whole panels
// may split the units unevenly (an Elman layer of 200 units: 128 and 72). 2-core Xeon, T1: inference
// RNN B256 H200 1.13x, LSTM/GRU B128-256 H256 1.01-1.05x, training 1.07-1.14x
// (bench/results/2026-12-07-cpu-one-step-rows-ab.md); at 32 rows a thread LSTM H256 ran 0.92-0.96x.
constexpr int64_t kOneStepRows = 64;
struct Split {
  bool by_rows;
  int64_t threads;  // threads to start
  // what thread tid of nt runs: its units and its rows [r0, r1)
  struct Part {
    Share own;
    int64_t r0, r1;
  };

  template <typename E>
  Split(const Panels<E>& p, int64_t B, int64_t T) {
    const int64_t nt = at::get_num_threads(), min_rows = std::is_same_v<E, BF16> && kHasAmxBf16 ? 12 : 3;
    by_rows = nt > 1 && B >= min_rows * nt && p.bytes() <= l2_bytes() && (T > 1 || B >= kOneStepRows * nt);
    threads = by_rows ? std::min(nt, B) : threads_for(p);
  }

  template <typename E>
  Part part(const Panels<E>& p, int64_t B, int64_t nt, int64_t tid) const {
    if (!by_rows) return {Share(p, nt, tid), 0, B};
    return {Share(p, 1, 0), B * tid / nt, B * (tid + 1) / nt};
  }
};

// Work dealt out in groups of panels, where each thread's share of W_hh would not stay in its L2
// anyway (it streams from L3 every step): each thread runs its own share (Share's panels) in
// kGroups groups, in order, then helps with what is left of the others', so that a phase takes
// about the threads' mean time, not the slowest's, on a host whose cores run at uneven speeds.
// Phases end at a barrier; the counters of phase q sit at q % 2, and thread 0 clears those of
// phase q + 1 during phase q.
class Deal {
 public:
  static constexpr int64_t kGroups = 4;  // a share's groups: the most a helper can take from the end

  template <typename E>
  explicit Deal(const Panels<E>& p, const Split& split)
      : on_(!split.by_rows && split.threads > 1 && p.bytes() > split.threads * (l2_bytes() / 2)),
        NB_(p.NB),
        nt_(split.threads),
        taken_(new std::atomic<int64_t>[2 * nt_]) {
    for (int64_t i = 0; i < 2 * nt_; ++i) taken_[i].store(0);
  }

  bool on() const { return on_; }

  // f(nb0, nb1) over the panels thread tid runs in its next phase (counted in q): its own share
  // [own.nb0, own.nb1) where dealing is off, else the groups it claims
  template <typename F>
  void run(int64_t& q, int64_t tid, const Share& own, F&& f) {
    if (!on_) return f(own.nb0, own.nb1);
    std::atomic<int64_t>* now = &taken_[q % 2 * nt_];
    if (tid == 0) {
      for (int64_t v = 0; v < nt_; ++v) taken_[(q + 1) % 2 * nt_ + v].store(0, std::memory_order_relaxed);
    }
    for (int64_t d = 0; d < nt_; ++d) {
      const int64_t v = (tid + d) % nt_, s0 = NB_ * v / nt_, n = NB_ * (v + 1) / nt_ - s0;
      for (int64_t g; (g = now[v].fetch_add(1, std::memory_order_relaxed)) < kGroups;) {
        const int64_t g0 = s0 + n * g / kGroups, g1 = s0 + n * (g + 1) / kGroups;
        if (g1 > g0) f(g0, g1);
      }
    }
    ++q;
  }

 private:
  bool on_;
  int64_t NB_, nt_;
  std::unique_ptr<std::atomic<int64_t>[]> taken_;  // [parity][thread]: groups of its share claimed
};

// Ask for rows [r0, r1) of step t of t3 (T, B, W): `runs` runs of m floats from column j0,
// H apart. Rows of the saved tensors are pages apart, beyond what the hardware prefetchers
// follow, and a gate update that waits on them stalls the step.
template <typename E>
void prefetch(const Rows<E>& t3, int64_t t, int64_t r0, int64_t r1, int64_t j0, int64_t m, int64_t runs,
              int64_t H) {
  for (int64_t b = r0; b < r1; ++b) {
    const char* row = reinterpret_cast<const char*>(t3(t, b) + j0);
    for (int64_t q = 0; q < runs; ++q) {
      for (int64_t j = 0; j < m * int64_t(sizeof(E)); j += 64) _mm_prefetch(row + q * H * sizeof(E) + j, _MM_HINT_T0);
    }
  }
}

// Weights packed for the loops, kept across calls until they change; tagged by use and mode.
enum PanelUse { kForward, kInput, kBackward, kBackwardInput, kStepwise, kStepwiseT };
template <typename E>
WeightCache<Panels<E>>& panels() {
  static WeightCache<Panels<E>> cache;
  return cache;
}

// Scratch that outlives a call, one set per calling thread: growing only, it spares
// each call the page faults of fresh allocations, a large share of short calls' time.
enum Slot {
  kStates, kStatesLow, kGates, kScratch, kGateGrads, kGateGradsH, kPrevStates, kPairs, kWeightGrads, kPackedX,
  kPackedDx, kSlots
};
Tensor workspace(Slot slot, at::IntArrayRef sizes, at::ScalarType dtype = at::kFloat) {
  thread_local std::array<Tensor, kSlots> held;
  const int64_t numel = c10::multiply_integers(sizes);
  Tensor& t = held[slot];
  if (!t.defined() || t.numel() < numel || t.scalar_type() != dtype) {
    c10::InferenceMode normal(false);  // a plain tensor, writable whether or not a later call runs in inference mode
    t = at::empty({numel}, dtype);
  }
  return t.as_strided(sizes, c10::contiguous_strides(sizes));  // one view, not narrow and view: short calls count
}

// Buffers that leave a call (what the forward saves for backward, the weight gradients), recycled
// when autograd frees them: the first touch of a fresh multi-megabyte allocation page-faults every
// 4 KiB, which costs about as much as the arithmetic that fills it (with the weight gradients from
// here an LSTMCell B32 H256 training step ran 1.45x as fast under glibc's default malloc,
// bench/results/2026-12-06-cpu-recycled-grads-ab.md). Holds at most kPoolBytes idle, in pages mapped
// for it: none of it stays in malloc's heap, and a block dropped goes back to the system. It allocates
// nothing as blocks come back: the nodes of an idle map, allocated as autograd freed a step's buffers,
// sat between the large tensors of a cell stepped over an input that needs its gradient (each step's
// x[t] hands autograd a zeroed (T, B, I) tensor), so that no freed tensor's hole took the next one and
// malloc's heap grew by about one such tensor a step (LSTMCell T200 B128 I128 H8 training: 1.7 GB peak
// resident against torch.nn's 0.1 GB, bench/results/2026-12-07-cpu-pool-pages-ab.md). Buffers below
// kPoolMinBytes, which malloc serves from its heap without fresh pages (glibc maps 128 KiB and up
// afresh by default), come from torch's allocator. Blocks in use are reported to torch's profiler as
// its allocator reports its own, so memory profiles (and the bench's peak memory) count them.
class RecyclingPool {
 public:
  RecyclingPool() { idle_.reserve(kPoolBytes / kPoolMinBytes); }

  Tensor empty(at::IntArrayRef sizes, bool zero, at::ScalarType dtype = at::kFloat) {
    const size_t bytes = c10::multiply_integers(sizes) * c10::elementSize(dtype);
    Tensor t;
    if (bytes < kPoolMinBytes) {
      t = at::empty(sizes, dtype);
    } else {
      const Block b = take(bytes);
      t = at::from_blob(b.p, sizes, [this, b](void*) { give(b); }, dtype);
    }
    return zero ? t.zero_() : poison(t);
  }

 private:
  static constexpr size_t kPoolBytes = size_t(256) << 20, kPoolMinBytes = size_t(128) << 10;

  struct Block {
    size_t bytes;
    void* p;
  };

  // A fresh block's size: `bytes` rounded up to a quarter of their power of two (at most a quarter
  // more), so that calls whose sizes change from batch to batch (sequence lengths) come back to
  // blocks of a few sizes. Exact sizes mapped a block for each new length, and its pages faulted
  // afresh (LSTM H256 training over lengths 50-150: 7700 page faults a step, against 1550 from malloc).
  static size_t block_size(size_t bytes) {
    const size_t quarter = (size_t(1) << (63 - __builtin_clzll(bytes))) / 4;
    return (bytes + quarter - 1) / quarter * quarter;
  }

  // the smallest idle block that holds `bytes` within twice them, of those the one given back last
  // (the likeliest to be in cache); else a fresh one
  Block take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      if (it->bytes >= bytes && it->bytes <= 2 * bytes && (best == idle_.end() || it->bytes <= best->bytes)) best = it;
    }
    Block b;
    if (best != idle_.end()) {
      b = *best;
      idle_.erase(best);
      held_ -= b.bytes;
    } else {
      b.bytes = block_size(bytes);
      b.p = mmap(nullptr, b.bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK_WITH(OutOfMemoryError, b.p != MAP_FAILED, "rnnfast: could not map ", b.bytes, " bytes: ",
                       std::strerror(errno));
    }
    used_ += b.bytes;
    report(b.p, int64_t(b.bytes));
    return b;
  }

  // allocates nothing: idle_ has room for every block the pool may hold
  void give(const Block& b) {
    std::lock_guard<std::mutex> lock(mutex_);
    used_ -= b.bytes;
    report(b.p, -int64_t(b.bytes));
    while (held_ + b.bytes > kPoolBytes && !idle_.empty()) {  // make room: drop the largest
      const auto largest =
          std::max_element(idle_.begin(), idle_.end(), [](const Block& x, const Block& y) { return x.bytes < y.bytes; });
      held_ -= largest->bytes;
      munmap(largest->p, largest->bytes);
      idle_.erase(largest);
    }
    if (b.bytes > kPoolBytes) {
      munmap(b.p, b.bytes);
      return;
    }
    idle_.push_back(b);
    held_ += b.bytes;
  }

  // a block handed out (bytes > 0) or given back, as torch's CPU allocator reports its own
  void report(void* p, int64_t bytes) const {
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(p, bytes, used_, used_ + held_, c10::Device(c10::DeviceType::CPU));
    }
  }

  std::mutex mutex_;
  std::vector<Block> idle_;  // reserved for the most it can hold: never grows
  size_t held_ = 0, used_ = 0;
};
RecyclingPool& recycling_pool() {
  static RecyclingPool* pool = new RecyclingPool;  // never destroyed: deleters may run at exit
  return *pool;
}

// Rows of a chunk that the weight gradients sum at a time.
constexpr int64_t kSumRows = 256;

// MKL's sgemm where torch is built with MKL (whose libraries export its ILP64 Fortran sgemm_64), the
// CPU is Intel's and RNNFAST_CPU_ISA caps nothing; else null. The float32 weight gradients take it,
// each thread on its columns: in the loop it ran them in about 90 ms where the tile products took
// 118 (LSTM T100 B64 H512 training on a 2 MB L2 Xeon; the whole step 1.13x, H1024 B16 1.36x, H256
// 1.03-1.12x; with the dh slabs 1.16x and 1.27x, bench/results/2026-12-06-cpu-f32-backward-ab.md).
// So does dx = dgi W_ih, each thread on its rows, where the tile products read W_ih in place (LSTM
// I=H 512 and 1024 training 1.05x, GRU 1.04x, H128-256 0.97-1.04x: within this host's noise,
// bench/results/2026-12-06-cpu-mkl-dx-ab.md). MKL takes slower paths on AMD CPUs (matmul_nt prefers
// oneDNN for that): the tile products stay there.
using Sgemm = void (*)(const char*, const char*, const int64_t*, const int64_t*, const int64_t*, const float*,
                       const float*, const int64_t*, const float*, const int64_t*, const float*, float*,
                       const int64_t*);
struct Mkl {
  Sgemm sgemm = nullptr;
  int (*set_local_threads)(int) = nullptr;  // MKL_Set_Num_Threads_Local: returns the setting it replaces

  // Column-major c (m, n) = a (m, k) b (k, n) + beta c, a and b transposed where ta, tb say "T"; on
  // the calling thread alone: left to split them, MKL ran our two threads' calls 8x slower than one
  // thread's (LSTM T100 B4 H32 training 6.3 -> 0.8 ms, T1000 B4 H64 2.3x; 2 threads, KVM Xeon),
  // though no new thread appeared.
  void gemm(const char* ta, const char* tb, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
            const float* b, int64_t ldb, float beta, float* c, int64_t ldc) const {
    const float one = 1.0f;
    const int was = set_local_threads(1);
    sgemm(ta, tb, &m, &n, &k, &one, a, &lda, b, &ldb, &beta, c, &ldc);
    set_local_threads(was);
  }
};
constexpr Mkl kNoMkl{};
const Mkl& mkl() {
  static const Mkl m = [] {
    if (!mkl_on_intel() || !kHasAvx512 || kIsaCapped) return Mkl{};
    void* torch_cpu = dlopen("libtorch_cpu.so", RTLD_LAZY | RTLD_NOLOAD);  // torch's own MKL, not another BLAS
    if (torch_cpu == nullptr) return Mkl{};
    Mkl found{reinterpret_cast<Sgemm>(dlsym(torch_cpu, "sgemm_64")),
              reinterpret_cast<int (*)(int)>(dlsym(torch_cpu, "MKL_Set_Num_Threads_Local"))};
    return found.sgemm != nullptr && found.set_local_threads != nullptr ? found : Mkl{};
  }();
  return m;
}

// Steps per chunk, about `rows` rows: the forward's input projection 256 at a time, so that
// its pre-activations stay in L2 (at H 256, 1024 rows did not; 10-15% slower); the backward's
// gate gradients 512, so that the weight gradients' products run over twice the K (2-core
// 2.6 GHz Xeon, LSTM H256 training, interleaved: bfloat16 B64 1.05x, B8 1.04x, GRU 1.07x,
// float32 1.01-1.03x the speed of 256). No buffer grows with T.
constexpr int64_t kForwardChunkRows = 256, kBackwardChunkRows = 512;
int64_t chunk_steps(int64_t T, int64_t B, int64_t rows) {
  return std::clamp<int64_t>(rows / std::max<int64_t>(B, 1), 1, T);
}

// Where each step's rows begin when the steps' active rows sit back to back (T + 1 entries): the
// rows of PackedSequence data, or of the backward's compact chunks.
std::vector<int64_t> step_starts(const std::vector<int64_t>& bs) {
  std::vector<int64_t> starts(bs.size() + 1, 0);
  for (size_t t = 0; t < bs.size(); ++t) starts[t + 1] = starts[t] + bs[t];
  return starts;
}

// The walked order of steps: k = 0, 1, ... is t = k forward and T - 1 - k in reverse;
// a chunk [k0, k1) of it covers the steps [first, first + count).
struct Walk {
  int64_t T;
  bool reverse;
  int64_t step(int64_t k) const { return reverse ? T - 1 - k : k; }
  int64_t first(int64_t k0, int64_t k1) const { return reverse ? T - k1 : k0; }
};

// The forward loop over inputs and weights E (float or bfloat16) and outputs and returned
// states O, h0's type: E, or float beside bfloat16 (autocast's float32 states). The state,
// the cell state, the gates and all sums stay float32; for bfloat16 a rounded copy of the
// state (hlo) feeds the recurrent product. Steps fused (fuses_steps) or over a chunk's
// input pre-activations (gi). x is (T, B, I), or in inference PackedSequence data
// (rows, I) whose steps bs gives: then the output is in its rows too, and no padded copy is made.
template <typename E, typename O>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> forward_loop(int64_t mode, const Tensor& x,
                                                                const std::vector<int64_t>& bs, bool packed,
                                                                const Tensor& h0, const Tensor& c0,
                                                                const Tensor& w_ih, const Tensor& w_hh,
                                                                const Tensor& b_ih, const Tensor& b_hh, bool reverse,
                                                                bool save) {
  constexpr bool low = !std::is_same_v<E, float>;
  const bool rows_in = x.dim() == 2;
  TORCH_CHECK(!rows_in || (packed && !save), "rnnfast: PackedSequence data runs the fused loop in inference only");
  const int64_t T = rows_in ? int64_t(bs.size()) : x.size(0), B = rows_in ? bs[0] : x.size(1), I = x.size(-1);
  const int64_t G = gate_count(mode), H = w_hh.size(1), GH = G * H;
  const bool lstm = mode == LSTM, gru = mode == GRU;
  const std::vector<int64_t> starts = rows_in ? step_starts(bs) : std::vector<int64_t>();
  const auto fopts = x.options().dtype(at::kFloat), oopts = h0.options();
  Tensor out = rows_in ? at::empty({x.size(0), H}, oopts)
                       : packed ? at::zeros({T, B, H}, oopts) : at::empty({T, B, H}, oopts);
  Tensor c = lstm ? c0.to(at::kFloat).contiguous().clone() : at::empty({0}, fopts);
  // saved for backward: LSTM gates and cell states, GRU r, z, n and W_hn h + b_hn
  Tensor ws1 = save && (lstm || gru) ? recycling_pool().empty({T, B, lstm ? GH : 4 * H}, packed)
                                     : at::empty({0}, fopts);
  Tensor ws2 = save && lstm ? recycling_pool().empty({1, T, B, H}, packed) : at::empty({0}, fopts);
  if (B == 0) return {out, h0.clone(), c.to(h0.scalar_type()), ws1, ws2};
  const Tensor cs = lstm && save ? ws2[0] : Tensor();
  const int64_t U = G == 1 ? 64 : 16;
  // a zero state's product is the bias alone only where W_hh is finite (0 x NaN is NaN, as torch.nn's
  // first step gives it)
  const Panels<E> p = panels<E>().get({w_hh, gru ? b_hh : Tensor()}, kForward * 4 + mode, [&] {
    Panels<E> packed_w = pack<E>(w_hh, split_biases(mode, b_ih, b_hh).second, G, U);
    packed_w.finite = all_finite(packed_w.data, 1, packed_w.w.numel(), 0);  // (zero padding is finite)
    return packed_w;
  });
  const Panels<E> p_in = panels<E>().get({w_ih, b_ih, b_hh}, kInput * 4 + mode,
                                         [&] { return pack<E>(w_ih, split_biases(mode, b_ih, b_hh).first, G, U); });
  const Split split(p, B, T);
  const bool by_rows = split.by_rows;
  const int64_t nt = split.threads;
  const bool fused = fuses_steps(p, mode, by_rows ? B / nt : B, by_rows);
  const int64_t RB = fused ? fused_block_rows(p, p_in, B) : block_rows(p, B);
  const int64_t TC = chunk_steps(T, B, kForwardChunkRows);
  const Walk walk{T, reverse};
  // ping-pong: walked step k reads hbuf[k % 2] and writes every row and unit of the other
  Tensor hbuf = workspace(kStates, {2, B, H});
  hbuf[0].copy_(h0);
  const bool h0_zero = p.finite && all_zero(hbuf.data_ptr<float>(), B * H);  // the first step's product: its bias
  Tensor hlo = low ? workspace(kStatesLow, {2, B, H}, x.scalar_type()) : hbuf;  // what the product reads
  if (low) hlo[0].copy_(h0);
  const int64_t ldg = padded_row(GH, sizeof(float));  // rows of pre-activations
  Tensor gi = workspace(kGates, {fused ? 0 : TC, B, ldg});  // one chunk's input pre-activations
  // per thread: recurrent pre-activations and a row's gates (fused steps keep both in registers)
  const int64_t scratch_row = fused ? 0 : RB * ldg + 4 * H;
  Tensor scratch = workspace(kScratch, {nt, scratch_row});

  const Rows<float> cs_rows(cs), ws1_rows(ws1);
  const Rows<E> x_rows(x, starts.data());
  const Rows<O> out_rows(out, starts.data());
  float* const gi_p = gi.data_ptr<float>();
  Deal deal(p, split);
  float* const c_p = lstm ? c.data_ptr<float>() : nullptr;
  float* const hbuf_p = hbuf.data_ptr<float>();
  E* const hlo_p = hlo.data_ptr<E>();
  // the last state, written by the thread that forms it, while in its cache: a copy on the calling
  // thread after the loop read the other's half from its core (RNNCell T1 B256 H33: 6 of 44 us)
  Tensor h_n = at::empty({B, H}, oopts);
  O* const h_n_p = h_n.data_ptr<O>();
#pragma omp parallel num_threads(nt)
  {
    const int64_t tid = omp_get_thread_num();
    const Split::Part part = split.part(p, B, omp_get_num_threads(), tid);
    const Share own = part.own;
    const int64_t rb0 = part.r0, rb1 = part.r1;
    int64_t phase = 0;  // of the dealt work (every thread counts the same)
    float* gh = scratch.data_ptr<float>() + tid * scratch_row;
    // a row's gates when nothing is saved: stays in L1 (fused steps have no scratch: their gates stay in registers)
    float* row_ws = fused ? nullptr : gh + RB * ldg;
    for (int64_t k0 = 0; k0 < T; k0 += TC) {
      const int64_t k1 = std::min(T, k0 + TC), t0 = walk.first(k0, k1), t1 = t0 + (k1 - k0);
      // the chunk's input pre-activations, as x lays out its rows; split by rows, at (step, row) whatever x's
      // layout, as no barrier keeps one thread's next chunk off the rows another still reads
      const auto gi_row = [&](int64_t t, int64_t b) {
        return gi_p + ((by_rows ? (t - t0) * B : x_rows.start(t) - x_rows.start(t0)) + b) * ldg;
      };
      // this thread's share of the chunk's input projection (fused steps project their own rows), only the rows
      // the steps run: only this thread reads it
      if (!fused && by_rows) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t r1 = std::min(rb1, bs[t]);
          if (r1 > rb0) gemm(p_in, 0, p_in.NB, x_rows(t, rb0), I, r1 - rb0, gi_row(t, rb0), ldg, false);
        }
      } else if (!fused) {
        const auto project = [&](int64_t nb0, int64_t nb1) {
          if (packed && !rows_in) {  // padded PackedSequence: each step's active rows
            for (int64_t t = t0; t < t1; ++t) {
              if (bs[t] > 0) gemm(p_in, nb0, nb1, x_rows(t, 0), I, bs[t], gi_row(t, 0), ldg, false);
            }
          } else {
            gemm(p_in, nb0, nb1, x_rows(t0, 0), I, x_rows.start(t1) - x_rows.start(t0), gi_row(t0, 0), ldg, false);
          }
        };
        deal.run(phase, tid, own, project);
        if (deal.on()) {  // the steps' groups may read any thread's columns
#pragma omp barrier
        }
      }
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t t = walk.step(k), n = std::min(bs[t], rb1);
        float* cur = hbuf_p + (k % 2) * B * H;
        float* nxt = hbuf_p + ((k + 1) % 2) * B * H;
        E* cur_lo = hlo_p + (k % 2) * B * H;
        E* nxt_lo = hlo_p + ((k + 1) % 2) * B * H;
        // panels [nb0, nb1) of step k: rows past the batch carried over, the others' product and gates
        const auto panels_step = [&](int64_t nb0, int64_t nb1) {
          const int64_t j0 = std::min(p.N, nb0 * p.U), m = std::min(p.N, nb1 * p.U) - j0;
          for (int64_t b = std::max(n, rb0); b < rb1; ++b) {
            std::memcpy(nxt + b * H + j0, cur + b * H + j0, m * sizeof(float));
            if (low) std::memcpy(nxt_lo + b * H + j0, cur_lo + b * H + j0, m * sizeof(E));
          }
          for_slabs(p, nb0, nb1, rb0, n, RB, fused ? p_in.pstride : 0,
                    [&](int64_t s0, int64_t s1, int64_t u0, int64_t cnt, int64_t r0, int64_t rows) {
                      if (fused) {
                        const StepRows<E, O> cells{cur + r0 * H,
                                                   lstm ? c_p + r0 * H : nullptr,
                                                   lstm && save ? cs_rows(t, r0) : nullptr,
                                                   (lstm || gru) && save ? ws1_rows(t, r0) : nullptr,
                                                   nxt + r0 * H,
                                                   low ? nxt_lo + r0 * H : nullptr,
                                                   out_rows(t, r0),
                                                   H,
                                                   ws1_rows.W};
                        return step_product(mode, p_in, p, s0, s1, x_rows(t, r0),
                                            k == 0 && h0_zero ? nullptr : cur_lo + r0 * H, rows, cells);
                      }
                      if (k == 0 && h0_zero) {
                        bias_rows(p, s0, s1, rows, gh, ldg);
                      } else {
                        gemm(p, s0, s1, cur_lo + r0 * H, H, rows, gh, ldg, false);
                      }
                      for (int64_t b = r0; b < r0 + rows; ++b) {
                        float* h_new = nxt + b * H + u0;
                        gate_forward(mode, gi_row(t, b) + u0, gh + (b - r0) * ldg + u0, cur + b * H + u0,
                                     lstm ? c_p + b * H + u0 : nullptr, lstm && save ? cs_rows(t, b) + u0 : nullptr,
                                     (save ? ws1_rows(t, b) : row_ws) + u0, h_new, cnt, H);
                        round_row(out_rows(t, b) + u0, h_new, cnt);
                        if (low) round_row(nxt_lo + b * H + u0, h_new, cnt);
                      }
                    });
          if (k == T - 1) {  // every row's state, the carried ones too
            for (int64_t b = rb0; b < rb1; ++b) round_row(h_n_p + b * H + j0, nxt + b * H + j0, m);
          }
        };
        deal.run(phase, tid, own, panels_step);
        if (!by_rows) {
#pragma omp barrier
        }
      }
    }
  }
  return {out, h_n, c.to(h0.scalar_type()), ws1, ws2};
}

// A row of E as float32: read in place, or widened into tmp.
const float* widened(const float* src, float*, int64_t) { return src; }
const float* widened(const BF16* src, float* tmp, int64_t n) {
  widen_row(tmp, src, n);
  return tmp;
}

// Where a row's gate gradients are formed: in place in float32, else in float32 scratch
// (rounded into place once the bias gradients have them).
float* formed(float* row, float*) { return row; }
float* formed(BF16*, float* tmp) { return tmp; }

// c = a @ B over rows [0, n) and every panel, in E: float32 straight into c, bfloat16 through
// tmp (kRoundRows rows of N floats), rounded a block of rows at a time while in cache.
constexpr int64_t kRoundRows = 96;
template <typename E>
void gemm_into(const Panels<E>& p, const E* a, int64_t lda, int64_t n, E* c, int64_t ldc, float* tmp) {
  if constexpr (std::is_same_v<E, float>) {
    gemm(p, 0, p.NB, a, lda, n, c, ldc, false);
  } else {
    for (int64_t r0 = 0; r0 < n; r0 += kRoundRows) {
      const int64_t rows = std::min(kRoundRows, n - r0);
      gemm(p, 0, p.NB, a + r0 * lda, lda, rows, tmp, p.N, false);
      for (int64_t r = 0; r < rows; ++r) round_row(c + (r0 + r) * ldc, tmp + r * p.N, p.N);
    }
  }
}

// A 16 x 16 block of 32-bit values transposed in registers: row r[q] becomes column kColumnOrder[q].
constexpr int kColumnOrder[16] = {0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15};
__attribute__((target("avx512f"), always_inline)) inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // pairs of rows: 32-bit interleaves
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // quads: 64-bit interleaves
    for (int j = 0; j < 2; ++j) {
      r[i + j] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + j]), _mm512_castps_pd(t[i + j + 2])));
      r[i + j + 2] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + j]), _mm512_castps_pd(t[i + j + 2])));
    }
  }
  for (int i = 0; i < 16; i += 8) {  // 128-bit lanes within groups of 8 rows
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {  // 256-bit halves across the two groups
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
}

// 16 x 16 floats from src (row stride lds) to dst (row stride ldd), transposed in registers.
__attribute__((target("avx512f"))) void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  transpose16(r);
  for (int q = 0; q < 16; ++q) _mm512_storeu_ps(dst + kColumnOrder[q] * ldd, r[q]);
}

// The transpose of rows [0, rows) of a row-major bfloat16 matrix with N columns (row stride lds),
// as the a side of AMX tiles reads it: dst (N, rows) row-major, rows from `live` on zero (rows a
// multiple of 32). Thread tid of nt takes its share of columns, 16 at a time: 32 rows widened in
// pairs to 16 words of (row r, row r + 1), whose 16 x 16 transpose holds a column's 32 values in
// each register. (On pairs of rows already in memory, a scalar word transpose took 5% of a
// bfloat16 LSTM H256 B64 backward.)
__attribute__((target("avx512f,avx512bw,avx512vl"))) void transpose_rows(const BF16* src, int64_t lds,
                                                                         int64_t live, int64_t rows, int64_t N,
                                                                         int64_t tid, int64_t nt, BF16* dst) {
  const int64_t blocks = (N + 15) / 16;
  for (int64_t r0 = 0; r0 < rows; r0 += 32) {  // 32 rows of this thread's columns stay in L1
    for (int64_t jb = blocks * tid / nt; jb < blocks * (tid + 1) / nt; ++jb) {
      const int64_t j = jb * 16, n = std::min<int64_t>(16, N - j);
      const __mmask16 cols = static_cast<__mmask16>((1u << n) - 1);
      __m512 w[16];
      for (int p = 0; p < 16; ++p) {  // rows r and r + 1 (16 values each, zero past live) as words
        const int64_t r = r0 + 2 * p;
        const __m256i a = r < live ? _mm256_maskz_loadu_epi16(cols, src + r * lds + j) : _mm256_setzero_si256();
        const __m256i b = r + 1 < live ? _mm256_maskz_loadu_epi16(cols, src + (r + 1) * lds + j) : _mm256_setzero_si256();
        w[p] = _mm512_castsi512_ps(
            _mm512_or_si512(_mm512_cvtepu16_epi32(a), _mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
      }
      transpose16(w);
      for (int q = 0; q < 16; ++q) {
        if (kColumnOrder[q] < n) _mm512_storeu_ps(dst + (j + kColumnOrder[q]) * rows + r0, w[q]);
      }
    }
  }
}

// The (C, R) transpose of a row-major (R, C) float32 matrix, in dtype: the weight gradients'
// sums leave their transposed scratch this way, 16 x 16 blocks in registers and the edges one by
// one (torch's strided copy took 0.36 ms for each of the two, of a 10 ms float32 LSTM H256 B8
// training step).
Tensor transposed(const Tensor& src, at::ScalarType dtype) {
  if (!kHasAvx512) return at::empty({src.size(1), src.size(0)}, src.options().dtype(dtype)).copy_(src.t());
  const int64_t R = src.size(0), C = src.size(1), R16 = R / 16 * 16, C16 = C / 16 * 16;
  Tensor dst = at::empty({C, R}, src.options());
  const float* s = src.data_ptr<float>();
  float* d = dst.data_ptr<float>();
  at::parallel_for(0, (R + 15) / 16, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0 * 16; i < std::min(R, b1 * 16); i += 16) {
      if (i < R16) {
        for (int64_t j = 0; j < C16; j += 16) transpose16(s + i * C + j, C, d + j * R + i, R);
      }
      const int64_t j0 = i < R16 ? C16 : 0;  // the rest of these rows: the last columns, or all of the last rows
      for (int64_t r = i; r < std::min(R, i + 16); ++r) {
        for (int64_t j = j0; j < C; ++j) d[j * R + r] = s[r * C + j];
      }
    }
  });
  return dtype == at::kFloat ? dst : dst.to(dtype);
}

// The backward loop over elements E (float, or bfloat16 x, out, weights and output gradients),
// the forward's counterpart: the saved gates (ws1, ws2), dh, dc and all sums stay float32; for
// bfloat16 each row's gate gradients are also rounded into the chunk's buffers that the products
// read, and the weight gradients read their operands in pairs of rows (interleave_pairs; on AMX
// a transposed, transpose_rows).
// Gradients come in the dtypes of the tensors they belong to; those not asked for (needs) are left out
// of the products and come back zero (dh0: the last step's dh product, at T 1 a third of them).
template <typename E>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward_loop(
    int64_t mode, const Tensor& x, const std::vector<int64_t>& bs, bool packed, const Tensor& h0, const Tensor& c0,
    const Tensor& w_ih, const Tensor& w_hh, bool has_bias, bool reverse, const Tensor& out_, const Tensor& ws1,
    const Tensor& ws2, const Tensor& go_, const Tensor& grad_hn, const Tensor& grad_cn, const Needs& needs) {
  constexpr bool low = !std::is_same_v<E, float>;
  const int64_t T = x.size(0), B = x.size(1), I = x.size(2), G = gate_count(mode), H = w_hh.size(1), GH = G * H;
  const bool lstm = mode == LSTM, gru = mode == GRU;
  const auto opts = x.options(), fopts = opts.dtype(at::kFloat);
  const Tensor none = at::empty({0}, opts);
  Tensor dx = packed ? at::zeros({T, B, I}, opts) : at::empty({T, B, I}, opts);
  Tensor dh = grad_hn.to(at::kFloat, false, /*copy=*/true).contiguous();
  Tensor dc = lstm ? grad_cn.to(at::kFloat, false, /*copy=*/true).contiguous() : none;
  // the weight gradients: float32 sums straight into (GH, I) and (GH, H) tensors from the recycling
  // pool, which the first chunk writes and the others add to, through MKL (float32 on Intel CPUs) or
  // the tile products; on AMX, whose tiles take no transposed a, their sums transposed, in scratch,
  // zeroed (which costs less than the page faults of a fresh zeroed tensor: at H 256 about 5% of a
  // bfloat16 training step), then transposed out. Without the zeroing and the transposes a cell's
  // training step (T 1) ran 1.30-1.44x as fast (bench/results/2026-12-06-cpu-dw-layout-ab.md).
  const bool amx = low && kHasAmxBf16;
  const Mkl& mkl_dw = low ? kNoMkl : mkl();
  const bool by_mkl = mkl_dw.sgemm != nullptr;
  // bfloat16 weights whose gradients' products are each one block of rows (a cell's step, a short call):
  // the tiles round their sums straight into bfloat16 tensors, with no float32 copy to write, read back
  // and round (bfloat16 training, AMD EPYC: GRUCell B128 H1024 0.97x -> 1.08x torch.nn, LSTMCell B8 H256
  // 1.64x -> 1.96x; bench/results/2026-12-07-cpu-amd-dw-rounded-ab.md). The same sums, rounded the same way.
  const bool dw_rounded = low && !amx && needs.dw && T * B <= kSumRows && w_ih.scalar_type() == at::kBFloat16 &&
                          w_hh.scalar_type() == at::kBFloat16;
  Tensor dw_ih, dw_hh;  // (GH, I) and (GH, H), on AMX transposed
  if (!amx) {
    const auto dt = dw_rounded ? at::kBFloat16 : at::kFloat;
    dw_ih = recycling_pool().empty({GH, I}, T * B == 0, dt);
    dw_hh = recycling_pool().empty({GH, H}, T * B == 0, dt);
  } else {
    Tensor dw_sums = workspace(kWeightGrads, {(I + H) * GH}).zero_();
    dw_ih = dw_sums.narrow(0, 0, I * GH).view({I, GH});
    dw_hh = dw_sums.narrow(0, I * GH, H * GH).view({H, GH});
  }
  Tensor db_i = at::zeros({GH}, fopts), db_h = gru ? at::zeros({GH}, fopts) : db_i;
  auto grads = [&]() -> std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> {
    const auto wt = w_ih.scalar_type();
    const Tensor db_ih = has_bias ? db_i.to(wt) : none;
    const Tensor db_hh = !has_bias ? none : gru ? db_h.to(wt) : db_ih.clone();
    // in the weights' dtypes: the pooled tensors, on AMX the scratch sums transposed out
    return {dx, dh.to(h0.scalar_type()), lstm ? dc.to(c0.scalar_type()) : none,
            !amx ? dw_ih.to(w_ih.scalar_type()) : transposed(dw_ih, w_ih.scalar_type()),
            !amx ? dw_hh.to(w_hh.scalar_type()) : transposed(dw_hh, w_hh.scalar_type()),
            db_ih, db_hh};
  };
  if (B == 0) return grads();
  // in E: float32 beside bfloat16 x only where autocast or a direct call passes it
  const Tensor out = out_.to(x.scalar_type()), go = go_.to(x.scalar_type());
  const Tensor h0_e = h0.to(x.scalar_type()).contiguous(), c0_f = lstm ? c0.to(at::kFloat).contiguous() : c0;
  // a zero h0 adds nothing to dW_hh (float32; bfloat16's operands go in pairs of rows)
  const bool h0_zero = !low && all_zero(h0_e.data_ptr<E>(), B * H);
  const Tensor cs = lstm ? ws2[0] : Tensor();
  const Tensor w_ih_c = w_ih.contiguous();
  // dh = dgh @ W_hh: H outputs, K = G * H
  const Panels<E> p =
      panels<E>().get({w_hh}, kBackward * 4 + mode, [&] { return pack<E>(w_hh.t(), Tensor(), 1, 64); });
  // dx = dgi @ W_ih: float32 through MKL where the weight gradients take it, else reading W_ih in
  // place; bfloat16 (loop or weights) packs it once
  const float* const w_ih_mkl = by_mkl && w_ih_c.scalar_type() == at::kFloat ? w_ih_c.data_ptr<float>() : nullptr;
  const Panels<E> p_dx = low || w_ih.scalar_type() != at::kFloat
                             ? panels<E>().get({w_ih}, kBackwardInput * 4 + mode,
                                               [&] { return pack<E>(w_ih.t(), Tensor(), 1, 64); })
                             : direct(w_ih_c.data_ptr<E>(), GH, I, I);
  const int64_t RB = block_rows(p, B), TC = chunk_steps(T, B, kBackwardChunkRows);
  const Split split(p, B, T);
  const bool by_rows = split.by_rows;
  const int64_t nt_max = split.threads;
  // by rows, each thread sums its rows' bias gradients apart (i, and h for GRU), added up at the end
  Tensor db_parts = by_rows ? at::zeros({nt_max, 2, GH}, fopts) : Tensor();
  const Walk walk{T, !reverse};  // backward walks the steps the other way
  // one chunk's gate gradients and the states its steps started from
  const auto dtype = x.scalar_type();
  const int64_t ldg = padded_row(GH, sizeof(E));  // rows of gate gradients
  Tensor dgi = workspace(kGateGrads, {TC, B, ldg}, dtype), dgh = gru ? workspace(kGateGradsH, {TC, B, ldg}, dtype) : dgi;
  Tensor h_prev = workspace(kPrevStates, {TC, B, H}, dtype);
  // bfloat16: per thread a row's gate gradients (2 GH) and widened state (H), and a block of dx;
  // per chunk the weight gradients' operands (x, h_prev, dgi, dgh for GRU) in pairs of rows, or on
  // AMX x and h_prev transposed and the gate gradients in tiles (K padded to 32 rows, zero)
  const int64_t per_thread = 2 * GH + H + kRoundRows * I, pair_rows = (TC * B + kTileK - 1) / kTileK * kTileK;
  Tensor scratch = low ? workspace(kScratch, {nt_max, per_thread}) : Tensor();
  const int64_t GHt = amx ? (GH + 63) / 64 * 64 : GH;  // on AMX the gate gradients' tiles: whole panels
  const int64_t pairs_size = pair_rows * (I + H + GHt * (gru ? 2 : 1));
  Tensor pairs = low ? workspace(kPairs, {pairs_size}, dtype) : Tensor();
  auto prev_rows = [&](int64_t k) { return k + 1 < T ? bs[walk.step(k + 1)] : 0; };
  // a chunk's gate gradients and states keep each step's active rows only, back to back, step t's
  // from starts[t] - starts[t0]: packed, the dx and weight-gradient products then run over those rows,
  // on a compact copy of x's (xc) into dxc, copied out to dx (its other rows zero)
  const std::vector<int64_t> starts = step_starts(bs);
  E* const xc = packed && needs.dw ? workspace(kPackedX, {TC * B, I}, dtype).data_ptr<E>() : nullptr;
  E* const dxc = packed && needs.dx ? workspace(kPackedDx, {TC * B, I}, dtype).data_ptr<E>() : nullptr;

  const Rows<E> go_rows(go), out_rows(out);
  E* const dgi_p = dgi.data_ptr<E>();  // a chunk's rows, crow() below
  E* const dgh_p = dgh.data_ptr<E>();
  E* const hp_p = h_prev.data_ptr<E>();
  const Rows<float> cs_rows(cs), ws1_rows(ws1);
  float* const dh_p = dh.data_ptr<float>();
  float* const dc_p = lstm ? dc.data_ptr<float>() : nullptr;
  float* const db_i_p = db_i.data_ptr<float>();
  float* const db_h_p = db_h.data_ptr<float>();
  const E* const h0_p = h0_e.data_ptr<E>();
  const float* const c0_p = lstm ? c0_f.data_ptr<float>() : nullptr;
  const E* const x_p = x.data_ptr<E>();
  E* const dx_p = dx.data_ptr<E>();
  float* const dw_ih_p = dw_rounded ? nullptr : dw_ih.data_ptr<float>();
  float* const dw_hh_p = dw_rounded ? nullptr : dw_hh.data_ptr<float>();
  float* const scratch_p = low ? scratch.data_ptr<float>() : nullptr;
  E* const pairs_x = low ? pairs.data_ptr<E>() : nullptr;
  E* const pairs_h = low ? pairs_x + pair_rows * I : nullptr;
  E* const pairs_gi = low ? pairs_h + pair_rows * H : nullptr;
  E* const pairs_gh = low && gru ? pairs_gi + pair_rows * GHt : pairs_gi;
#pragma omp parallel num_threads(nt_max)
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const Split::Part part = split.part(p, B, nt, tid);
    const Share own = part.own;
    const int64_t j0 = own.u0, m = own.cnt, rb0 = part.r0, rb1 = part.r1;
    float* const db_i_own = by_rows ? db_parts.data_ptr<float>() + tid * 2 * GH : db_i_p;
    float* const db_h_own = by_rows ? db_i_own + GH : db_h_p;
    float* const row_gi = low ? scratch_p + tid * per_thread : nullptr;
    float* const row_gh = low ? row_gi + GH : nullptr;
    float* const row_h = low ? row_gh + GH : nullptr;
    float* const dx_block = low ? row_h + H : nullptr;
    int64_t t0 = 0;  // the chunk's first step
    const auto crow = [&](int64_t t, int64_t b) { return starts[t] - starts[t0] + b; };  // (t, b)'s chunk row
    // what pointwise(k, r0, r1, j0, m) will read, fetched while a GEMM block runs
    auto fetch = [&](int64_t k, int64_t r0, int64_t r1, int64_t j0, int64_t m) {
      if (k >= T || r0 >= r1) return;
      const int64_t t = walk.step(k), np = std::min(r1, prev_rows(k)), tp = k + 1 < T ? walk.step(k + 1) : 0;
      prefetch(go_rows, t, r0, r1, j0, m, 1, H);
      if (lstm || gru) {
        prefetch(ws1_rows, t, r0, r1, j0, m, 4, H);
      } else {
        prefetch(out_rows, t, r0, r1, j0, m, 1, H);
      }
      if (lstm) prefetch(cs_rows, t, r0, r1, j0, m, 1, H);
      if (r0 < np) {
        prefetch(out_rows, tp, r0, np, j0, m, 1, H);
        if (lstm) prefetch(cs_rows, tp, r0, np, j0, m, 1, H);
      }
    };
    // gate gradients of walked step k, rows [r0, r1), units [j0, j0 + m) (of this thread's)
    auto pointwise = [&](int64_t k, int64_t r0, int64_t r1, int64_t j0, int64_t m) {
      const int64_t t = walk.step(k), np = prev_rows(k), tp = k + 1 < T ? walk.step(k + 1) : 0;
      for (int64_t b = r0; b < r1 && m > 0; ++b) {
        float* d = dh_p + b * H + j0;
        const E* g_out = go_rows(t, b) + j0;
        add_row(d, g_out, m);
        const E* hp = (b < np ? out_rows(tp, b) : h0_p + b * H) + j0;
        std::memcpy(hp_p + crow(t, b) * H + j0, hp, m * sizeof(E));
        const float* cp = lstm ? (b < np ? cs_rows(tp, b) : c0_p + b * H) + j0 : nullptr;
        E* const gi_e = dgi_p + crow(t, b) * ldg;
        E* const gh_e = dgh_p + crow(t, b) * ldg;
        float* const gi = formed(gi_e, row_gi);
        float* const gh = formed(gh_e, gru ? row_gh : row_gi);
        // what the mode reads of the states: h_prev (GRU) or h (RNN)
        const float* hp_f = gru ? widened(hp, row_h, m) : nullptr;
        const float* h_f = !lstm && !gru ? widened(out_rows(t, b) + j0, row_h, m) : nullptr;
        gate_backward(mode, ws1_rows(t, b) + j0, cs_rows(t, b) + j0, cp, hp_f, h_f, d,
                      lstm ? dc_p + b * H + j0 : nullptr, gi + j0, gh + j0, m, H);
        for (int64_t q = 0; q < G; ++q) {  // the bias gradients, summed as the rows go by
          const float* gi_row = gi + q * H + j0;
          const float* gh_row = gh + q * H + j0;
          float* sum_i = db_i_own + q * H + j0;
          float* sum_h = db_h_own + q * H + j0;
          add_row(sum_i, gi_row, m);
          if (gru) add_row(sum_h, gh_row, m);
          if constexpr (low) {
            round_row(gi_e + q * H + j0, gi_row, m);
            if (gru) round_row(gh_e + q * H + j0, gh_row, m);
          }
        }
      }
    };
    for (int64_t k0 = 0; k0 < T; k0 += TC) {
      const int64_t k1 = std::min(T, k0 + TC);
      t0 = walk.first(k0, k1);
      const int64_t t1 = t0 + (k1 - k0), rows = starts[t1] - starts[t0];
      pointwise(k0, rb0, std::min(rb1, bs[walk.step(k0)]), j0, m);
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t t = walk.step(k), n = std::min(bs[t], rb1);
        const int64_t n_next = k + 1 < k1 ? std::min(prev_rows(k), rb1) : 0;
        if (!by_rows) {
#pragma omp barrier
        }
        if (k == T - 1 && !needs.dh0) continue;  // dh0: not asked for
        // dh of the rows active at t, block by block, each block's rows (and the slab's units)
        // going straight on to the gate gradients of the next walked step of this chunk
        for_slabs(p, own.nb0, own.nb1, rb0, n, RB, 0,
                  [&](int64_t s0, int64_t s1, int64_t u0, int64_t cnt, int64_t r0, int64_t rb) {
                    fetch(k + 1, r0, std::min(r0 + rb, n_next), u0, cnt);
                    gemm(p, s0, s1, dgh_p + crow(t, r0) * ldg, ldg, rb, dh_p + r0 * H, H, gru);
                    pointwise(k + 1, r0, std::min(r0 + rb, n_next), u0, cnt);
                  });
        if (n_next > std::max(n, rb0)) pointwise(k + 1, std::max(n, rb0), n_next, j0, m);
      }
      if (xc != nullptr) {  // this thread's share of each step's rows of x, compact
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t b0 = bs[t] * tid / nt, b1 = bs[t] * (tid + 1) / nt;
          if (b1 > b0) std::memcpy(xc + crow(t, b0) * I, x_p + (t * B + b0) * I, (b1 - b0) * I * sizeof(E));
        }
      }
#pragma omp barrier
      // the chunk's share of dx = dgi W_ih, dW_ih += dgi^T x and dW_hh += dgh^T h_prev, by rows
      const auto [x0, x1] = row_share(rows, nt, tid);
      const E* const x_chunk = xc != nullptr ? xc : x_p + t0 * B * I;
      if (needs.dx && x1 > x0) {
        E* const dx_rows = dxc != nullptr ? dxc : dx_p + t0 * B * I;  // the chunk's rows
        bool dx_done = false;
        if constexpr (!low) {
          if (w_ih_mkl != nullptr) {  // row-major dx = dgi W_ih is column-major dx^T = W_ih^T dgi^T
            mkl_dw.gemm("N", "N", I, x1 - x0, GH, w_ih_mkl, I, dgi_p + x0 * ldg, ldg, 0.0f, dx_rows + x0 * I, I);
            dx_done = true;
          }
        }
        if (!dx_done) gemm_into(p_dx, dgi_p + x0 * ldg, ldg, x1 - x0, dx_rows + x0 * I, I, dx_block);
        if (dxc != nullptr) {  // this thread's rows [x0, x1) of the chunk to their places in dx
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t r0 = std::max(x0, crow(t, 0)), r1 = std::min(x1, crow(t, bs[t]));
            if (r1 > r0) {
              std::memcpy(dx_p + (t * B + r0 - crow(t, 0)) * I, dx_rows + r0 * I, (r1 - r0) * I * sizeof(E));
            }
          }
        }
      }
      if (!needs.dw) {  // the next chunk's gate gradients overwrite what dx read
#pragma omp barrier
        continue;
      }
      if constexpr (low) {  // the weight gradients' operands
        if (amx) {  // a: x and h_prev transposed, by columns; b: the gate gradients in tiles, by rows,
                    // the last thread also filling K's padding
          const int64_t padded = (rows + kTileK - 1) / kTileK * kTileK, end = tid == nt - 1 ? padded : x1;
          transpose_rows(x_chunk, I, rows, padded, I, tid, nt, pairs_x);
          transpose_rows(hp_p, H, rows, padded, H, tid, nt, pairs_h);
          const Panels<E> gi = direct_tiled(pairs_gi, padded, GH), gh = direct_tiled(pairs_gh, padded, GH);
          interleave_pairs(dgi_p, ldg, x0, end, rows, gi);
          if (gru) interleave_pairs(dgh_p, ldg, x0, end, rows, gh);
#pragma omp barrier
          const Share cols(gi, nt, tid);
          gemm(gi, cols.nb0, cols.nb1, pairs_x, padded, I, dw_ih_p, GH, true);
          gemm(gh, cols.nb0, cols.nb1, pairs_h, padded, H, dw_hh_p, GH, true);
#pragma omp barrier
          continue;
        }
        interleave_pairs(x_chunk, I, x0, x1, rows, direct(pairs_x, rows, I, I));
        interleave_pairs(hp_p, H, x0, x1, rows, direct(pairs_h, rows, H, H));
        interleave_pairs(dgi_p, ldg, x0, x1, rows, direct(pairs_gi, rows, GH, GH));
        if (gru) interleave_pairs(dgh_p, ldg, x0, x1, rows, direct(pairs_gh, rows, GH, GH));
#pragma omp barrier
      }
      const E* const a_x = low ? pairs_x : x_chunk;
      const E* const a_h = low ? pairs_h : hp_p;
      const E* const b_gi = low ? pairs_gi : dgi_p;
      const E* const b_gh = low ? pairs_gh : dgh_p;
      const int64_t ld_g = low ? GH : ldg;  // pairs are packed, the gate gradients' rows padded
      // the weight gradients, dgi^T x and dgh^T h_prev, by this thread's columns of the gate
      // gradients (their rows): through MKL (its column-major C is their rows, beta 0 on the first
      // chunk), else the tiles over a transposed (the gate gradients) in blocks of rows that keep both
      // operands in L2, the first block of the first chunk writing, the others adding
      const Share cols(direct(b_gi, rows, GH, GH), nt, tid);
      // dW_hh's rows [h0r, h1r): not those of the step whose h_prev is a zero h0 (the first forward), unless
      // one of its gate gradients in this thread's columns is NaN or infinite (times zero: NaN, as torch.nn's)
      // (float32 only: bfloat16 keeps its zero rows, h0_zero false, its gate gradients in pairs of rows)
      const auto finite_rows = [&](int64_t r0, int64_t n) {
        return all_finite(b_gh + r0 * ld_g + cols.u0, n, cols.cnt, ld_g);
      };
      int64_t h0r = 0, h1r = rows;
      if (h0_zero && (reverse ? T - 1 : 0) == t0 && finite_rows(0, bs[t0])) {
        h0r = bs[t0];
      } else if (h0_zero && (reverse ? T - 1 : 0) == t1 - 1 && finite_rows(rows - bs[t1 - 1], bs[t1 - 1])) {
        h1r = rows - bs[t1 - 1];
      }
      const int64_t h_rows = h1r - h0r;
      if (by_mkl) {
        if constexpr (!low) {  // (bfloat16 has kNoMkl)
          const float beta = k0 == 0 ? 0.0f : 1.0f;
          const int64_t u0 = cols.u0, cnt = cols.cnt;
          if (cnt > 0) {
            mkl_dw.gemm("N", "T", I, cnt, rows, a_x, I, b_gi + u0, ld_g, beta, dw_ih_p + u0 * I, I);
            if (h_rows > 0) {
              mkl_dw.gemm("N", "T", H, cnt, h_rows, a_h + h0r * H, H, b_gh + h0r * ld_g + u0, ld_g, beta,
                          dw_hh_p + u0 * H, H);
            } else if (k0 == 0) {
              std::memset(dw_hh_p + u0 * H, 0, cnt * H * sizeof(float));
            }
          }
        }
      } else if (cols.cnt > 0 && dw_rounded) {  // one chunk of at most kSumRows rows
        if constexpr (low) {  // (dw_rounded is bfloat16's)
          const int64_t u0 = cols.u0, cnt = cols.cnt;
          gemm_rounded(direct(a_x, rows, I, I), 0, (I + 63) / 64, b_gi + 2 * u0, ld_g, cnt,
                       dw_ih.data_ptr<BF16>() + u0 * I, I);
          gemm_rounded(direct(a_h, rows, H, H), 0, (H + 63) / 64, b_gh + 2 * u0, ld_g, cnt,
                       dw_hh.data_ptr<BF16>() + u0 * H, H);
        }
      } else if (cols.cnt > 0) {
        const int64_t u0 = cols.u0, cnt = cols.cnt, pu0 = kPair<E> * u0;  // (bfloat16 a: pairs of rows)
        bool hh_written = k0 > 0;
        for (int64_t k = 0; k < rows; k += kSumRows) {  // (k, k_h even: bfloat16 has no zero h0 rows)
          const int64_t kb = std::min(kSumRows, rows - k), k_h = std::max(k, h0r), kb_h = std::min(k + kb, h1r) - k_h;
          gemm(direct(a_x + k * I, kb, I, I), 0, (I + 63) / 64, b_gi + k * ld_g + pu0, ld_g, cnt, dw_ih_p + u0 * I, I,
               k0 > 0 || k > 0, true);
          if (kb_h > 0) {
            gemm(direct(a_h + k_h * H, kb_h, H, H), 0, (H + 63) / 64, b_gh + k_h * ld_g + pu0, ld_g, cnt,
                 dw_hh_p + u0 * H, H, hh_written, true);
            hh_written = true;
          }
        }
        if (!hh_written) std::memset(dw_hh_p + u0 * H, 0, cnt * H * sizeof(float));
      }
#pragma omp barrier
    }
  }
  if (by_rows) {
    db_i.add_(db_parts.select(1, 0).sum(0));
    if (gru) db_h.add_(db_parts.select(1, 1).sum(0));
  }
  if (!needs.dh0) dh.zero_();
  if (!needs.dx) dx.zero_();
  if (!needs.dw && !amx) {  // (AMX's scratch sums start zero)
    dw_ih.zero_();
    dw_hh.zero_();
  }
  return grads();
}

// 24 register-resident chains of the loops' multiply-add, iters rounds: a float32 FMA or a
// bfloat16 pair dot (vdpbf16ps) per chain and round, as in tile (12 chains of 8 lanes on AVX2, as
// in tile_avx2). Returns a sum, so none is dropped.
__attribute__((target("avx512f"), noinline)) float fma_chains(int64_t iters) {
  __m512 acc[24];
  for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(1e-3f * i);
  const __m512 x = _mm512_set1_ps(0.999f), y = _mm512_set1_ps(1e-4f);
  for (int64_t k = 0; k < iters; ++k) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_fmadd_ps(acc[i], x, y);
  }
  for (int i = 1; i < 24; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  return _mm512_reduce_add_ps(acc[0]);
}

__attribute__((target("avx2,fma"), noinline)) float fma_chains_avx2(int64_t iters) {
  __m256 acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = _mm256_set1_ps(1e-3f * i);
  const __m256 x = _mm256_set1_ps(0.999f), y = _mm256_set1_ps(1e-4f);
  for (int64_t k = 0; k < iters; ++k) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) acc[i] = _mm256_fmadd_ps(acc[i], x, y);
  }
  for (int i = 1; i < 12; ++i) acc[0] = _mm256_add_ps(acc[0], acc[i]);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc[0]);
  return lanes[0] + lanes[7];
}

__attribute__((target("avx512f,avx512bf16"), noinline)) float dot_chains(int64_t iters) {
  __m512 acc[24];
  for (int i = 0; i < 24; ++i) acc[i] = _mm512_set1_ps(1e-3f * i);
  const __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f7f3f7f), y = (__m512bh)_mm512_set1_epi32(0x38d138d1);
  for (int64_t k = 0; k < iters; ++k) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], x, y);
  }
  for (int i = 1; i < 24; ++i) acc[0] = _mm512_add_ps(acc[0], acc[i]);
  return _mm512_reduce_add_ps(acc[0]);
}

// The same on AMX tiles: 4 sums, each round a 16 x 32 by 32 x 16 bfloat16 tile product into each.
RNNFAST_AMX float tile_chains(int64_t iters) {
  alignas(64) static const std::array<uint16_t, 512> ones = [] {
    std::array<uint16_t, 512> o{};
    o.fill(0x3f80);  // 1.0
    return o;
  }();
  static const TileConfig config;
  _tile_loadconfig(&config);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, ones.data(), 64);
  _tile_loadd(6, ones.data(), 64);
  for (int64_t k = 0; k < iters; ++k) {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 6);
    _tile_dpbf16ps(2, 4, 6);
    _tile_dpbf16ps(3, 4, 6);
  }
  alignas(64) float sums[16 * 16];
  _tile_stored(0, sums, 64);
  _tile_release();
  return sums[0];
}

}  // namespace

const char* product_isa(const std::string& dtype) {
  TORCH_CHECK(dtype == "bfloat16" || dtype == "float32", "rnnfast: product_isa takes float32 or bfloat16, not ",
              dtype);
  if (dtype == "float32") return kHasAvx512 ? "AVX-512 FMA" : kHasAvx2 ? "AVX2 FMA" : "";
  return kHasAmxBf16 ? "AMX tdpbf16ps" : kHasAvx512Bf16 ? "AVX512-BF16 vdpbf16ps" : "";
}

double peak_gflops(const std::string& dtype, double seconds) {
  const bool bf16 = dtype == "bfloat16";
  TORCH_CHECK(bf16 || dtype == "float32", "rnnfast: peak_gflops takes float32 or bfloat16, not ", dtype);
  if (!(bf16 ? kHasAvx512Bf16 : kHasAvx2)) return 0.0;
  const bool amx = bf16 && kHasAmxBf16, avx2 = !bf16 && !kHasAvx512;
  auto chains = amx ? tile_chains : bf16 ? dot_chains : avx2 ? fma_chains_avx2 : fma_chains;
  // 24 registers of 16 lanes (12 of 8 on AVX2), each 2 (or 2 x 2) flops; or 4 tiles of 16 x 16
  // sums over 32 products
  const double flops_per_round = amx ? 4 * 16 * 16 * 32 * 2 : avx2 ? 12 * 8 * 2 : 24 * 16 * (bf16 ? 4 : 2);
  using Clock = std::chrono::steady_clock;
  auto elapsed = [](Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); };
  int64_t iters = 1 << 14;  // calibrated on one thread to about a tenth of the time
  for (double took = 0; took < seconds / 10; iters *= 2) {
    const auto t0 = Clock::now();
    chains(iters);
    took = elapsed(t0);
  }
  const int64_t nt = at::get_num_threads();
  std::vector<float> sink(nt);
  const auto t0 = Clock::now();
#pragma omp parallel num_threads(nt)
  sink[omp_get_thread_num()] = chains(iters * 5);
  const double secs = elapsed(t0);
  TORCH_CHECK(std::isfinite(sink[0]), "rnnfast: peak_gflops: the chains did not run");  // and keeps them
  return nt * iters * 5 * flops_per_round / secs / 1e9;
}

Tensor bf16_product(const Tensor& a, const Tensor& w, bool transposed, const c10::optional<Tensor>& bias) {
  TORCH_CHECK(kHasAvx512Bf16, "rnnfast: bf16_product needs AVX512-BF16");
  const Panels<BF16> p = panels<BF16>().get({w}, (transposed ? kStepwiseT : kStepwise) * 4,
                                            [&] { return pack<BF16>(transposed ? w.t() : w, Tensor(), 1, 64); });
  const Tensor a_lo = a.to(at::kBFloat16).contiguous();
  const int64_t n = a_lo.size(0);
  TORCH_CHECK(a_lo.dim() == 2 && a_lo.size(1) == p.K, "rnnfast: bf16_product: a is ", a.sizes(), ", K ", p.K);
  const bool add = bias.has_value() && bias->defined();
  Tensor c = add ? bias->to(at::kFloat).expand({n, p.N}).contiguous()
                 : at::empty({n, p.N}, a.options().dtype(at::kFloat));
  if (n == 0) return c;
  const BF16* const a_p = a_lo.data_ptr<BF16>();
  float* const c_p = c.data_ptr<float>();
#pragma omp parallel num_threads(std::min<int64_t>(at::get_num_threads(), p.NB))
  {
    const Share own(p, omp_get_num_threads(), omp_get_thread_num());
    if (own.nb1 > own.nb0) gemm(p, own.nb0, own.nb1, a_p, p.K, n, c_p, p.N, add);
  }
  return c;
}

bool fused_loop_supported(const Tensor& x, bool proj) {
  if (proj) return false;
  return x.scalar_type() == at::kFloat ? kHasAvx2 : x.scalar_type() == at::kBFloat16 && kHasAvx512Bf16;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> fused_layer_fwd(int64_t mode, const Tensor& x,
                                                                   const std::vector<int64_t>& bs, bool packed,
                                                                   const Tensor& h0, const Tensor& c0,
                                                                   const Tensor& w_ih, const Tensor& w_hh,
                                                                   const Tensor& b_ih, const Tensor& b_hh,
                                                                   bool reverse, bool save) {
  if (x.scalar_type() == at::kBFloat16 && h0.scalar_type() == at::kFloat) {  // autocast's float32 states
    return forward_loop<BF16, float>(mode, x, bs, packed, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, save);
  }
  if (x.scalar_type() == at::kBFloat16) {
    return forward_loop<BF16, BF16>(mode, x, bs, packed, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, save);
  }
  return forward_loop<float, float>(mode, x, bs, packed, h0, c0, w_ih, w_hh, b_ih, b_hh, reverse, save);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> fused_layer_bwd(
    int64_t mode, const Tensor& x, const std::vector<int64_t>& bs, bool packed, const Tensor& h0, const Tensor& c0,
    const Tensor& w_ih, const Tensor& w_hh, bool has_bias, bool reverse, const Tensor& out, const Tensor& ws1,
    const Tensor& ws2, const Tensor& go, const Tensor& grad_hn, const Tensor& grad_cn, const Needs& needs) {
  if (x.scalar_type() == at::kBFloat16) {
    return backward_loop<BF16>(mode, x, bs, packed, h0, c0, w_ih, w_hh, has_bias, reverse, out, ws1, ws2, go,
                               grad_hn, grad_cn, needs);
  }
  return backward_loop<float>(mode, x, bs, packed, h0, c0, w_ih, w_hh, has_bias, reverse, out, ws1, ws2, go, grad_hn,
                              grad_cn, needs);
}

}  // namespace rnnfast
