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

namespace {

// Moves d's dropped assignments to free seats by preference (make_dispatch's `reroute`) and
// regroups the kept ones: the seats first filled keep their order, rerouted assignments
// follow in the order they were moved.
void reroute(Dispatch& d, const torch::Tensor& rank_A, const torch::Tensor& preference_TE) {
  const int64_t A = d.expert_A.size(0), K = d.top_k, E = d.n_experts();
  torch::Tensor dropped =
      d.dropped_M.index_select(0, rank_A.index_select(0, d.dropped_M).argsort());
  torch::Tensor expert_A = d.expert_A.clone();
  torch::Tensor pref = preference_TE.to(torch::kInt64).contiguous();
  int64_t* ex = expert_A.data_ptr<int64_t>();
  const int64_t* pr = pref.data_ptr<int64_t>();
  std::vector<int64_t> load(static_cast<size_t>(E));
  for (int64_t e = 0; e < E; ++e)
    load[e] = d.offsets[e + 1] - d.offsets[e];
  std::vector<int64_t> moved, still;
  const int64_t* dr = dropped.data_ptr<int64_t>();
  for (int64_t i = 0; i < dropped.size(0); ++i) {
    const int64_t a = dr[i], t = a / K;
    int64_t to = -1;
    for (int64_t j = 0; j < E && to < 0; ++j) {
      const int64_t e = pr[t * E + j];
      bool used = false;
      for (int64_t c = 0; c < K; ++c)
        used |= ex[t * K + c] == e;
      if (!used && load[e] < d.capacity) to = e;
    }
    if (to < 0) {
      still.push_back(a);
      continue;
    }
    ex[a] = to;
    ++load[to];
    moved.push_back(a);
  }
  if (moved.empty()) {
    d.rerouted_R = torch::empty({0}, torch::kInt64);
    return;
  }
  // Priority keys: a kept assignment its seat order, a moved one A + the order it moved in.
  torch::Tensor key_A = torch::full({A}, -1, torch::kInt64);
  key_A.index_put_({d.order_N}, d.expert_N * (2 * A) + d.slot_N);
  d.rerouted_R = torch::tensor(moved, torch::kInt64);
  torch::Tensor moved_e = expert_A.index_select(0, d.rerouted_R);
  key_A.index_put_({d.rerouted_R}, moved_e * (2 * A) + A + torch::arange(d.n_rerouted()));
  torch::Tensor kept = (key_A >= 0).nonzero().squeeze(1);
  d.order_N = kept.index_select(0, key_A.index_select(0, kept).argsort());
  d.expert_N = expert_A.index_select(0, d.order_N);
  for (int64_t e = 0; e < E; ++e)
    d.offsets[e + 1] = d.offsets[e] + load[e];
  torch::Tensor start_N =
      torch::tensor(std::vector<int64_t>(d.offsets.begin(), d.offsets.end() - 1), torch::kInt64)
          .index_select(0, d.expert_N);
  d.slot_N = torch::arange(d.order_N.size(0), torch::kInt64) - start_N;
  d.dropped_M = torch::tensor(still, torch::kInt64);
  d.expert_A = expert_A;
}

}  // namespace

Dispatch make_dispatch(const torch::Tensor& expert_TK, const torch::Tensor& gate_TK,
                       int64_t n_experts, int64_t capacity, DropPolicy policy,
                       const RankFn& random_rank, const torch::Tensor& preference_TE) {
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
    d.rerouted_R = d.dropped_M;
    return d;
  }
  torch::Tensor keep = seat_sorted < capacity;
  d.order_N = sorted_A.masked_select(keep);
  d.expert_N = expert_sorted.masked_select(keep);
  d.slot_N = seat_sorted.masked_select(keep);
  d.dropped_M = sorted_A.masked_select(keep.logical_not());
  d.rerouted_R = torch::empty({0}, torch::kInt64);
  if (preference_TE.defined()) reroute(d, rank_A, preference_TE);
  return d;
}

}  // namespace sw
