// Argument checks of the CPU operators and the RNNFAST_POISON switch (see checks.h).
#include "checks.h"

#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "kernels.h"

namespace rnnfast {
namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

// The sizes every operator argument is checked against, from x, w_hh and w_hr.
struct Dims {
  const char* op;
  at::ScalarType dtype;
  int64_t T, B, I, G, H, P;
  at::ScalarType state = dtype;  // h0's, once checked
};

// t is a defined CPU tensor of the operator's dtype (or float32 beside a bfloat16 or float16 input:
// autocast's float32 weights and states, float32 saved values) with exactly the sizes given.
void expect(const Dims& d, const Tensor& t, const char* name, at::IntArrayRef sizes) {
  TORCH_CHECK(t.defined(), d.op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), d.op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  const bool widened = widened_dtype(d.dtype) && t.scalar_type() == at::kFloat;
  TORCH_CHECK(t.scalar_type() == d.dtype || widened, d.op, ": ", name, " has dtype ", t.scalar_type(),
              " but the input has dtype ", d.dtype);
  TORCH_CHECK(t.sizes() == sizes, d.op, ": ", name, " has shape ", t.sizes(), ", expected ", sizes);
}

// What layer_fwd writes for backward is read row by row from its data pointer.
void expect_contiguous(const Dims& d, const Tensor& t, const char* name, at::IntArrayRef sizes) {
  expect(d, t, name, sizes);
  TORCH_CHECK(t.is_contiguous(), d.op, ": ", name, " must be contiguous, as layer_fwd returns it");
}

// The states, the outputs and their gradients share h0's dtype: the input's, or float32 beside a
// bfloat16 input (autocast's float32 states: bfloat16 products, float32 updates and outputs).
void expect_state(const Dims& d, const Tensor& t, const char* name, at::IntArrayRef sizes) {
  expect(d, t, name, sizes);
  TORCH_CHECK(t.scalar_type() == d.state, d.op, ": ", name, " has dtype ", t.scalar_type(), " but h0 has dtype ",
              d.state);
}

void check_input_dtype(const char* op, const Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, op,
              ": input must be float32, float64, bfloat16 or float16, got ", t);
}

// Checks the arguments both layer operators share and returns the sizes they imply.
Dims check_layer(const char* op, int64_t mode, const Tensor& x, const OptTensor& batch_sizes, const Tensor& h0,
                 const OptTensor& c0, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& w_hr) {
  TORCH_CHECK(mode >= LSTM && mode <= RNN_RELU, op, ": unknown mode ", mode,
              " (0 LSTM, 1 GRU, 2 RNN_TANH, 3 RNN_RELU)");
  TORCH_CHECK(x.defined() && x.device().is_cpu(), op, ": input must be a CPU tensor");
  check_input_dtype(op, x);
  TORCH_CHECK(x.dim() == 3, op, ": input must be 3-D (T, B, input_size), got shape ", x.sizes());
  TORCH_CHECK(x.size(0) > 0, op, ": the input must have at least one time step, as torch.nn requires");
  TORCH_CHECK(x.size(2) > 0, op, ": input_size (input.size(2)) must be positive, as torch.nn requires");
  TORCH_CHECK(w_hh.defined() && w_hh.dim() == 2, op, ": weight_hh must be 2-D (gates * hidden_size, state size)");
  const int64_t G = gate_count(mode);
  TORCH_CHECK(w_hh.size(0) > 0 && w_hh.size(0) % G == 0, op, ": weight_hh has ", w_hh.size(0),
              " rows, expected a positive multiple of ", G, " (the gate count)");
  const int64_t H = w_hh.size(0) / G;
  TORCH_CHECK(!present(w_hr) || mode == LSTM, op, ": weight_hr (proj_size) is only supported for LSTM");
  TORCH_CHECK(!present(w_hr) || (w_hr->dim() == 2 && w_hr->size(0) > 0), op,
              ": weight_hr must be 2-D (proj_size, hidden_size) with proj_size > 0");
  const int64_t P = present(w_hr) ? w_hr->size(0) : H;
  Dims d{op, x.scalar_type(), x.size(0), x.size(1), x.size(2), G, H, P};
  expect(d, w_hh, "weight_hh", {G * H, P});
  expect(d, w_ih, "weight_ih", {G * H, d.I});
  if (present(w_hr)) expect(d, *w_hr, "weight_hr", {P, H});
  expect(d, h0, "h0", {d.B, P});
  d.state = h0.scalar_type();
  if (mode == LSTM) {
    TORCH_CHECK(present(c0), op, ": LSTM needs c0");
    expect_state(d, *c0, "c0", {d.B, H});
  }
  if (present(batch_sizes)) {
    const Tensor& b = *batch_sizes;
    TORCH_CHECK(b.device().is_cpu() && at::isIntegralType(b.scalar_type(), /*includeBool=*/false), op,
                ": batch_sizes must be an integer CPU tensor, got ", b.scalar_type(), " on ", b.device());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == d.T, op, ": batch_sizes must have one entry per time step (", d.T,
                "), got shape ", b.sizes());
  }
  return d;
}

}  // namespace

void check_layer_fwd(int64_t mode, const Tensor& x, const OptTensor& batch_sizes, const Tensor& h0,
                     const OptTensor& c0, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                     const OptTensor& b_hh, const OptTensor& w_hr) {
  const Dims d = check_layer("rnnfast::layer_fwd", mode, x, batch_sizes, h0, c0, w_ih, w_hh, w_hr);
  TORCH_CHECK(present(b_ih) == present(b_hh), d.op, ": bias_ih and bias_hh must both be given or both be None");
  if (present(b_ih)) {
    expect(d, *b_ih, "bias_ih", {d.G * d.H});
    expect(d, *b_hh, "bias_hh", {d.G * d.H});
  }
}

void check_layer_bwd(int64_t mode, const Tensor& x, const OptTensor& batch_sizes, const Tensor& h0,
                     const OptTensor& c0, const Tensor& w_ih, const Tensor& w_hh, const OptTensor& w_hr, bool has_bias,
                     const Tensor& out, const Tensor& ws1, const Tensor& ws2, const Tensor& grad_out,
                     const Tensor& grad_hn, const Tensor& grad_cn) {
  const Dims d = check_layer("rnnfast::layer_bwd", mode, x, batch_sizes, h0, c0, w_ih, w_hh, w_hr);
  expect_contiguous(d, out, "out", {d.T, d.B, d.P});
  expect_state(d, out, "out", {d.T, d.B, d.P});
  if (mode == LSTM || mode == GRU) {  // LSTM: activated gates and cell states; GRU: r, z, n and W_hn h + b_hn
    TORCH_CHECK(ws1.dim() == 3, d.op, ": ws1 must be what layer_fwd saves with save=True, got shape ", ws1.sizes());
    expect_contiguous(d, ws1, "ws1", {d.T, d.B, 4 * d.H});
  }
  if (mode == LSTM) expect_contiguous(d, ws2, "ws2", {present(w_hr) ? 2 : 1, d.T, d.B, d.H});
  expect_state(d, grad_out, "grad_out", {d.T, d.B, d.P});
  expect_state(d, grad_hn, "grad_hn", {d.B, d.P});
  if (mode == LSTM) expect_state(d, grad_cn, "grad_cn", {d.B, d.H});
}

void check_decode(int64_t mode, const std::vector<Tensor>& weights, int64_t num_layers, bool has_bias,
                  const Tensor& x, const Tensor& h0, const OptTensor& c0) {
  const char* op = "rnnfast._C.decode";
  TORCH_CHECK(mode >= LSTM && mode <= RNN_RELU, op, ": unknown mode ", mode,
              " (0 LSTM, 1 GRU, 2 RNN_TANH, 3 RNN_RELU)");
  TORCH_CHECK(num_layers >= 1, op, ": num_layers must be at least 1, got ", num_layers);
  TORCH_CHECK(x.defined() && x.device().is_cpu(), op, ": input must be a CPU tensor");
  check_input_dtype(op, x);
  TORCH_CHECK(x.dim() == 3, op, ": input must be 3-D (T, B, input_size), got shape ", x.sizes());
  TORCH_CHECK(x.size(2) > 0, op, ": input_size (input.size(2)) must be positive, as torch.nn requires");
  TORCH_CHECK(h0.defined() && h0.dim() == 3, op, ": h0 must be 3-D (num_layers, B, hidden_size)");
  // LSTM with proj_size: h0 (num_layers, B, proj_size) beside c0 (num_layers, B, hidden_size), as ATen's lstm
  // tells them apart; W_hr follows each layer's weights
  const int64_t G = gate_count(mode), P = h0.size(2);
  const int64_t H = mode == LSTM && present(c0) && c0->dim() == 3 ? c0->size(2) : P;
  TORCH_CHECK(P > 0, op, ": hidden_size (h0.size(2)) must be positive");
  TORCH_CHECK(P <= H, op, ": proj_size (h0.size(2) = ", P, ") must be smaller than hidden_size (c0.size(2) = ", H,
              ")");
  const bool proj = P != H;
  const int64_t per = weights_per_layer(has_bias, proj);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == per * num_layers, op, ": expected ", per * num_layers,
              " weights (", per, " per layer", proj ? ", with weight_hr: h0 and c0 differ in size(2)" : "", "), got ",
              weights.size());
  Dims d{op, x.scalar_type(), x.size(0), x.size(1), x.size(2), G, H, P};
  expect(d, h0, "h0", {num_layers, d.B, P});
  d.state = h0.scalar_type();
  if (mode == LSTM) {
    TORCH_CHECK(present(c0), op, ": LSTM needs c0");
    expect_state(d, *c0, "c0", {num_layers, d.B, H});
  }
  for (int64_t l = 0; l < num_layers; ++l) {
    const std::string n = std::to_string(l);
    expect(d, weights[l * per], ("weight_ih_l" + n).c_str(), {G * H, l == 0 ? d.I : P});
    expect(d, weights[l * per + 1], ("weight_hh_l" + n).c_str(), {G * H, P});
    if (has_bias) {
      expect(d, weights[l * per + 2], ("bias_ih_l" + n).c_str(), {G * H});
      expect(d, weights[l * per + 3], ("bias_hh_l" + n).c_str(), {G * H});
    }
    if (proj) expect(d, weights[l * per + per - 1], ("weight_hr_l" + n).c_str(), {P, H});
  }
}

namespace {

bool read_poison_switch() {
  const char* v = std::getenv("RNNFAST_POISON");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

// Wraps the CPU allocator: the same memory and deleter, filled with 0xFF bytes first.
class PoisonAllocator final : public c10::Allocator {
 public:
  explicit PoisonAllocator(c10::Allocator* base) : base_(base) {}
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr p = base_->allocate(n);
    if (n > 0) std::memset(p.get(), 0xFF, n);
    return p;
  }
  c10::DeleterFnPtr raw_deleter() const override { return base_->raw_deleter(); }
  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

 private:
  c10::Allocator* base_;
};

// Installed once, at load, while nothing else runs: SetCPUAllocator is not thread-safe.
const bool kPoison = [] {
  if (!read_poison_switch()) return false;
  static PoisonAllocator poisoner(c10::GetCPUAllocator());
  c10::SetCPUAllocator(&poisoner, std::numeric_limits<uint8_t>::max());
  return true;
}();

}  // namespace

bool poison_enabled() { return kPoison; }

const Tensor& poison(const Tensor& t) {
  if (kPoison && t.numel() > 0) {
    t.is_floating_point() ? t.fill_(std::numeric_limits<double>::quiet_NaN()) : t.fill_(-1);
  }
  return t;
}

}  // namespace rnnfast
