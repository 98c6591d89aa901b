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
#include "util/process.h"

namespace fs = std::filesystem;

namespace {

std::atomic<int> g_stop{0};
void on_signal(int sig) {
  g_stop.store(sig);
}

// A python3 that has matplotlib: Debian's first (python3-matplotlib), then PATH's.
std::string plotting_python() {
  for (const char* py : {"/usr/bin/python3", "python3"}) {
    try {
      if (sw::run_program({py, "-c", "import matplotlib"}, /*quiet=*/true).ok()) return py;
    } catch (const sw::Error&) {  // no such program: try the next
    }
  }
  return "";
}

int run(int argc, char** argv) {
  CLI::App app{
      "Run every point of a sweep file (a base config, a grid, variants, seeds), one "
      "switch-train run per point, then write a summary table and plots."};
  std::string file, out_dir;
  std::vector<std::string> sets;
  int jobs = 1;
  bool dry_run = false, summary_only = false, no_plot = false, quiet = false;
  app.add_option("FILE", file, "sweep file (JSON)")->required()->check(CLI::ExistingFile);
  app.add_option("--out", out_dir, "where the runs go (default runs/<sweep file name>)");
  app.add_option("--set", sets, "override a key in every point: --set train.steps=1000")
      ->type_name("KEY=VALUE");
  app.add_option("--jobs", jobs, "points trained at once; the cores are shared out")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  app.add_flag("--dry-run", dry_run, "list the points and exit");
  app.add_flag("--summary", summary_only, "only (re)write the summary and plots of the runs");
  app.add_flag("--no-plot", no_plot, "do not draw the pictures");
  app.add_flag("-q,--quiet", quiet, "print nothing but errors and the summary");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    return rc == 0 ? 0 : 2;
  }

  sw::Sweep sweep;
  try {
    sweep = sw::load_sweep(file, sets);
  } catch (const sw::Error& e) {
    std::cerr << "switch-sweep: error: " << e.what() << std::endl;
    return 2;
  }
  if (out_dir.empty()) out_dir = "runs/" + fs::path(file).stem().string();

  if (dry_run) {
    std::cout << fmt::format("{} points -> {}/<point>/\n", sweep.points.size(), out_dir);
    for (size_t i = 0; i < sweep.points.size(); ++i) {
      const auto& p = sweep.points[i];
      std::cout << fmt::format("{:>3}  {:<48} {:<8} {}\n", i + 1, p.name,
                               sw::to_string(sw::point_state(p, out_dir + "/" + p.name)),
                               p.overrides.dump());
    }
    return 0;
  }

  int rc = 0;
  sw::DirLock lock;  // one sweep writes a sweep directory at a time, plots included
  try {
    if (!summary_only || fs::is_directory(out_dir)) {
      fs::create_directories(out_dir);
      lock = sw::DirLock::acquire(
          out_dir, "sweep directory",
          fmt::format("two sweeps cannot write one folder. Wait for it to finish, stop it "
                      "(rerunning 'switch-sweep {} --out {}' goes on where it stopped), or "
                      "give this one another --out",
                      file, out_dir));
    }
    if (!summary_only) {
      struct sigaction sa {};
      sa.sa_handler = on_signal;
      sigemptyset(&sa.sa_mask);
      sigaction(SIGINT, &sa, nullptr);
      sigaction(SIGTERM, &sa, nullptr);
      sw::SweepOptions opt;
      opt.out_dir = out_dir;
      opt.train_exe = (fs::path(sw::self_exe()).parent_path() / "switch-train").string();
      opt.jobs = jobs;
      opt.quiet = quiet;
      opt.stop = &g_stop;
      int stopped = 0;
      const int failed = sw::run_sweep(sweep, opt, &stopped);
      if (stopped != 0) {
        std::cerr << fmt::format(
                         "switch-sweep: stopped by {}; run 'switch-sweep {} --out {}' to go on",
                         stopped == SIGINT ? "SIGINT" : "SIGTERM", file, out_dir)
                  << std::endl;
        rc = 128 + stopped;
      } else if (failed > 0) {
        std::cerr << fmt::format("switch-sweep: {} of {} points failed (see their train.log)",
                                 failed, sweep.points.size())
                  << std::endl;
        rc = 1;
      }
    } else if (!fs::is_directory(out_dir)) {
      throw sw::Error(fmt::format("--summary: '{}' holds no sweep runs (use --out)", out_dir));
    }
    std::cout << sw::write_sweep_summary(sweep, out_dir);
    std::cout << fmt::format("summary: {0}/summary.md, {0}/summary.csv, {0}/summary.json", out_dir)
              << std::endl;
  } catch (const sw::Error& e) {
    std::cerr << "switch-sweep: error: " << e.what() << std::endl;
    return 1;
  } catch (const std::exception& e) {  // e.g. a filesystem error moving a stale run aside
    std::cerr << "switch-sweep: error: " << sw::unexpected_error_message(e) << std::endl;
    return 1;
  }

  if (!no_plot) {
    const std::string script = std::string(SWITCH_TOOLS_DIR) + "/plot.py";
    const std::string py = plotting_python();
    if (!fs::exists(script) || py.empty()) {
      std::cerr << "switch-sweep: no plots: "
                << (py.empty() ? "no python3 with matplotlib (tools/setup.sh installs it)"
                               : script + " is missing")
                << std::endl;
    } else {
      // The folder as one argument, absolute so that a name starting with '-' is no option.
      const std::string dir = fs::absolute(out_dir).string();
      std::string why;
      try {
        const sw::ProgramResult r = sw::run_program({py, script, dir});
        if (!r.ok()) why = fmt::format("{} {}", script, r.describe());
      } catch (const sw::Error& e) {
        why = e.what();
      }
      if (!why.empty()) {
        std::cerr << "switch-sweep: plotting failed: " << why << std::endl;
        if (rc == 0) rc = 1;
      }
    }
  }
  return rc;
}

}  // namespace

int main(int argc, char** argv) {
  return sw::guarded_main("switch-sweep", run, argc, argv);
}
