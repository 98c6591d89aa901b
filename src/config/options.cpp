#include "config/options.h"

namespace sw {

template <>
const std::vector<Choice<Activation>>& choices<Activation>() {
  static const std::vector<Choice<Activation>> table = {
      {Activation::Gelu, "gelu", "GELU, exact (erf) form"},
      {Activation::Relu, "relu", "ReLU, as in labml's Switch experiment (configs/labml.json)"},
      {Activation::Swiglu, "swiglu",
       "the gated FFN `(silu(x W_gate) * (x W_up)) W_out`: three matrices, the first two "
       "stored side by side as one input matrix of width 2 x d_ff (gate half first)"},
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

template <>
const std::vector<Choice<Score>>& choices<Score>() {
  static const std::vector<Choice<Score>> table = {
      {Score::Softmax, "softmax",
       "a softmax over the experts; top-1 gates are the winning probability, top-k ones "
       "renormalised over the chosen (Switch, GShard)"},
      {Score::Sigmoid, "sigmoid",
       "an independent sigmoid per expert; the gates are the chosen scores normalised over the "
       "chosen experts, and the balancing losses see the scores normalised over all experts "
       "(DeepSeek-V3)"},
  };
  return table;
}

template <>
const std::vector<Choice<Balance>>& choices<Balance>() {
  static const std::vector<Choice<Balance>> table = {
      {Balance::AuxLoss, "aux_loss",
       "the Switch load-balancing loss `E * sum_i f_i * P_i` (f: fraction of assignments, P: "
       "mean router probability), times `moe.alpha`"},
      {Balance::Bias, "bias",
       "auxiliary-loss-free (DeepSeek-V3): a per-expert bias added to the scores when choosing "
       "experts only, moved by `moe.bias_rate * sign(mean_load - load_i)` after every step "
       "from that step's loads over all micro-batches and ranks; no loss term"},
      {Balance::Variance, "variance",
       "the variance over experts of the mean router probability `P_i`, times `moe.alpha`"},
      {Balance::None, "none", "no balancing term (the Switch loss is still reported)"},
  };
  return table;
}

template <>
const std::vector<Choice<Overflow>>& choices<Overflow>() {
  static const std::vector<Choice<Overflow>> table = {
      {Overflow::Drop, "drop", "an assignment over its expert's capacity is dropped (Switch)"},
      {Overflow::Reroute, "reroute",
       "it goes to the token's next-best expert (by score) that still has room, in the drop "
       "policy's order, and is dropped only when none has"},
  };
  return table;
}

}  // namespace sw
