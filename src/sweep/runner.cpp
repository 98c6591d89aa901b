#include "sweep/runner.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <thread>

#include <fmt/format.h>

#include "train/metrics.h"
#include "util/dir_lock.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/json_depth.h"
#include "util/process.h"

extern char** environ;

namespace sw {
namespace fs = std::filesystem;

namespace {

using ojson = nlohmann::ordered_json;

// Starts `argv` with stdout and stderr appended to `log`, in its own process group (so a
// terminal's Ctrl-C reaches it once, forwarded by the sweep).
pid_t spawn(std::vector<std::string> argv, const std::string& log) {
  const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) throw Error(fmt::format("cannot open '{}': {}", log, std::strerror(errno)));
  std::vector<char*> args = c_strings(argv);
  const pid_t pid = fork();
  if (pid < 0) {
    ::close(fd);
    throw Error(fmt::format("cannot fork: {}", std::strerror(errno)));
  }
  if (pid == 0) {
    setpgid(0, 0);
    dup2(fd, STDOUT_FILENO);
    dup2(fd, STDERR_FILENO);
    execve(args[0], args.data(), environ);
    const char msg[] = "switch-sweep: cannot start switch-train\n";
    (void)!write(STDERR_FILENO, msg, sizeof msg - 1);
    _exit(127);
  }
  ::close(fd);
  return pid;
}

std::string last_line(const std::string& path) {
  std::string text;
  try {
    text = read_file(path, "log");
  } catch (const Error&) {
    return "";
  }
  while (!text.empty() && text.back() == '\n')
    text.pop_back();
  const size_t nl = text.rfind('\n');
  return nl == std::string::npos ? text : text.substr(nl + 1);
}

std::string fmt_num(const ojson& v, const char* spec) {
  if (v.is_null()) return "";
  return fmt::format(fmt::runtime(spec), v.get<double>());
}

// Params as "0.82 M".
std::string fmt_params(const ojson& v) {
  if (v.is_null()) return "";
  return fmt::format("{:.2f} M", v.get<double>() / 1e6);
}

}  // namespace

nlohmann::ordered_json val_at_time(const std::string& run_dir, double t_s) {
  ojson out = {{"step", nullptr}, {"time_s", nullptr}, {"val_loss", nullptr}};
  const fs::path metrics = fs::path(run_dir) / "metrics.jsonl";
  if (!fs::exists(metrics)) return out;
  for (const auto& r : read_metrics(metrics.string())) {
    if (r.value("kind", "") != "eval" || !r.contains("val_loss")) continue;
    const double t = r.value("time_s", std::numeric_limits<double>::infinity());
    if (t > t_s) continue;
    out = {{"step", r["step"]}, {"time_s", t}, {"val_loss", r["val_loss"]}};
  }
  return out;
}

nlohmann::ordered_json summarize_run(const std::string& run_dir) {
  ojson out = {{"final_train_loss", nullptr}, {"final_val_loss", nullptr},
               {"best_val_loss", nullptr},    {"drop_frac", nullptr},
               {"load_cv", nullptr},          {"tokens_per_s", nullptr},
               {"wall_s", nullptr},           {"steps", nullptr},
               {"params_total", nullptr},     {"params_active", nullptr}};
  const fs::path summary = fs::path(run_dir) / "summary.json";
  if (fs::exists(summary)) {
    const nlohmann::json s = parse_json_text(
        read_file(summary.string(), "run summary", kMaxJsonFileBytes), summary.string());
    for (const char* k : {"final_train_loss", "final_val_loss", "best_val_loss", "tokens_per_s",
                          "wall_s", "steps", "params_total", "params_active"})
      if (s.contains(k)) out[k] = s[k];
  }
  const fs::path metrics = fs::path(run_dir) / "metrics.jsonl";
  if (!fs::exists(metrics)) return out;
  double drop = 0, steps = 0;
  std::vector<std::vector<double>> load;  // per layer, per expert: assignments routed
  for (const auto& r : read_metrics(metrics.string())) {
    if (r.value("kind", "") != "train") continue;
    const double n = r.value("steps_in_record", 1.0);
    drop += r.value("drop_frac", 0.0) * n;
    steps += n;
    if (!r.contains("layers")) continue;
    const auto& layers = r["layers"];  // read_metrics checked its shape and types
    load.resize(std::max(load.size(), layers.size()));
    for (size_t l = 0; l < layers.size(); ++l) {
      if (!layers[l].contains("counts")) continue;
      const auto& counts = layers[l]["counts"];
      load[l].resize(std::max(load[l].size(), counts.size()));
      for (size_t e = 0; e < counts.size(); ++e)
        load[l][e] += counts[e].get<double>();
    }
  }
  if (steps > 0) out["drop_frac"] = drop / steps;
  double cv_sum = 0;
  int layers = 0;
  for (const auto& l : load) {
    if (l.size() < 2) continue;
    double mean = 0, var = 0;
    for (double c : l)
      mean += c;
    mean /= static_cast<double>(l.size());
    for (double c : l)
      var += (c - mean) * (c - mean);
    var /= static_cast<double>(l.size());
    if (mean > 0) {
      cv_sum += std::sqrt(var) / mean;
      ++layers;
    }
  }
  if (layers > 0) out["load_cv"] = cv_sum / layers;
  return out;
}

const char* to_string(PointState s) {
  switch (s) {
    case PointState::Fresh:
      return "new";
    case PointState::Done:
      return "done";
    case PointState::Resume:
      return "resume";
    case PointState::Changed:
      return "changed";
  }
  return "?";
}

PointState point_state(const SweepPoint& p, const std::string& run_dir) {
  const fs::path cfg_path = fs::path(run_dir) / "config.json";
  if (!fs::exists(cfg_path)) return PointState::Fresh;
  Config existing;
  try {
    apply_file(existing, cfg_path.string());
  } catch (const Error&) {
    return PointState::Changed;
  }
  if (comparable_config(existing) != comparable_config(p.config)) return PointState::Changed;
  const fs::path summary = fs::path(run_dir) / "summary.json";
  if (fs::exists(summary)) {
    try {
      const auto s = parse_json_text(read_file(summary.string(), "run summary", kMaxJsonFileBytes),
                                     summary.string());
      if (s.value("steps", int64_t{-1}) == p.config.train.steps) return PointState::Done;
    } catch (const std::exception&) {
    }
  }
  return PointState::Resume;
}

namespace {

// Runs a sweep's points as switch-train processes, at most opt.jobs at once.
class SweepRunner {
 public:
  SweepRunner(const Sweep& s, const SweepOptions& opt) : s_(s), opt_(opt) {
    cores_ = opt.cores > 0 ? opt.cores : std::max<int64_t>(1, std::thread::hardware_concurrency());
    jobs_ = std::max(1, opt.jobs);
    threads_ = std::max<int64_t>(1, cores_ / jobs_);
  }

  // Returns how many points failed; *stopped: the stop signal forwarded, else 0.
  int run(int* stopped) {
    *stopped = 0;
    fs::create_directories(fs::path(opt_.out_dir) / ".points");
    write_file_atomic((fs::path(opt_.out_dir) / "sweep.json").string(),
                      read_file(s_.path, "sweep file"));
    int forwarded = 0;
    size_t next = 0;
    while (next < s_.points.size() || !running_.empty()) {
      const int sig = opt_.stop ? opt_.stop->load() : 0;
      if (sig != 0 && sig != forwarded) {  // forward each new request once
        for (const auto& [pid, _] : running_)
          kill(pid, sig);
        forwarded = sig;
        *stopped = sig;
      }
      while (*stopped == 0 && next < s_.points.size() &&
             static_cast<int>(running_.size()) < jobs_ && !source_running(next))
        launch(next++);
      if (running_.empty()) break;
      wait_one(*stopped != 0);
    }
    return failed_;
  }

 private:
  struct Running {
    size_t index;
    std::chrono::steady_clock::time_point start;
  };

  void say(const std::string& line) const {
    if (!opt_.quiet) std::cout << line << std::endl;
  }
  std::string label(size_t i) const {
    return fmt::format("[{}/{}] {}", i + 1, s_.points.size(), s_.points[i].name);
  }
  std::string dir_of(size_t i) const {
    return (fs::path(opt_.out_dir) / s_.points[i].name).string();
  }
  // Whether point i upcycles a point that is still training (it then waits).
  bool source_running(size_t i) const {
    const int64_t src = s_.points[i].init_from;
    if (src < 0) return false;
    for (const auto& [pid, r] : running_)
      if (r.index == static_cast<size_t>(src)) return true;
    return false;
  }

  // A point another process writes (a switch-train started in it by hand) is left alone:
  // not moved aside, no log opened in it. The probe's lock is held while the sweep moves or
  // prepares the folder, and handed to the point's own switch-train when it starts.
  std::optional<DirLock> probe(size_t i) {
    if (!fs::exists(dir_of(i))) return DirLock();
    try {
      return DirLock::acquire(dir_of(i), "run directory",
                              "the sweep leaves this point alone; run the sweep again when "
                              "that process is done");
    } catch (const Error& e) {
      ++failed_;
      say(fmt::format("{}: FAILED: {}", label(i), e.what()));
      return std::nullopt;
    }
  }

  // The command line of a point that starts afresh: a directory of another config moved
  // aside first, the point's config written for it.
  void fresh_args(size_t i, PointState st, int64_t threads, std::vector<std::string>& argv) {
    const SweepPoint& p = s_.points[i];
    if (st == PointState::Changed) {
      const fs::path stale = fs::path(opt_.out_dir) / ".stale" /
                             fmt::format("{}-{}", p.name, static_cast<int64_t>(std::time(nullptr)));
      fs::create_directories(stale.parent_path());
      fs::rename(dir_of(i), stale);
      say(fmt::format("{}: its directory held another config; moved to {}", label(i),
                      stale.string()));
    }
    const std::string cfg = (fs::path(opt_.out_dir) / ".points" / (p.name + ".json")).string();
    write_file_atomic(cfg, to_json(p.config).dump(2) + "\n");
    argv.insert(argv.end(), {"--config=" + cfg, fmt::format("--set=train.threads={}", threads)});
    if (p.init_from >= 0) argv.push_back("--init-from=" + dir_of(static_cast<size_t>(p.init_from)));
  }

  void launch(size_t i) {
    const SweepPoint& p = s_.points[i];
    const std::string dir = dir_of(i);
    const PointState st = point_state(p, dir);
    if (st == PointState::Done) return say(label(i) + ": already done, skipped");
    if (p.init_from >= 0 && st != PointState::Resume &&
        !fs::exists(fs::path(dir_of(static_cast<size_t>(p.init_from))) / "summary.json")) {
      ++failed_;
      return say(fmt::format("{}: FAILED: it starts from point '{}', which did not finish",
                             label(i), s_.points[static_cast<size_t>(p.init_from)].name));
    }
    std::optional<DirLock> lock = probe(i);
    if (!lock) return;
    // One job: the point's own thread count (0: every core); several: the cores shared out.
    const int64_t t = jobs_ > 1                    ? threads_
                      : p.config.train.threads > 0 ? p.config.train.threads
                                                   : cores_;
    // Paths as "--key=value", one argument each: a name starting with '-' is no option.
    std::vector<std::string> argv = {opt_.train_exe, "-q", "--out=" + dir};
    int64_t shown_threads = t;
    if (st == PointState::Resume) {
      // With the thread count it started with, so that it ends as a straight run would.
      argv.push_back("--resume");
      Config started;
      apply_file(started, (fs::path(dir) / "config.json").string());
      shown_threads = started.train.threads > 0 ? started.train.threads : cores_;
    } else {
      fresh_args(i, st, t, argv);
    }
    fs::create_directories(dir);
    lock.reset();  // released just before the point's switch-train takes it
    const pid_t pid = spawn(argv, (fs::path(dir) / "train.log").string());
    running_[pid] = {i, std::chrono::steady_clock::now()};
    say(fmt::format("{}: {} ({} thread{})", label(i),
                    st == PointState::Resume ? "resuming from its checkpoint" : "training",
                    shown_threads, shown_threads == 1 ? "" : "s"));
  }

  // Waits for one point's process and reports how it ended.
  void wait_one(bool stopping) {
    int status = 0;
    const pid_t pid = waitpid(-1, &status, 0);
    if (pid < 0) {
      if (errno == EINTR) return;
      throw Error(fmt::format("waiting for a point: {}", std::strerror(errno)));
    }
    auto it = running_.find(pid);
    if (it == running_.end()) return;
    const size_t i = it->second.index;
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - it->second.start).count();
    running_.erase(it);
    const std::string dir = dir_of(i);
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    if (code == 0) {
      const ojson r = summarize_run(dir);
      say(fmt::format("{}: done in {:.0f} s | val loss {} | {} tok/s", label(i), secs,
                      fmt_num(r["final_val_loss"], "{:.4f}"),
                      fmt_num(r["tokens_per_s"], "{:.0f}")));
    } else if (stopping && (code == 130 || code == 143)) {
      say(fmt::format("{}: stopped with a checkpoint; run the sweep again to resume it", label(i)));
    } else {
      ++failed_;
      say(fmt::format("{}: FAILED (exit {}): {} (log: {}/train.log)", label(i), code,
                      last_line(dir + "/train.log"), dir));
    }
  }

  const Sweep& s_;
  const SweepOptions& opt_;
  int64_t cores_ = 1, threads_ = 1;
  int jobs_ = 1;
  std::map<pid_t, Running> running_;
  int failed_ = 0;
};

// One row per point: its state, overrides and run figures, and its val loss at the equal
// wall time (the shortest finished run's); returns that time (infinity: none finished).
double summary_rows(const Sweep& s, const std::string& out_dir, std::vector<ojson>& rows) {
  for (const auto& p : s.points) {
    const std::string dir = (fs::path(out_dir) / p.name).string();
    ojson row = {{"point", p.name}};
    const PointState st = point_state(p, dir);
    // A point that left only its train.log failed before its run began (a bad data file).
    const bool failed = st == PointState::Fresh && fs::exists(fs::path(dir) / "train.log");
    row["status"] = st == PointState::Done     ? "done"
                    : st == PointState::Resume ? "incomplete"
                    : failed                   ? "failed"
                    : st == PointState::Fresh  ? "not run"
                                               : "stale";
    row["overrides"] = p.overrides;
    ojson r = st == PointState::Fresh || st == PointState::Changed ? summarize_run("/nonexistent")
                                                                   : summarize_run(dir);
    for (auto& [k, v] : r.items())
      row[k] = v;
    rows.push_back(std::move(row));
  }
  double equal_s = std::numeric_limits<double>::infinity();
  for (const auto& r : rows)
    if (r["status"] == "done" && !r["wall_s"].is_null())
      equal_s = std::min(equal_s, r["wall_s"].get<double>());
  for (size_t i = 0; i < rows.size(); ++i) {
    rows[i]["val_at_equal_time"] = nullptr;
    rows[i]["step_at_equal_time"] = nullptr;
    if (!std::isfinite(equal_s)) continue;
    const ojson at =
        val_at_time((fs::path(out_dir) / s.points[i].name).string(), equal_s * (1 + 1e-9));
    rows[i]["val_at_equal_time"] = at["val_loss"];
    rows[i]["step_at_equal_time"] = at["step"];
  }
  return equal_s;
}

std::string cell(const ojson& v) {
  return v.is_string() ? v.get<std::string>() : v.dump();
}

std::string markdown_table(const std::vector<ojson>& rows, const std::vector<std::string>& keys,
                           double equal_s) {
  std::string md = "| # | point | ";
  for (const auto& k : keys)
    md += k + " | ";
  const std::string at_col =
      std::isfinite(equal_s) ? fmt::format("val @ {:.0f} s (step)", equal_s) : "val @ equal time";
  md += "best val | final val | " + at_col +
        " | final train | dropped % | load CV | tokens/s | wall s | params active / total | "
        "status |\n|";
  for (size_t i = 0; i < keys.size() + 12; ++i)
    md += "---|";
  md += "\n";
  for (size_t i = 0; i < rows.size(); ++i) {
    const ojson& r = rows[i];
    md += fmt::format("| {} | {} | ", i + 1, r["point"].get<std::string>());
    for (const auto& k : keys)
      md += (r["overrides"].contains(k) ? cell(r["overrides"][k]) : "") + " | ";
    const ojson& drop = r["drop_frac"];
    const std::string at = r["val_at_equal_time"].is_null()
                               ? ""
                               : fmt::format("{:.4f} ({})", r["val_at_equal_time"].get<double>(),
                                             r["step_at_equal_time"].get<int64_t>());
    const std::string params =
        r["params_active"].is_null()
            ? ""
            : fmt_params(r["params_active"]) + " / " + fmt_params(r["params_total"]);
    md += fmt::format("{} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                      fmt_num(r["best_val_loss"], "{:.4f}"), fmt_num(r["final_val_loss"], "{:.4f}"),
                      at, fmt_num(r["final_train_loss"], "{:.4f}"),
                      drop.is_null() ? "" : fmt::format("{:.2f}", 100.0 * drop.get<double>()),
                      fmt_num(r["load_cv"], "{:.3f}"), fmt_num(r["tokens_per_s"], "{:.0f}"),
                      fmt_num(r["wall_s"], "{:.0f}"), params, r["status"].get<std::string>());
  }
  return md;
}

std::string csv_table(const std::vector<ojson>& rows, const std::vector<std::string>& keys) {
  static const char* const kFigures[] = {"best_val_loss",
                                         "final_val_loss",
                                         "final_train_loss",
                                         "drop_frac",
                                         "load_cv",
                                         "tokens_per_s",
                                         "wall_s",
                                         "steps",
                                         "params_total",
                                         "params_active",
                                         "val_at_equal_time",
                                         "step_at_equal_time"};
  std::string csv = "point,status";
  for (const auto& k : keys)
    csv += "," + k;
  for (const char* k : kFigures)
    csv += std::string(",") + k;
  csv += "\n";
  for (const ojson& r : rows) {
    csv += r["point"].get<std::string>() + "," + r["status"].get<std::string>();
    for (const auto& k : keys)
      csv += "," + (r["overrides"].contains(k) ? cell(r["overrides"][k]) : "");
    for (const char* k : kFigures)
      csv += "," + (r[k].is_null() ? std::string() : r[k].dump());
    csv += "\n";
  }
  return csv;
}

}  // namespace

int run_sweep(const Sweep& s, const SweepOptions& opt, int* stopped) {
  return SweepRunner(s, opt).run(stopped);
}

std::string write_sweep_summary(const Sweep& s, const std::string& out_dir) {
  // The columns: every key some point overrides, in first-seen order.
  std::vector<std::string> keys;
  for (const auto& p : s.points)
    for (const auto& [k, _] : p.overrides.items())
      if (std::find(keys.begin(), keys.end(), k) == keys.end()) keys.push_back(k);
  std::vector<ojson> rows;
  const double equal_s = summary_rows(s, out_dir, rows);
  auto key_of = [](const ojson& r) {
    return r["best_val_loss"].is_null() ? std::numeric_limits<double>::infinity()
                                        : r["best_val_loss"].get<double>();
  };
  std::stable_sort(rows.begin(), rows.end(),
                   [&](const ojson& a, const ojson& b) { return key_of(a) < key_of(b); });
  const std::string md = markdown_table(rows, keys, equal_s);
  const ojson summary = {{"sweep", s.path},
                         {"equal_time_s", std::isfinite(equal_s) ? ojson(equal_s) : ojson()},
                         {"points", rows}};
  write_file_atomic((fs::path(out_dir) / "summary.json").string(), summary.dump(2) + "\n");
  write_file_atomic((fs::path(out_dir) / "summary.csv").string(), csv_table(rows, keys));
  write_file_atomic((fs::path(out_dir) / "summary.md").string(), md);
  return md;
}

}  // namespace sw
