// PackedSequence data in inference: one layer over the data itself (layer_packed), and the data to
// and from the padded (T, B, ...) layout the other loops take: one memcpy per step, zeros only where
// rows are inactive. torch's pad_packed_sequence and pack_padded_sequence (which autograd needs) cost
// about 40 us a call at small sizes through their Python wrappers, per-step slices and a full zero
// fill (2-core Xeon).
#include <cstring>

#include "checks.h"
#include "kernels.h"
#include "layer.h"

namespace rnnfast {

using at::Tensor;

namespace {

// batch_sizes checked against data's rows: the steps' sizes, non-increasing, summing to rows.
std::vector<int64_t> packed_steps(const Tensor& batch_sizes, int64_t rows) {
  TORCH_CHECK(batch_sizes.dim() == 1 && batch_sizes.size(0) > 0, "rnnfast: batch_sizes must be 1-D and non-empty");
  const int64_t B = batch_sizes.to(at::kLong)[0].item<int64_t>();
  const std::vector<int64_t> bs = step_sizes(batch_sizes, batch_sizes.size(0), B);
  int64_t sum = 0;
  for (int64_t n : bs) sum += n;
  TORCH_CHECK(sum == rows, "rnnfast: batch_sizes sum to ", sum, " rows, the packed data has ", rows);
  return bs;
}

}  // namespace

Tensor pad_packed(const Tensor& data_, const Tensor& batch_sizes) {
  TORCH_CHECK(data_.dim() >= 1, "rnnfast pad_packed: data must be (rows, ...), got a scalar");
  TORCH_CHECK(data_.device().is_cpu(), "rnnfast pad_packed: data must be a CPU tensor");
  const std::vector<int64_t> bs = packed_steps(batch_sizes, data_.size(0));
  return pad_steps(data_, bs, bs[0]);
}

Tensor pad_steps(const Tensor& data_, const std::vector<int64_t>& bs, int64_t B) {
  const Tensor data = data_.contiguous();
  const int64_t T = bs.size(), row = data.numel() / std::max<int64_t>(data.size(0), 1);
  std::vector<int64_t> shape{T, B};
  shape.insert(shape.end(), data.sizes().begin() + 1, data.sizes().end());
  Tensor out = at::empty(shape, data.options());
  const int64_t bytes = row * data.element_size();
  const char* src = static_cast<const char*>(data.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  for (int64_t t = 0; t < T && bytes > 0; ++t) {  // (no rows, or rows of nothing: no pointer to copy through)
    if (bs[t] > 0) std::memcpy(dst + t * B * bytes, src, bs[t] * bytes);
    if (bs[t] < B) std::memset(dst + (t * B + bs[t]) * bytes, 0, (B - bs[t]) * bytes);
    src += bs[t] * bytes;
  }
  return out;
}

Tensor pack_padded(const Tensor& padded_, const Tensor& batch_sizes) {
  TORCH_CHECK(padded_.dim() >= 2, "rnnfast pack_padded: padded must be (T, B, ...), got shape ", padded_.sizes());
  TORCH_CHECK(padded_.device().is_cpu(), "rnnfast pack_padded: padded must be a CPU tensor");
  return pack_steps(padded_, step_sizes(batch_sizes, padded_.size(0), padded_.size(1)));
}

Tensor pack_steps(const Tensor& padded_, const std::vector<int64_t>& bs) {
  const Tensor padded = padded_.contiguous();
  const int64_t T = padded.size(0), B = padded.size(1), row = T * B == 0 ? 0 : padded.numel() / (T * B);
  int64_t rows = 0;
  for (int64_t n : bs) rows += n;
  std::vector<int64_t> shape{rows};
  shape.insert(shape.end(), padded.sizes().begin() + 2, padded.sizes().end());
  Tensor out = at::empty(shape, padded.options());
  const int64_t bytes = row * padded.element_size();
  const char* src = static_cast<const char*>(padded.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  for (int64_t t = 0; t < T && bytes > 0; ++t) {
    if (bs[t] > 0) std::memcpy(dst, src + t * B * bytes, bs[t] * bytes);
    dst += bs[t] * bytes;
  }
  return out;
}

std::tuple<Tensor, Tensor, Tensor> layer_packed(int64_t mode, const Tensor& data, const Tensor& batch_sizes,
                                                const Tensor& h0, const c10::optional<Tensor>& c0, const Tensor& w_ih,
                                                const Tensor& w_hh, const c10::optional<Tensor>& b_ih,
                                                const c10::optional<Tensor>& b_hh, const c10::optional<Tensor>& w_hr,
                                                bool reverse) {
  TORCH_CHECK(data.dim() == 2, "rnnfast layer_packed: data must be 2-D (rows, input_size), got shape ", data.sizes());
  const std::vector<int64_t> bs = packed_steps(batch_sizes, data.size(0));
  const int64_t T = bs.size(), B = bs[0];
  if (B > 0 && fused_loop_supported(data, present(w_hr))) {
    // the operator's checks, on a (T, B, I) view of the first row
    check_layer_fwd(mode, data[0].expand({T, B, data.size(1)}), batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr);
    const auto [out, h_n, c_n, ws1, ws2] =
        fused_layer_fwd(mode, data.contiguous(), bs, true, h0, mode == LSTM ? *c0 : Tensor(), w_ih.contiguous(),
                        w_hh.contiguous(), given(b_ih), given(b_hh), reverse, false);
    return {out, h_n, c_n};
  }
  const auto [out, h_n, c_n, ws1, ws2] = layer_fwd_eager(mode, pad_packed(data, batch_sizes), batch_sizes, h0, c0,
                                                         w_ih, w_hh, b_ih, b_hh, w_hr, reverse, false, true);
  return {pack_padded(out, batch_sizes), h_n, c_n};
}

}  // namespace rnnfast
