// int8 inference for rnnfast.quantize_dynamic: the operators rnnfast::quant_pack and
// rnnfast::quant_rnn (every layer and direction of a stack in one call, no autograd).
//
// Weights are int8 with one scale per output row (symmetric, [-127, 127]). Activations
// (each layer's input rows and each step's h rows) are quantized on the fly to uint8
// with a scale and zero point per row, so a product is
//   W x ~ s_w * s_x * (sum_k u_k w_k - zp * sum_k w_k)
// with u = q(x) + zp in [0, 255]: the int32 sums come from vpdpbusd (AVX512-VNNI, 64
// multiply-adds per instruction) and the row sums sum_k w_k are computed once at pack
// time. A 2-layer H512 LSTM decode step reads 4.2 MB of int8 weights instead of 16.8 MB
// of float32. CPUs without VNNI run the same integer sums with AVX2 (vpmaddwd on int16) or in
// plain C++, bit-identical before the float conversion.
//
// Weight layout, built once by quant_pack: the G*H rows are padded to G x Hp (Hp a
// multiple of 16) and the K columns to a multiple of 4, then stored as
// [unit block of 16 units][K/4][gate][16 rows][4 k]: a unit block's 16 x G rows stream
// contiguously, and one vpdpbusd multiplies 4 k's of 16 rows by a broadcast u[k:k+4].
//
// Threads split a step by rows where each has enough of them and W_hh fits one core's L2:
// each runs every unit of its rows, quantizes its own rows and waits on no other thread.
// Else they split the hidden units (whole blocks): each computes every gate of its units, so
// the gate update is local and a step needs one barrier (small batch: every thread quantizes
// the new h rows itself) or two (large batch: each quantizes every nt-th row for all).
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "dispatch.h"
#include "kernels.h"

namespace rnnfast {
namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

constexpr int64_t kUnits = 16;   // output rows per int32 vector (one per lane)
constexpr int64_t kDepth = 4;    // k's per lane per vpdpbusd
constexpr int kMaxRows = 4;      // activation rows sharing one pass over a weight block
// int32 accumulation is exact while K * 255 * 127 < 2^31
constexpr int64_t kMaxK = (int64_t(1) << 31) / (255 * 127);

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// 0: baseline x86-64, 1: AVX2, 2: AVX512-VNNI. The CPU's best, capped by
// RNNFAST_CPU_ISA (base, avx2) like the float kernels, and by `cap` (tests) when >= 0.
int64_t quant_isa(int64_t cap) {
  static const int64_t best = [] {
    __builtin_cpu_init();
    if (kHasAvx512 && __builtin_cpu_supports("avx512vnni")) return int64_t(2);
    const char* env = std::getenv("RNNFAST_CPU_ISA");
    const bool capped = env != nullptr && std::strcmp(env, "base") == 0;
    return int64_t(__builtin_cpu_supports("avx2") && !capped ? 1 : 0);
  }();
  return cap < 0 ? best : std::min(best, cap);
}

// ---- quantization of activation rows ----------------------------------------

// x[0, n) -> u[0, np) (zero padded) with x ~ scale * (u - zp). A non-finite x makes the
// scale NaN, so the outputs that use this row are NaN rather than quietly finite.
void quantize_row(const float* x, int64_t n, int64_t np, uint8_t* u, float* scale, int32_t* zp) {
  float lo = 0.f, hi = 0.f, poison = 0.f;
#pragma omp simd reduction(min : lo) reduction(max : hi) reduction(+ : poison)
  for (int64_t i = 0; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
    poison += x[i] * 0.f;
  }
  float s = (hi - lo) / 255.f;
  if (!(s > 0.f)) s = 1.f;  // an all-zero row
  const float inv = 1.f / s;
  const float z = static_cast<float>(static_cast<int32_t>(-lo * inv + 0.5f));
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float v = x[i] * inv + z;
    v = v > 0.f ? v : 0.f;  // also maps NaN to 0
    v = v < 255.f ? v : 255.f;
    u[i] = static_cast<uint8_t>(static_cast<int32_t>(v + 0.5f));
  }
  for (int64_t i = n; i < np; ++i) u[i] = 0;
  *scale = s + poison;
  *zp = static_cast<int32_t>(z);
}

// ---- the block kernel: G x 16 output rows for up to kMaxRows activation rows --------

struct BlockArgs {
  const int8_t* w;               // the unit block's packed weights: Kg groups of G x 16 x 4
  int64_t Kg;                    // K / 4 (padded)
  int64_t Hp;                    // gate stride of sw, rs, bias and out
  const uint8_t* u[kMaxRows];    // activation rows, 4 * Kg bytes each
  float sx[kMaxRows];            // their scales
  int32_t zx[kMaxRows];          // and zero points
  const float* sw;               // weight row scales (G, Hp), at the block's first unit
  const int32_t* rs;             // weight row sums, same layout
  const float* bias;             // same layout (zeros without bias)
  float* out[kMaxRows];          // output rows (G, Hp), at the block's first unit
};

using BlockFn = void (*)(const BlockArgs&);

inline int32_t load_u32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// The block kernel in plain C++: the fallback on x86-64 CPUs without AVX2.
template <int G, int MB>
void block_base(const BlockArgs& a) {
  int32_t acc[G][MB][kUnits] = {};
  for (int64_t kg = 0; kg < a.Kg; ++kg) {
    for (int q = 0; q < G; ++q) {
      const int8_t* wb = a.w + (kg * G + q) * kUnits * kDepth;
      for (int m = 0; m < MB; ++m) {
        const uint8_t* x = a.u[m] + kg * kDepth;
        const int32_t x0 = x[0], x1 = x[1], x2 = x[2], x3 = x[3];
        for (int r = 0; r < kUnits; ++r) {
          acc[q][m][r] += x0 * wb[4 * r] + x1 * wb[4 * r + 1] + x2 * wb[4 * r + 2] + x3 * wb[4 * r + 3];
        }
      }
    }
  }
  for (int q = 0; q < G; ++q) {
    for (int m = 0; m < MB; ++m) {
      for (int r = 0; r < kUnits; ++r) {
        const int64_t i = q * a.Hp + r;
        const float v = static_cast<float>(acc[q][m][r] - a.zx[m] * a.rs[i]);
        a.out[m][i] = v * (a.sx[m] * a.sw[i]) + a.bias[i];
      }
    }
  }
}

// Rows 8 * half + [0, 8) of gate q for activation row m, from their k sums in hadd's order of two
// chunks, [r0 r1 r4 r5 | r2 r3 r6 r7] (the permute restores row order): zero point, scales, bias.
__attribute__((target("avx2,fma"))) inline void store_half_avx2(const BlockArgs& a, int m, int q, int half,
                                                               __m256i hadded) {
  const __m256i sums = _mm256_permute4x64_epi64(hadded, 0xD8);
  const int64_t i = q * a.Hp + 8 * half;
  const __m256i rs = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.rs + i));
  const __m256i v = _mm256_sub_epi32(sums, _mm256_mullo_epi32(_mm256_set1_epi32(a.zx[m]), rs));
  const __m256 scale = _mm256_mul_ps(_mm256_set1_ps(a.sx[m]), _mm256_loadu_ps(a.sw + i));
  _mm256_storeu_ps(a.out[m] + i, _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), scale, _mm256_loadu_ps(a.bias + i)));
}

// AVX2 has no u8 x s8 dot product without int16 saturation (vpmaddubsw), so both sides are
// widened to int16 and vpmaddwd sums pairs exactly: a 16-byte chunk (4 rows x 4 k) gives
// each row's (k0 k1) and (k2 k3) sums, added pairwise at the end. One gate at a time keeps
// the 4 x MB accumulators in registers; the first gate's pass fetches the others' lines (a k
// group's gates are 256 contiguous bytes), else each pass streams every fourth line from
// memory (int8 LSTM H1024 decode on an AVX2 EPYC, measured while one-row calls still came here:
// 0.74x -> 0.9x torch's; they now take block_avx2_row, several rows still pass once a gate).
template <int G, int MB>
__attribute__((target("avx2,fma"))) void block_avx2(const BlockArgs& a) {
  const int64_t step = G * kUnits * kDepth;
  for (int q = 0; q < G; ++q) {
    __m256i acc[MB][4];
    for (int m = 0; m < MB; ++m)
      for (int c = 0; c < 4; ++c) acc[m][c] = _mm256_setzero_si256();
    const int8_t* wq = a.w + q * kUnits * kDepth;
    for (int64_t kg = 0; kg < a.Kg; ++kg) {
      __m256i x[MB];
      for (int m = 0; m < MB; ++m) {
        x[m] = _mm256_cvtepu8_epi16(_mm_set1_epi32(load_u32(a.u[m] + kg * kDepth)));
      }
      const int8_t* wb = wq + kg * step;
      if (q == 0) {  // the other gates' lines of a k group, 4 groups ahead, into L2 for their passes
        for (int g = 1; g < G; ++g) {
          _mm_prefetch(reinterpret_cast<const char*>(wb + 4 * step + g * kUnits * kDepth), _MM_HINT_T1);
        }
      }
      for (int c = 0; c < 4; ++c) {
        const __m256i w16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wb + 16 * c)));
        for (int m = 0; m < MB; ++m) acc[m][c] = _mm256_add_epi32(acc[m][c], _mm256_madd_epi16(w16, x[m]));
      }
    }
    for (int m = 0; m < MB; ++m) {
      for (int half = 0; half < 2; ++half) {
        store_half_avx2(a, m, q, half, _mm256_hadd_epi32(acc[m][2 * half], acc[m][2 * half + 1]));
      }
    }
  }
}

// One activation row (decode): every gate of a k group in one pass, reading its 256 bytes in
// order. Each pair of chunks is summed across at once (hadd), so a gate keeps 2 accumulators
// and the G gates fit in registers.
template <int G>
__attribute__((target("avx2,fma"))) void block_avx2_row(const BlockArgs& a) {
  __m256i acc[G][2];
  for (int q = 0; q < G; ++q) acc[q][0] = acc[q][1] = _mm256_setzero_si256();
  for (int64_t kg = 0; kg < a.Kg; ++kg) {
    const __m256i x = _mm256_cvtepu8_epi16(_mm_set1_epi32(load_u32(a.u[0] + kg * kDepth)));
    const int8_t* wb = a.w + kg * G * kUnits * kDepth;
#pragma GCC unroll 4
    for (int q = 0; q < G; ++q) {
#pragma GCC unroll 2
      for (int half = 0; half < 2; ++half) {
        const int8_t* w = wb + (2 * q + half) * 32;
        const __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
        const __m256i hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)));
        acc[q][half] = _mm256_add_epi32(acc[q][half],
                                        _mm256_hadd_epi32(_mm256_madd_epi16(lo, x), _mm256_madd_epi16(hi, x)));
      }
    }
  }
  for (int q = 0; q < G; ++q) {
    for (int half = 0; half < 2; ++half) store_half_avx2(a, 0, q, half, acc[q][half]);
  }
}

// One row: two accumulator sets over alternate k groups, so that the G dependency
// chains of vpdpbusd become 2G (its latency is several cycles).
template <int G, int MB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma"))) void block_vnni(const BlockArgs& a) {
  constexpr int U = MB == 1 ? 2 : 1;
  __m512i acc[U][G][MB];
#pragma GCC unroll 16
  for (int v = 0; v < U; ++v)
#pragma GCC unroll 16
    for (int q = 0; q < G; ++q)
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) acc[v][q][m] = _mm512_setzero_si512();
  const int64_t step = G * kUnits * kDepth;
  int64_t kg = 0;
  for (; kg + U <= a.Kg; kg += U) {
#pragma GCC unroll 16
    for (int v = 0; v < U; ++v) {
      __m512i x[MB];
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) x[m] = _mm512_set1_epi32(load_u32(a.u[m] + (kg + v) * kDepth));
      const int8_t* wb = a.w + (kg + v) * step;
#pragma GCC unroll 16
      for (int q = 0; q < G; ++q) {
        const __m512i wq = _mm512_loadu_si512(wb + q * kUnits * kDepth);
#pragma GCC unroll 16
        for (int m = 0; m < MB; ++m) acc[v][q][m] = _mm512_dpbusd_epi32(acc[v][q][m], x[m], wq);
      }
    }
  }
  for (; kg < a.Kg; ++kg) {
    const int8_t* wb = a.w + kg * step;
#pragma GCC unroll 16
    for (int q = 0; q < G; ++q) {
      const __m512i wq = _mm512_loadu_si512(wb + q * kUnits * kDepth);
#pragma GCC unroll 16
      for (int m = 0; m < MB; ++m) {
        acc[0][q][m] = _mm512_dpbusd_epi32(acc[0][q][m], _mm512_set1_epi32(load_u32(a.u[m] + kg * kDepth)), wq);
      }
    }
  }
#pragma GCC unroll 16
  for (int q = 0; q < G; ++q) {
    const __m512 sw = _mm512_loadu_ps(a.sw + q * a.Hp);
    const __m512i rs = _mm512_loadu_si512(a.rs + q * a.Hp);
    const __m512 b = _mm512_loadu_ps(a.bias + q * a.Hp);
#pragma GCC unroll 16
    for (int m = 0; m < MB; ++m) {
      __m512i sum = acc[0][q][m];
      if (U == 2) sum = _mm512_add_epi32(sum, acc[U - 1][q][m]);
      sum = _mm512_sub_epi32(sum, _mm512_mullo_epi32(_mm512_set1_epi32(a.zx[m]), rs));
      const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_mul_ps(_mm512_set1_ps(a.sx[m]), sw), b);
      _mm512_storeu_ps(a.out[m] + q * a.Hp, f);
    }
  }
}

// The block kernel for `isa`, G gates and each row count 1..kMaxRows (index = rows).
struct Kernels {
  BlockFn rows[kMaxRows + 1];
};

template <int G>
Kernels kernels_for(int64_t isa) {
  if (isa >= 2) return {{nullptr, block_vnni<G, 1>, block_vnni<G, 2>, block_vnni<G, 3>, block_vnni<G, 4>}};
  if (isa == 1) return {{nullptr, block_avx2_row<G>, block_avx2<G, 2>, block_avx2<G, 3>, block_avx2<G, 4>}};
  return {{nullptr, block_base<G, 1>, block_base<G, 2>, block_base<G, 3>, block_base<G, 4>}};
}

Kernels kernels_for(int64_t isa, int64_t G) {
  return G == 4 ? kernels_for<4>(isa) : G == 3 ? kernels_for<3>(isa) : kernels_for<1>(isa);
}

// ---- one layer and direction, run by every thread of a team ----------------------

struct QWeights {  // one product (input or recurrent) of one layer and direction
  const int8_t* w;
  int64_t Kg;
  const float* scale;  // (G, Hp)
  const int32_t* rowsum;
  const float* bias;
};

// Quantized activation rows: u (rows, ld) with a scale and zero point per row; a row of n
// values is zero-padded to the products' K, a multiple of kDepth.
struct QRows {
  uint8_t* u;
  float* scale;
  int32_t* zp;
  int64_t ld;
  void quantize(const float* x, int64_t n, int64_t r) const {
    quantize_row(x, n, round_up(n, kDepth), u + r * ld, scale + r, zp + r);
  }
  QRows slice(int64_t r) const { return {u + r * ld, scale + r, zp + r, ld}; }
};

// out rows [0, rows) (stride ldo) = W q(rows) + bias, for the unit blocks [ub0, ub1)
void qgemm(const Kernels& k, const QWeights& w, const QRows& q, int64_t rows, int64_t G, int64_t Hp, float* out,
           int64_t ldo, int64_t ub0, int64_t ub1) {
  constexpr int64_t kPanel = 64;  // activation rows kept hot while the thread's weights stream
  BlockArgs a;
  a.Kg = w.Kg;
  a.Hp = Hp;
  for (int64_t p0 = 0; p0 < rows; p0 += kPanel) {
    const int64_t p1 = std::min(rows, p0 + kPanel);
    for (int64_t ub = ub0; ub < ub1; ++ub) {
      const int64_t u0 = ub * kUnits;
      a.w = w.w + ub * w.Kg * G * kUnits * kDepth;
      a.sw = w.scale + u0;
      a.rs = w.rowsum + u0;
      a.bias = w.bias + u0;
      for (int64_t r = p0; r < p1; r += kMaxRows) {
        const int mb = static_cast<int>(std::min<int64_t>(kMaxRows, p1 - r));
        for (int m = 0; m < mb; ++m) {
          a.u[m] = q.u + (r + m) * q.ld;
          a.sx[m] = q.scale[r + m];
          a.zx[m] = q.zp[r + m];
          a.out[m] = out + (r + m) * ldo + u0;
        }
        k.rows[mb](a);
      }
    }
  }
}

struct Job {
  int64_t mode, G, T, B, I, H, Hp, nb;
  const int64_t* bs;  // active rows per step
  bool reverse;
  QWeights w_ih, w_hh;
  const float* x;                    // (T, B, I)
  float* out;                        // row (t, b) at out + (t * B + b) * out_ld
  int64_t out_ld;
  const float* h0;                   // (B, H)
  const float* c0;                   // (B, H), LSTM
  float* h_n;
  float* c_n;
  // scratch
  QRows xq;                          // T * B rows per thread (private_q) or T * B rows shared
  QRows hq;                          // B rows per thread (private_q) or B rows shared
  bool private_q;                    // every thread quantizes every row: fewer barriers on small calls
  bool by_rows;                      // threads split the batch rows (private_q false), else the units
  float* gi;                         // (T * B, G * Hp)
  float* gh;                         // (B, G * Hp)
  float* ws;                         // (B, 4 * Hp), GRU
  float* hbuf;                       // (2, B, H): the state, alternating by step
  float* c;                          // (B, H)
};

void run_layer(const Job& j, const Kernels& k, int64_t tid, int64_t nt) {
  const int64_t G = j.G, B = j.B, H = j.H, Hp = j.Hp, GHp = G * Hp, T = j.T;
  // this thread's unit blocks [ub0, ub1) (units [lo, lo + nu)) and rows [rb0, rb1)
  const int64_t ub0 = j.by_rows ? 0 : j.nb * tid / nt, ub1 = j.by_rows ? j.nb : j.nb * (tid + 1) / nt;
  const int64_t rb0 = j.by_rows ? B * tid / nt : 0, rb1 = j.by_rows ? B * (tid + 1) / nt : B;
  const int64_t lo = ub0 * kUnits, nu = std::max<int64_t>(0, std::min(ub1 * kUnits, H) - lo);
  const bool lstm = j.mode == LSTM;
  QRows xq = j.xq, hq = j.hq;
  if (j.private_q) {
    xq = xq.slice(tid * T * B);
    hq = hq.slice(tid * B);
  }
  // the rows this thread quantizes: its own (by rows), every row (private_q), or every nt-th
  auto quantized = [&](int64_t r) { return j.by_rows || j.private_q || r % nt == tid; };
  // where input row (t, b) sits in xq and gi: by rows a thread's rows step after step, so
  // that its input projection is one product over them all
  auto xrow = [&](int64_t t, int64_t b) { return j.by_rows ? rb0 * T + t * (rb1 - rb0) + b - rb0 : t * B + b; };

  for (int64_t t = 0; t < T; ++t) {
    for (int64_t b = rb0; b < rb1; ++b) {
      if (quantized(xrow(t, b))) xq.quantize(j.x + (t * B + b) * j.I, j.I, xrow(t, b));
    }
  }
  for (int64_t b = rb0; b < rb1; ++b) {
    if (quantized(b)) hq.quantize(j.h0 + b * H, H, b);
  }
  float* first_prev = j.hbuf + B * H;  // step s reads hbuf[(s + 1) % 2] and writes hbuf[s % 2]
  for (int64_t b = rb0; b < rb1; ++b) {
    std::memcpy(first_prev + b * H + lo, j.h0 + b * H + lo, nu * sizeof(float));
    if (lstm) std::memcpy(j.c + b * H + lo, j.c0 + b * H + lo, nu * sizeof(float));
  }
  const bool shared_q = !j.private_q && !j.by_rows;  // else this thread reads only what it wrote
  if (shared_q) {
#pragma omp barrier
  }
  const int64_t x0 = xrow(0, rb0);
  qgemm(k, j.w_ih, xq.slice(x0), T * (rb1 - rb0), G, Hp, j.gi + x0 * GHp, GHp, ub0, ub1);

  float* cur = nullptr;
  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = j.reverse ? T - 1 - s : s;
    const int64_t n = std::min(j.bs[t], rb1);
    cur = j.hbuf + (s % 2) * B * H;
    const float* prev = j.hbuf + ((s + 1) % 2) * B * H;
    qgemm(k, j.w_hh, hq.slice(rb0), n - rb0, G, Hp, j.gh + rb0 * GHp, GHp, ub0, ub1);
    for (int64_t b = rb0; b < n && nu > 0; ++b) {
      float* gi = j.gi + xrow(t, b) * GHp + lo;
      float* h = cur + b * H + lo;
      gate_forward(j.mode, gi, j.gh + b * GHp + lo, prev + b * H + lo, lstm ? j.c + b * H + lo : nullptr,
                   static_cast<float*>(nullptr), j.mode == GRU ? j.ws + b * 4 * Hp + lo : gi, h, nu, Hp);
      std::memcpy(j.out + (t * B + b) * j.out_ld + lo, h, nu * sizeof(float));
    }
    for (int64_t b = std::max(n, rb0); b < rb1; ++b) {
      std::memcpy(cur + b * H + lo, prev + b * H + lo, nu * sizeof(float));
    }
    if (!j.by_rows) {
#pragma omp barrier
    }
    if (s + 1 < T) {
      const int64_t n_next = std::min(j.bs[j.reverse ? t - 1 : t + 1], rb1);
      for (int64_t b = rb0; b < n_next; ++b) {
        if (quantized(b)) hq.quantize(cur + b * H, H, b);
      }
      if (shared_q) {
#pragma omp barrier
      }
    }
  }
  for (int64_t b = rb0; b < rb1; ++b) {
    std::memcpy(j.h_n + b * H + lo, cur + b * H + lo, nu * sizeof(float));
    if (lstm) std::memcpy(j.c_n + b * H + lo, j.c + b * H + lo, nu * sizeof(float));
  }
}

// ---- operators ---------------------------------------------------------------

void check_cpu(const Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "rnnfast int8: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "rnnfast int8: ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "rnnfast int8: ", name, " must be ", dim, "-D, got ", t.dim(), "-D");
}

// (G*H, K) int8 -> packed (H/16, K/4, G, 16, 4) and its row sums (G, Hp), both padded with zeros.
std::pair<Tensor, Tensor> pack_weight(const Tensor& w, int64_t G, int64_t H, int64_t Hp) {
  const int64_t K = w.size(1), Kp = round_up(K, kDepth);
  TORCH_CHECK(K < kMaxK, "rnnfast int8: input size ", K, " is too large for int32 accumulation");
  Tensor wp = at::zeros({G, Hp, Kp}, w.options());
  wp.narrow(1, 0, H).narrow(2, 0, K).copy_(w.view({G, H, K}));
  Tensor rowsum = wp.sum(2, /*keepdim=*/false, at::kInt).contiguous();
  Tensor packed = wp.view({G, Hp / kUnits, kUnits, Kp / kDepth, kDepth}).permute({1, 3, 0, 2, 4}).contiguous();
  return {packed, rowsum};
}

std::vector<Tensor> quant_pack(const Tensor& w_ih, const Tensor& s_ih, const Tensor& w_hh, const Tensor& s_hh,
                               const OptTensor& b_ih, const OptTensor& b_hh, int64_t gates) {
  TORCH_CHECK(gates == 4 || gates == 3 || gates == 1, "rnnfast int8: gates must be 4, 3 or 1, got ", gates);
  check_cpu(w_ih, "weight_ih", at::kChar, 2);
  check_cpu(w_hh, "weight_hh", at::kChar, 2);
  const int64_t G = gates, H = w_hh.size(1), Hp = round_up(H, kUnits);
  TORCH_CHECK(w_hh.size(0) == G * H && w_ih.size(0) == G * H, "rnnfast int8: weights have shapes ", w_ih.sizes(),
              " and ", w_hh.sizes(), ", expected [", G * H, ", I] and [", G * H, ", ", H, "]");
  Tensor meta = at::zeros({4, G, Hp}, w_ih.options().dtype(at::kFloat));
  const Tensor parts[4] = {s_ih, s_hh, b_ih.value_or(Tensor()), b_hh.value_or(Tensor())};
  for (int i = 0; i < 4; ++i) {
    if (!parts[i].defined()) continue;
    TORCH_CHECK(parts[i].numel() == G * H, "rnnfast int8: scales and biases need ", G * H, " entries, got ",
                parts[i].numel());
    meta[i].narrow(1, 0, H).copy_(parts[i].reshape({G, H}));
  }
  auto [p_ih, rs_ih] = pack_weight(w_ih.contiguous(), G, H, Hp);
  auto [p_hh, rs_hh] = pack_weight(w_hh.contiguous(), G, H, Hp);
  return {p_ih, p_hh, meta, at::stack({rs_ih, rs_hh})};
}

std::tuple<Tensor, Tensor, Tensor> quant_rnn(int64_t mode, const Tensor& x_, const OptTensor& batch_sizes,
                                             const Tensor& h0_, const OptTensor& c0_, at::TensorList params,
                                             int64_t num_layers, bool bidirectional, int64_t isa_cap) {
  TORCH_CHECK(mode >= LSTM && mode <= RNN_RELU, "rnnfast int8: unknown mode ", mode);
  check_cpu(x_, "input", at::kFloat, 3);
  check_cpu(h0_, "h0", at::kFloat, 3);
  const bool lstm = mode == LSTM, packed = batch_sizes.has_value() && batch_sizes->defined();
  const int64_t D = bidirectional ? 2 : 1, L = num_layers, G = gate_count(mode);
  const int64_t T = x_.size(0), B = x_.size(1), I = x_.size(2), H = h0_.size(2);
  const int64_t Hp = round_up(H, kUnits), nb = Hp / kUnits;
  TORCH_CHECK(h0_.size(0) == L * D && h0_.size(1) == B, "rnnfast int8: h0 has shape ", h0_.sizes(), ", expected [",
              L * D, ", ", B, ", H]");
  TORCH_CHECK(!lstm || (c0_.has_value() && c0_->sizes() == h0_.sizes()), "rnnfast int8: LSTM needs c0 shaped like h0");
  if (lstm) check_cpu(*c0_, "c0", at::kFloat, 3);
  TORCH_CHECK(static_cast<int64_t>(params.size()) == 4 * L * D, "rnnfast int8: expected ", 4 * L * D,
              " packed tensors, got ", params.size());
  std::vector<int64_t> bs(T, B);
  if (packed) {
    const Tensor b = batch_sizes->to(at::kLong).contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == T, "rnnfast int8: batch_sizes must have one entry per time step");
    for (int64_t t = 0; t < T; ++t) {
      bs[t] = b.data_ptr<int64_t>()[t];
      TORCH_CHECK(bs[t] >= 0 && bs[t] <= B && (t == 0 || bs[t] <= bs[t - 1]),
                  "rnnfast int8: batch_sizes must be non-increasing and at most the batch size");
    }
  }
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t d = 0; d < D; ++d) {
      const Tensor* p = &params[4 * (l * D + d)];
      const int64_t in = l == 0 ? I : D * H;
      TORCH_CHECK(p[0].scalar_type() == at::kChar && p[0].dim() == 5 && p[0].size(0) == nb &&
                      p[0].size(1) == round_up(in, kDepth) / kDepth && p[0].size(2) == G,
                  "rnnfast int8: packed weight_ih of layer ", l, " does not match input size ", in, " and H ", H);
      TORCH_CHECK(p[1].scalar_type() == at::kChar && p[1].dim() == 5 && p[1].size(0) == nb &&
                      p[1].size(1) == round_up(H, kDepth) / kDepth && p[1].size(2) == G,
                  "rnnfast int8: packed weight_hh of layer ", l, " does not match H ", H);
      TORCH_CHECK(p[2].scalar_type() == at::kFloat && p[2].numel() == 4 * G * Hp && p[3].scalar_type() == at::kInt &&
                      p[3].numel() == 2 * G * Hp,
                  "rnnfast int8: packed scales of layer ", l, " do not match H ", H);
      for (int i = 0; i < 4; ++i) TORCH_CHECK(p[i].is_contiguous(), "rnnfast int8: packed tensors must be contiguous");
    }
  }

  const Tensor x = x_.contiguous(), h0 = h0_.contiguous(), c0 = lstm ? c0_->contiguous() : Tensor();
  const auto opts = x.options();
  Tensor out = packed ? at::zeros({T, B, D * H}, opts) : at::empty({T, B, D * H}, opts);
  Tensor h_n = at::empty({L * D, B, H}, opts);
  Tensor c_n = lstm ? at::empty({L * D, B, H}, opts) : at::empty({0}, opts);

  // threads: whole unit blocks each, and enough multiply-adds per step to pay for a barrier
  const int64_t macs = G * Hp * (std::max(I, D * H) + H) * B;
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), nb, macs >> 16}));
  // by rows (see the top) while the G x Hp x H int8 weights fit L2, from kMaxRows rows a
  // thread (each pass over a weight block then serves a whole group of rows), and more as the
  // weights take more of L2 (kMaxRows x 8 x W_hh / L2): a thread then streams all of W_hh
  // instead of its share, which its rows repay only when there are enough of them. Measured
  // on 2 threads, 2 MB L2, rows over units: LSTM H256 at 4 rows a thread 1.27x; H512 at 4,
  // 8, 16, 32 rows 0.90x, 1.06x, 1.22x, 1.13x (bench/results/2026-12-03-cpu-8-int8-rows-ab.md)
  const int64_t wh_bytes = G * Hp * round_up(H, kDepth), l2 = l2_bytes();
  const bool by_rows = nt > 1 && wh_bytes <= l2 && B * l2 >= kMaxRows * nt * std::max(l2, 8 * wh_bytes);
  const bool private_q = !by_rows && T * B * std::max(I, D * H) <= 8192 && B * H <= 8192;
  const int64_t kx = round_up(std::max(I, D * H), kDepth), kh = round_up(H, kDepth);
  const int64_t copies = private_q ? nt : 1, hq_rows = copies * B, xq_rows = copies * T * B;
  // all scratch in one allocation (a decode step is short enough for allocations to show)
  std::vector<int64_t> sizes = {
      xq_rows * kx, xq_rows * 4, xq_rows * 4,     // xq, its scales and zero points
      hq_rows * kh, hq_rows * 4, hq_rows * 4,     // hq, ...
      T * B * G * Hp * 4, B * G * Hp * 4,         // gi, gh
      (mode == GRU ? B : 0) * 4 * Hp * 4,         // ws
      2 * B * H * 4, B * H * 4,                   // hbuf, c
      (L > 1 ? T * B * D * H * 4 : 0),            // the output of the layer before, when there is one
  };
  int64_t total = 0;
  std::vector<int64_t> offsets;
  for (int64_t n : sizes) {
    offsets.push_back(total);
    total += round_up(n, 64);
  }
  Tensor scratch = at::empty({total}, opts.dtype(at::kByte));
  uint8_t* base = scratch.data_ptr<uint8_t>();
  auto at_ = [&](int i) { return base + offsets[i]; };
  uint8_t* xq = at_(0);
  float* xs = reinterpret_cast<float*>(at_(1));
  int32_t* xz = reinterpret_cast<int32_t*>(at_(2));
  uint8_t* hq = at_(3);
  float* hs = reinterpret_cast<float*>(at_(4));
  int32_t* hz = reinterpret_cast<int32_t*>(at_(5));
  float* gi = reinterpret_cast<float*>(at_(6));
  float* gh = reinterpret_cast<float*>(at_(7));
  float* ws = reinterpret_cast<float*>(at_(8));
  float* hbuf = reinterpret_cast<float*>(at_(9));
  float* c = reinterpret_cast<float*>(at_(10));
  float* mid = reinterpret_cast<float*>(at_(11));
  if (packed && L > 1) std::memset(mid, 0, sizes[11]);
  // layer l writes `out` when it is the last, else alternates with `mid` so that the last one writes `out`
  auto layer_out = [&](int64_t l) { return (L - 1 - l) % 2 == 0 ? out.data_ptr<float>() : mid; };

  std::vector<Job> jobs;
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t d = 0; d < D; ++d) {
      const int64_t k = l * D + d;
      const Tensor* p = &params[4 * k];
      const float* meta = p[2].data_ptr<float>();
      const int32_t* rs = p[3].data_ptr<int32_t>();
      Job j;
      j.mode = mode;
      j.G = G;
      j.T = T;
      j.B = B;
      j.I = l == 0 ? I : D * H;
      j.H = H;
      j.Hp = Hp;
      j.nb = nb;
      j.bs = bs.data();
      j.reverse = d == 1;
      j.w_ih = {p[0].data_ptr<int8_t>(), p[0].size(1), meta, rs, meta + 2 * G * Hp};
      j.w_hh = {p[1].data_ptr<int8_t>(), p[1].size(1), meta + G * Hp, rs + G * Hp, meta + 3 * G * Hp};
      j.x = l == 0 ? x.data_ptr<float>() : layer_out(l - 1);
      j.out = layer_out(l) + d * H;
      j.out_ld = D * H;
      j.h0 = h0.data_ptr<float>() + k * B * H;
      j.c0 = lstm ? c0.data_ptr<float>() + k * B * H : nullptr;
      j.h_n = h_n.data_ptr<float>() + k * B * H;
      j.c_n = lstm ? c_n.data_ptr<float>() + k * B * H : nullptr;
      // one row stride for every layer: by rows a thread starts the next layer without waiting,
      // and its rows of xq must not move onto rows another thread still reads
      j.xq = {xq, xs, xz, kx};
      j.hq = {hq, hs, hz, kh};
      j.private_q = private_q;
      j.by_rows = by_rows;
      j.gi = gi;
      j.gh = gh;
      j.ws = ws;
      j.hbuf = hbuf;
      j.c = c;
      jobs.push_back(j);
    }
  }
  const Kernels k = kernels_for(quant_isa(isa_cap), G);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int64_t team = omp_get_num_threads(), tid = omp_get_thread_num();
    for (const Job& j : jobs) run_layer(j, k, tid, team);
  }
  return {out, h_n, c_n};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rnnfast, m) {
  m.def("quant_isa(int cap) -> int", &quant_isa);
  m.def(
      "quant_pack(Tensor w_ih, Tensor s_ih, Tensor w_hh, Tensor s_hh, Tensor? b_ih, Tensor? b_hh, int gates) "
      "-> Tensor[]");
  m.def(
      "quant_rnn(int mode, Tensor x, Tensor? batch_sizes, Tensor h0, Tensor? c0, Tensor[] params, int num_layers, "
      "bool bidirectional, int isa) -> (Tensor, Tensor, Tensor)");
  m.def("int8_no_backward(Tensor grad, Tensor input) -> Tensor");  // quant_rnn's backward (autograd.cpp): raises
}

TORCH_LIBRARY_IMPL(rnnfast, CPU, m) {
  m.impl("quant_pack", &quant_pack);
  m.impl("quant_rnn", &quant_rnn);
  m.impl("int8_no_backward", [](const Tensor&, const Tensor&) -> Tensor {
    TORCH_CHECK(false, "rnnfast's int8 recurrent modules (rnnfast.quantize_dynamic) cannot backpropagate: train the "
                "float model and quantize it after (run inference under torch.no_grad() or torch.inference_mode() to "
                "leave them out of the graph)");
  });
}

}  // namespace rnnfast
