// Argument checks at the entry of every CPU operator, and the poisoned-memory debug switch.
//
// The operators are public (torch.ops.rnnfast.*, rnnfast._C.decode): a call with a wrong shape,
// dtype, device or layout must raise a RuntimeError that names the argument, never read out
// of bounds. Each entry point calls its check_* function first, before any work.
//
// RNNFAST_POISON=1 (read once, at load; the test suite sets it) fills every fresh CPU
// allocation with 0xFF bytes (NaN in every float type, -1 in integers), so an output a
// kernel leaves partly unwritten fails the parity tests instead of passing on zeroed pages.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace rnnfast {

// An optional tensor argument given and defined (Python None is neither).
inline bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }
// It contiguous, or an undefined tensor where it is absent.
inline at::Tensor given(const c10::optional<at::Tensor>& t) { return present(t) ? t->contiguous() : at::Tensor(); }

// bfloat16 and float16: the dtypes the loops may take widened to float32, so that float32 tensors (autocast's
// weights and states, the saved values) may come beside an input in them.
inline bool widened_dtype(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

void check_layer_fwd(int64_t mode, const at::Tensor& x, const c10::optional<at::Tensor>& batch_sizes,
                     const at::Tensor& h0, const c10::optional<at::Tensor>& c0, const at::Tensor& w_ih,
                     const at::Tensor& w_hh, const c10::optional<at::Tensor>& b_ih,
                     const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& w_hr);

// Also checks what layer_fwd saved (out, ws1, ws2) against the shapes it saves them in.
void check_layer_bwd(int64_t mode, const at::Tensor& x, const c10::optional<at::Tensor>& batch_sizes,
                     const at::Tensor& h0, const c10::optional<at::Tensor>& c0, const at::Tensor& w_ih,
                     const at::Tensor& w_hh, const c10::optional<at::Tensor>& w_hr, bool has_bias,
                     const at::Tensor& out, const at::Tensor& ws1, const at::Tensor& ws2, const at::Tensor& grad_out,
                     const at::Tensor& grad_hn, const at::Tensor& grad_cn);

void check_decode(int64_t mode, const std::vector<at::Tensor>& weights, int64_t num_layers, bool has_bias,
                  const at::Tensor& x, const at::Tensor& h0, const c10::optional<at::Tensor>& c0);

// Tensors a layer (and direction) has in torch's flat weight list: w_ih, w_hh, [b_ih, b_hh], [w_hr].
inline int64_t weights_per_layer(bool has_bias, bool proj) { return (has_bias ? 4 : 2) + (proj ? 1 : 0); }
// Active rows per step (the CPU and CUDA time loops): batch_sizes for packed input, checked
// non-increasing and at most B, else B at every step.
inline std::vector<int64_t> step_sizes(const c10::optional<at::Tensor>& batch_sizes, int64_t T, int64_t B) {
  std::vector<int64_t> bs(T, B);
  if (!batch_sizes.has_value() || !batch_sizes->defined()) return bs;
  const at::Tensor b = batch_sizes->to(at::kCPU, at::kLong).contiguous();
  TORCH_CHECK(b.dim() == 1 && b.size(0) == T, "rnnfast: batch_sizes must have one entry per time step (", T,
              "), got shape ", b.sizes());
  const int64_t* p = b.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(p[t] >= 0 && p[t] <= B && (t == 0 || p[t] <= p[t - 1]),
                "rnnfast: batch_sizes must be non-increasing and at most the batch size");
    bs[t] = p[t];
  }
  return bs;
}

// Whether RNNFAST_POISON=1 was set when the extension loaded.
bool poison_enabled();

// Memory that does not come from a fresh allocation (a recycled buffer), poisoned like a
// fresh one when the switch is on; returns t.
const at::Tensor& poison(const at::Tensor& t);

}  // namespace rnnfast
