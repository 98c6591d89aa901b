// The experts of one MoE layer: E feed-forward networks whose weights are stored stacked
// (w_in [E, D, F], b_in [E, F], w_out [E, F, D], b_out [E, D]) whatever strategy computes
// them, so a checkpoint trained with one strategy runs with any other.
//
// Strategies (moe.strategy, config/options.h); all give the same outputs and gradients for the same
// dispatch:
//   loop      the seed's reference: one expert after another;
//   capacity  a padded [E, C, D] buffer and one batched matmul per FFN layer (static shapes);
//   grouped   the kept rows sorted by expert in one buffer and all experts computed by one
//             grouped operation over segment offsets with its own backward (grouped_ffn).
#pragma once

#include <mutex>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "model/dispatch.h"
#include "model/ffn.h"

namespace sw {

// The weight gradients of the grouped operation's backward passes in one training step,
// held back so that each expert's come from one product over the rows of every micro-batch
// (ExpertsImpl::flush_weight_grads): the weight gradients are written once per step instead
// of once per micro-batch and then summed. Only the small-matrix path's are held back (where
// the weight traffic is the cost); the parts are summed in micro-batch order.
struct DeferredGrads : torch::CustomClassHolder {
  struct Part {
    int64_t micro_batch = 0;
    torch::Tensor x, gh_pre, h, gy;  // the layer's inputs and gradients, rows by expert
    std::vector<int64_t> offsets;
  };
  std::mutex mutex;  // micro-batches run their backward passes at once
  std::vector<Part> parts;
};

// Tags the grouped operations run on this thread while it lives with micro-batch `index`
// (their deferred parts' order of summation).
class MicroBatchScope {
 public:
  explicit MicroBatchScope(int64_t index);
  ~MicroBatchScope();
  MicroBatchScope(const MicroBatchScope&) = delete;
  MicroBatchScope& operator=(const MicroBatchScope&) = delete;

 private:
  int64_t previous_;
};

// All experts' FFN over rows sorted by expert: rows [offsets[e], offsets[e+1]) of x_ND go
// through expert e. One autograd node: the backward writes each expert's gradient slice once
// (experts without rows get zeros, no per-expert full-size gradients), and experts without
// rows cost nothing. Segments of few rows or small experts (kFewRows, kSmallExpert) run on
// the small-matrix products (model/small_gemm.h), experts spread over the threads; with
// `deferred`, their weight gradients are left to it (returned undefined).
torch::Tensor grouped_ffn(const torch::Tensor& x_ND, const torch::Tensor& w_in,
                          const torch::Tensor& b_in, const torch::Tensor& w_out,
                          const torch::Tensor& b_out, const std::vector<int64_t>& offsets,
                          Activation act, const c10::intrusive_ptr<DeferredGrads>& deferred = {});

// The grouped operation uses the small-matrix products up to kFewRows rows per expert on
// average, and for experts whose input matrix has at most kSmallExpert weights (d_model x
// width, e.g. 128 x 128) whatever their rows: a BLAS packs every such matrix for a product
// too small to repay it. Above both (the default model's 4 experts of 128 x 512 at 128
// rows each) every expert's product is one LibTorch matmul on all threads.
constexpr int64_t kFewRows = 64;
constexpr int64_t kSmallExpert = 128 * 128;

struct ExpertsImpl : torch::nn::Module {
  ExpertsImpl(int64_t n_experts, int64_t d_model, int64_t d_ff, Activation act);

  // x_ND: the kept assignments' inputs in dispatch order (row i is d.order_N[i]'s token).
  // Returns their expert outputs, row for row.
  torch::Tensor forward(const torch::Tensor& x_ND, const Dispatch& d, Strategy s);
  torch::Tensor forward_loop(const torch::Tensor& x_ND, const Dispatch& d);
  torch::Tensor forward_capacity(const torch::Tensor& x_ND, const Dispatch& d);
  torch::Tensor forward_grouped(const torch::Tensor& x_ND, const Dispatch& d);

  // Training: hold back the grouped strategy's weight gradients of few-row segments until
  // flush_weight_grads, which adds them to the parameters' .grad (creating it if need be),
  // one product per expert over every micro-batch since the last flush. Whoever turns this
  // on flushes after every backward (train_step does); a graph built before a change of
  // the setting keeps the setting it was built with.
  void defer_weight_grads(bool on);
  void flush_weight_grads();

  int64_t n_experts, d_model, d_ff;
  Activation act;
  torch::Tensor w_in, b_in, w_out, b_out;
  c10::intrusive_ptr<DeferredGrads> deferred;  // null unless deferring
};
TORCH_MODULE(Experts);

}  // namespace sw
