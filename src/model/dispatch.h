// Dispatch: given each token's chosen expert and an expert capacity, decide which tokens
// each expert processes and which are dropped. Plain functions over tensors, no parameters:
// every expert strategy (and the expert-parallel path) consumes the same Dispatch.
//
// Shape legend used across src/model: B batch, S sequence, T tokens (B*S), D model width,
// F expert/FFN hidden width, E experts, C capacity, N kept tokens, M dropped tokens, V vocab.
#pragma once

#include <functional>
#include <vector>

#include <torch/torch.h>

namespace sw {

struct Dispatch {
  torch::Tensor expert_T;        // int64: the expert each token was routed to
  torch::Tensor order_N;         // int64: kept token indices, grouped by expert
  std::vector<int64_t> offsets;  // E + 1 bounds: expert e has order_N[offsets[e], offsets[e+1])
  torch::Tensor dropped_M;       // int64: token indices dropped for lack of capacity
  torch::Tensor counts_E;        // int64: tokens routed to each expert, before dropping
  int64_t capacity = -1;         // -1: unlimited (drop_tokens off)

  int64_t n_experts() const { return static_cast<int64_t>(offsets.size()) - 1; }
  int64_t n_dropped() const { return dropped_M.size(0); }
};

// Reorders the n tokens competing for one over-full expert; the first `capacity` are kept.
// The seed draws a uniformly random permutation (torch.randperm); tests pass fixed ones.
using Permutation = std::function<torch::Tensor(int64_t n)>;
torch::Tensor random_permutation(int64_t n);

// capacity = int(capacity_factor * tokens / experts), as in the seed.
int64_t expert_capacity(double capacity_factor, int64_t tokens, int64_t experts);

// Top-1 dispatch with the seed's semantics: tokens of an expert in ascending token order;
// an expert with more than `capacity` tokens (capacity >= 0) keeps the first `capacity` of
// them after reordering with `permute`, and drops the rest.
Dispatch dispatch_top1(const torch::Tensor& expert_T, int64_t n_experts, int64_t capacity,
                       const Permutation& permute = random_permutation);

}  // namespace sw
