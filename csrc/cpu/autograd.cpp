// Eager calls of rnnfast::layer_fwd (rnnfast._C.layer_fwd_eager): with save, the operator pair
// with its backward as a C++ autograd node, the same forward and backward as the Python
// registration in rnnfast/cpu.py, which torch.compile and torch.func use; without, the operator
// alone. Eager calls skip autograd.Function's Python machinery in both directions (about 50 us a
// call, as long as a small cell's whole step) and torch.ops' argument parsing. The operators are
// called through the dispatcher below autograd, so fake tensors, dispatch modes and the profiler
// see them as before.
#include <torch/autograd.h>

#include "layer.h"

namespace rnnfast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<Tensor>;

// The identity on a fused backward's gradients, tied to the tensors they came from, for
// create_graph=True: a second derivative raises the error of rnnfast.backend.first_order.
struct FirstOrder : public torch::autograd::Function<FirstOrder> {
  static variable_list forward(AutogradContext*, at::TensorList grads, at::TensorList) {
    variable_list views;
    for (const Tensor& g : grads) views.push_back(g.view_as(g));
    return views;
  }
  static variable_list backward(AutogradContext*, const variable_list&) {
    TORCH_CHECK_NOT_IMPLEMENTED(false, "rnnfast cpu backend: double backward (create_graph=True) is not supported; "
                                       "use backend='reference'");
  }
};

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

struct Layer : public torch::autograd::Function<Layer> {
  static variable_list forward(AutogradContext* ctx, int64_t mode, const Tensor& x, const OptTensor& batch_sizes,
                               const Tensor& h0, const OptTensor& c0, const Tensor& w_ih, const Tensor& w_hh,
                               const OptTensor& b_ih, const OptTensor& b_hh, const OptTensor& w_hr, bool reverse) {
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
                            w_hr.value_or(Tensor()), out, ws1, ws2});
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
    auto given = [](const Tensor& g, const Tensor& like) { return g.defined() ? g : at::zeros_like(like); };
    variable_list result;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      auto opt = [](const Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); };
      const Tensor g_cn = lstm ? given(grads[2], c0) : at::empty({0}, x.options());
      auto [dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, dw_hr] =
          layer_bwd_op().call(mode, x, opt(bs), h0, opt(c0), w_ih, w_hh, opt(w_hr), has_bias, reverse, out, saved[8],
                              saved[9], given(grads[0], out), given(grads[1], h0), g_cn, ctx->saved_data["need_dx"].toBool(),
                              ctx->saved_data["need_dh0"].toBool(), ctx->saved_data["need_dw"].toBool());
      const Tensor none;
      // one gradient per argument of forward: mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse
      result = {none,  dx,    none, dh0, lstm ? dc0 : none, dw_ih, dw_hh, has_bias ? db_ih : none,
                has_bias ? db_hh : none, w_hr.defined() ? dw_hr : none, none};
    }
    if (!at::GradMode::is_enabled()) return result;
    variable_list present, anchors;
    for (const Tensor& g : result) {
      if (g.defined()) present.push_back(g);
    }
    for (const Tensor& t : saved) {
      if (t.defined() && t.requires_grad()) anchors.push_back(t);
    }
    if (present.empty() || anchors.empty()) return result;
    const variable_list tied = FirstOrder::apply(at::TensorList(present), at::TensorList(anchors));
    for (size_t k = 0, j = 0; k < result.size(); ++k) {
      if (result[k].defined()) result[k] = tied[j++];
    }
    return result;
  }
};

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> layer_fwd_eager(int64_t mode, const Tensor& x,
                                                                   const OptTensor& batch_sizes, const Tensor& h0,
                                                                   const OptTensor& c0, const Tensor& w_ih,
                                                                   const Tensor& w_hh, const OptTensor& b_ih,
                                                                   const OptTensor& b_hh, const OptTensor& w_hr,
                                                                   bool reverse, bool save) {
  if (!save) {
    at::AutoDispatchBelowADInplaceOrView below;
    return layer_fwd_op().call(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, false);
  }
  const variable_list r = Layer::apply(mode, x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse);
  return {r[0], r[1], r[2], r[3], r[4]};
}

}  // namespace rnnfast
