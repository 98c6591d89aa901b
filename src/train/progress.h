// What a run reports as it goes: the train records of metrics.jsonl and the progress lines,
// each averaging the steps since the last one (an Interval), and the human-readable counts
// and durations they print.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "config/config.h"
#include "train/metrics.h"
#include "train/step.h"

namespace sw {

// "1.23M", "45.6k", "789".
std::string human_count(double v);
// "1h02m", "3m04s", "5s".
std::string human_duration(double seconds);

// The steps since the last train record. Times count every step; the losses and routing
// statistics only the applied ones (a skipped step's values stay out of the averages).
struct Interval {
  RoutingAccumulator routing;
  double ce = 0, lb = 0, z = 0, balance = 0;
  double step_s = 0, forward_s = 0, backward_s = 0, optimizer_s = 0;
  CommStats comm;     // this rank's collectives in the interval's steps
  int64_t steps = 0;  // applied steps
  double lr = 0;      // of the last step
  double grad_norm = 0;

  void add(const StepResult& s);
};

// The train record of `in` ending at `step` (routing already summed over the ranks).
// `comm`: add rank 0's collectives per step.
nlohmann::ordered_json train_record(const Interval& in, const MoeConfig& moe, int64_t step,
                                    double time_s, int64_t tokens_per_step, int64_t skipped_steps,
                                    bool comm);

// "step 120/2000 | loss 2.3100 | lb 1.020 | drop 0.8% | lr 9.90e-04 | 41 ms | 18.7k tok/s |
// eta 1m12s"
std::string progress_line(const Interval& in, int64_t step, int64_t steps, int64_t tokens_per_step,
                          double eta_s);

}  // namespace sw
