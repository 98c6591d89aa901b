// switch-sample: generates text from a trained run. CLI wiring only.
#include <chrono>
#include <iostream>

#include <fmt/format.h>

#include <CLI/CLI.hpp>

#include "sample/sampler.h"
#include "train/trainer.h"
#include "util/error.h"
#include "util/main_guard.h"
#include "util/malloc_tuning.h"

namespace {

int run(int argc, char** argv) {
  sw::keep_freed_memory();
  CLI::App app{"Generate text from a run trained by switch-train."};
  std::string run_dir;
  sw::SampleOptions opt;
  int64_t threads = 0;
  app.add_option("--run", run_dir, "run directory written by switch-train")->required();
  app.add_option("--prompt", opt.prompt, "text to continue (default a newline)");
  app.add_option("--chars", opt.chars, "characters to generate")->capture_default_str();
  app.add_option("--temperature", opt.temperature, "softmax temperature; 0 picks the argmax")
      ->capture_default_str();
  app.add_option("--top-k", opt.top_k, "sample among the k most likely characters (0: all)")
      ->capture_default_str();
  app.add_option("--seed", opt.seed, "sampling seed")->capture_default_str();
  app.add_option("--threads", threads, "intra-op threads (0: all cores)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1024}));
  bool no_cache = false, stats = false;
  app.add_flag("--no-cache", no_cache,
               "recompute the whole context for every character (same text, slower)");
  app.add_flag("--stats", stats, "print characters per second to stderr at the end");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);  // prints help, or the parse error and a hint
    return rc == 0 ? 0 : 2;
  }

  try {
    sw::configure_threads(threads);
    opt.kv_cache = !no_cache;
    sw::Sampler sampler(run_dir);
    const auto t0 = std::chrono::steady_clock::now();
    sampler.generate(opt, [](const std::string& piece) { std::cout << piece << std::flush; });
    std::cout << std::endl;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (stats)
      std::cerr << fmt::format("switch-sample: {} characters in {:.3f} s: {:.0f} characters/s ({})",
                               opt.chars, s, static_cast<double>(opt.chars) / s,
                               no_cache ? "no cache" : "key/value cache")
                << std::endl;
  } catch (const sw::Error& e) {
    std::cerr << "switch-sample: error: " << e.what() << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "switch-sample: internal error: " << sw::unexpected_error_message(e) << std::endl;
    return 3;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return sw::guarded_main("switch-sample", run, argc, argv);
}
