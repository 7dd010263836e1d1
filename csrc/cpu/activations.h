// The activations and cell updates of the CPU backend, written once for a float, a double or a
// register of 16 floats (Lanes, through GCC's vector operators, which take a scalar beside a vector):
// the row kernels (kernels_impl.h) run them over rows, the fused loop's step tiles (recurrent.cpp) on
// a tile's sums in registers, so both give the same bits. Always inlined, so that each compiles for
// the target of the loop it lands in.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#define RNNFAST_MATH inline __attribute__((always_inline))

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // Lanes by value: only ever inlined into AVX-512 code

namespace rnnfast {

using Lanes = __m512;  // 16 floats: one AVX-512 register
using LaneInts = int32_t __attribute__((vector_size(64)));

// 2^n for whole n in [-126, 128] (128: infinity), through the exponent field.
RNNFAST_MATH float pow2_int(float n) {
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return scale;
}
RNNFAST_MATH Lanes pow2_int(Lanes n) { return (Lanes)((__builtin_convertvector(n, LaneInts) + 127) << 23); }

// 2^y for float or Lanes, branch-free so that loops over it vectorise: 2^n * p(f) with n = round(y),
// f = y - n in [-1/2, 1/2] and p a degree-6 minimax fit (1.6e-8 relative). sigmoid and tanh
// below take exp(-x) as 2^(-x log2 e): where that product rounds (large |x|) the sigmoid's
// slope sigma (1 - sigma) is tiny, so the result's absolute error stays ~1e-7. y is clamped
// below to the normal range and above to 128, whose n gives the exponent field of infinity: from
// y 127.5 on 2^y is +inf, so sigmoid(-inf) and of any x below about -88.4 is 0, as torch's is (not
// 2^-127: a gate's slope would then be nonzero, and an infinite input's weight gradient inf where
// torch.nn's is NaN). NaN passes both comparisons and propagates through p.
template <typename F>
RNNFAST_MATH F exp2_f(F y) {
  y = y > 128.f ? 128.f : y;
  y = y < -126.f ? -126.f : y;
  const F n = (y + 12582912.f) - 12582912.f;  // round to nearest
  const F f = y - n;
  F p = f * 1.5337577497e-4f + 1.3399859890e-3f;
  p = p * f + 9.6185198054e-3f;
  p = p * f + 5.5503290147e-2f;
  p = p * f + 2.4022646248e-1f;
  p = p * f + 6.9314718246e-1f;
  p = p * f + 1.f;
  return p * pow2_int(n);
}

// float's and Lanes': one 2^y and one division each, with no sign selects: 0.65x the time of an
// exp-based form with Cody-Waite reduction and tanh's odd-symmetry fix, at the same ~3e-7 absolute
// error (AVX-512, LSTM gates).
template <typename F>
struct Act {
  static RNNFAST_MATH F sigmoid(F x) { return 1.f / (1.f + exp2_f(x * -1.44269504089f)); }
  static RNNFAST_MATH F tanh(F x) { return 2.f / (1.f + exp2_f(x * -2.88539008178f)) - 1.f; }
};

// e^x for double, branch-free so that loops over it vectorise, as libm's exp and tanh do not (with
// them float64 Elman inference ran at 0.58x torch.nn's, whose tanh is vectorised; 1.22x on this,
// bench/results/2026-12-07-cpu-amd-float64-ab.md): x = n ln2 + r with ln2
// in two parts (n ln2_hi exact), |r| <= ln2 / 2, e^r by its Taylor series to r^13 (truncation below
// 1e-17 relative), times 2^n through the exponent bits of x log2 e + 1.5 * 2^52, whose low bits hold n.
// x is clamped below to the normal range and above to 710, whose n (1024) gives infinity's exponent field:
// +inf from x 709.44 on, so the sigmoid of a large negative x is 0, as exp2_f's. NaN passes the clamps
// and propagates through r.
RNNFAST_MATH double exp_d(double x) {
  x = x > 710.0 ? 710.0 : x;
  x = x < -708.0 ? -708.0 : x;
  const double shifted = x * 1.4426950408889634 + 6755399441055744.0;  // round to nearest in the low bits
  const double n = shifted - 6755399441055744.0;
  const double r = (x - n * 6.93147180369123816490e-01) - n * 1.90821492927058770002e-10;
  double p = 1.0 / 6227020800.0;  // 1 / 13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  uint64_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits + 1023) << 52;  // 2^n: n + 1023 in the exponent field, the rest shifted out
  double scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// As float's, on exp_d: within a few ulp of 1 absolute (tanh near 0 loses relative, not absolute, accuracy).
template <>
struct Act<double> {
  static RNNFAST_MATH double sigmoid(double x) { return 1.0 / (1.0 + exp_d(-x)); }
  static RNNFAST_MATH double tanh(double x) { return 2.0 / (1.0 + exp_d(-2.0 * x)) - 1.0; }
};

// LSTM's cell: i, f, g, o come in as pre-activations and leave activated; c is the new cell state
// f c_prev + i g, h the output o tanh(c).
template <typename F>
RNNFAST_MATH void lstm_cell(F& i, F& f, F& g, F& o, F c_prev, F& c, F& h) {
  i = Act<F>::sigmoid(i);
  f = Act<F>::sigmoid(f);
  g = Act<F>::tanh(g);
  o = Act<F>::sigmoid(o);
  c = f * c_prev + i * g;
  h = o * Act<F>::tanh(c);
}

// GRU's cell: r and z come in as pre-activations and leave activated; n = tanh(xn + r hn) from the input's
// and the state's n pre-activations (hn: W_hn h + b_hn); returns the new state (1 - z) n + z h_prev.
template <typename F>
RNNFAST_MATH F gru_cell(F& r, F& z, F xn, F hn, F h_prev, F& n) {
  r = Act<F>::sigmoid(r);
  z = Act<F>::sigmoid(z);
  n = Act<F>::tanh(xn + r * hn);
  return (1.f - z) * n + z * h_prev;
}

// The Elman cell: tanh or ReLU of the pre-activation (NaN passes ReLU, as torch's relu lets it).
template <typename F>
RNNFAST_MATH F elman_cell(F x, bool relu) {
  return relu ? (x < F{} ? F{} : x) : Act<F>::tanh(x);
}

}  // namespace rnnfast

#pragma GCC diagnostic pop
