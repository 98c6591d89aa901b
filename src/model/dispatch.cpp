#include "model/dispatch.h"

#include <algorithm>

#include "model/random.h"

namespace sw {

torch::Tensor random_ranks(int64_t n) {
  return torch::randperm(n, current_generator(), torch::kInt64);
}

int64_t expert_capacity(double capacity_factor, int64_t tokens, int64_t experts, int64_t top_k) {
  return static_cast<int64_t>(capacity_factor * static_cast<double>(top_k) *
                              static_cast<double>(tokens) / static_cast<double>(experts));
}

int64_t Dispatch::max_load() const {
  int64_t m = 0;
  for (size_t e = 0; e + 1 < offsets.size(); ++e)
    m = std::max(m, offsets[e + 1] - offsets[e]);
  return m;
}

Dispatch make_dispatch(const torch::Tensor& expert_TK, const torch::Tensor& gate_TK,
                       int64_t n_experts, int64_t capacity, DropPolicy policy,
                       const RankFn& random_rank) {
  const int64_t T = expert_TK.size(0), K = expert_TK.size(1), A = T * K;
  Dispatch d;
  d.top_k = K;
  d.capacity = capacity;
  d.expert_A = expert_TK.reshape({A}).contiguous();
  d.counts_E = torch::bincount(d.expert_A, /*weights=*/{}, /*minlength=*/n_experts);

  // rank_A: lower keeps its seat first. Position order is slot-major: a = t*K + j has
  // position j*T + t, so every token's first choice outranks any second choice.
  torch::Tensor a_A = torch::arange(A, torch::kInt64);
  torch::Tensor position_A = a_A.remainder(K) * T + a_A.div(K, "floor");
  torch::Tensor rank_A;
  switch (policy) {
    case DropPolicy::Random:
      rank_A = random_rank(A);
      break;
    case DropPolicy::Position:
      rank_A = position_A;
      break;
    case DropPolicy::Probability: {
      // Assignments in position order, then a stable sort by descending gate.
      torch::Tensor by_position = std::get<1>(position_A.sort());
      torch::Tensor gate_by_position = gate_TK.detach().reshape({A}).index_select(0, by_position);
      torch::Tensor order = by_position.index_select(
          0, std::get<1>(gate_by_position.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true)));
      rank_A = torch::empty({A}, torch::kInt64).scatter_(0, order, a_A);
      break;
    }
  }

  // Group by expert, by rank inside a group: the keys are distinct, so any sort will do.
  torch::Tensor sorted_A = std::get<1>((d.expert_A * A + rank_A).sort());
  const int64_t* counts = d.counts_E.data_ptr<int64_t>();
  d.offsets.assign(static_cast<size_t>(n_experts) + 1, 0);
  std::vector<int64_t> starts(static_cast<size_t>(n_experts), 0);
  bool overflow = false;
  for (int64_t e = 0, start = 0; e < n_experts; ++e) {
    starts[e] = start;
    start += counts[e];
    const int64_t kept = capacity >= 0 ? std::min(counts[e], capacity) : counts[e];
    overflow |= kept < counts[e];
    d.offsets[e + 1] = d.offsets[e] + kept;
  }
  torch::Tensor expert_sorted = d.expert_A.index_select(0, sorted_A);
  torch::Tensor seat_sorted = torch::arange(A, torch::kInt64) -
                              torch::tensor(starts, torch::kInt64).index_select(0, expert_sorted);
  if (!overflow) {
    d.order_N = sorted_A;
    d.expert_N = expert_sorted;
    d.slot_N = seat_sorted;
    d.dropped_M = torch::empty({0}, torch::kInt64);
    return d;
  }
  torch::Tensor keep = seat_sorted < capacity;
  d.order_N = sorted_A.masked_select(keep);
  d.expert_N = expert_sorted.masked_select(keep);
  d.slot_N = seat_sorted.masked_select(keep);
  d.dropped_M = sorted_A.masked_select(keep.logical_not());
  return d;
}

}  // namespace sw
