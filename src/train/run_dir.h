// The run directory's life outside the training loop: its default name, its lock (one
// writer per run), the checks that keep a new run from landing on an old one, and its
// config.json.
#pragma once

#include <string>

#include "config/config.h"
#include "util/dir_lock.h"

namespace sw {

// A default run directory name: runs/<YYYYmmdd-HHMMSS>.
std::string default_run_dir();

// Creates `dir` (and its parents); throws sw::Error naming it when that fails.
void create_run_dir(const std::string& dir);

// Takes the run directory's lock, or throws sw::Error naming the process that holds it.
DirLock lock_run_dir(const std::string& dir);

// Throws sw::Error unless `dir` may hold a new run: no config.json or metrics.jsonl there
// (that is a run: resume it), and nothing else but its lock and a sweep's train.log.
void check_new_run_dir(const std::string& dir);

// Writes <run_dir>/config.json (atomically).
void write_config_file(const std::string& run_dir, const Config& cfg);

// The config of an existing run directory (its config.json), for --resume.
Config resume_config(const std::string& run_dir);

}  // namespace sw
