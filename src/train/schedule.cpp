#include "train/schedule.h"

#include <algorithm>
#include <cmath>

namespace sw {

double lr_at(const TrainConfig& t, int64_t step) {
  if (step < t.warmup) return t.lr * static_cast<double>(step + 1) / static_cast<double>(t.warmup);
  const int64_t decay_steps = std::max<int64_t>(1, t.steps - t.warmup);
  const double progress =
      std::min(1.0, static_cast<double>(step - t.warmup) / static_cast<double>(decay_steps));
  return t.min_lr + 0.5 * (1.0 + std::cos(M_PI * progress)) * (t.lr - t.min_lr);
}

}  // namespace sw
