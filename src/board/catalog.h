// What switch-board serves: the run and sweep directories found under the folders it was
// given, and the one way a request names one of them.
//
// A request names a directory by an id, "<root>/<path under it>" (root: the index of the
// folder on the command line; "0" alone is that folder). resolve_id refuses every id that
// could leave the folder — "..", ".", empty or hidden segments, backslashes, control bytes,
// an absolute path — and, after following symbolic links, any directory that is not inside
// the folder's own real path. The scan never follows a symbolic link either.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace sw {

// The folders served: each one's real path (absolute, symbolic links followed).
struct Roots {
  std::vector<std::string> paths;
  std::vector<std::string> labels;  // the name each shows as: its last path component
};

// Resolves the command line's folders; throws sw::Error naming one that is missing or not
// a directory.
Roots make_roots(const std::vector<std::string>& args);

// The outcome of resolving an id: `status` 200 with the real `path`, else the HTTP status
// to answer (400 malformed id, 403 outside the served folders, 404 no such directory) and
// why.
struct Resolved {
  int status = 200;
  std::string path;
  std::string why;
};
Resolved resolve_id(const Roots& roots, const std::string& id);

// Whether a folder's name can be part of an id: not hidden, valid UTF-8 (names go out as
// JSON), no control bytes, no backslash. Folders with other names are not listed.
bool servable_name(const std::string& name);

// The names of `dir`'s subfolders that can be listed (servable, not links), sorted.
std::vector<std::string> child_folders(const std::string& dir);

// A run directory: config.json beside metrics.jsonl, summary.json or a lock file, all
// regular files (a link is not followed).
bool is_run_dir(const std::string& dir);
// A sweep directory: sweep.json, written by switch-sweep.
bool is_sweep_dir(const std::string& dir);

struct RunRef {
  std::string id, name, dir;
  std::string sweep;  // the id of the sweep it is a point of, else empty
};
struct SweepRef {
  std::string id, name, dir;
  std::vector<std::string> points;  // ids of its runs
};
struct Catalog {
  std::vector<RunRef> runs;
  std::vector<SweepRef> sweeps;
  bool truncated = false;  // more than max_runs runs or too many folders: the rest left out
};

// Finds the runs and sweeps under every root: a root may be a run, a sweep or a folder of
// them (searched three folders deep). Hidden folders (.stale, .points) and symbolic links
// are not entered. Sorted by id.
Catalog scan(const Roots& roots, size_t max_runs);

// training (a process holds the run's lock), finished (summary.json), stopped (neither).
std::string run_status(const std::string& dir);

// Whether a live process holds the flock on `dir`/.lock: the kernel's table of locks
// (/proc/locks) has one on that file's inode, by the PID the lock file names. Takes no
// lock itself, so a writer starting at that moment is never refused because of it.
bool lock_held(const std::string& dir);

// A nested config object as dotted keys ({"model": {"d_model": 64}} -> "model.d_model").
nlohmann::json flatten_config(const nlohmann::json& config);

}  // namespace sw
