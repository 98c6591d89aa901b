// switch-sweep: runs every point of a sweep file, resumable, then writes a summary table and
// the pictures. CLI wiring only.
#include <signal.h>

#include <atomic>
#include <filesystem>
#include <iostream>

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include "sweep/runner.h"
#include "sweep/sweep.h"
#include "util/dir_lock.h"
#include "util/error.h"
#include "util/main_guard.h"
#include "util/plot.h"
#include "util/process.h"

namespace fs = std::filesystem;

namespace {

std::atomic<int> g_stop{0};
void on_signal(int sig) {
  g_stop.store(sig);
}

struct Args {
  std::string file, out_dir;
  std::vector<std::string> sets;
  int jobs = 1;
  bool dry_run = false, summary_only = false, no_plot = false, quiet = false;
};

void add_options(CLI::App& app, Args& a) {
  app.add_option("FILE", a.file, "sweep file (JSON)")->required()->check(CLI::ExistingFile);
  app.add_option("--out", a.out_dir, "where the runs go (default runs/<sweep file name>)");
  app.add_option("--set", a.sets, "override a key in every point: --set train.steps=1000")
      ->type_name("KEY=VALUE");
  app.add_option("--jobs", a.jobs, "points trained at once; the cores are shared out")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_flag("--dry-run", a.dry_run, "list the points and exit");
  app.add_flag("--summary", a.summary_only, "only (re)write the summary and plots of the runs");
  app.add_flag("--no-plot", a.no_plot, "do not draw the pictures");
  app.add_flag("-q,--quiet", a.quiet, "print nothing but errors and the summary");
}

void list_points(const sw::Sweep& sweep, const std::string& out_dir) {
  std::cout << fmt::format("{} points -> {}/<point>/\n", sweep.points.size(), out_dir);
  for (size_t i = 0; i < sweep.points.size(); ++i) {
    const auto& p = sweep.points[i];
    const std::string from =
        p.init_from >= 0 ? " --init-from " + sweep.points[static_cast<size_t>(p.init_from)].name
                         : "";
    std::cout << fmt::format("{:>3}  {:<48} {:<8} {}{}\n", i + 1, p.name,
                             sw::to_string(sw::point_state(p, out_dir + "/" + p.name)),
                             p.overrides.dump(), from);
  }
}

// Trains the points; returns the exit status their outcome calls for.
int train_points(const sw::Sweep& sweep, const Args& a) {
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  sw::SweepOptions opt;
  opt.out_dir = a.out_dir;
  opt.train_exe = (fs::path(sw::self_exe()).parent_path() / "switch-train").string();
  opt.jobs = a.jobs;
  opt.quiet = a.quiet;
  opt.stop = &g_stop;
  int stopped = 0;
  const int failed = sw::run_sweep(sweep, opt, &stopped);
  if (stopped != 0) {
    std::cerr << fmt::format("switch-sweep: stopped by {}; run 'switch-sweep {} --out {}' to go on",
                             stopped == SIGINT ? "SIGINT" : "SIGTERM", a.file, a.out_dir)
              << std::endl;
    return 128 + stopped;
  }
  if (failed > 0) {
    std::cerr << fmt::format("switch-sweep: {} of {} points failed (see their train.log)", failed,
                             sweep.points.size())
              << std::endl;
    return 1;
  }
  return 0;
}

// Under the sweep directory's lock: the points (unless --summary), then the summary.
int run_and_summarize(const sw::Sweep& sweep, const Args& a) {
  int rc = 0;
  sw::DirLock lock;  // one sweep writes a sweep directory at a time, plots included
  if (!a.summary_only || fs::is_directory(a.out_dir)) {
    fs::create_directories(a.out_dir);
    lock = sw::DirLock::acquire(
        a.out_dir, "sweep directory",
        fmt::format("two sweeps cannot write one folder. Wait for it to finish, stop it "
                    "(rerunning 'switch-sweep {} --out {}' goes on where it stopped), or "
                    "give this one another --out",
                    a.file, a.out_dir));
  }
  if (!a.summary_only)
    rc = train_points(sweep, a);
  else if (!fs::is_directory(a.out_dir))
    throw sw::Error(fmt::format("--summary: '{}' holds no sweep runs (use --out)", a.out_dir));
  std::cout << sw::write_sweep_summary(sweep, a.out_dir);
  std::cout << fmt::format("summary: {0}/summary.md, {0}/summary.csv, {0}/summary.json", a.out_dir)
            << std::endl;
  return rc;
}

// Draws the pictures with tools/plot.py; returns false (after saying why) when that fails.
bool plot(const std::string& out_dir) {
  // The folder as one argument, absolute so that a name starting with '-' is no option.
  const sw::PlotResult r = sw::run_plot_script({fs::absolute(out_dir).string()});
  if (r.state == sw::PlotResult::Unavailable)
    std::cerr << "switch-sweep: no plots: " << r.why << std::endl;
  if (r.state != sw::PlotResult::Failed) return true;
  std::cerr << "switch-sweep: plotting failed: " << r.why << std::endl;
  return false;
}

int run(int argc, char** argv) {
  CLI::App app{
      "Run every point of a sweep file (a base config, a grid, variants, seeds), one "
      "switch-train run per point, then write a summary table and plots."};
  Args a;
  add_options(app, a);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }
  sw::Sweep sweep;
  try {
    sweep = sw::load_sweep(a.file, a.sets);
  } catch (const sw::Error& e) {
    std::cerr << "switch-sweep: error: " << e.what() << std::endl;
    return 2;
  }
  if (a.out_dir.empty()) a.out_dir = "runs/" + fs::path(a.file).stem().string();
  if (a.dry_run) {
    list_points(sweep, a.out_dir);
    return 0;
  }
  int rc = 0;
  try {
    rc = run_and_summarize(sweep, a);
  } catch (const sw::Error& e) {
    std::cerr << "switch-sweep: error: " << e.what() << std::endl;
    return 1;
  } catch (const std::exception& e) {  // e.g. a filesystem error moving a stale run aside
    std::cerr << "switch-sweep: error: " << sw::unexpected_error_message(e) << std::endl;
    return 1;
  }
  if (!a.no_plot && !plot(a.out_dir) && rc == 0) rc = 1;
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  return sw::guarded_main("switch-sweep", run, argc, argv);
}
