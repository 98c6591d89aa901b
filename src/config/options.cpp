#include "config/options.h"

namespace sw {

template <>
const std::vector<Choice<Activation>>& choices<Activation>() {
  static const std::vector<Choice<Activation>> table = {
      {Activation::Gelu, "gelu", "GELU, exact (erf) form"},
      {Activation::Relu, "relu", "ReLU, as in labml's Switch experiment (configs/labml.json)"},
  };
  return table;
}

template <>
const std::vector<Choice<DropPolicy>>& choices<DropPolicy>() {
  static const std::vector<Choice<DropPolicy>> table = {
      {DropPolicy::Random, "random", "a uniformly random subset keeps its seats (the reference)"},
      {DropPolicy::Position, "position",
       "first choices before second choices, then earlier tokens"},
      {DropPolicy::Probability, "probability", "highest gate first, ties by position"},
  };
  return table;
}

template <>
const std::vector<Choice<DroppedOutput>>& choices<DroppedOutput>() {
  static const std::vector<Choice<DroppedOutput>> table = {
      {DroppedOutput::Pass, "pass", "its input, scaled as an expert output is (the reference)"},
      {DroppedOutput::Zero, "zero", "nothing; only the residual carries it (the Switch paper)"},
  };
  return table;
}

template <>
const std::vector<Choice<Strategy>>& choices<Strategy>() {
  static const std::vector<Choice<Strategy>> table = {
      {Strategy::Loop, "loop", "one expert after another (the reference)"},
      {Strategy::Capacity, "capacity",
       "a padded [E, C, D] buffer and one batched matmul per FFN layer"},
      {Strategy::Grouped, "grouped",
       "rows sorted by expert, all experts in one grouped operation with its own backward"},
  };
  return table;
}

template <>
const std::vector<Choice<OnNonfinite>>& choices<OnNonfinite>() {
  static const std::vector<Choice<OnNonfinite>> table = {
      {OnNonfinite::Stop, "stop",
       "fail, naming the step and the first stage whose output is not finite, e.g. "
       "`block 1: router logits (blocks.1.ffn.router)`, or the parameters whose gradients are "
       "not; the last checkpoint is kept"},
      {OnNonfinite::Skip, "skip",
       "skip the step, counted as `skipped_steps` in train records and summary.json; 10 in a "
       "row stop the run"},
  };
  return table;
}

}  // namespace sw
