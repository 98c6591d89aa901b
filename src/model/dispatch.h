// Dispatch: given each token's chosen experts and an expert capacity, decide which
// (token, expert) assignments each expert processes, in which seat, and which are dropped.
// Plain functions over tensors, no parameters: every expert strategy (and the
// expert-parallel path) consumes the same Dispatch.
//
// Shape legend used across src/model: B batch, S sequence, T tokens (B*S), K experts per
// token (top-k), A assignments (T*K; assignment a is token a / K's (a % K)-th choice),
// D model width, F expert/FFN hidden width, E experts, C capacity, N kept assignments,
// M dropped assignments, V vocabulary.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "config/options.h"

namespace sw {

// DropPolicy (config/options.h): Random, the seed's, keeps a uniformly random subset of an
// over-full expert's assignments; Position keeps first choices before second choices, then
// earlier tokens; Probability keeps the highest gates (ties by position).

struct Dispatch {
  int64_t top_k = 1;
  int64_t capacity = -1;         // -1: unlimited (drop_tokens off)
  torch::Tensor expert_A;        // int64: the expert of each assignment (after rerouting)
  torch::Tensor order_N;         // int64: kept assignments, grouped by expert, by priority
  torch::Tensor expert_N;        // int64: expert of each kept assignment
  torch::Tensor slot_N;          // int64: its seat in the expert, 0 .. capacity - 1
  std::vector<int64_t> offsets;  // E + 1 bounds: expert e has order_N[offsets[e], offsets[e+1])
  torch::Tensor dropped_M;       // int64: assignments dropped for lack of capacity
  torch::Tensor counts_E;        // int64: assignments routed to each expert, before dropping
                                 // and rerouting (the router's choices)
  torch::Tensor rerouted_R;      // int64: assignments moved to another expert (moe.overflow)

  int64_t n_experts() const { return static_cast<int64_t>(offsets.size()) - 1; }
  int64_t n_kept() const { return order_N.size(0); }
  int64_t n_dropped() const { return dropped_M.size(0); }
  int64_t n_rerouted() const { return rerouted_R.size(0); }
  int64_t max_load() const;  // the most assignments any expert keeps
  torch::Tensor token_N() const { return order_N.div(top_k, "floor"); }
  torch::Tensor token_M() const { return dropped_M.div(top_k, "floor"); }
};

// Priorities for the random policy: a permutation of 0 .. A-1 (lower keeps its seat first).
// The default draws torch::randperm from LibTorch's generator; tests pass fixed ones.
using RankFn = std::function<torch::Tensor(int64_t n_assignments)>;
torch::Tensor random_ranks(int64_t n_assignments);

// capacity = int(capacity_factor * top_k * tokens / experts); top_k = 1 is the seed's.
int64_t expert_capacity(double capacity_factor, int64_t tokens, int64_t experts, int64_t top_k = 1);

// Groups assignments by expert; with capacity >= 0 an expert keeps its `capacity` assignments
// of highest priority under `policy` and drops the rest. With `preference_TE` (each token's
// experts, best first: moe.overflow = reroute) an assignment over capacity goes instead, in
// priority order, to its token's most preferred expert that the token does not use yet and
// that still has a free seat (after the first choices are seated), and is dropped only when
// none has.
Dispatch make_dispatch(const torch::Tensor& expert_TK, const torch::Tensor& gate_TK,
                       int64_t n_experts, int64_t capacity, DropPolicy policy,
                       const RankFn& random_rank = random_ranks,
                       const torch::Tensor& preference_TE = {});

}  // namespace sw
