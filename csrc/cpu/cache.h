// Values built from weights (packed copies, panels), kept until one of those
// weights changes: a new tensor, new storage, or an in-place update (version
// counter), as from load_state_dict or an optimizer step. Holds the weights
// weakly, so it never keeps a module's parameters alive.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include <map>
#include <mutex>
#include <optional>
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
    if (entries_.size() >= kMaxEntries) {
      for (auto e = entries_.begin(); e != entries_.end();) e = e->second.expired() ? entries_.erase(e) : std::next(e);
      if (entries_.size() >= kMaxEntries) entries_.clear();
    }
    Entry entry;
    for (const at::Tensor& t : weights) {
      entry.refs.push_back(t.defined() ? std::optional<WeakImpl>(t.getIntrusivePtr()) : std::nullopt);
      entry.versions.push_back(t.defined() ? t._version() : 0);
      entry.ptrs.push_back(t.defined() ? t.data_ptr() : nullptr);
    }
    entry.value = build();
    return entries_.emplace(key, std::move(entry)).first->second.value;
  }

 private:
  using WeakImpl = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  using Key = std::pair<const c10::TensorImpl*, int64_t>;
  static constexpr size_t kMaxEntries = 64;

  struct Entry {
    std::vector<std::optional<WeakImpl>> refs;  // nullopt: an absent (undefined) weight
    std::vector<int64_t> versions;
    std::vector<const void*> ptrs;
    V value;

    bool expired() const { return refs[0]->expired(); }
    bool matches(const std::vector<at::Tensor>& weights) const {
      if (weights.size() != refs.size()) return false;
      for (size_t k = 0; k < weights.size(); ++k) {
        const at::Tensor& t = weights[k];
        if (t.defined() != refs[k].has_value()) return false;
        if (t.defined() && (refs[k]->expired() || refs[k]->_unsafe_get_target() != t.unsafeGetTensorImpl() ||
                            ptrs[k] != t.data_ptr() || versions[k] != t._version())) {
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
