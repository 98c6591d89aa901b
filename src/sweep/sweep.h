// Hyperparameter sweeps: a JSON file names a base config, overrides for every point, a grid
// (cartesian product), named variants and seeds; every point gets a readable name from its
// overrides and is validated before anything runs. Also the per-run summary a sweep's table
// is made of.
//
//   {
//     "base": "../default.json",             // a config file (relative to this file) or
//                                            // an inline config object; default: built-in
//     "set": {"train.steps": 1000},          // overrides for every point
//     "grid": {"moe.capacity_factor": [1.0, 1.25, 2.0], "moe.drop_tokens": [true, false]},
//     "variants": [{"name": "dense", "set": {"moe.every": 0}}, {"name": "switch"},
//                  {"name": "upcycled", "init_from": "dense"}],   // --init-from that
//                                            // variant's point of the same grid values and
//                                            // seed (an earlier variant; runs after it)
//     "seeds": [1337, 1338]
//   }
#pragma once

#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "config/config.h"

namespace sw {

struct SweepPoint {
  std::string name;                  // directory name: variant, grid values, seed
  nlohmann::ordered_json overrides;  // dotted key -> value: what distinguishes this point
  Config config;                     // base + set + variant + grid values + seed, validated
  int64_t init_from = -1;            // index of the point whose run this one upcycles, or -1
};

struct Sweep {
  std::string path;                    // the sweep file
  std::vector<std::string> grid_keys;  // in the file's order
  bool has_variants = false, has_seeds = false;
  std::vector<SweepPoint> points;
};

// Reads, expands and validates a sweep file. Every error names the file, and for a point
// that fails validation the point (number and name) and the key.
// `sets` ("key=value", as switch-train's --set) apply to every point, after the file's
// own values.
Sweep load_sweep(const std::string& path, const std::vector<std::string>& sets = {});

// The same from the file's text (`source` names it in errors, `dir` resolves a base path).
Sweep parse_sweep(const std::string& text, const std::string& source, const std::string& dir,
                  const std::vector<std::string>& sets = {});

// The same config with train.threads cleared: what decides whether a run directory already
// holds a point (the thread count changes speed, not results).
nlohmann::json comparable_config(const Config& c);

}  // namespace sw
