// Running a sweep: every point in its own switch-train process (so --jobs N can give each
// its share of the cores), finished points skipped, interrupted ones resumed from their
// checkpoints, changed ones rerun; then the summary table.
#pragma once

#include <atomic>
#include <string>

#include <nlohmann/json.hpp>

#include "sweep/sweep.h"

namespace sw {

struct SweepOptions {
  std::string out_dir;                     // <out>/<point name>/ per point
  std::string train_exe;                   // the switch-train binary
  int jobs = 1;                            // points trained at once
  int64_t cores = 0;                       // shared out over the jobs (0: this machine's)
  bool quiet = false;                      // no progress lines
  const std::atomic<int>* stop = nullptr;  // a signal number: stop launching, forward it
};

// What a sweep's table shows of one finished (or partial) run directory: the run's
// summary.json keys, plus from metrics.jsonl the mean dropped fraction over training
// (weighted by steps) and `load_cv`, the coefficient of variation (std / mean) of the
// tokens routed to each expert over the whole run, averaged over MoE layers (null for a
// dense model). Missing files give nulls.
nlohmann::ordered_json summarize_run(const std::string& run_dir);

// The run's newest eval record at or before `t_s` seconds of its wall time (evaluations
// included): {step, time_s, val_loss}, nulls when there is none.
nlohmann::ordered_json val_at_time(const std::string& run_dir, double t_s);

// What run_sweep will do with a point, from what its directory holds.
enum class PointState {
  Fresh,    // nothing there yet
  Done,     // finished with this point's config: skipped
  Resume,   // started with this point's config: resumed from its newest checkpoint
  Changed,  // holds a run of another config: moved to <out>/.stale/ and rerun
};
PointState point_state(const SweepPoint& p, const std::string& run_dir);
const char* to_string(PointState s);

// Runs the sweep's points and returns how many failed (a failed point does not stop the
// others; its output is in <run>/train.log). When opt.stop is raised it launches no more
// points, forwards the signal to the running ones (they checkpoint and exit) and returns
// once they have; *stopped then holds the signal (else 0).
int run_sweep(const Sweep& s, const SweepOptions& opt, int* stopped);

// Writes <out>/summary.json, summary.csv and summary.md from the points' run directories
// (sorted by best val loss, unfinished points last) and returns the markdown table. Besides
// each run's own figures, a row has its val loss at equal wall time: at the wall time of the
// shortest finished run (`equal_time_s`), the newest eval by then (`val_at_equal_time`,
// `step_at_equal_time`) — the comparison for points that differ in speed.
std::string write_sweep_summary(const Sweep& s, const std::string& out_dir);

}  // namespace sw
