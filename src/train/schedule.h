// Learning-rate schedule and optimizer construction: AdamW with weight decay on matrices
// only, linear warmup to train.lr, then cosine decay to train.min_lr at train.steps.
#pragma once

#include <memory>

#include <torch/torch.h>

#include "config/config.h"
#include "train/fused_adamw.h"

namespace sw {

// Learning rate for 0-based step `step`.
double lr_at(const TrainConfig& t, int64_t step);

// True for parameters that get weight decay: weight matrices and embeddings, never biases
// or LayerNorm parameters (expert biases are [E, F] yet are biases).
bool is_decayed(const std::string& name, const torch::Tensor& p);

std::unique_ptr<FusedAdamW> make_optimizer(torch::nn::Module& model, const TrainConfig& t);
void set_lr(torch::optim::Optimizer& opt, double lr);

}  // namespace sw
