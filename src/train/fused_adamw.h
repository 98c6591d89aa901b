// AdamW with the whole update of a parameter in one pass over memory. LibTorch's AdamW
// makes about ten passes per parameter (decay, two for each moment, sqrt, divide, add,
// update); with many experts the optimizer is memory-bound, and that was half of a training
// step at E = 64. The state (step, exp_avg, exp_avg_sq) is AdamW's own, so checkpoints are
// interchangeable with torch::optim::AdamW. Gradient clipping is folded in: the clip
// coefficient scales each gradient as it is read instead of in a separate pass.
#pragma once

#include <vector>

#include <torch/torch.h>

#include "train/adamw_state.h"

namespace sw {

class FusedAdamW : public torch::optim::AdamW {
 public:
  using torch::optim::AdamW::AdamW;

  // Multiplies every gradient by `scale` in the next step (1: unchanged).
  void set_grad_scale(double scale) { grad_scale_ = scale; }
  torch::Tensor step(LossClosure closure = nullptr) override;

 private:
  double grad_scale_ = 1.0;
};

// The global L2 norm of the gradients, and the factor clip_grad_norm_ would scale them by
// (min(1, max_norm / (norm + 1e-6))).
struct GradNorm {
  double norm;
  double clip_scale;
};
GradNorm grad_norm(const std::vector<torch::Tensor>& params, double max_norm);

}  // namespace sw
