// switch-eval's measurements of one checkpoint of a trained run, without training it: the
// loss and bits per character on the run's own evaluation batches (reproducing the val_loss
// it recorded) or on any text; the capacity curve (the same checkpoint under other
// evaluation capacity factors, dropless and other drop policies); what each expert receives
// (eval/routing.h); the logits of one window, for checking other implementations.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/options.h"

namespace sw {

enum class EvalSplit { Val, Train, Test, All };

struct EvalOptions {
  std::string run_dir;
  int64_t step = -1;               // the checkpoint; < 0: the newest complete one
  std::string data_file;           // "": the run's data.path
  bool skip_unknown = false;       // drop characters outside the vocabulary instead of refusing
  std::optional<EvalSplit> split;  // default: val, or all with data_file
  std::optional<int64_t> batches;  // N fixed batches; 0: every window; default: the run's
                                   // train.eval_batches for a split, every window for all
  std::vector<std::optional<double>> capacity_factors;  // the curve; nullopt: dropless
  std::vector<DropPolicy> drop_policies;                // the curve's policies
  bool routing = false;
  int64_t top_tokens = 3;             // surest tokens shown per expert
  std::string logits_file;            // "": none
  std::optional<std::string> prompt;  // the logits' window; default the text's first
};

// "0.5,1,1.25,2,none" (--capacity-factors): positive numbers and "none" (dropless).
// Throws sw::Error naming the item that is neither, and what is accepted.
std::vector<std::optional<double>> parse_capacity_factors(const std::string& list);
// "random,position" (--drop-policies): names of moe.drop_policy.
std::vector<DropPolicy> parse_drop_policies(const std::string& list);
// "val" | "train" | "test" | "all" (--split); "all" | N > 0 (--batches, "all" as 0).
EvalSplit parse_split(const std::string& s);
int64_t parse_batches(const std::string& s);

// Everything `opt` asks for, as one JSON document (what `switch-eval --json` prints):
// "checkpoint", "data", "settings", "loss", "bits_per_char", "layers"; and as asked,
// "capacity_curve", "routing", "logits". Throws sw::Error on bad input, naming it.
nlohmann::ordered_json evaluate_checkpoint(const EvalOptions& opt);

// The document as the text switch-eval prints: the loss, a line per MoE layer, the curve
// as a table, and per layer each expert's load, commonest characters and surest token.
std::string eval_report(const nlohmann::ordered_json& doc);

}  // namespace sw
