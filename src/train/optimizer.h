// The optimizer of a run: the fused AdamW (fused_adamw.h) over two parameter groups, weight
// decay on matrices and embeddings only; the learning rate is set each step from the
// schedule (schedule.h).
#pragma once

#include <memory>
#include <string>

#include <torch/torch.h>

#include "config/config.h"
#include "train/fused_adamw.h"

namespace sw {

// True for parameters that get weight decay: weight matrices and embeddings, never biases
// or LayerNorm parameters (expert biases are [E, F] yet are biases).
bool is_decayed(const std::string& name, const torch::Tensor& p);

std::unique_ptr<FusedAdamW> make_optimizer(torch::nn::Module& model, const TrainConfig& t);
void set_lr(torch::optim::Optimizer& opt, double lr);

}  // namespace sw
