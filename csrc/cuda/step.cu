// The fused gate kernels of the layer time loop: one launch per step in forward
// (after the step's recurrent GEMM) and one in backward (before it), a thread per
// (row, hidden unit). Math in Acc<T>, the same formulas as rnnfast/reference.py.
#include "common.cuh"

namespace rnnfast::cuda {
namespace {

template <typename T, int MODE>
__global__ void step_fwd_kernel(StepFwdArgs a) {
  constexpr int G = gate_count(MODE);
  using A = Acc<T>;
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= a.n * a.H) return;
  const int64_t H = a.H, b = idx / H, j = idx - b * H;
  const T* gi = static_cast<const T*>(a.gi) + b * G * H + j;
  const T* gh = static_cast<const T*>(a.gh) + b * G * H + j;
  const int64_t hj = b * H + j;
  A h;
  if constexpr (MODE == LSTM) {
    const A i = sigmoid(load(gi) + load(gh));
    const A f = sigmoid(load(gi + H) + load(gh + H));
    const A g = tanh_(load(gi + 2 * H) + load(gh + 2 * H));
    const A o = sigmoid(load(gi + 3 * H) + load(gh + 3 * H));
    A* c = static_cast<A*>(a.c) + hj;
    const A c_new = f * *c + i * g;
    *c = c_new;
    h = o * tanh_(c_new);
    if (a.ws != nullptr) {
      T* ws = static_cast<T*>(a.ws) + b * 4 * H + j;
      store(ws, i);
      store(ws + H, f);
      store(ws + 2 * H, g);
      store(ws + 3 * H, o);
      store(static_cast<T*>(a.cs) + hj, c_new);
    }
  } else if constexpr (MODE == GRU) {
    const T* bh = static_cast<const T*>(a.b_hh);
    const A b_r = bh ? load(bh + j) : A(0), b_z = bh ? load(bh + H + j) : A(0), b_n = bh ? load(bh + 2 * H + j) : A(0);
    const A r = sigmoid(load(gi) + load(gh) + b_r);
    const A z = sigmoid(load(gi + H) + load(gh + H) + b_z);
    const A ghn = load(gh + 2 * H) + b_n;
    const A n = tanh_(load(gi + 2 * H) + r * ghn);
    const A h_prev = load(static_cast<const T*>(a.h_state) + hj);
    h = (A(1) - z) * n + z * h_prev;
    if (a.ws != nullptr) {
      T* ws = static_cast<T*>(a.ws) + b * 4 * H + j;
      store(ws, r);
      store(ws + H, z);
      store(ws + 2 * H, n);
      store(ws + 3 * H, ghn);
    }
  } else {
    const A pre = load(gi) + load(gh);
    h = MODE == RNN_TANH ? tanh_(pre) : (pre > A(0) ? pre : A(0));
  }
  store(static_cast<T*>(a.h_out) + hj, h);
  if (a.h_state != nullptr) store(static_cast<T*>(a.h_state) + hj, h);
}

template <typename T, int MODE>
__global__ void step_bwd_kernel(StepBwdArgs a) {
  using A = Acc<T>;
  constexpr int G = gate_count(MODE);
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= a.n * a.H) return;
  const int64_t H = a.H, b = idx / H, j = idx - b * H, hj = b * H + j;
  A* dh_p = static_cast<A*>(a.dh) + hj;
  const A dh = *dh_p + (a.g_out ? load(static_cast<const T*>(a.g_out) + hj) : A(0));
  T* dgi = static_cast<T*>(a.dgi) + b * G * H + j;
  if constexpr (MODE == LSTM) {
    const T* ws = static_cast<const T*>(a.ws) + b * 4 * H + j;
    const A i = load(ws), f = load(ws + H), g = load(ws + 2 * H), o = load(ws + 3 * H);
    const A c = load(static_cast<const T*>(a.cs) + hj), c_prev = load(static_cast<const T*>(a.c_prev) + hj);
    const A tc = tanh_(c);
    A* dc_p = static_cast<A*>(a.dc) + hj;
    const A dc = *dc_p + dh * o * (A(1) - tc * tc);
    store(dgi, dc * g * i * (A(1) - i));
    store(dgi + H, dc * c_prev * f * (A(1) - f));
    store(dgi + 2 * H, dc * i * (A(1) - g * g));
    store(dgi + 3 * H, dh * tc * o * (A(1) - o));
    *dc_p = dc * f;
    *dh_p = A(0);
  } else if constexpr (MODE == GRU) {
    const T* ws = static_cast<const T*>(a.ws) + b * 4 * H + j;
    const A r = load(ws), z = load(ws + H), n = load(ws + 2 * H), ghn = load(ws + 3 * H);
    const A h_prev = load(static_cast<const T*>(a.h_prev) + hj);
    const A dn = dh * (A(1) - z) * (A(1) - n * n);
    const A dz = dh * (h_prev - n) * z * (A(1) - z);
    const A dr = dn * ghn * r * (A(1) - r);
    T* dgh = static_cast<T*>(a.dgh) + b * G * H + j;
    store(dgi, dr);
    store(dgi + H, dz);
    store(dgi + 2 * H, dn);
    store(dgh, dr);
    store(dgh + H, dz);
    store(dgh + 2 * H, dn * r);
    *dh_p = dh * z;
  } else {
    const A h = load(static_cast<const T*>(a.h_t) + hj);
    store(dgi, MODE == RNN_TANH ? dh * (A(1) - h * h) : (h > A(0) ? dh : A(0)));
    *dh_p = A(0);
  }
}

struct LaunchFwd {
  const StepFwdArgs& a;
  Stream stream;
  template <typename T, int MODE>
  void operator()() const {
    step_fwd_kernel<T, MODE><<<blocks_for(a.n * a.H), kThreads, 0, stream>>>(a);
  }
};

struct LaunchBwd {
  const StepBwdArgs& a;
  Stream stream;
  template <typename T, int MODE>
  void operator()() const {
    step_bwd_kernel<T, MODE><<<blocks_for(a.n * a.H), kThreads, 0, stream>>>(a);
  }
};

}  // namespace

void step_fwd(int mode, DType dtype, const StepFwdArgs& a, Stream stream) {
  if (a.n * a.H > 0) dispatch(mode, dtype, LaunchFwd{a, stream});
}

void step_bwd(int mode, DType dtype, const StepBwdArgs& a, Stream stream) {
  if (a.n * a.H > 0) dispatch(mode, dtype, LaunchBwd{a, stream});
}

}  // namespace rnnfast::cuda
