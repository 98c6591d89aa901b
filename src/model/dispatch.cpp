#include "model/dispatch.h"

namespace sw {

torch::Tensor random_permutation(int64_t n) {
  return torch::randperm(n, torch::kInt64);
}

int64_t expert_capacity(double capacity_factor, int64_t tokens, int64_t experts) {
  return static_cast<int64_t>(capacity_factor * static_cast<double>(tokens) /
                              static_cast<double>(experts));
}

Dispatch dispatch_top1(const torch::Tensor& expert_T, int64_t n_experts, int64_t capacity,
                       const Permutation& permute) {
  Dispatch d;
  d.expert_T = expert_T;
  d.capacity = capacity;
  d.counts_E = torch::bincount(expert_T, /*weights=*/{}, /*minlength=*/n_experts);
  // A stable sort groups the tokens by expert and keeps ascending token order inside a group.
  torch::Tensor by_expert_T =
      std::get<1>(expert_T.sort(/*stable=*/c10::optional<bool>(true), /*dim=*/0));

  const int64_t* counts = d.counts_E.data_ptr<int64_t>();
  d.offsets.assign(static_cast<size_t>(n_experts) + 1, 0);
  bool overflow = false;
  for (int64_t e = 0; e < n_experts; ++e)
    overflow |= capacity >= 0 && counts[e] > capacity;

  if (!overflow) {
    for (int64_t e = 0; e < n_experts; ++e)
      d.offsets[e + 1] = d.offsets[e] + counts[e];
    d.order_N = by_expert_T;
    d.dropped_M = torch::empty({0}, torch::kInt64);
    return d;
  }

  std::vector<torch::Tensor> kept, dropped;
  int64_t start = 0;
  for (int64_t e = 0; e < n_experts; ++e) {
    torch::Tensor seg = by_expert_T.slice(0, start, start + counts[e]);
    start += counts[e];
    if (counts[e] > capacity) {
      seg = seg.index_select(0, permute(counts[e]));
      dropped.push_back(seg.slice(0, capacity));
      seg = seg.slice(0, 0, capacity);
    }
    kept.push_back(seg);
    d.offsets[e + 1] = d.offsets[e] + seg.size(0);
  }
  d.order_N = torch::cat(kept);
  d.dropped_M = torch::cat(dropped);
  return d;
}

}  // namespace sw
