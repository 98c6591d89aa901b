// switch-board: a live web view of runs and sweeps. CLI wiring and signals only.
#include <pthread.h>
#include <signal.h>

#include <iostream>
#include <mutex>
#include <thread>

#include <fmt/format.h>

#include <CLI/CLI.hpp>

#include "board/board.h"
#include "board/server.h"
#include "util/error.h"
#include "util/main_guard.h"

namespace {

struct Args {
  std::vector<std::string> paths;
  sw::ServeOptions serve;
  size_t max_runs = 2000;
};

void add_options(CLI::App& app, Args& a) {
  app.add_option("PATH", a.paths, "run directories, sweep directories, or folders of them")
      ->required();
  app.add_option("--port", a.serve.port, "TCP port (0: any free port, printed)")
      ->capture_default_str()
      ->check(CLI::Range(0, 65535));
  app.add_option("--host", a.serve.host,
                 "address to listen on; anything but loopback lets other machines read the "
                 "runs")
      ->capture_default_str();
  app.add_option("--poll-ms", a.serve.poll_ms, "how often the page asks for new records")
      ->capture_default_str()
      ->check(CLI::Range(100, 600000));
  app.add_option("--max-runs", a.max_runs, "runs listed at most")
      ->capture_default_str()
      ->check(CLI::Range(size_t{1}, size_t{100000}));
  app.add_option("--chart-js", a.serve.chart_js, "Chart.js (UMD build) to serve")
      ->capture_default_str();
}

std::string count(size_t n, const char* one, const char* many) {
  return fmt::format("{} {}", n, n == 1 ? one : many);
}

// Serves until SIGINT or SIGTERM, which a thread of its own waits for (blocked in every
// other thread, which inherit this thread's mask).
int serve_until_signal(sw::Board& board, const sw::ServeOptions& opt) {
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  std::mutex mu;
  std::function<void()> stop;
  bool done = false, requested = false;
  std::thread waiter([&] {
    for (;;) {
      int sig = 0;
      sigwait(&stop_signals, &sig);
      std::lock_guard<std::mutex> lock(mu);
      if (done) return;
      if (requested) std::_Exit(128 + sig);  // a second signal: at once
      requested = true;
      std::cerr << "switch-board: stopping (again to quit at once)" << std::endl;
      if (stop) stop();
    }
  });
  auto finish = [&] {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (done) return;
      done = true;
    }
    pthread_kill(waiter.native_handle(), SIGTERM);
  };
  try {
    sw::serve(board, opt, [&](const std::string& url, std::function<void()> s) {
      std::lock_guard<std::mutex> lock(mu);
      stop = std::move(s);
      if (requested) stop();  // a signal came before the server was bound
      const sw::Reply r = board.runs();
      std::cout << fmt::format("switch-board: {} and {} at {} (Ctrl-C stops)",
                               count(r.body["runs"].size(), "run", "runs"),
                               count(r.body["sweeps"].size(), "sweep", "sweeps"), url)
                << std::endl;
    });
  } catch (...) {
    finish();
    waiter.join();
    throw;
  }
  finish();
  waiter.join();
  return 0;
}

int run(int argc, char** argv) {
  CLI::App app{
      "switch-board: a live web view of runs and sweeps (loss curves, learning rate, dropped "
      "fraction, expert load per MoE layer, sweep tables). Read-only."};
  Args a;
  add_options(app, a);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  try {
    sw::Board board(sw::make_roots(a.paths), a.max_runs);
    if (!sw::is_loopback_host(a.serve.host))
      std::cerr << fmt::format(
                       "switch-board: warning: listening on {}, not loopback: anyone who can "
                       "reach this machine can read these runs (there is no password)",
                       a.serve.host)
                << std::endl;
    return serve_until_signal(board, a.serve);
  } catch (const sw::Error& e) {
    std::cerr << "switch-board: error: " << e.what() << std::endl;
    return 1;
  }
}

}  // namespace

int main(int argc, char** argv) {
  return sw::guarded_main("switch-board", run, argc, argv);
}
