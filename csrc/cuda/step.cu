// The fused gate kernels of the layer time loop: one launch per step in forward
// (after the step's recurrent GEMM) and one in backward (before it), a thread per
// (row, hidden unit) running the element functions of cell.cuh.
#include "cell.cuh"

namespace rnnfast::cuda {
namespace {

template <typename T, int MODE>
__global__ void step_fwd_kernel(StepFwdArgs a) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < a.n * a.H) step_fwd_elem<T, MODE>(a, idx);
}

template <typename T, int MODE>
__global__ void step_bwd_kernel(StepBwdArgs a) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < a.n * a.H) step_bwd_elem<T, MODE>(a, idx);
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
