// The operators rnnfast::layer_fwd / layer_bwd (layer.cpp) as C++ signatures, and their eager
// autograd entry (autograd.cpp).
#pragma once

#include <ATen/ATen.h>
#include <pybind11/pybind11.h>

#include <tuple>
#include <vector>

#include "kernels.h"

namespace rnnfast {

using LayerFwdSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    int64_t mode, const at::Tensor& x, const c10::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const c10::optional<at::Tensor>& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
    const c10::optional<at::Tensor>& w_hr, bool reverse, bool save);
using LayerBwdSignature = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                     at::Tensor, at::Tensor>(
    int64_t mode, const at::Tensor& x, const c10::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const c10::optional<at::Tensor>& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& w_hr, bool has_bias, bool reverse, const at::Tensor& out, const at::Tensor& ws1,
    const at::Tensor& ws2, const at::Tensor& grad_out, const at::Tensor& grad_hn, const at::Tensor& grad_cn,
    bool need_dx, bool need_dh0, bool need_dw);

// layer_fwd for eager calls: with save, its outputs tied to a C++ autograd node that runs layer_bwd
// (as the Python registration does; compiled autograd takes the node as it is); without, the
// operator below autograd. out_seen false: the caller keeps the output from the user (a cell's
// step, a stack's lower layers), so that backward may read it with no copy.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_fwd_eager(
    int64_t mode, const at::Tensor& x, const c10::optional<at::Tensor>& batch_sizes, const at::Tensor& h0,
    const c10::optional<at::Tensor>& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
    const c10::optional<at::Tensor>& w_hr, bool reverse, bool save, bool out_seen);

// A stack of layers (and directions) in one eager call on unpadded input: (output, h_n, c_n), c_n
// undefined but for LSTM; dropout (> 0 in training) between layers, as rnnfast.backend.run_stack.
std::tuple<at::Tensor, at::Tensor, at::Tensor> stack_eager(int64_t mode, const at::Tensor& x, const at::Tensor& h0,
                                                           const c10::optional<at::Tensor>& c0,
                                                           const std::vector<at::Tensor>& weights, int64_t num_layers,
                                                           bool bidirectional, bool has_bias, double dropout);

// The Python function (rnnfast.cpu._grads_with_graph) that layer_fwd_eager's backward takes its
// gradients from when autograd asks for a graph (create_graph=True): a second derivative then goes
// through reference's loop. Without it such a backward raises.
void set_grads_with_graph(pybind11::object fn);

// PackedSequence data (sum of batch_sizes, ...) to the padded layout (T, B, ...), zeros past each row's
// end, and back (packed.cpp): inference's conversions, without autograd.
at::Tensor pad_packed(const at::Tensor& data, const at::Tensor& batch_sizes);
at::Tensor pack_padded(const at::Tensor& padded, const at::Tensor& batch_sizes);
// pad_packed into (bs.size(), B, ...) by the steps' sizes bs, which the caller has checked against data's rows
// (step_sizes or packed_steps), B >= bs[0].
at::Tensor pad_steps(const at::Tensor& data, const std::vector<int64_t>& bs, int64_t B);
// pack_padded by the steps' sizes bs (bs.size() == padded.size(0), each at most padded.size(1)), which the caller
// has checked (step_sizes).
at::Tensor pack_steps(const at::Tensor& padded, const std::vector<int64_t>& bs);

// One layer, one direction over PackedSequence data in inference: (output data, h_n, c_n). The fused
// loops read the data's rows and write the output's in place, and project only the rows each step
// runs (no padded copy, no products past a sequence's end); the other paths (proj_size, float64,
// CPUs without the fused loop) run layer_fwd on a padded copy (packed.cpp).
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_packed(
    int64_t mode, const at::Tensor& data, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const c10::optional<at::Tensor>& c0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const c10::optional<at::Tensor>& b_ih, const c10::optional<at::Tensor>& b_hh,
    const c10::optional<at::Tensor>& w_hr, bool reverse);

}  // namespace rnnfast
