// A run's metrics.jsonl as switch-board shows it: read incrementally while the run appends
// to it, kept in bounded memory however long the run, and sent downsampled.
//
// Only complete lines are read: a last line without its newline is being written and is
// left for the next read. A complete line that is not a JSON object (a torn write after a
// crash, a hand edit) is counted in `malformed` and skipped. A file that shrank or was
// replaced (another inode) is read again from the start.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace sw {

// Points kept per series: past this, neighbouring points are merged pairwise (means of the
// values, the later step and time), so memory stays bounded and the shape is kept.
inline constexpr size_t kSeriesCap = 8192;
// Columns kept per expert-load heatmap, merged the same way.
inline constexpr size_t kHeatmapCap = 1024;
// The longest line read: a longer one is skipped as malformed.
inline constexpr size_t kMaxLineBytes = size_t{4} << 20;
// Heatmaps kept per run, and experts per heatmap: layers past these are left out.
inline constexpr size_t kMaxLayers = 256;
inline constexpr int64_t kMaxExperts = 4096;

// `v` as JSON, null when it is not finite (absent, or NaN).
nlohmann::json finite_or_null(double v);

// Points of one or more named values over (step, time_s), merged pairwise past a cap.
struct Series {
  std::vector<std::string> names;           // the values' names (loss, lr, ...)
  std::vector<double> step, time_s;         // x of each point
  std::vector<std::vector<double>> values;  // values[k][i]: names[k] at point i (NaN: absent)
  std::vector<int64_t> weight;              // records merged into each point
  size_t cap = kSeriesCap;

  explicit Series(std::vector<std::string> n = {}, size_t c = kSeriesCap);
  // Adds a point; `v` in the order of names. Merges pairwise when the cap is reached.
  void add(double step, double time_s, const std::vector<double>& v);
  size_t size() const { return step.size(); }
  // At most `max_points` points (0: all): consecutive points merged into buckets
  // (weighted means; the bucket's last step and time).
  Series downsampled(size_t max_points) const;
  // downsampled(max_points) as {step, time_s, <name>: [...]};
  // NaN as null.
  nlohmann::json to_json(size_t max_points) const;
};

// The expert load of one MoE layer over training: per train record the fraction of the
// layer's routed assignments each expert received, before dropping.
struct LoadMap {
  int64_t layer = 0;    // block index
  Series series;        // E + 1 unnamed values: each expert's fraction, then the dropped one
  int64_t experts = 0;  // E
};

// Reads one run's metrics.jsonl incrementally.
class MetricsTail {
 public:
  explicit MetricsTail(std::string path);

  // Reads what was appended since the last call (at most `max_bytes` at a time). Returns
  // true when anything changed. A missing file is no error: the series stay empty.
  bool update(size_t max_bytes = size_t{64} << 20);

  // Everything, downsampled to at most `max_points` points a series:
  // {records, malformed, train: {...}, eval: {...}, layers: [{layer, experts,
  // step, time_s, load: [[E fractions] per column], dropped: [...]}]}.
  nlohmann::json to_json(size_t max_points) const;

  // The eval records only: {step, time_s, val_loss, train_loss}.
  nlohmann::json eval_json(size_t max_points) const { return eval_.to_json(max_points); }

  // Changes with every update that read something (and on a restart from the beginning).
  uint64_t version() const { return version_; }
  int64_t records() const { return records_; }
  int64_t malformed() const { return malformed_; }
  // The newest train and eval figures, for the list of runs (NaN / -1 when none yet).
  int64_t last_step() const { return last_step_; }
  double last_time_s() const { return last_time_; }
  double last_val() const { return last_val_; }
  double best_val() const { return best_val_; }
  double last_train_loss() const { return last_loss_; }
  double last_tokens_per_s() const { return last_tok_s_; }
  double last_lr() const { return last_lr_; }

 private:
  void reset();
  void take_line(const char* begin, const char* end);
  void take_record(const char* begin, const char* end);
  void take_train(const nlohmann::json& r, double step, double t);

  std::string path_;
  uint64_t inode_ = 0;
  uint64_t offset_ = 0;
  uint64_t version_ = 0, generation_ = 0;
  int64_t records_ = 0, malformed_ = 0;
  bool skipping_long_line_ = false;
  Series train_, eval_;
  std::vector<LoadMap> layers_;
  int64_t last_step_ = -1;
  double last_time_, last_val_, best_val_, last_loss_, last_tok_s_, last_lr_;
};

}  // namespace sw
