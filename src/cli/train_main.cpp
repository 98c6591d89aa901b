// switch-train: trains a Switch Transformer language model. CLI wiring only.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <iostream>

#include <fmt/format.h>
#include <CLI/CLI.hpp>

#include "config/config.h"
#include "data/corpus.h"
#include "distributed/comm.h"
#include "distributed/launch.h"
#include "train/footprint.h"
#include "train/trainer.h"
#include "util/error.h"
#include "util/main_guard.h"
#include "util/malloc_tuning.h"
#include "util/process.h"

namespace {

// The first SIGINT or SIGTERM asks training to stop after the current step and write a
// checkpoint; a second SIGINT exits at once (checkpoints are renamed into place whole, so
// nothing on disk is left half-written).
std::atomic<int> g_stop{0};

void on_signal(int sig) {
  if (g_stop.load() != 0 && sig == SIGINT) _exit(128 + SIGINT);
  g_stop.store(sig);
}

void install_signal_handlers() {
  struct sigaction sa {};
  sa.sa_handler = on_signal;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, nullptr);
  sigaction(SIGTERM, &sa, nullptr);
  // Over a file-size limit (ulimit -f) a write then fails with EFBIG and is reported like a
  // full disk, instead of the signal killing the process.
  signal(SIGXFSZ, SIG_IGN);
}

// Applies --set overrides to a resumed run's config: only keys that steer the loop, not the
// model or the data, may change.
void apply_resume_overrides(sw::Config& cfg, const std::vector<std::string>& overrides) {
  std::vector<std::string> allowed;
  for (const auto& k : sw::config_keys())
    if (k.resumable) allowed.push_back(k.key);
  for (const auto& o : overrides) {
    const std::string key = o.substr(0, o.find('='));
    if (std::find(allowed.begin(), allowed.end(), key) == allowed.end())
      throw sw::Error(fmt::format("--resume: '{}' cannot change in a resumed run (allowed: {})",
                                  key, fmt::join(allowed, ", ")));
    sw::apply_override(cfg, o);
  }
}

// --nproc N: the same command line, minus --nproc, run as N ranks (and with --out fixed
// here, so that every rank names the same run directory).
int launch(int argc, char** argv, int nproc, const std::string& out_dir, bool add_out) {
  try {
    sw::LaunchOptions lo;
    lo.exe = sw::self_exe();
    lo.nproc = nproc;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--nproc") {
        ++i;
        continue;
      }
      if (a.rfind("--nproc=", 0) == 0) continue;
      lo.args.push_back(a);
    }
    if (add_out) {
      lo.args.push_back("--out");
      lo.args.push_back(out_dir);
    }
    return sw::launch_local(lo);
  } catch (const sw::Error& e) {
    std::cerr << "switch-train: error: " << e.what() << std::endl;
    return 1;
  }
}

// The memory estimate of --print-config, from the prepared data file's vocabulary and size
// when it is prepared (else its size in bytes and 256 characters, said so); nothing is
// prepared here.
std::string memory_line(const sw::Config& cfg, int64_t world) {
  int64_t vocab = 256, chars = 0;
  std::string note = "";
  std::error_code ec;
  if (auto info = sw::peek_corpus(cfg.data.path, cfg.data.cache_dir)) {
    vocab = info->vocab_size;
    chars = info->characters;
  } else if (const auto bytes = std::filesystem::file_size(cfg.data.path, ec); !ec) {
    chars = static_cast<int64_t>(bytes);
    note =
        " (data.path not prepared yet: as many characters as bytes and a vocabulary of 256 "
        "assumed)";
  } else {
    note = " (data.path unreadable: a vocabulary of 256 and no corpus assumed)";
  }
  const sw::MemoryEstimate need = sw::estimate_memory(cfg, vocab, world, chars);
  const sw::MemoryLimit limit = sw::memory_limit();
  return fmt::format("memory: about {}{}{}; this process may use {}", need.describe(),
                     world > 1 ? " per rank" : "", note,
                     limit.bytes < 0 ? std::string("(unknown)")
                                     : sw::human_bytes(limit.bytes) + " (" + limit.source + ")");
}

struct Args {
  std::string config_file, out_dir, init_from;
  std::vector<std::string> overrides;
  bool resume = false, quiet = false, print_config = false, keys = false, markdown = false,
       prepare = false;
  int nproc = 1;
  int64_t keep = 0;
};

void add_options(CLI::App& app, Args& a) {
  app.add_option("--config", a.config_file, "JSON config file applied over the defaults")
      ->check(CLI::ExistingFile);
  app.add_option("--set", a.overrides, "override one key: --set moe.n_experts=8 (repeatable)")
      ->type_name("KEY=VALUE");
  app.add_option("--out", a.out_dir, "run directory (default runs/<timestamp>)");
  CLI::Option* resume =
      app.add_flag("--resume", a.resume, "continue the run in --out from its newest checkpoint");
  app.add_option("--init-from", a.init_from,
                 "start a new MoE run from a trained dense run's newest checkpoint (sparse "
                 "upcycling: every expert a copy of its layer's FFN, routers fresh)")
      ->type_name("RUN_DIR")
      ->excludes(resume);
  app.add_option("--keep", a.keep, "keep only the newest N checkpoints (train.keep_checkpoints)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 40));
  app.add_flag("-q,--quiet", a.quiet, "print nothing but errors");
  app.add_option("--nproc", a.nproc,
                 "start N ranks on this machine (expert + data parallel over c10d/Gloo)")
      ->check(CLI::Range(1, 1024));
  app.add_flag("--print-config", a.print_config, "print the resolved config as JSON and exit");
  app.add_flag("--prepare-data", a.prepare,
               "prepare data.path's token file (if it is missing or out of date) and exit");
  app.add_flag("--list-keys", a.keys, "list every config key with its default and exit");
  app.add_flag("--markdown", a.markdown, "with --list-keys: print docs/config.md instead")
      ->needs("--list-keys");
  app.footer(
      "Config keys are dotted (model.d_model, moe.n_experts, train.steps, ...); "
      "see --list-keys.");
}

// The run's config (a resumed run's own, with the overrides it allows) and the number of
// ranks, validated; throws sw::Error.
sw::Config resolve_config(const Args& a, int64_t& world) {
  sw::Config cfg;
  if (a.resume) {
    if (a.out_dir.empty()) throw sw::Error("--resume needs --out DIR naming the run to continue");
    if (!a.config_file.empty())
      throw sw::Error("--resume takes the run's own config.json; drop --config");
    cfg = sw::resume_config(a.out_dir);
    apply_resume_overrides(cfg, a.overrides);
  } else {
    if (!a.config_file.empty()) sw::apply_file(cfg, a.config_file);
    for (const auto& o : a.overrides)
      sw::apply_override(cfg, o);
  }
  sw::validate(cfg);
  world = a.nproc;
  if (auto env = sw::dist_env_from_environment()) {
    if (a.nproc > 1)
      throw sw::Error(
          "--nproc starts its own ranks; it cannot run under a launcher that set WORLD_SIZE");
    world = env->world_size;
  }
  sw::validate_world(cfg, world);
  return cfg;
}

// --prepare-data: the token file of data.path, prepared or found up to date.
int prepare_data(const sw::Config& cfg, bool quiet) {
  try {
    const sw::Corpus c =
        sw::open_corpus(cfg.data.path, cfg.data.cache_dir, [&](const std::string& m) {
          if (!quiet) std::cout << m << std::endl;
        });
    if (!quiet)
      std::cout << fmt::format("data: {} {}: {} characters, vocabulary {}, {} ids, sha256 {}",
                               c.files.tokens, c.prepared_now ? "prepared" : "up to date",
                               c.tokens.size(), c.vocab.size(), sw::token_dtype(c.tokens.width()),
                               c.sha256)
                << std::endl;
    return 0;
  } catch (const sw::Error& e) {
    std::cerr << "switch-train: error: " << e.what() << std::endl;
    return 1;
  }
}

// Trains in this process; the exit status says how it ended.
int train_here(const sw::Config& cfg, const sw::TrainOptions& opt) {
  install_signal_handlers();
  try {
    sw::train(cfg, opt);
  } catch (const sw::Interrupted& i) {
    std::cerr << fmt::format(
                     "switch-train: stopped by {} after step {}; checkpoint {}; continue "
                     "with 'switch-train --out {} --resume'",
                     i.signal == SIGINT ? "SIGINT" : "SIGTERM", i.step, i.checkpoint_dir,
                     opt.out_dir)
              << std::endl;
    return 128 + i.signal;
  } catch (const sw::ConfigError& e) {  // a run this machine cannot hold
    std::cerr << "switch-train: error: " << e.what() << std::endl;
    return 2;
  } catch (const sw::Error& e) {
    std::cerr << "switch-train: error: " << e.what() << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "switch-train: internal error: " << sw::unexpected_error_message(e) << std::endl;
    return 3;
  }
  return 0;
}

int run(int argc, char** argv) {
  sw::keep_freed_memory();
  CLI::App app{
      "Train a Switch Transformer (sparse mixture-of-experts) character-level "
      "language model."};
  Args a;
  add_options(app, a);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);  // prints help, or the parse error and a hint
    return rc == 0 ? 0 : 2;
  }
  if (a.keys) {
    std::cout << (a.markdown ? sw::keys_markdown() : sw::keys_text());
    return 0;
  }
  if (a.keep > 0) a.overrides.push_back(fmt::format("train.keep_checkpoints={}", a.keep));
  sw::Config cfg;
  int64_t world = 1;
  try {
    cfg = resolve_config(a, world);
  } catch (const sw::Error& e) {
    std::cerr << "switch-train: error: " << e.what() << std::endl;
    return 2;
  }
  if (a.print_config) {
    std::cout << sw::to_json(cfg).dump(2) << std::endl;
    std::cerr << memory_line(cfg, world) << std::endl;  // stdout stays a config file
    return 0;
  }
  if (a.prepare) return prepare_data(cfg, a.quiet);
  sw::TrainOptions opt;
  opt.quiet = a.quiet;
  opt.out_dir = a.out_dir.empty() ? sw::default_run_dir() : a.out_dir;
  if (a.nproc > 1) return launch(argc, argv, a.nproc, opt.out_dir, a.out_dir.empty());
  opt.resume = a.resume;
  opt.init_from = a.init_from;
  opt.config_changed = a.resume && !a.overrides.empty();
  opt.stop = &g_stop;
  return train_here(cfg, opt);
}

}  // namespace

int main(int argc, char** argv) {
  return sw::guarded_main("switch-train", run, argc, argv);
}
