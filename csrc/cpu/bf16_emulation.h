// AVX512-BF16 by AVX-512F, and AMX-BF16 tiles by plain C++, for test builds only (-DRNNFAST_EMULATE_BF16,
// -DRNNFAST_EMULATE_AMX; `make test-bf16-emulated`): the bfloat16 fused loop, which this project's CI host
// cannot run (it has neither), then runs there with the same operand layouts, masks, tile shapes and
// indexing; only the instructions differ. Included after <immintrin.h>; the vector types keep their names.
#pragma once

#ifdef RNNFAST_EMULATE_BF16
#include <immintrin.h>

namespace rnnfast::emulated {

// vdpbf16ps: each float32 lane adds the products of its odd, then its even, bfloat16 pair (each product
// exact in float32, so an FMA is the instruction's multiply and add).
__attribute__((target("avx512f,avx512bw"), always_inline)) inline __m512 dpbf16_ps(__m512 acc, __m512i a, __m512i b) {
  const __m512i high = _mm512_set1_epi32(int(0xFFFF0000u));
  const __m512 a_odd = _mm512_castsi512_ps(_mm512_and_si512(a, high));
  const __m512 b_odd = _mm512_castsi512_ps(_mm512_and_si512(b, high));
  const __m512 a_even = _mm512_castsi512_ps(_mm512_slli_epi32(a, 16));
  const __m512 b_even = _mm512_castsi512_ps(_mm512_slli_epi32(b, 16));
  return _mm512_fmadd_ps(a_even, b_even, _mm512_fmadd_ps(a_odd, b_odd, acc));
}

// vcvtneps2bf16: float32 to bfloat16, rounded to nearest even; NaNs stay quiet NaNs.
__attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) inline __m256i cvtneps_pbh(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet));
}

}  // namespace rnnfast::emulated

#define _mm512_dpbf16_ps(acc, a, b) \
  ::rnnfast::emulated::dpbf16_ps((acc), (__m512i)(a), (__m512i)(b))
#define _mm512_cvtneps_pbh(x) ((__m256bh)::rnnfast::emulated::cvtneps_pbh(x))
#endif

#ifdef RNNFAST_EMULATE_AMX
#include <immintrin.h>  // first: its _tile_* macros are replaced below

#include <cstdint>
#include <cstring>

namespace rnnfast::emulated {

// The eight tile registers of this thread (16 rows of 64 bytes) and their shapes from the last loadconfig.
struct Tiles {
  alignas(64) uint8_t data[8][16][64];
  uint8_t rows[8];
  uint16_t colsb[8];
};
inline thread_local Tiles tiles;

// ldtilecfg: palette 1's layout, colsb (uint16) from byte 16 and rows (uint8) from byte 48.
inline void tile_loadconfig(const void* config) {
  const auto* c = static_cast<const uint8_t*>(config);
  for (int t = 0; t < 8; ++t) {
    std::memcpy(&tiles.colsb[t], c + 16 + 2 * t, 2);
    tiles.rows[t] = c[48 + t];
  }
}

// tileloadd: the configured rows and bytes of each row, the rest zero.
inline void tile_loadd(int t, const void* base, int64_t stride) {
  std::memset(tiles.data[t], 0, sizeof(tiles.data[t]));
  for (int r = 0; r < tiles.rows[t]; ++r) {
    std::memcpy(tiles.data[t][r], static_cast<const uint8_t*>(base) + r * stride, tiles.colsb[t]);
  }
}

inline void tile_stored(int t, void* base, int64_t stride) {
  for (int r = 0; r < tiles.rows[t]; ++r) {
    std::memcpy(static_cast<uint8_t*>(base) + r * stride, tiles.data[t][r], tiles.colsb[t]);
  }
}

inline void tile_zero(int t) { std::memset(tiles.data[t], 0, sizeof(tiles.data[t])); }

inline float widen(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// tdpbf16ps: c[m][n] += a[m][2k] b[k][2n] + a[m][2k+1] b[k][2n+1] over the pairs k of a's rows.
inline void tile_dpbf16ps(int c, int a, int b) {
  const int M = tiles.rows[c], N = tiles.colsb[c] / 4, K = tiles.colsb[a] / 4;
  for (int m = 0; m < M; ++m) {
    auto* out = reinterpret_cast<float*>(tiles.data[c][m]);
    const auto* x = reinterpret_cast<const uint16_t*>(tiles.data[a][m]);
    for (int k = 0; k < K; ++k) {
      const auto* y = reinterpret_cast<const uint16_t*>(tiles.data[b][k]);
      for (int n = 0; n < N; ++n) {
        out[n] += widen(x[2 * k]) * widen(y[2 * n]);
        out[n] += widen(x[2 * k + 1]) * widen(y[2 * n + 1]);
      }
    }
  }
}

}  // namespace rnnfast::emulated

#undef _tile_loadconfig
#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#undef _tile_release
#define _tile_loadconfig(config) ::rnnfast::emulated::tile_loadconfig(config)
#define _tile_loadd(t, base, stride) ::rnnfast::emulated::tile_loadd((t), (base), (stride))
#define _tile_stored(t, base, stride) ::rnnfast::emulated::tile_stored((t), (base), (stride))
#define _tile_zero(t) ::rnnfast::emulated::tile_zero(t)
#define _tile_dpbf16ps(c, a, b) ::rnnfast::emulated::tile_dpbf16ps((c), (a), (b))
#define _tile_release() ((void)0)
#endif
