#include "train/run_dir.h"

#include <ctime>
#include <filesystem>

#include <fmt/format.h>

#include "util/error.h"
#include "util/fs.h"

namespace sw {
namespace fs = std::filesystem;

std::string default_run_dir() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y%m%d-%H%M%S", &tm);
  return std::string("runs/") + buf;
}

void create_run_dir(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir))
    throw Error(fmt::format("cannot create run directory '{}': {}", dir,
                            ec ? ec.message() : "not a directory"));
}

DirLock lock_run_dir(const std::string& dir) {
  return DirLock::acquire(
      dir, "run directory",
      fmt::format("two processes cannot write one run. Wait for it to finish, stop it "
                  "(its checkpoint lets 'switch-train --out {} --resume' go on), or train "
                  "into another --out",
                  dir));
}

void check_new_run_dir(const std::string& dir) {
  if (fs::exists(fs::path(dir) / "config.json") || fs::exists(fs::path(dir) / "metrics.jsonl"))
    throw Error(
        fmt::format("run directory '{}' already holds a run; continue it with "
                    "'switch-train --out {} --resume' or choose another --out",
                    dir, dir));
  // A new run starts in an empty folder (its lock and a sweep's train.log aside): old
  // checkpoints or foreign files there would be taken for the run's own, or pruned.
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    if (name != ".lock" && name != "train.log")
      throw Error(
          fmt::format("'{}' is not empty and holds no run ('{}' is there): a new run "
                      "needs a new or empty --out",
                      dir, name));
  }
}

void write_config_file(const std::string& run_dir, const Config& cfg) {
  write_file_atomic((fs::path(run_dir) / "config.json").string(), to_json(cfg).dump(2) + "\n");
}

Config resume_config(const std::string& run_dir) {
  const std::string path = (fs::path(run_dir) / "config.json").string();
  if (!fs::exists(path))
    throw Error(fmt::format("--resume: '{}' is not a run directory (no config.json)", run_dir));
  Config c;
  apply_file(c, path);
  return c;
}

}  // namespace sw
