// The learning-rate schedule: linear warmup to train.lr, then cosine decay to train.min_lr
// at train.steps.
#pragma once

#include <cstdint>

#include "config/config.h"

namespace sw {

// Learning rate for 0-based step `step`.
double lr_at(const TrainConfig& t, int64_t step);

}  // namespace sw
