// Pointwise gate kernels over rows, on the activations and cells of activations.h. Included three
// times by kernels.cpp, inside a baseline, an AVX2+FMA and an AVX-512 target region, so that every
// helper inlines into the loops and those loops vectorise for each target.
// No include guard, on purpose.

// ---- forward rows ---------------------------------------------------------

// gi, gh: 4H input and recurrent pre-activations; gates: the activated (i, f, g, o) out
// (may be gi itself); c_out may be c_prev.
template <typename T>
RNNFAST_INLINE void lstm_fwd_impl(const T* gi, const T* gh, const T* c_prev, T* gates, T* c_out, T* h_out, int64_t n,
                                  int64_t H) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    T i = gi[j] + gh[j], f = gi[H + j] + gh[H + j], gg = gi[2 * H + j] + gh[2 * H + j];
    T o = gi[3 * H + j] + gh[3 * H + j], c, h;
    lstm_cell(i, f, gg, o, c_prev[j], c, h);
    gates[j] = i;
    gates[H + j] = f;
    gates[2 * H + j] = gg;
    gates[3 * H + j] = o;
    c_out[j] = c;
    h_out[j] = h;
  }
}

// gi, gh: 3H pre-activations (biases included); ws: r, z, n, gh_n saved for backward.
template <typename T>
RNNFAST_INLINE void gru_fwd_impl(const T* gi, const T* gh, const T* h_prev, T* ws, T* h_out, int64_t n, int64_t H) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    T r = gi[j] + gh[j], z = gi[H + j] + gh[H + j], n;
    const T ghn = gh[2 * H + j];
    h_out[j] = gru_cell(r, z, gi[2 * H + j], ghn, h_prev[j], n);
    ws[j] = r;
    ws[H + j] = z;
    ws[2 * H + j] = n;
    ws[3 * H + j] = ghn;
  }
}

template <typename T>
RNNFAST_INLINE void rnn_fwd_impl(const T* gi, const T* gh, T* h_out, bool relu, int64_t n) {
  if (relu) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) h_out[j] = elman_cell(gi[j] + gh[j], true);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) h_out[j] = elman_cell(gi[j] + gh[j], false);
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
    for (int64_t j = 0; j < n; ++j) dg[j] = h[j] <= T(0) ? T(0) : dh[j];  // NaN h passes dh, as torch's
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) dg[j] = dh[j] * (T(1) - h[j] * h[j]);
  }
}

// ---- rows of sums ----------------------------------------------------------

// A bfloat16's bits as float32, exactly (they are a float32's top half); a float as it is.
RNNFAST_INLINE float widen(float v) { return v; }
RNNFAST_INLINE float widen(uint16_t bits) { return __builtin_bit_cast(float, uint32_t(bits) << 16); }

// dst[j] += src[j] for j < n (the backward's running sums: dh, the bias gradients).
template <typename S>
RNNFAST_INLINE void add_row_impl(float* dst, const S* src, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] += widen(src[j]);
}

template <typename S>
RNNFAST_INLINE void widen_row_impl(float* dst, const S* src, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = widen(src[j]);
}

void add_row(float* dst, const float* src, int64_t n) { add_row_impl(dst, src, n); }
void add_row(float* dst, const at::BFloat16* src, int64_t n) {
  add_row_impl(dst, reinterpret_cast<const uint16_t*>(src), n);
}
void widen_row(float* dst, const at::BFloat16* src, int64_t n) {
  widen_row_impl(dst, reinterpret_cast<const uint16_t*>(src), n);
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
