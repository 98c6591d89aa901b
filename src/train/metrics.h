// metrics.jsonl: one JSON object per line, appended and flushed record by record, so the
// file stays valid JSON lines if the process dies. Also the per-layer routing statistics
// accumulated between two train records.
#pragma once

#include <cstdio>
#include <string>
#include <vector>

#include <torch/torch.h>
#include <nlohmann/json.hpp>

#include "model/switch_ffn.h"

namespace sw {

class MetricsWriter {
 public:
  MetricsWriter() = default;
  explicit MetricsWriter(const std::string& path);
  ~MetricsWriter();
  MetricsWriter(const MetricsWriter&) = delete;
  MetricsWriter& operator=(const MetricsWriter&) = delete;
  void write(const nlohmann::ordered_json& record);

 private:
  std::string path_;
  std::FILE* f_ = nullptr;
};

// Rewrites metrics.jsonl keeping the records with step <= max_step, dropping a torn last
// line; used on resume so the file matches the checkpoint it continues from.
void truncate_metrics(const std::string& path, int64_t max_step);

// Reads every record of a metrics.jsonl (a torn last line is skipped).
std::vector<nlohmann::json> read_metrics(const std::string& path);

// Sums of MoeStats over the steps since the last train record, one entry per MoE layer.
class RoutingAccumulator {
 public:
  void add(const std::vector<MoeStats>& stats);
  // [{layer, tokens, counts, dropped, prob_sum}, ...], with `rerouted` after dropped when
  // `rerouting` (moe.overflow = reroute).
  nlohmann::ordered_json to_json(bool rerouting = false) const;
  double drop_fraction() const;  // dropped / routed over all MoE layers
  void reset() { layers_.clear(); }
  // Replaces this rank's sums by the sums over all ranks (collective; `rerouting` the same
  // on every rank).
  void sum_over_ranks(Comm& comm, bool rerouting = false);

 private:
  struct Layer {
    int64_t layer = -1;
    int64_t tokens = 0;
    int64_t dropped = 0;
    int64_t rerouted = 0;
    torch::Tensor counts_E, prob_sum_E;
  };
  std::vector<Layer> layers_;
};

}  // namespace sw
