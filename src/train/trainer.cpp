#include "train/trainer.h"

#include <signal.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <optional>
#include <thread>

#include <fmt/format.h>

#include "data/corpus.h"
#include "data/dataset.h"
#include "distributed/comm.h"
#include "model/transformer.h"
#include "train/checkpoint.h"
#include "train/evaluate.h"
#include "train/footprint.h"
#include "train/metrics.h"
#include "train/optimizer.h"
#include "train/progress.h"
#include "train/ranks.h"
#include "train/run_dir.h"
#include "train/step.h"
#include "train/upcycle.h"
#include "util/dir_lock.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/stop_at_once.h"

namespace sw {
namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

// A generator seed for rank `rank` > 0, distinct per rank and per step it starts from.
uint64_t rank_seed(int64_t seed, int64_t rank, int64_t step) {
  uint64_t x = static_cast<uint64_t>(seed) ^ (0x9E3779B97F4A7C15ULL * static_cast<uint64_t>(rank));
  x ^= 0xBF58476D1CE4E5B9ULL * static_cast<uint64_t>(step + 1);
  return x >> 1;  // non-negative as int64
}

// The ranks sharing this machine: LOCAL_WORLD_SIZE (set by --nproc and torchrun), else 1.
int64_t local_ranks(int64_t fallback) {
  const char* v = std::getenv("LOCAL_WORLD_SIZE");
  return v != nullptr ? std::max(1, std::atoi(v)) : fallback;
}

// Everything a training run holds from set-up to summary.
struct Run {
  Run(const Config& c, const TrainOptions& o) : cfg(c), opt(o) {}
  const Config& cfg;
  const TrainOptions& opt;
  std::optional<DistEnv> env;
  Ranks ranks;
  int64_t threads = 0;
  DirLock lock;                           // rank 0's, from set-up to the end
  std::optional<CheckpointMeta> resumed;  // the checkpoint the run continues from
  std::optional<UpcycleSource> dense;     // the dense checkpoint a new run upcycles
  std::optional<Dataset> data;
  int64_t corpus_chars = 0;
  Transformer model{nullptr};
  int64_t n_params = 0, n_active = 0;  // the whole model's, before experts are sharded
  std::unique_ptr<FusedAdamW> optimizer;
  ParamSplit params;
  Rng data_rng{0};
  TrainState state;
  std::optional<MetricsWriter> metrics;  // rank 0's
  std::vector<Batch> val_batches, train_eval_batches;
  double last_val = std::nan(""), last_train = std::nan("");
  Clock::time_point started = Clock::now();
  double time_offset = 0;     // training seconds before this process (a resumed run's)
  double session_step_s = 0;  // this process's steps, for the ETA and the throughput
  int64_t session_steps = 0;

  void say(const std::string& line) const {
    if (!opt.quiet && ranks.root()) std::cout << line << std::endl;
  }
  double now_s() const {
    return time_offset + std::chrono::duration<double>(Clock::now() - started).count();
  }
  int64_t tokens_per_step() const { return cfg.train.batch_size * cfg.model.seq_len; }
};

// This process's place among the ranks (WORLD_SIZE, RANK) and its threads.
void place_rank(Run& r) {
  validate(r.cfg);
  r.env = dist_env_from_environment();
  r.ranks.world = r.env ? r.env->world_size : 1;
  r.ranks.rank = r.env ? r.env->rank : 0;
  validate_world(r.cfg, r.ranks.world);
  r.ranks.expert_parallel =
      expert_parallel_ranks(r.cfg, r.ranks.world) > 1 && r.cfg.n_moe_layers() > 0;
  r.threads = configure_threads(r.cfg.train.threads, local_ranks(r.ranks.world));
  r.say(fmt::format("threads: {} (intra-op){}", r.threads,
                    r.ranks.world > 1 ? fmt::format(" per rank, {} ranks", r.ranks.world) : ""));
}

// The checkpoint a resumed run continues from, read after its directory is locked, or the
// dense one a new run upcycles.
void find_checkpoint(Run& r) {
  if (!r.opt.init_from.empty() && !r.opt.resume) {
    r.dense = upcycle_source(r.opt.init_from, r.cfg);
    r.say(fmt::format("upcycling {} (step {})", r.dense->meta.dir, r.dense->meta.state.step));
  }
  if (!r.opt.resume) return;
  if (r.ranks.root()) r.lock = lock_run_dir(r.opt.out_dir);
  if (auto dir = newest_checkpoint(r.opt.out_dir)) {
    r.resumed = read_checkpoint_meta(*dir);
    r.say(fmt::format("resuming {} from step {}", *dir, r.resumed->state.step));
    return;
  }
  // An upcycled run stopped before its first checkpoint upcycles again.
  const std::string source = recorded_upcycle_source(r.opt.out_dir);
  if (!source.empty()) {
    r.dense = upcycle_source(source, r.cfg);
    r.say(fmt::format("{} has no complete checkpoint yet: upcycling {} again from step 0",
                      r.opt.out_dir, source));
  } else {
    r.say(fmt::format("{} has no complete checkpoint yet: starting it from step 0", r.opt.out_dir));
  }
}

// The data, before anything is written: the text's prepared token file, mapped (prepared
// first if need be); a resumed or upcycled run keeps its checkpoint's vocabulary.
void load_data(Run& r) {
  const DataConfig& d = r.cfg.data;
  Corpus corpus = open_corpus(d.path, d.cache_dir, [&](const std::string& m) { r.say(m); });
  const std::string source = "data file '" + d.path + "'";
  const CheckpointMeta* from = r.resumed ? &*r.resumed : r.dense ? &r.dense->meta : nullptr;
  Tokens ids = corpus.tokens;
  Vocab vocab = corpus.vocab;
  const bool remapped = from && !(from->vocab == vocab);
  if (remapped) {  // another text's vocabulary: ids remapped in memory
    ids = remap_tokens(ids, vocab, from->vocab, source);
    vocab = from->vocab;
  }
  r.data.emplace(std::move(ids), std::move(vocab), d.val_fraction, d.test_fraction,
                 r.cfg.model.seq_len, source);
  r.corpus_chars = corpus.tokens.size();
  r.say(fmt::format("data: {} ({} characters, vocabulary {}, train {} / val {}{}; {} ids {} {})",
                    d.path, r.corpus_chars, r.data->vocab().size(), r.data->size(Split::Train),
                    r.data->size(Split::Val),
                    d.test_fraction > 0 ? fmt::format(" / test {}", r.data->size(Split::Test)) : "",
                    token_dtype(r.data->tokens(Split::Train).width()),
                    remapped ? "remapped to the checkpoint's vocabulary from" : "mapped from",
                    corpus.files.tokens));
}

// Refuses a run this machine cannot hold, before the model is allocated and before a new
// run's directory is created.
void check_memory(const Run& r) {
  const MemoryEstimate need =
      estimate_memory(r.cfg, r.data->vocab().size(), r.ranks.world, r.corpus_chars);
  r.say("memory: about " + need.describe() + (r.ranks.world > 1 ? " per rank" : ""));
  check_fits(r.cfg, need, local_ranks(1), memory_limit());
}

// A new run's directory: created and locked by rank 0, checked empty by every rank (so all
// fail alike, before the rendezvous).
void open_new_run_dir(Run& r) {
  if (r.opt.resume) return;
  if (r.ranks.root()) {
    create_run_dir(r.opt.out_dir);
    r.lock = lock_run_dir(r.opt.out_dir);  // a writer already there is named, not overwritten
  }
  check_new_run_dir(r.opt.out_dir);
}

void join_ranks(Run& r) {
  if (!r.env || r.ranks.world == 1) return;
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(r.cfg.dist.timeout_s * 1e3));
  {
    const StopAtOnce at_once(r.opt.stop);  // nothing to save while waiting for the others
    r.ranks.comm = Comm::connect(*r.env, timeout);
    r.ranks.comm->set_spin(std::chrono::microseconds(r.cfg.dist.spin_us));  // before the lanes
    if (r.ranks.expert_parallel && r.cfg.dist.overlap && r.cfg.train.micro_batches > 1)
      r.ranks.lanes = std::make_shared<Lanes>(*r.ranks.comm, r.cfg.train.micro_batches);
  }
  const int64_t W = r.ranks.world;
  r.say(fmt::format(
      "ranks: {} joined at {}:{} ({}; global batch {} = {} per rank{})", W, r.env->master_addr,
      r.env->master_port,
      r.ranks.expert_parallel
          ? fmt::format("{} experts per rank per layer", r.cfg.moe.n_experts / W)
          : std::string("experts replicated"),
      r.cfg.train.batch_size, r.cfg.train.batch_size / W,
      r.ranks.lanes ? fmt::format(", {} micro-batches overlapped", r.ranks.lanes->size()) : ""));
}

// The model and optimizer, fresh or from the checkpoint, with this rank's experts.
void build_model(Run& r) {
  const Config& cfg = r.cfg;
  // Every rank builds the whole model from the same seed, so an expert's initial weights do
  // not depend on the number of ranks; then each keeps its slice.
  torch::manual_seed(static_cast<uint64_t>(cfg.train.seed));
  r.model = Transformer(cfg, r.data->vocab().size());
  if (r.dense) upcycle(*r.dense, r.model);
  r.model->train();
  r.n_params = r.model->n_params();
  r.n_active = r.model->n_active_params();
  r.optimizer = make_optimizer(*r.model, cfg.train);
  r.say(fmt::format(
      "model: {} layers ({} MoE, {} experts each), {} parameters, {} active per token",
      cfg.model.n_layers, cfg.n_moe_layers(), cfg.moe.n_experts,
      human_count(static_cast<double>(r.n_params)), human_count(static_cast<double>(r.n_active))));
  r.data_rng = Rng(static_cast<uint64_t>(cfg.train.seed));  // the same stream on every rank
  bool rng_restored = false;
  if (r.resumed) {
    load_weights(r.resumed->dir, *r.model);
    rng_restored =
        load_optimizer_and_rng(r.resumed->dir, *r.optimizer, r.ranks.rank, r.ranks.world);
    r.state = r.resumed->state;
    r.data_rng.set_state(r.state.data_rng);
  }
  // Rank 0 continues the single-process generator stream; the others get their own.
  if (r.ranks.rank > 0 && !rng_restored)
    torch::manual_seed(rank_seed(cfg.train.seed, r.ranks.rank, r.state.step));
  if (r.ranks.expert_parallel) shard_experts(r.model, *r.optimizer, r.ranks.comm);
  r.params = split_parameters(r.model, r.ranks.expert_parallel);
  defer_expert_weight_grads(r.model);
}

// metrics.jsonl (cut back to the checkpoint's step on resume) and the fixed eval batches.
void open_records(Run& r) {
  const std::string path = (fs::path(r.opt.out_dir) / "metrics.jsonl").string();
  if (r.opt.resume && r.ranks.root()) truncate_metrics(path, r.state.step);
  if (r.ranks.root()) r.metrics.emplace(path);
  r.val_batches = fixed_batches(*r.data, Split::Val, r.cfg.train, kValSalt);
  r.train_eval_batches = fixed_batches(*r.data, Split::Train, r.cfg.train, kTrainSalt);
}

// moe.balance = bias: each MoE layer's bias as the record's step left it, in its entry.
void add_expert_biases(nlohmann::ordered_json& rec, const Transformer& model) {
  for (auto& entry : rec["layers"]) {
    const Block& b = model->block_list.at(entry["layer"].get<size_t>());
    const torch::Tensor bias = b->switch_->router->expert_bias.to(torch::kFloat64).contiguous();
    entry["bias"] =
        std::vector<double>(bias.data_ptr<double>(), bias.data_ptr<double>() + bias.numel());
  }
}

// Writes the interval's train record and prints its progress line.
void log_interval(Run& r, Interval& in) {
  if (r.ranks.comm)
    in.routing.sum_over_ranks(*r.ranks.comm, r.cfg.moe.overflow == Overflow::Reroute);
  if (r.metrics) {
    nlohmann::ordered_json rec =
        train_record(in, r.cfg.moe, r.state.step, r.now_s(), r.tokens_per_step(),
                     r.state.skipped_steps, r.ranks.comm != nullptr);
    if (r.cfg.moe.balance == Balance::Bias) add_expert_biases(rec, r.model);
    r.metrics->write(rec);
  }
  const double eta = r.session_step_s / static_cast<double>(r.session_steps) *
                     static_cast<double>(r.cfg.train.steps - r.state.step);
  r.say(progress_line(in, r.state.step, r.cfg.train.steps, r.tokens_per_step(), eta));
}

void evaluate_now(Run& r) {
  r.last_val = evaluate(r.model, r.val_batches, r.ranks);
  r.last_train = evaluate(r.model, r.train_eval_batches, r.ranks);
  r.state.best_val_loss = std::min(r.state.best_val_loss, r.last_val);
}

void evaluate_and_log(Run& r) {
  evaluate_now(r);
  if (r.metrics)
    r.metrics->write(nlohmann::ordered_json{{"kind", "eval"},
                                            {"step", r.state.step},
                                            {"time_s", r.now_s()},
                                            {"val_loss", r.last_val},
                                            {"train_loss", r.last_train}});
  r.say(fmt::format("eval step {} | train {:.4f} | val {:.4f} | best val {:.4f}", r.state.step,
                    r.last_train, r.last_val, r.state.best_val_loss));
}

// A checkpoint of the whole run: rank 0 writes it with every rank's generator state and, with
// expert parallelism, every expert gathered; no rank goes on before it is on disk.
void checkpoint(Run& r) {
  r.state.time_s = r.now_s();
  r.state.data_rng = r.data_rng.state();
  auto save = [&](const torch::Tensor& rank_rng) {
    if (!r.ranks.root()) return;
    save_checkpoint(r.opt.out_dir, r.cfg, r.data->vocab(), *r.model, *r.optimizer, r.state,
                    rank_rng);
    prune_checkpoints(r.opt.out_dir, r.cfg.train.keep_checkpoints);
  };
  if (!r.ranks.comm) {
    save({});
    return;
  }
  const torch::Tensor rank_rng = gather_rng_states(*r.ranks.comm);
  if (r.ranks.expert_parallel)
    with_full_experts(*r.ranks.comm, r.model, *r.optimizer, [&] { save(rank_rng); });
  else
    save(rank_rng);
  r.ranks.comm->barrier();
}

// summary.json, after a last evaluation if the loop ran none (a finished run resumed).
nlohmann::ordered_json finish(Run& r) {
  if (!std::isfinite(r.last_val)) evaluate_now(r);
  const int64_t tokens = r.tokens_per_step();
  const double wall_s = r.now_s();
  const double tok_s =
      r.session_steps > 0 ? static_cast<double>(r.session_steps * tokens) / r.session_step_s : 0;
  nlohmann::ordered_json summary = {
      {"steps", r.state.step},
      {"final_train_loss", r.last_train},
      {"final_val_loss", r.last_val},
      {"best_val_loss", r.state.best_val_loss},
      {"wall_s", wall_s},
      {"tokens_per_s", tok_s},
      {"tokens_trained", r.state.step * tokens},
      {"params_total", r.n_params},
      {"params_active", r.n_active},
      {"threads", r.threads},
      {"skipped_steps", r.state.skipped_steps},
      {"ranks", r.ranks.world},
      {"expert_parallel", r.ranks.expert_parallel},
      {"overlap", r.ranks.lanes != nullptr},
  };
  if (r.ranks.root())
    write_file_atomic((fs::path(r.opt.out_dir) / "summary.json").string(), summary.dump(2) + "\n");
  r.say(fmt::format("done: {} steps in {} | val loss {:.4f} (best {:.4f}) | {} tok/s | run in {}",
                    r.state.step, human_duration(wall_s), r.last_val, r.state.best_val_loss,
                    human_count(tok_s), r.opt.out_dir));
  return summary;
}

// The signal that stops the run: this process's own, else the one another rank received
// (SIGTERM stands for it).
int stop_signal(const TrainOptions& opt) {
  const int mine = opt.stop ? opt.stop->load() : 0;
  return mine != 0 ? mine : SIGTERM;
}

bool due(int64_t step, int64_t every, bool last) {
  return step % every == 0 || last;
}

}  // namespace

int64_t configure_threads(int64_t requested, int64_t local_ranks) {
  int64_t n = requested > 0 ? requested
                            : static_cast<int64_t>(std::thread::hardware_concurrency()) /
                                  std::max<int64_t>(1, local_ranks);
  if (n <= 0) n = 1;
  torch::set_num_threads(static_cast<int>(n));
  return torch::get_num_threads();
}

nlohmann::ordered_json train(const Config& cfg, const TrainOptions& opt) {
  Run r(cfg, opt);
  place_rank(r);
  find_checkpoint(r);
  load_data(r);
  check_memory(r);
  open_new_run_dir(r);
  join_ranks(r);
  if ((!opt.resume || opt.config_changed) && r.ranks.root()) write_config_file(opt.out_dir, cfg);
  if (r.dense && !opt.resume && r.ranks.root()) record_upcycle_source(opt.out_dir, *r.dense);
  build_model(r);
  open_records(r);

  NonfiniteGuard nonfinite(cfg.train.on_nonfinite, opt.out_dir,
                           [&](const std::string& line) { r.say(line); });
  StepContext ctx{cfg,     r.ranks,    r.model,   *r.optimizer, r.params,
                  *r.data, r.data_rng, nonfinite, opt.stop};
  r.started = Clock::now();
  r.time_offset = r.state.time_s;
  Interval interval;
  while (r.state.step < cfg.train.steps) {
    const StepResult s = train_step(ctx, r.state.step);
    r.state.step += 1;
    r.state.skipped_steps += s.applied ? 0 : 1;
    r.session_step_s += s.step_s;
    r.session_steps += 1;
    interval.add(s);
    const bool last = r.state.step == cfg.train.steps;
    if (due(r.state.step, cfg.train.log_every, last) && interval.steps > 0) {
      log_interval(r, interval);
      interval = Interval{};
    }
    if (due(r.state.step, cfg.train.eval_every, last)) evaluate_and_log(r);
    const int stop = s.stop_requested ? stop_signal(opt) : 0;
    if (opt.checkpoints && (due(r.state.step, cfg.train.checkpoint_every, last) || stop != 0))
      checkpoint(r);
    if (stop != 0 && !last)
      throw Interrupted{stop, r.state.step,
                        opt.checkpoints ? newest_checkpoint(opt.out_dir).value_or("") : ""};
  }
  return finish(r);
}

}  // namespace sw
