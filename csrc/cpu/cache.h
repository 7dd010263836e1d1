// Values built from weights (packed copies, panels), kept until one of those
// weights changes: a new tensor, new storage, or an in-place update (version
// counter), as from load_state_dict or an optimizer step. Writes through `.data`
// (`p.data.add_(...)` in older training loops) bump no version counter, so CPU
// weights are also fingerprinted: small tensors (biases) byte for byte, larger ones
// at kSamples positions spread over every block of rows. Repacking on every call
// would cost 5% of a training step and 3x a short inference call; a fingerprint
// costs a few dozen loads. Tensors made under torch.inference_mode have no version
// counter: on the CPU their fingerprint alone stands for it, and elsewhere (GPU, no
// fingerprint) nothing is cached for them. Holds the weights' storages weakly, so it never keeps a
// module's parameters alive, and not the tensors themselves: torch.utils.swap_tensors (module.to() and
// load_state_dict under torch.__future__.set_swap_module_params_on_conversion, and for tensor
// subclasses) refuses a tensor that anything holds a weak reference to. A tensor is then known by its
// TensorImpl's address with its storage, data pointer, sizes and strides.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace rnnfast {

template <class V>
class WeightCache {
 public:
  // The value for (weights, tag): the cached one while the weights are unchanged, else build().
  template <class Build>
  V get(const std::vector<at::Tensor>& weights, int64_t tag, Build&& build) {
    const Key key{weights.at(0).unsafeGetTensorImpl(), tag};
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = entries_.find(key);
    if (it != entries_.end() && it->second.matches(weights)) return it->second.value;
    if (it != entries_.end()) entries_.erase(it);
    if (!trackable(weights)) return build();
    if (entries_.size() >= kMaxEntries) {
      for (auto e = entries_.begin(); e != entries_.end();) e = e->second.expired() ? entries_.erase(e) : std::next(e);
      if (entries_.size() >= kMaxEntries) entries_.clear();
    }
    Entry entry;
    for (const at::Tensor& t : weights) {
      entry.storages.push_back(t.defined() ? std::optional<WeakStorage>(t.storage().getWeakStorageImpl()) : std::nullopt);
      entry.impls.push_back(t.defined() ? t.unsafeGetTensorImpl() : nullptr);
      entry.layouts.push_back(layout(t));
      entry.versions.push_back(version(t));
      entry.ptrs.push_back(t.defined() ? t.data_ptr() : nullptr);
      entry.prints.push_back(fingerprint(t));
    }
    entry.value = build();
    return entries_.emplace(key, std::move(entry)).first->second.value;
  }

 private:
  using WeakStorage = c10::weak_intrusive_ptr<c10::StorageImpl>;
  using Key = std::pair<const c10::TensorImpl*, int64_t>;
  static constexpr size_t kMaxEntries = 64;
  static constexpr int64_t kExact = 8192;  // tensors up to this many elements are kept whole
  // Each sample of a large weight sits on a page of its own that the call's work has not touched: a
  // TLB and cache miss. 128 cost 4-9 us of an RNNCell B2 H512 step, 32 cost 0.5-3
  // (bench/results/2026-12-07-cpu-fingerprint-ab.md); 32 still put 8 in each gate's rows of an LSTM.
  static constexpr int64_t kSamples = 32;

  static int64_t samples(int64_t n) { return n <= kExact ? n : kSamples; }

  // t's version counter, or -1 for a tensor without one (undefined, or made in inference mode).
  static int64_t version(const at::Tensor& t) { return t.defined() && !t.is_inference() ? t._version() : -1; }

  // Whether a change to any of the weights would show: each has a storage, and a version counter or a
  // fingerprint.
  static bool trackable(const std::vector<at::Tensor>& weights) {
    return std::all_of(weights.begin(), weights.end(), [](const at::Tensor& t) {
      return !t.defined() || (t.has_storage() && (!t.is_inference() || t.device().is_cpu()));
    });
  }

  // t's sizes, then its strides.
  static std::vector<int64_t> layout(const at::Tensor& t) {
    if (!t.defined()) return {};
    std::vector<int64_t> v(t.sizes().begin(), t.sizes().end());
    v.insert(v.end(), t.strides().begin(), t.strides().end());
    return v;
  }

  // Calls f(k, element) for the elements of t that its fingerprint holds: all of a small
  // tensor, else kSamples, the k-th at a scrambled place in the k-th of kSamples equal stretches.
  template <class F>
  static void sampled(const at::Tensor& t, F&& f) {
    const int64_t n = t.numel(), size = t.element_size();
    const char* base = static_cast<const char*>(t.data_ptr());
    const int64_t count = samples(n), stretch = count > 0 ? n / count : 0;
    const bool flat = t.is_contiguous();
    for (int64_t k = 0; k < count; ++k) {
      const int64_t i = k * stretch + int64_t((uint64_t(uint32_t(k * 2654435761u)) * uint64_t(stretch)) >> 32);
      int64_t offset = flat ? i : 0;
      for (int64_t d = t.dim() - 1, rest = i; !flat && d >= 0; rest /= t.size(d), --d) {
        offset += (rest % t.size(d)) * t.stride(d);
      }
      f(k, base + offset * size);
    }
  }

  // The bytes of t's fingerprint; empty for tensors the host cannot read (GPU), which rely on
  // the version counter alone.
  static std::string fingerprint(const at::Tensor& t) {
    if (!t.defined() || !t.device().is_cpu()) return {};
    const int64_t size = t.element_size();
    std::string bytes(samples(t.numel()) * size, '\0');
    sampled(t, [&](int64_t k, const char* e) { std::memcpy(&bytes[k * size], e, size); });
    return bytes;
  }

  // Whether t still has the fingerprint `print`.
  static bool same(const at::Tensor& t, const std::string& print) {
    if (!t.device().is_cpu()) return true;
    const int64_t size = t.element_size();
    if (t.numel() <= kExact && t.is_contiguous()) {  // one comparison of the whole tensor
      return print.size() == size_t(t.numel() * size) &&
             (print.empty() || std::memcmp(t.data_ptr(), print.data(), print.size()) == 0);
    }
    bool equal = print.size() == size_t(samples(t.numel()) * size);
    if (equal) sampled(t, [&](int64_t k, const char* e) { equal = equal && !std::memcmp(&print[k * size], e, size); });
    return equal;
  }

  struct Entry {
    std::vector<std::optional<WeakStorage>> storages;  // nullopt: an absent (undefined) weight
    std::vector<const c10::TensorImpl*> impls;
    std::vector<std::vector<int64_t>> layouts;
    std::vector<int64_t> versions;
    std::vector<const void*> ptrs;
    std::vector<std::string> prints;
    V value;

    bool expired() const { return storages[0]->expired(); }
    bool matches(const std::vector<at::Tensor>& weights) const {
      if (weights.size() != storages.size()) return false;
      for (size_t k = 0; k < weights.size(); ++k) {
        const at::Tensor& t = weights[k];
        if (t.defined() != storages[k].has_value()) return false;
        if (t.defined() &&
            (!t.has_storage() || storages[k]->expired() ||
             storages[k]->_unsafe_get_target() != t.storage().unsafeGetStorageImpl() ||
             impls[k] != t.unsafeGetTensorImpl() || ptrs[k] != t.data_ptr() || layouts[k] != layout(t) ||
             versions[k] != version(t) || !same(t, prints[k]))) {
          return false;
        }
      }
      return true;
    }
  };

  std::mutex mutex_;
  std::map<Key, Entry> entries_;
};

}  // namespace rnnfast
