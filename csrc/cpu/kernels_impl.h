// Pointwise gate kernels and the exp/sigmoid/tanh they use. Included three times by
// kernels.cpp, inside a baseline, an AVX2+FMA and an AVX-512 target region, so that
// every helper inlines into the loops and those loops vectorise for each target.
// No include guard, on purpose.



// 2^y for float, branch-free so that loops over it vectorise: 2^n * p(f) with n = round(y),
// f = y - n in [-1/2, 1/2] and p a degree-6 minimax fit (1.6e-8 relative). sigmoid and tanh
// below take exp(-x) as 2^(-x log2 e): where that product rounds (large |x|) the sigmoid's
// slope sigma (1 - sigma) is tiny, so the result's absolute error stays ~1e-7. y is clamped
// below to the normal range and above to 128, whose n gives the exponent field of infinity: from
// y 127.5 on 2^y is +inf, so sigmoid(-inf) and of any x below about -88.4 is 0, as torch's is (not
// 2^-127: a gate's slope would then be nonzero, and an infinite input's weight gradient inf where
// torch.nn's is NaN). NaN passes both comparisons and propagates through p.
RNNFAST_INLINE float exp2_f(float y) {
  y = y > 128.f ? 128.f : y;
  y = y < -126.f ? -126.f : y;
  const float n = (y + 12582912.f) - 12582912.f;  // round to nearest
  const float f = y - n;
  float p = 1.5337577497e-4f;
  p = p * f + 1.3399859890e-3f;
  p = p * f + 9.6185198054e-3f;
  p = p * f + 5.5503290147e-2f;
  p = p * f + 2.4022646248e-1f;
  p = p * f + 6.9314718246e-1f;
  p = p * f + 1.f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename T>
struct Act;

// One 2^y and one division each, with no sign selects: 0.65x the time of an exp-based form
// with Cody-Waite reduction and tanh's odd-symmetry fix, at the same ~3e-7 absolute error
// (AVX-512, LSTM gates).
template <>
struct Act<float> {
  static RNNFAST_INLINE float sigmoid(float x) { return 1.f / (1.f + exp2_f(x * -1.44269504089f)); }
  static RNNFAST_INLINE float tanh(float x) { return 2.f / (1.f + exp2_f(x * -2.88539008178f)) - 1.f; }
};

// e^x for double, branch-free so that loops over it vectorise, as libm's exp and tanh do not (with
// them float64 Elman inference ran at 0.58x torch.nn's, whose tanh is vectorised; 1.22x on this,
// bench/results/2026-12-07-cpu-amd-float64-ab.md): x = n ln2 + r with ln2
// in two parts (n ln2_hi exact), |r| <= ln2 / 2, e^r by its Taylor series to r^13 (truncation below
// 1e-17 relative), times 2^n through the exponent bits of x log2 e + 1.5 * 2^52, whose low bits hold n.
// x is clamped below to the normal range and above to 710, whose n (1024) gives infinity's exponent field:
// +inf from x 709.44 on, so the sigmoid of a large negative x is 0, as exp2_f's. NaN passes the clamps
// and propagates through r.
RNNFAST_INLINE double exp_d(double x) {
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
  static RNNFAST_INLINE double sigmoid(double x) { return 1.0 / (1.0 + exp_d(-x)); }
  static RNNFAST_INLINE double tanh(double x) { return 2.0 / (1.0 + exp_d(-2.0 * x)) - 1.0; }
};

// ---- forward rows ---------------------------------------------------------

// gi, gh: 4H input and recurrent pre-activations; gates: the activated (i, f, g, o) out
// (may be gi itself); c_out may be c_prev.
template <typename T>
RNNFAST_INLINE void lstm_fwd_impl(const T* gi, const T* gh, const T* c_prev, T* gates, T* c_out, T* h_out, int64_t n,
                                  int64_t H) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T i = Act<T>::sigmoid(gi[j] + gh[j]);
    const T f = Act<T>::sigmoid(gi[H + j] + gh[H + j]);
    const T gg = Act<T>::tanh(gi[2 * H + j] + gh[2 * H + j]);
    const T o = Act<T>::sigmoid(gi[3 * H + j] + gh[3 * H + j]);
    const T c = f * c_prev[j] + i * gg;
    gates[j] = i;
    gates[H + j] = f;
    gates[2 * H + j] = gg;
    gates[3 * H + j] = o;
    c_out[j] = c;
    h_out[j] = o * Act<T>::tanh(c);
  }
}

// gi, gh: 3H pre-activations (biases included); ws: r, z, n, gh_n saved for backward.
template <typename T>
RNNFAST_INLINE void gru_fwd_impl(const T* gi, const T* gh, const T* h_prev, T* ws, T* h_out, int64_t n, int64_t H) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T r = Act<T>::sigmoid(gi[j] + gh[j]);
    const T z = Act<T>::sigmoid(gi[H + j] + gh[H + j]);
    const T ghn = gh[2 * H + j];
    const T n = Act<T>::tanh(gi[2 * H + j] + r * ghn);
    ws[j] = r;
    ws[H + j] = z;
    ws[2 * H + j] = n;
    ws[3 * H + j] = ghn;
    h_out[j] = (T(1) - z) * n + z * h_prev[j];
  }
}

template <typename T>
RNNFAST_INLINE void rnn_fwd_impl(const T* gi, const T* gh, T* h_out, bool relu, int64_t n) {
  if (relu) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) h_out[j] = gi[j] + gh[j] > T(0) ? gi[j] + gh[j] : T(0);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) h_out[j] = Act<T>::tanh(gi[j] + gh[j]);
  }
}

// ---- backward rows --------------------------------------------------------

// dh: gradient w.r.t. o * tanh(c); dc: in/out running cell gradient; dg: 4H pre-activation grads.
template <typename T>
RNNFAST_INLINE void lstm_bwd_impl(const T* g, const T* c, const T* c_prev, const T* dh, T* dc, T* dg, int64_t n,
                                  int64_t H) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T i = g[j], f = g[H + j], gg = g[2 * H + j], o = g[3 * H + j];
    const T tc = Act<T>::tanh(c[j]);
    const T dct = dc[j] + dh[j] * o * (T(1) - tc * tc);
    dg[j] = dct * gg * i * (T(1) - i);
    dg[H + j] = dct * c_prev[j] * f * (T(1) - f);
    dg[2 * H + j] = dct * i * (T(1) - gg * gg);
    dg[3 * H + j] = dh[j] * tc * o * (T(1) - o);
    dc[j] = dct * f;
  }
}

// dh: in, total gradient w.r.t. h_t; out, its direct part z * dh (the GEMM adds the rest).
template <typename T>
RNNFAST_INLINE void gru_bwd_impl(const T* ws, const T* h_prev, T* dh, T* dgi, T* dgh, int64_t n, int64_t H) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    const T r = ws[j], z = ws[H + j], n = ws[2 * H + j], ghn = ws[3 * H + j];
    const T d = dh[j];
    const T dan = d * (T(1) - z) * (T(1) - n * n);
    const T dar = dan * ghn * r * (T(1) - r);
    const T daz = d * (h_prev[j] - n) * z * (T(1) - z);
    dgi[j] = dar;
    dgi[H + j] = daz;
    dgi[2 * H + j] = dan;
    dgh[j] = dar;
    dgh[H + j] = daz;
    dgh[2 * H + j] = dan * r;
    dh[j] = d * z;
  }
}

template <typename T>
RNNFAST_INLINE void rnn_bwd_impl(const T* h, const T* dh, T* dg, bool relu, int64_t n) {
  if (relu) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dg[j] = h[j] > T(0) ? dh[j] : T(0);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dg[j] = dh[j] * (T(1) - h[j] * h[j]);
  }
}


// Out-of-line entry points of this target's build, for float and double.
#define RNNFAST_ENTRIES(T)                                                                                        \
  void lstm_fwd(const T* gi, const T* gh, const T* c_prev, T* gates, T* c_out, T* h_out, int64_t n, int64_t H) { \
    lstm_fwd_impl(gi, gh, c_prev, gates, c_out, h_out, n, H);                                                     \
  }                                                                                                               \
  void gru_fwd(const T* gi, const T* gh, const T* h_prev, T* ws, T* h_out, int64_t n, int64_t H) {                \
    gru_fwd_impl(gi, gh, h_prev, ws, h_out, n, H);                                                                \
  }                                                                                                               \
  void rnn_fwd(const T* gi, const T* gh, T* h_out, bool relu, int64_t n) { rnn_fwd_impl(gi, gh, h_out, relu, n); } \
  void lstm_bwd(const T* g, const T* c, const T* c_prev, const T* dh, T* dc, T* dg, int64_t n, int64_t H) {       \
    lstm_bwd_impl(g, c, c_prev, dh, dc, dg, n, H);                                                                \
  }                                                                                                               \
  void gru_bwd(const T* ws, const T* h_prev, T* dh, T* dgi, T* dgh, int64_t n, int64_t H) {                       \
    gru_bwd_impl(ws, h_prev, dh, dgi, dgh, n, H);                                                                 \
  }                                                                                                               \
  void rnn_bwd(const T* h, const T* dh, T* dg, bool relu, int64_t n) { rnn_bwd_impl(h, dh, dg, relu, n); }
RNNFAST_ENTRIES(float)
RNNFAST_ENTRIES(double)
#undef RNNFAST_ENTRIES
