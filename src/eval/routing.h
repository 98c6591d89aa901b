// What each expert receives: for every MoE layer, which characters the router sends to
// which expert (a characters x experts table), how sure it is (entropy), the load per
// expert and the tokens each expert is most sure of. Built from evaluation passes
// (evaluate_shares' observer), one slot per pass, combined in slot order: the result does
// not depend on the order the passes ran in.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "data/vocab.h"
#include "model/transformer.h"

namespace sw {

// A token an expert is sure of: the character and the window's characters before it.
struct SureToken {
  double prob = 0;     // the router's probability of the expert for it
  std::string before;  // UTF-8, up to `context` characters
  std::string token;   // UTF-8, the character
};

struct LayerRouting {
  int64_t layer = -1;       // the transformer block
  torch::Tensor counts_VE;  // int64: the router's assignments of each character to each expert
  double entropy_sum = 0;   // of the router's distribution over the experts, bits, over tokens
  int64_t tokens = 0;
  std::vector<std::vector<SureToken>> sure;  // per expert, surest first
};

class RoutingAnalysis {
 public:
  RoutingAnalysis(Vocab vocab, int64_t n_experts, int64_t top_k, int64_t top_tokens,
                  int64_t context = 16);

  // Slots for `passes` passes (evaluate_shares runs batches x shares).
  void reserve(size_t passes) { slots_.assign(passes, {}); }
  // Records pass `slot`: its inputs and the model's output. One thread per slot.
  void observe(size_t slot, const torch::Tensor& x_BS, const ModelOutput& out);

  // The passes combined, one entry per MoE layer.
  std::vector<LayerRouting> combine() const;

  // routing.json: the characters by frequency (with readable labels) and per layer the
  // fraction of each character's assignments that went to each expert (each row sums to 1),
  // the load, the mean entropy, the mutual information between character and expert, each
  // expert's commonest characters and surest tokens.
  nlohmann::ordered_json json(const std::vector<LayerRouting>& layers) const;

 private:
  Vocab vocab_;
  int64_t experts_, top_k_, top_tokens_, context_;
  std::vector<std::vector<LayerRouting>> slots_;
};

// A character as a label: ' ' is "␣", a newline "\n" and a tab "\t" spelled out, other
// control characters their U+ code, the rest themselves.
std::string char_label(char32_t c);

}  // namespace sw
