// Eager calls of rnnfast::layer_fwd (rnnfast._C.layer_fwd_eager): with save, the operator pair
// with its backward as a C++ autograd node, the same forward and backward as the Python
// registration in rnnfast/cpu.py, which torch.compile and torch.func use; without, the operator
// alone. Eager calls skip autograd.Function's Python machinery in both directions (about 50 us a
// call, as long as a small cell's whole step) and torch.ops' argument parsing. The operators are
// called through the dispatcher below autograd, so fake tensors, dispatch modes and the profiler
// see them as before. A backward asked for a graph (create_graph=True, a second derivative) takes
// its gradients from rnnfast.cpu._grads_with_graph, as the Python registration does.
#include <algorithm>

#include <torch/autograd.h>
#include <torch/python.h>

#include "checks.h"
#include "layer.h"

namespace rnnfast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<Tensor>;

// rnnfast.cpu._grads_with_graph, which rnnfast.cpu sets on import: a backward asked for a graph
// (create_graph=True) takes its gradients from there (reference's loop, differentiable). Never freed:
// the interpreter may be gone when statics are destroyed.
pybind11::object* grads_with_graph = nullptr;

// The operators, called through the dispatcher (below autograd: callers hold the guard).
const c10::TypedOperatorHandle<LayerFwdSignature>& layer_fwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("rnnfast::layer_fwd", "").typed<LayerFwdSignature>();
  return op;
}
const c10::TypedOperatorHandle<LayerBwdSignature>& layer_bwd_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("rnnfast::layer_bwd", "").typed<LayerBwdSignature>();
  return op;
}

bool requires_grad(const OptTensor& t) { return t.has_value() && t->defined() && t->requires_grad(); }

// What backward reads of a layer's output (its states) where the user gets it: a copy, so that the output handed
// back may change in place (`out += residual`, an in-place activation), as torch.nn's outputs may (its float32
// LSTM refuses, its float64 one allows). LSTM T100 B64 H256 training ran as fast with the copy as without
// (alternating processes). An output no user sees (a cell's step, a stack's lower layers) is read as it is: its
// copy took ~2.6 us of an RNNCell B128 H64 training step's ~35, and a lower layer's output in memory
// (bench/results/2026-12-07-cpu-amd-no-output-copy-ab.md).
Tensor saved_output(const Tensor& out) { return out.clone(); }

struct Layer : public torch::autograd::Function<Layer> {
  // out_seen: the caller hands the output on to the user (else backward reads it as it is, see saved_output)
  static variable_list forward(AutogradContext* ctx, int64_t mode, const Tensor& x, const OptTensor& batch_sizes,
                               const Tensor& h0, const OptTensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                               const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr, bool reverse,
                               bool out_seen) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, h_n, c_n, ws1, ws2] =
        layer_fwd_op().call(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, true);
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["reverse"] = reverse;
    ctx->saved_data["has_bias"] = b_ih.has_value() && b_ih->defined();
    // what backward is asked for, as Python's needs_input_grad says it (the C++ one counts present tensors only)
    ctx->saved_data["need_dx"] = x.requires_grad();
    ctx->saved_data["need_dh0"] = h0.requires_grad();
    ctx->saved_data["need_dw"] = w_ih.requires_grad() || w_hh.requires_grad() || requires_grad(b_ih) ||
                                 requires_grad(b_hh) || requires_grad(w_hr);
    ctx->save_for_backward({x, batch_sizes.value_or(Tensor()), h0, c0.value_or(Tensor()), w_ih, w_hh,
                            w_hr.value_or(Tensor()), out_seen ? saved_output(out) : out, ws1, ws2,
                            b_ih.value_or(Tensor()), b_hh.value_or(Tensor())});
    // no zeros the size of the saved gates for their (never used) gradients
    ctx->set_materialize_grads(false);
    return {out, h_n, c_n, ws1, ws2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &bs = saved[1], &h0 = saved[2], &c0 = saved[3], &w_ih = saved[4], &w_hh = saved[5],
                 &w_hr = saved[6], &out = saved[7];
    const int64_t mode = ctx->saved_data["mode"].toInt();
    const bool reverse = ctx->saved_data["reverse"].toBool(), has_bias = ctx->saved_data["has_bias"].toBool();
    const bool lstm = mode == LSTM;
    if (at::GradMode::is_enabled()) return with_graph(mode, reverse, saved, grads);
    auto given = [](const Tensor& g, const Tensor& like) { return g.defined() ? g : at::zeros_like(like); };
    at::AutoDispatchBelowADInplaceOrView below;
    auto opt = [](const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
    const Tensor g_cn = lstm ? given(grads[2], c0) : at::empty({0}, x.options());
    auto [dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr] =
        layer_bwd_op().call(mode, x, opt(bs), h0, opt(c0), w_ih, w_hh, opt(w_hr), has_bias, reverse, out, saved[8],
                            saved[9], given(grads[0], out), given(grads[1], h0), g_cn, ctx->saved_data["need_dx"].toBool(),
                            ctx->saved_data["need_dh0"].toBool(), ctx->saved_data["need_dw"].toBool());
    const Tensor none;
    // one gradient per argument of forward: mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
    // out_seen
    return {none,  dx,    none, dh0, lstm ? dc0 : none, dw_ih, dw_hh, has_bias ? db_ih : none,
            has_bias ? db_hh : none, w_hr.defined() ? dw_hr : none, none, none};
  }

  // The gradients as a graph, from grads_with_graph: one per argument of forward, as backward's.
  static variable_list with_graph(int64_t mode, bool reverse, const variable_list& saved, const variable_list& grads) {
    namespace py = pybind11;
    TORCH_CHECK(grads_with_graph != nullptr, "rnnfast: import rnnfast.cpu before asking layer_fwd_eager for a graph");
    py::gil_scoped_acquire gil;
    auto arg = [](const Tensor& t) -> py::object { return t.defined() ? py::cast(t) : py::none(); };
    // saved: x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, ws1, ws2, b_ih, b_hh
    const py::tuple got = (*grads_with_graph)(mode, reverse, arg(saved[0]), arg(saved[1]), arg(saved[2]), arg(saved[3]),
                                              arg(saved[4]), arg(saved[5]), arg(saved[10]), arg(saved[11]),
                                              arg(saved[6]), arg(grads[0]), arg(grads[1]), arg(grads[2]));
    auto grad = [&](size_t k) { return got[k].is_none() ? Tensor() : got[k].cast<Tensor>(); };
    const Tensor none;
    // forward's arguments: mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, out_seen
    return {none, grad(0), none, grad(1), grad(2), grad(3), grad(4), grad(5), grad(6), grad(7), none, none};
  }
};

}  // namespace

void set_grads_with_graph(pybind11::object fn) {
  pybind11::object* old = grads_with_graph;
  grads_with_graph = new pybind11::object(std::move(fn));
  delete old;
}

// rnnfast::quant_rnn (the int8 modules' operator) under autograd: a call whose input or state autograd tracks
// (an embedding's output without torch.no_grad()) runs, as torch's int8 layers do, its outputs tied to them by a
// node whose backward raises: no gradient flows through int8 weights, so training through them fails clearly,
// never silently without gradients. Other calls pass straight on (no node, no Python).
namespace {
using QuantRnnSignature = std::tuple<Tensor, Tensor, Tensor>(int64_t, const Tensor&, const OptTensor&, const Tensor&,
                                                             const OptTensor&, at::TensorList, int64_t, bool, int64_t);
const c10::TypedOperatorHandle<QuantRnnSignature>& quant_rnn_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("rnnfast::quant_rnn", "").typed<QuantRnnSignature>();
  return op;
}

const c10::TypedOperatorHandle<Tensor(const Tensor&, const Tensor&)>& int8_no_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("rnnfast::int8_no_backward", "")
                             .typed<Tensor(const Tensor&, const Tensor&)>();
  return op;
}

// The node's gradients come from rnnfast::int8_no_backward, which raises when it runs: at once in eager
// backward, and in a backward compiled by torch.compile (which traces it at compile time) when that runs
// (it reads an incoming gradient, so that the compiled forward cannot take it).
struct QuantNoBackward : public torch::autograd::Function<QuantNoBackward> {
  static variable_list forward(AutogradContext* ctx, int64_t mode, const Tensor& x, const OptTensor& batch_sizes,
                               const Tensor& h0, const OptTensor& c0, at::TensorList params, int64_t num_layers,
                               bool bidirectional, int64_t isa) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, h_n, c_n] = quant_rnn_op().call(mode, x, batch_sizes, h0, c0, params, num_layers, bidirectional, isa);
    ctx->save_for_backward({x, h0, c0.value_or(Tensor())});
    ctx->saved_data["params"] = static_cast<int64_t>(params.size());
    ctx->set_materialize_grads(false);  // an unused output's zeros would let the compiled forward take the op
    return {out, h_n, c_n};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads_out) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor given = *std::find_if(grads_out.begin(), grads_out.end(), [](const Tensor& g) { return g.defined(); });
    auto refused = [&](const Tensor& t) {
      return t.defined() && t.requires_grad() ? int8_no_backward_op().call(given, t) : Tensor();
    };
    // one gradient per forward argument, the params list's counted tensor by tensor: mode, x, batch_sizes,
    // h0, c0, params..., num_layers, bidirectional, isa
    variable_list grads{Tensor(), refused(saved[0]), Tensor(), refused(saved[1]), refused(saved[2])};
    grads.resize(grads.size() + ctx->saved_data["params"].toInt() + 3);
    return grads;
  }
};

std::tuple<Tensor, Tensor, Tensor> quant_rnn_autograd(int64_t mode, const Tensor& x, const OptTensor& batch_sizes,
                                                      const Tensor& h0, const OptTensor& c0, at::TensorList params,
                                                      int64_t num_layers, bool bidirectional, int64_t isa) {
  if (at::GradMode::is_enabled() && (x.requires_grad() || h0.requires_grad() || requires_grad(c0))) {
    const variable_list r =
        QuantNoBackward::apply(mode, x, batch_sizes, h0, c0, params, num_layers, bidirectional, isa);
    return {r[0], r[1], r[2]};
  }
  at::AutoDispatchBelowADInplaceOrView below;
  return quant_rnn_op().call(mode, x, batch_sizes, h0, c0, params, num_layers, bidirectional, isa);
}
}  // namespace

TORCH_LIBRARY_IMPL(rnnfast, Autograd, m) { m.impl("quant_rnn", &quant_rnn_autograd); }

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layer_fwd_eager(int64_t mode, const Tensor& x,
                                                                   const OptTensor& batch_sizes, const Tensor& h0,
                                                                   const OptTensor& c0, const Tensor& w_ih,
                                                                   const Tensor& w_hh, const OptTensor& b_ih,
                                                                   const OptTensor& b_hh, const OptTensor& w_hr,
                                                                   bool reverse, bool save, bool out_seen) {
  if (!save) {
    at::AutoDispatchBelowADInplaceOrView below;
    return layer_fwd_op().call(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, false);
  }
  const variable_list r = Layer::apply(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, out_seen);
  return {r[0], r[1], r[2], r[3], r[4]};
}

// The stack of an eager call on unpadded input, as rnnfast.backend.run_stack runs it (and does for
// every other path: torch.compile, torch.func, packed training, the other backends): each layer and
// direction through layer_fwd_eager (with save where grad mode is on and one of its tensors needs a
// gradient), the directions concatenated, dropout > 0 between layers (training). Here a short call
// skips run_stack's Python per layer (GRU T1 B4 H16: 16.5 -> 9 us of a 27 us call).
std::tuple<Tensor, Tensor, Tensor> stack_eager(int64_t mode, const Tensor& x, const Tensor& h0, const OptTensor& c0,
                                               const std::vector<Tensor>& weights, int64_t num_layers,
                                               bool bidirectional, bool has_bias, double dropout) {
  const char* op = "rnnfast._C.stack_eager";
  TORCH_CHECK(mode >= LSTM && mode <= RNN_RELU, op, ": unknown mode ", mode, " (0 LSTM, 1 GRU, 2 RNN_TANH, 3 RNN_RELU)");
  TORCH_CHECK(num_layers >= 1, op, ": num_layers must be at least 1, got ", num_layers);
  TORCH_CHECK(dropout >= 0 && dropout <= 1, op, ": dropout must be in [0, 1], got ", dropout);
  const int64_t D = bidirectional ? 2 : 1;
  const bool lstm = mode == LSTM;
  TORCH_CHECK(x.defined() && x.dim() == 3, op, ": input must be 3-D (T, B, input_size)");
  // num_layers x directions states (compared by division: a direct call's num_layers may be any int64)
  TORCH_CHECK(h0.defined() && h0.dim() == 3 && h0.size(0) % D == 0 && h0.size(0) / D == num_layers, op,
              ": h0 must be 3-D with num_layers x directions = ", num_layers, " x ", D, " states, got shape ",
              h0.defined() ? h0.sizes() : at::IntArrayRef());
  const int64_t n = num_layers * D;
  TORCH_CHECK(!lstm || (present(c0) && c0->dim() == 3 && c0->size(0) == n), op, ": LSTM needs a 3-D c0 with ", n,
              " (num_layers x directions) states");
  TORCH_CHECK(lstm || !present(c0), op, ": c0 is for LSTM only");
  // LSTM with proj_size: h0 (.., proj_size) beside c0 (.., hidden_size), W_hr after each layer's weights
  const bool proj = lstm && c0->size(2) != h0.size(2);
  const int64_t per = weights_per_layer(has_bias, proj);
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == per * n, op, ": expected ", per * n, " weights (", per,
              " per layer and direction), got ", weights.size());
  const auto needs_grad = [](const Tensor& t) { return t.defined() && t.requires_grad(); };
  const auto opt = [](const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
  const bool grad_mode = at::GradMode::is_enabled();
  std::vector<Tensor> hs, cs;
  Tensor layer_in = x;
  for (int64_t i = 0; i < num_layers; ++i) {
    if (layer_in.scalar_type() != x.scalar_type()) layer_in = layer_in.to(x.scalar_type());  // autocast's float32 out
    std::vector<Tensor> outs;
    for (int64_t d = 0; d < D; ++d) {
      const int64_t k = i * D + d;
      const Tensor* w = weights.data() + k * per;
      const Tensor h = h0.select(0, k), c = lstm ? c0->select(0, k) : Tensor();
      const bool save = grad_mode && (needs_grad(layer_in) || needs_grad(h) || needs_grad(c) ||
                                       std::any_of(w, w + per, needs_grad));
      auto [out, h_n, c_n, ws1, ws2] =
          layer_fwd_eager(mode, layer_in, c10::nullopt, h, opt(c), w[0], w[1], has_bias ? opt(w[2]) : OptTensor(),
                          has_bias ? opt(w[3]) : OptTensor(), proj ? opt(w[per - 1]) : OptTensor(), d == 1, save,
                          D == 1 && i == num_layers - 1);  // (what else comes out only feeds cat or the next layer)
      outs.push_back(std::move(out));
      hs.push_back(std::move(h_n));
      if (lstm) cs.push_back(std::move(c_n));
    }
    layer_in = D == 1 ? outs[0] : at::cat(outs, -1);
    if (dropout > 0 && i < num_layers - 1) layer_in = at::dropout(layer_in, dropout, true);
  }
  return {layer_in, at::stack(hs), lstm ? at::stack(cs) : Tensor()};
}

}  // namespace rnnfast
