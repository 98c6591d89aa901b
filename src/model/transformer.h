// The language model: token (+ optional position) embedding, n_layers pre-LayerNorm blocks
// of causal self-attention and a feed-forward that is dense or a SwitchFeedForward
// (moe.every), a final LayerNorm and a linear head. Forward returns the logits and the
// routing statistics of every MoE layer; the trainer turns those into losses and metrics.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "config/config.h"
#include "model/attention.h"
#include "model/ffn.h"
#include "model/switch_ffn.h"

namespace sw {

// A look at a stage's output as a pass goes: the tensor and the stage, e.g.
// "block 1: attention (blocks.1.attn)" (the non-finite probe).
using StageHook = std::function<void(const torch::Tensor&, const std::string&)>;

// What one pass over the blocks keeps besides the output: the MoE layers' statistics
// (training), the attention caches (generation), a look at each stage (the probe).
struct BlockPass {
  std::vector<MoeStats>* moe = nullptr;
  std::vector<KVCache>* caches = nullptr;  // one per block
  StageHook hook;
};

struct BlockImpl : torch::nn::Module {
  BlockImpl(const Config& c, bool moe);
  // Block `index` of the model on x_BSD.
  torch::Tensor forward(const torch::Tensor& x_BSD, int64_t index, const BlockPass& pass);

  torch::nn::LayerNorm ln_attn{nullptr}, ln_ffn{nullptr};
  CausalSelfAttention attn{nullptr};
  DenseFFN dense{nullptr};     // registered as "ffn" when the block is dense
  SwitchFFN switch_{nullptr};  // registered as "ffn" when the block is an MoE block
  torch::nn::Dropout ffn_drop{nullptr};
};
TORCH_MODULE(Block);

struct ModelOutput {
  torch::Tensor logits_BSV;
  std::vector<MoeStats> moe;  // one entry per MoE layer, in layer order
};

struct TransformerImpl : torch::nn::Module {
  TransformerImpl(const Config& c, int64_t vocab_size);
  ModelOutput forward(const torch::Tensor& idx_BS);

  // Generation with key/value caches (one per block, filled from position caches[0].len):
  // the logits of idx_BS's positions. Eval mode; no routing statistics.
  torch::Tensor forward_cached(const torch::Tensor& idx_BS, std::vector<KVCache>& caches);

  // Runs the forward pass checking every stage (embeddings, each block's attention, router
  // logits, experts or dense FFN, the head) and names the first whose output holds a NaN or
  // an infinity, e.g. "block 2: router logits (blocks.2.ffn.router)"; "" when all are
  // finite. Every stage runs whatever it finds, so ranks of a run stay in step.
  std::string first_nonfinite(const torch::Tensor& idx_BS);

  // Changes the MoE settings every MoE layer runs with (and cfg.moe): `f` edits them. For
  // what is read at each pass (capacity factors, drop_tokens, drop_policy, overflow,
  // dropped); the shapes (n_experts, top_k, widths) must not change.
  void configure_moe(const std::function<void(MoeConfig&)>& f);

  int64_t n_params() const;
  // Parameters one token uses: all but the experts it is not routed to.
  int64_t n_active_params() const;

  Config cfg;
  torch::nn::Embedding tok_emb{nullptr}, pos_emb{nullptr};
  torch::nn::Dropout emb_drop{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  std::vector<Block> block_list;
  torch::nn::LayerNorm ln_f{nullptr};
  torch::nn::Linear head{nullptr};

 private:
  // The one traversal behind forward, forward_cached and first_nonfinite: embeddings from
  // position `start`, the blocks, the head.
  torch::Tensor run(const torch::Tensor& idx_BS, int64_t start, const BlockPass& pass);
};
TORCH_MODULE(Transformer);

// The auxiliary losses summed over MoE layers, before their weights (moe.alpha, moe.z_loss).
struct AuxLosses {
  torch::Tensor lb;       // sum of E * sum_i f_i P_i
  torch::Tensor z;        // sum of mean_t logsumexp(logits_t)^2
  torch::Tensor balance;  // sum of the balancing terms (moe.balance; aux_loss: lb)
};
AuxLosses total_aux_losses(const std::vector<MoeStats>& stats);

}  // namespace sw
