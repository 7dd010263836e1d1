// The kernels of kernels_impl.h built three times, for baseline x86-64, AVX2+FMA
// and AVX-512, with the choice made once at load time: the extension runs on
// any x86-64 machine and uses the wide units where they exist.
#include "kernels.h"

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "activations.h"
#include "bf16_emulation.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#define RNNFAST_INLINE inline __attribute__((always_inline))

namespace rnnfast {
namespace base {
#include "kernels_impl.h"
}  // namespace base
}  // namespace rnnfast

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace rnnfast {
namespace avx2 {
#include "kernels_impl.h"
}  // namespace avx2
}  // namespace rnnfast
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,prefer-vector-width=512")
namespace rnnfast {
namespace avx512 {
#include "kernels_impl.h"
}  // namespace avx512
}  // namespace rnnfast
#pragma GCC pop_options

namespace rnnfast {

namespace {

// Whether the CPU has AMX tiles with bfloat16 products and Linux lets this process use them
// (the tile data is a large state that a process must ask for, once, before its first use); in a
// test build, whether bf16_emulation.h stands in for them.
bool amx_usable() {
#if defined(RNNFAST_EMULATE_AMX)
  return true;
#elif defined(RNNFAST_EMULATE_BF16)
  return false;
#else
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  const bool tile = (edx >> 24) & 1, bf16 = (edx >> 22) & 1;
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return tile && bf16 && syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
#endif
}

// 0: baseline x86-64, 1: AVX2+FMA, 2: AVX-512, 3: AVX-512 with AVX512-BF16, 4: and AMX-BF16.
// What the CPU has, capped by RNNFAST_CPU_ISA (base, avx2, avx512, avx512bf16) so that one
// machine can test every build.
int isa_level() {
  __builtin_cpu_init();  // this initialiser may run before libgcc's own
  int level = 0;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    level = 1;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")) {
#ifdef RNNFAST_EMULATE_BF16
      level = 3;  // a test build: bf16_emulation.h stands in for the instructions
#else
      level = __builtin_cpu_supports("avx512bf16") ? 3 : 2;
#endif
    }
  }
  const char* cap = std::getenv("RNNFAST_CPU_ISA");
  if (cap != nullptr && std::strcmp(cap, "base") == 0) level = 0;
  if (cap != nullptr && std::strcmp(cap, "avx2") == 0) level = std::min(level, 1);
  if (cap != nullptr && std::strcmp(cap, "avx512") == 0) level = std::min(level, 2);
  const bool below_amx = cap != nullptr && std::strcmp(cap, "avx512bf16") == 0;
  if (level == 3 && !below_amx && amx_usable()) level = 4;
  return level;
}

const int kIsa = isa_level();

}  // namespace

const bool kHasAvx2 = kIsa >= 1;
const bool kHasAvx512 = kIsa >= 2;
const bool kHasAvx512Bf16 = kIsa >= 3;
const bool kHasAmxBf16 = kIsa >= 4;
const bool kIsaCapped = std::getenv("RNNFAST_CPU_ISA") != nullptr;

namespace {
int64_t cache_bytes(int name, int64_t otherwise) {
  const long b = sysconf(name);
  return b > 0 ? int64_t(b) : otherwise;
}
}  // namespace

int64_t l1d_bytes() {
  static const int64_t bytes = cache_bytes(_SC_LEVEL1_DCACHE_SIZE, int64_t(32) << 10);
  return bytes;
}

int64_t l2_bytes() {
  static const int64_t bytes = cache_bytes(_SC_LEVEL2_CACHE_SIZE, int64_t(512) << 10);
  return bytes;
}

#define RNNFAST_DISPATCH(fn, ...) \
  (kHasAvx512 ? avx512::fn(__VA_ARGS__) : kHasAvx2 ? avx2::fn(__VA_ARGS__) : base::fn(__VA_ARGS__))

#define RNNFAST_DEFINE(T)                                                                                   \
  void lstm_fwd(const T* gi, const T* gh, const T* c_prev, T* gates, T* c_out, T* h_out, int64_t n,        \
                int64_t H) {                                                                                \
    RNNFAST_DISPATCH(lstm_fwd, gi, gh, c_prev, gates, c_out, h_out, n, H);                                  \
  }                                                                                                         \
  void gru_fwd(const T* gi, const T* gh, const T* h_prev, T* ws, T* h_out, int64_t n, int64_t H) {          \
    RNNFAST_DISPATCH(gru_fwd, gi, gh, h_prev, ws, h_out, n, H);                                             \
  }                                                                                                         \
  void rnn_fwd(const T* gi, const T* gh, T* h_out, bool relu, int64_t n) {                                 \
    RNNFAST_DISPATCH(rnn_fwd, gi, gh, h_out, relu, n);                                                      \
  }                                                                                                         \
  void lstm_bwd(const T* g, const T* c, const T* c_prev, const T* dh, T* dc, T* dg, int64_t n, int64_t H) { \
    RNNFAST_DISPATCH(lstm_bwd, g, c, c_prev, dh, dc, dg, n, H);                                             \
  }                                                                                                         \
  void gru_bwd(const T* ws, const T* h_prev, T* dh, T* dgi, T* dgh, int64_t n, int64_t H) {                 \
    RNNFAST_DISPATCH(gru_bwd, ws, h_prev, dh, dgi, dgh, n, H);                                              \
  }                                                                                                         \
  void rnn_bwd(const T* h, const T* dh, T* dg, bool relu, int64_t n) { RNNFAST_DISPATCH(rnn_bwd, h, dh, dg, relu, n); }
RNNFAST_DEFINE(float)
RNNFAST_DEFINE(double)
#undef RNNFAST_DEFINE

void add_row(float* dst, const float* src, int64_t n) { RNNFAST_DISPATCH(add_row, dst, src, n); }
void add_row(float* dst, const at::BFloat16* src, int64_t n) { RNNFAST_DISPATCH(add_row, dst, src, n); }
void widen_row(float* dst, const at::BFloat16* src, int64_t n) { RNNFAST_DISPATCH(widen_row, dst, src, n); }

namespace {

template <typename T>
void dot_rows_generic(const T* w, int64_t ldw, int64_t rows, const T* v, int64_t n, T* res, int64_t res_stride) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* wr = w + r * ldw;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < n; ++k) acc += wr[k] * v[k];
    res[r * res_stride] = acc;
  }
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Eight float32 lanes of a row: float32 as it is, bfloat16 widened exactly (its bits are a float32's top half).
__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load8(const at::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// Eight rows at a time share each load of v: eight independent FMA chains, summed in float32.
template <typename E>
__attribute__((target("avx2,fma"))) void dot_rows_avx2(const E* w, int64_t ldw, int64_t rows, const E* v,
                                                       int64_t n, float* res, int64_t res_stride) {
  int64_t r = 0;
  const int64_t nv = n & ~int64_t(7);
  for (; r + 8 <= rows; r += 8) {
    __m256 acc[8];
    for (int q = 0; q < 8; ++q) acc[q] = _mm256_setzero_ps();
    const E* wr = w + r * ldw;
    for (int64_t k = 0; k < nv; k += 8) {
      const __m256 x = load8(v + k);
      for (int q = 0; q < 8; ++q) acc[q] = _mm256_fmadd_ps(load8(wr + q * ldw + k), x, acc[q]);
    }
    for (int q = 0; q < 8; ++q) {
      float s = hsum(acc[q]);
      for (int64_t k = nv; k < n; ++k) s += float(wr[q * ldw + k]) * float(v[k]);
      res[(r + q) * res_stride] = s;
    }
  }
  for (; r < rows; ++r) {
    const E* wr = w + r * ldw;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < nv; k += 8) acc = _mm256_fmadd_ps(load8(wr + k), load8(v + k), acc);
    float s = hsum(acc);
    for (int64_t k = nv; k < n; ++k) s += float(wr[k]) * float(v[k]);
    res[r * res_stride] = s;
  }
}

// Sixteen float32 lanes of a row, the lanes from n on zero: float32 as it is, bfloat16 widened exactly.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const float* p, __mmask16 live) {
  return _mm512_maskz_loadu_ps(live, p);
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m512 load16(const at::BFloat16* p, __mmask16 live) {
  const __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// Q rows' sums over n of w * v, 16 lanes each (the tail masked): Q chains sharing each load of v.
template <int Q, typename E>
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline void row_sums16(const E* w, int64_t ldw, const E* v,
                                                                            int64_t n, __m512* acc) {
  for (int q = 0; q < Q; ++q) acc[q] = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 16) {
    const __mmask16 live = n - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - k)) - 1);
    const __m512 x = load16(v + k, live);
    for (int q = 0; q < Q; ++q) acc[q] = _mm512_fmadd_ps(load16(w + q * ldw + k, live), x, acc[q]);
  }
}

// The eight sums of acc[0..7] (16 lanes each) in one register: halves added, then a tree of horizontal adds.
__attribute__((target("avx512f,avx512bw,avx512vl"))) inline __m256 sums8(const __m512* acc) {
  __m256 half[8];
  for (int q = 0; q < 8; ++q) {
    half[q] = _mm256_add_ps(_mm512_castps512_ps256(acc[q]),
                            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[q]), 1)));
  }
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(half[0], half[1]), _mm256_hadd_ps(half[2], half[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(half[4], half[5]), _mm256_hadd_ps(half[6], half[7]));
  // u0: rows 0-3 over the low 128 bits, then over the high; u1 the same for rows 4-7
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// dot_rows_avx2 on 16 lanes: eight rows at a time, their sums reduced together (halves added,
// then a tree of horizontal adds) into one store.
template <typename E>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void dot_rows_avx512(const E* w, int64_t ldw, int64_t rows,
                                                                          const E* v, int64_t n, float* res,
                                                                          int64_t res_stride) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) {
    __m512 acc[8];
    row_sums16<8>(w + r * ldw, ldw, v, n, acc);
    const __m256 sums = sums8(acc);
    if (res_stride == 1) {
      _mm256_storeu_ps(res + r, sums);
    } else {
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, sums);
      for (int q = 0; q < 8; ++q) res[(r + q) * res_stride] = lanes[q];
    }
  }
  for (; r < rows; ++r) {
    __m512 acc[1];
    row_sums16<1>(w + r * ldw, ldw, v, n, acc);
    res[r * res_stride] = _mm512_reduce_add_ps(acc[0]);
  }
}

// float64: Q rows at a time share each load of v, 8 lanes each (the tail masked), each row's lanes
// then reduced. The generic loop (one chain a row, baseline vectors) held float64 cells' decode steps
// at 0.6x torch.nn's (bench/results/2026-12-07-cpu-amd-float64-ab.md).
template <int Q>
__attribute__((target("avx512f"))) inline void row_sums8(const double* w, int64_t ldw, const double* v, int64_t n,
                                                         double* res, int64_t res_stride) {
  __m512d acc[Q];
  for (int q = 0; q < Q; ++q) acc[q] = _mm512_setzero_pd();
  for (int64_t k = 0; k < n; k += 8) {
    const __mmask8 live = n - k >= 8 ? __mmask8(0xFF) : __mmask8((1u << (n - k)) - 1);
    const __m512d x = _mm512_maskz_loadu_pd(live, v + k);
    for (int q = 0; q < Q; ++q) acc[q] = _mm512_fmadd_pd(_mm512_maskz_loadu_pd(live, w + q * ldw + k), x, acc[q]);
  }
  for (int q = 0; q < Q; ++q) res[q * res_stride] = _mm512_reduce_add_pd(acc[q]);
}

__attribute__((target("avx512f"))) void dot_rows_avx512(const double* w, int64_t ldw, int64_t rows, const double* v,
                                                        int64_t n, double* res, int64_t res_stride) {
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) row_sums8<8>(w + r * ldw, ldw, v, n, res + r * res_stride, res_stride);
  for (; r < rows; ++r) row_sums8<1>(w + r * ldw, ldw, v, n, res + r * res_stride, res_stride);
}

// Q rows of bfloat16 dot products, each vdpbf16ps summing 32 products into 16 float32 lanes.
template <int Q>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void dot_rows_bf16(const at::BFloat16* w, int64_t ldw,
                                                                         const at::BFloat16* v, int64_t n,
                                                                         float* res, int64_t res_stride) {
  __m512 acc[Q];
  for (int q = 0; q < Q; ++q) acc[q] = _mm512_setzero_ps();
  for (int64_t k = 0; k < n; k += 32) {
    const __mmask32 live = n - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (n - k)) - 1;
    const __m512bh x = (__m512bh)_mm512_maskz_loadu_epi16(live, v + k);
    for (int q = 0; q < Q; ++q) {
      acc[q] = _mm512_dpbf16_ps(acc[q], (__m512bh)_mm512_maskz_loadu_epi16(live, w + q * ldw + k), x);
    }
  }
  for (int q = 0; q < Q; ++q) res[q * res_stride] = _mm512_reduce_add_ps(acc[q]);
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void round_row_bf16(at::BFloat16* dst,
                                                                                   const float* src, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 live = static_cast<__mmask16>(n - j >= 16 ? 0xffff : (1u << (n - j)) - 1);
    const __m256bh y = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(live, src + j));
    _mm256_mask_storeu_epi16(dst + j, live, (__m256i)y);
  }
}

}  // namespace

void dot_rows(const at::BFloat16* w, int64_t ldw, int64_t rows, const at::BFloat16* v, int64_t n, float* res,
              int64_t res_stride) {
  if (!kHasAvx512Bf16 && kHasAvx512) return dot_rows_avx512(w, ldw, rows, v, n, res, res_stride);
  if (!kHasAvx512Bf16 && kHasAvx2) return dot_rows_avx2(w, ldw, rows, v, n, res, res_stride);
  if (!kHasAvx512Bf16) {
    for (int64_t r = 0; r < rows; ++r) {
      float acc = 0;
      for (int64_t k = 0; k < n; ++k) acc += float(w[r * ldw + k]) * float(v[k]);
      res[r * res_stride] = acc;
    }
    return;
  }
  int64_t r = 0;
  for (; r + 8 <= rows; r += 8) dot_rows_bf16<8>(w + r * ldw, ldw, v, n, res + r * res_stride, res_stride);
  for (; r < rows; ++r) dot_rows_bf16<1>(w + r * ldw, ldw, v, n, res + r * res_stride, res_stride);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) void dot_pairs(const float* a, int64_t lda, int64_t n,
                                                                   const float* w, int64_t ldw, int64_t K, int64_t N,
                                                                   const float* bias, float* c, int64_t ldc,
                                                                   bool add) {
  for (int64_t j0 = 0; j0 < N; j0 += 8) {
    const int64_t m = std::min<int64_t>(8, N - j0);
    const __mmask8 out = static_cast<__mmask8>((1u << m) - 1);
    const float* wq[8];
    for (int q = 0; q < 8; ++q) wq[q] = w + (j0 + std::min<int64_t>(q, m - 1)) * ldw;  // dead rows repeat the last
    const __m256 b = bias != nullptr ? _mm256_maskz_loadu_ps(out, bias + j0) : _mm256_setzero_ps();
    for (int64_t r = 0; r < n; r += 2) {
      const int rows = n - r >= 2 ? 2 : 1;
      const float* a0 = a + r * lda;
      const float* a1 = rows == 2 ? a0 + lda : a0;  // an odd last row sums itself twice
      __m512 acc[2][8];
      for (int q = 0; q < 8; ++q) acc[0][q] = acc[1][q] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 live = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
        const __m512 x0 = _mm512_maskz_loadu_ps(live, a0 + k), x1 = _mm512_maskz_loadu_ps(live, a1 + k);
        for (int q = 0; q < 8; ++q) {
          const __m512 wk = _mm512_maskz_loadu_ps(live, wq[q] + k);
          acc[0][q] = _mm512_fmadd_ps(x0, wk, acc[0][q]);
          acc[1][q] = _mm512_fmadd_ps(x1, wk, acc[1][q]);
        }
      }
      for (int i = 0; i < rows; ++i) {
        float* dst = c + (r + i) * ldc + j0;
        __m256 y = _mm256_add_ps(sums8(acc[i]), b);
        if (add) y = _mm256_add_ps(y, _mm256_maskz_loadu_ps(out, dst));
        _mm256_mask_storeu_ps(dst, out, y);
      }
    }
  }
}

void round_row(at::BFloat16* dst, const float* src, int64_t n) {
  if (kHasAvx512Bf16) return round_row_bf16(dst, src, n);
  for (int64_t j = 0; j < n; ++j) dst[j] = at::BFloat16(src[j]);
}

void dot_rows(const float* w, int64_t ldw, int64_t rows, const float* v, int64_t n, float* res, int64_t res_stride) {
  if (kHasAvx512) {
    dot_rows_avx512(w, ldw, rows, v, n, res, res_stride);
  } else if (kHasAvx2) {
    dot_rows_avx2(w, ldw, rows, v, n, res, res_stride);
  } else {
    dot_rows_generic(w, ldw, rows, v, n, res, res_stride);
  }
}

void dot_rows(const double* w, int64_t ldw, int64_t rows, const double* v, int64_t n, double* res,
              int64_t res_stride) {
  if (kHasAvx512) return dot_rows_avx512(w, ldw, rows, v, n, res, res_stride);
  dot_rows_generic(w, ldw, rows, v, n, res, res_stride);
}

}  // namespace rnnfast

#include <ATen/core/dispatch/Dispatcher.h>

namespace rnnfast {

bool mkl_on_intel() {
  static const bool on = [] {
    __builtin_cpu_init();
    return at::hasMKL() && __builtin_cpu_is("intel");
  }();
  return on;
}

// oneDNN's linear costs 25-35 us a call more than ATen's GEMM (2-core Xeon, float32, 1-48 rows of
// K 128-512): a step's product of a few rows takes ATen's (bench/results/2026-12-06-cpu-proj-ab.md).
constexpr int64_t kOneDnnMinRows = 64;

at::Tensor matmul_nt(const at::Tensor& a, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& add) {
  static const c10::optional<c10::OperatorHandle> onednn =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  static const c10::optional<c10::OperatorHandle> onednn_add =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", "binary"});
  const bool has_bias = bias.has_value() && bias->defined(), has_add = add.has_value() && add->defined();
  const c10::IValue b = has_bias ? c10::IValue(*bias) : c10::IValue();
  if (mkl_on_intel() || a.size(0) < kOneDnnMinRows) {
    at::Tensor out = has_bias ? at::addmm(*bias, a, w.t()) : at::mm(a, w.t());
    return has_add ? out.add_(*add) : out;
  }
  if (a.scalar_type() == at::kFloat && has_add && onednn_add.has_value()) {
    std::vector<c10::IValue> stack{a, *add, w, b, std::string("add")};
    onednn_add->callBoxed(stack);
    return stack[0].toTensor();
  }
  if (a.scalar_type() == at::kFloat && !has_add && onednn.has_value()) {
    std::vector<c10::IValue> stack{a, w, b, std::string("none"), c10::List<c10::optional<c10::Scalar>>(),
                                   std::string("")};
    onednn->callBoxed(stack);
    return stack[0].toTensor();
  }
  at::Tensor out = has_bias ? at::addmm(*bias, a, w.t()) : at::mm(a, w.t());
  return has_add ? out.add_(*add) : out;
}

}  // namespace rnnfast
