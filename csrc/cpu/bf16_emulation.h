// AVX512-BF16 by AVX-512F, for test builds only (-DRNNFAST_EMULATE_BF16, `make test-bf16-emulated`): the
// bfloat16 fused loop, which this project's CI host cannot run (no AVX512-BF16 there), then runs there
// with the same operand layouts, masks and indexing; only the two instructions it uses differ. AMX stays
// off. Included after <immintrin.h>; the vector types keep their names.
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
