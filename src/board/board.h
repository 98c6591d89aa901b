// switch-board's answers, apart from HTTP: the list of runs and sweeps, one run's series,
// one sweep's curves. Every answer reads the files again (only what was appended, for
// metrics.jsonl), so it shows what is on disk now; nothing is ever written.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include <nlohmann/json.hpp>

#include "board/catalog.h"
#include "board/series.h"

namespace sw {

// An HTTP answer: status and JSON body.
struct Reply {
  int status = 200;
  nlohmann::json body;
};

class Board {
 public:
  explicit Board(Roots roots, size_t max_runs = 2000);

  // GET /api/runs: {roots, truncated, runs: [...], diff_keys, sweeps: [...]}.
  Reply runs();
  // GET /api/run?id=ID&max=N&have=V: the run's series downsampled to N points, or
  // {unchanged: true} when its version is still V.
  Reply run(const std::string& id, size_t max_points, const std::string& have);
  // GET /api/sweep?id=ID: every point's val loss over steps and wall time.
  Reply sweep(const std::string& id, size_t max_points);

  const Roots& roots() const { return roots_; }

 private:
  struct Cached {
    std::unique_ptr<MetricsTail> tail;
    nlohmann::json config;  // flattened; {} when unreadable
    nlohmann::json summary;
    int64_t config_mtime = -1, summary_mtime = -1;
  };
  Cached& refresh(const std::string& dir);
  // A run's version as the page sees it: this process's epoch (so that a page left open
  // across a restart of the board never takes a changed run for unchanged) and its count.
  std::string version_of(const Cached& c) const;
  nlohmann::json run_info(const RunRef& ref, Cached& c);

  Roots roots_;
  size_t max_runs_;
  std::string epoch_;
  std::mutex mu_;
  std::map<std::string, Cached> cache_;  // by real directory
};

}  // namespace sw
