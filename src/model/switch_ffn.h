// SwitchFeedForward: composes the router, the dispatch and the experts into the sparse FFN,
// with the seed's semantics for top-1 (capacity, dropping, pass-through, probability
// scaling) generalized to top-k, and returns its routing statistics and auxiliary losses
// as values. moe.shared_experts adds a dense FFN every token goes through; moe.overflow =
// reroute seats an over-capacity assignment at the token's next-best expert with room.
#pragma once

#include <functional>
#include <memory>

#include <torch/torch.h>

#include "config/config.h"
#include "distributed/comm.h"
#include "model/dispatch.h"
#include "model/experts.h"
#include "model/router.h"

namespace sw {

// What one MoE layer reports for one forward pass.
struct MoeStats {
  int64_t layer = -1;          // index of the transformer block (set by the transformer)
  int64_t tokens = 0;          // T
  int64_t assignments = 0;     // T * top_k
  torch::Tensor counts_E;      // int64: assignments routed to each expert, before dropping
  torch::Tensor prob_sum_E;    // float: sum over tokens of each expert's router probability
  int64_t dropped = 0;         // assignments over capacity (after rerouting)
  int64_t rerouted = 0;        // assignments moved to another expert (moe.overflow)
  torch::Tensor prob_max_T;    // float: each token's highest router probability
  torch::Tensor routed_TK;     // int64: each token's k experts as the router chose them, best
                               // first (before capacity and rerouting)
  torch::Tensor probs_TE;      // float, detached: the router's probabilities (Routing::probs_TE)
  torch::Tensor lb_loss;       // scalar, differentiable: E * sum_i f_i * P_i (before alpha)
  torch::Tensor z_loss;        // scalar, differentiable: mean_t logsumexp(logits_t)^2
  torch::Tensor balance_loss;  // scalar, differentiable: the term moe.alpha weighs (moe.balance)
};

struct SwitchFFNOutput {
  torch::Tensor y;  // same shape as the input
  MoeStats stats;
};

struct SwitchFFNImpl : torch::nn::Module {
  SwitchFFNImpl(int64_t d_model, int64_t d_ff, const MoeConfig& moe, Activation act);
  // x: [..., D]. `on_logits`, when set, sees the router logits (the non-finite probe).
  SwitchFFNOutput forward(const torch::Tensor& x,
                          const std::function<void(const torch::Tensor&)>& on_logits = {});

  // The parts, for tests and benchmarks: routing, then dispatch under the current mode's
  // capacity, then experts and combine.
  Routing route(const torch::Tensor& x_TD);
  Dispatch dispatch(const Routing& r, int64_t tokens);
  torch::Tensor combine(const torch::Tensor& x_TD, const Routing& r, const Dispatch& d);

  // moe.balance = bias: moves each expert's bias by rate * sign(mean load - its load), from
  // one step's loads (assignments per expert, all routing groups and ranks).
  void update_bias(const torch::Tensor& load_E, double rate);

  // Expert parallelism: keep only this rank's experts [rank*E/W, (rank+1)*E/W) and compute
  // the kept rows on their experts' ranks (model/expert_parallel.h). Routing, capacity
  // and dropping stay decided on this rank's own tokens. Throws sw::Error unless W divides E.
  void enable_expert_parallel(std::shared_ptr<Comm> comm);

  MoeConfig cfg;
  std::shared_ptr<Comm> comm;  // null: every expert is local
  Router router{nullptr};
  Experts experts{nullptr};
  DenseFFN shared{nullptr};           // "shared", width shared_experts x d_ff; null without
  RankFn random_rank = random_ranks;  // replaceable for tests
};
TORCH_MODULE(SwitchFFN);

}  // namespace sw
