#include "train/trainer.h"

#include <signal.h>

#include <chrono>
#include <cmath>
#include <csignal>
#include <ctime>
#include <filesystem>
#include <iostream>
#include <optional>
#include <thread>

#include <ATen/CPUGeneratorImpl.h>
#include <fmt/format.h>

#include "data/dataset.h"
#include "model/random.h"
#include "model/transformer.h"
#include "train/checkpoint.h"
#include "train/footprint.h"
#include "train/metrics.h"
#include "train/optimizer.h"
#include "train/ranks.h"
#include "train/schedule.h"
#include "util/dir_lock.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/parallel.h"

namespace sw {
namespace fs = std::filesystem;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string human_count(double v) {
  if (v >= 1e6) return fmt::format("{:.2f}M", v / 1e6);
  if (v >= 1e3) return fmt::format("{:.1f}k", v / 1e3);
  return fmt::format("{:.0f}", v);
}

std::string human_duration(double s) {
  const int64_t t = static_cast<int64_t>(std::llround(s));
  if (t >= 3600) return fmt::format("{}h{:02d}m", t / 3600, (t % 3600) / 60);
  if (t >= 60) return fmt::format("{}m{:02d}s", t / 60, t % 60);
  return fmt::format("{}s", t);
}

// Mean cross-entropy over fixed batches, in eval mode, leaving the training RNG untouched.
// The batches run at once, each alone on one thread and with a generator of its own, except
// with expert parallelism, whose forward holds collectives. With several ranks each
// evaluates its share of every batch and the means are averaged.
double evaluate(Transformer& model, const std::vector<Batch>& batches, const Ranks& par) {
  auto gen = at::detail::getDefaultCPUGenerator();
  const torch::Tensor rng_state = gen.get_state();
  model->eval();
  std::vector<double> losses(batches.size());
  auto run = [&](int64_t begin, int64_t end) {
    torch::NoGradGuard no_grad;
    for (int64_t i = begin; i < end; ++i) {
      const Batch& b = batches[static_cast<size_t>(i)];
      // Random drop order (over eval_capacity_factor) from a generator of the batch's own.
      GeneratorScope scope(
          at::make_generator<at::CPUGeneratorImpl>(0x6576616cULL + static_cast<uint64_t>(i)));
      ModelOutput out = model->forward(par.share(b.x_BS));
      const int64_t V = out.logits_BSV.size(-1);
      losses[static_cast<size_t>(i)] = torch::cross_entropy_loss(out.logits_BSV.reshape({-1, V}),
                                                                 par.share(b.y_BS).reshape({-1}))
                                           .item<double>();
    }
  };
  const auto n = static_cast<int64_t>(batches.size());
  if (par.expert_parallel)
    run(0, n);
  else
    sw::parallel_for(0, n, 1, run);
  model->train();
  gen.set_state(rng_state);
  double sum = 0;
  for (double l : losses)
    sum += l;  // in batch order
  if (par.comm) {
    torch::Tensor t = torch::tensor({sum}, torch::kFloat64);
    par.comm->all_reduce_sum(t);
    sum = t.item<double>() / static_cast<double>(par.world);
  }
  return sum / static_cast<double>(batches.size());
}

// One forward's training loss: cross-entropy plus the weighted auxiliary losses.
struct StepLoss {
  torch::Tensor ce, total;
  AuxLosses aux;
};
StepLoss step_loss(const ModelOutput& out, const torch::Tensor& y_BS, const Config& cfg) {
  const int64_t V = out.logits_BSV.size(-1);
  StepLoss l;
  l.ce = torch::cross_entropy_loss(out.logits_BSV.reshape({-1, V}), y_BS.reshape({-1}));
  l.aux = total_aux_losses(out.moe);
  l.total = l.ce + cfg.moe.alpha * l.aux.lb + cfg.moe.z_loss * l.aux.z;
  return l;
}

// One step's forward and backward over train.micro_batches micro-batches of this rank's
// share of the batch, each its own routing group. They run at once, each alone on one
// thread, except with expert parallelism, whose forward and backward hold collectives; each
// draws from its own generator, seeded from the default one, and their gradients are summed
// in micro-batch order, so the step does not depend on the thread count. Leaves the
// gradient of the mean loss over the micro-batches in every parameter's .grad.
struct MicroBatchStep {
  double ce = 0, lb = 0, z = 0;            // means over the micro-batches
  double forward_s = 0, backward_s = 0;    // summed over the micro-batches
  std::vector<std::vector<MoeStats>> moe;  // each micro-batch's routing statistics
};
MicroBatchStep forward_backward_micro(Transformer& model, const torch::Tensor& x_BS,
                                      const torch::Tensor& y_BS, const Config& cfg,
                                      const Ranks& par) {
  const int64_t m = cfg.train.micro_batches;
  const auto n = static_cast<size_t>(m);
  const std::vector<torch::Tensor> xs = x_BS.chunk(m), ys = y_BS.chunk(m);
  const torch::Tensor seeds = torch::empty({m}, torch::kInt64).random_();  // default generator
  const std::vector<torch::Tensor> params = model->parameters();
  std::vector<std::vector<torch::Tensor>> grads(n);
  std::vector<double> ce(n), lb(n), z(n), fwd_s(n), bwd_s(n);
  MicroBatchStep r;
  r.moe.resize(n);
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const auto u = static_cast<size_t>(i);
      const auto t0 = Clock::now();
      GeneratorScope scope(at::make_generator<at::CPUGeneratorImpl>(
          static_cast<uint64_t>(seeds[i].item<int64_t>())));
      ModelOutput out = model->forward(xs[u]);
      const StepLoss l = step_loss(out, ys[u], cfg);
      const auto t1 = Clock::now();
      grads[u] = torch::autograd::grad({l.total / static_cast<double>(m)}, params,
                                       /*grad_outputs=*/{},
                                       /*retain_graph=*/false, /*create_graph=*/false,
                                       /*allow_unused=*/true);
      fwd_s[u] = std::chrono::duration<double>(t1 - t0).count();
      bwd_s[u] = seconds_since(t1);
      ce[u] = l.ce.item<double>();
      lb[u] = l.aux.lb.item<double>();
      z[u] = l.aux.z.item<double>();
      r.moe[u] = std::move(out.moe);
    }
  };
  if (par.expert_parallel)
    run(0, m);
  else
    sw::parallel_for(0, m, 1, run);
  for (size_t j = 0; j < params.size(); ++j) {
    torch::Tensor g;
    for (size_t i = 0; i < n; ++i) {  // in micro-batch order
      const torch::Tensor& gi = grads[i][j];
      if (gi.defined()) g = g.defined() ? g + gi : gi.contiguous();
    }
    torch::Tensor p = params[j];
    p.mutable_grad() = g;
  }
  for (size_t i = 0; i < n; ++i) {
    r.ce += ce[i] / static_cast<double>(m);
    r.lb += lb[i] / static_cast<double>(m);
    r.z += z[i] / static_cast<double>(m);
    r.forward_s += fwd_s[i];
    r.backward_s += bwd_s[i];
  }
  return r;
}

// With train.on_nonfinite = skip, this many non-finite steps in a row stop the run anyway.
constexpr int64_t kMaxConsecutiveSkips = 10;

// The parameters whose gradients hold a NaN or an infinity, e.g.
// "gradients of blocks.1.ffn.experts.w_in, blocks.1.ffn.router.proj.weight".
std::string nonfinite_gradients(torch::nn::Module& model) {
  std::vector<std::string> names;
  for (const auto& item : model.named_parameters()) {
    const torch::Tensor& gr = item.value().grad();
    if (gr.defined() && !torch::isfinite(gr).all().item<bool>()) names.push_back(item.key());
  }
  if (names.empty()) return "";
  if (names.size() > 4) {
    const size_t more = names.size() - 3;
    names.resize(3);
    names.push_back(fmt::format("and {} more", more));
  }
  return fmt::format("gradients of {}", fmt::join(names, ", "));
}

// A generator seed for rank `rank` > 0, distinct per rank and per step it starts from.
uint64_t rank_seed(int64_t seed, int64_t rank, int64_t step) {
  uint64_t x = static_cast<uint64_t>(seed) ^ (0x9E3779B97F4A7C15ULL * static_cast<uint64_t>(rank));
  x ^= 0xBF58476D1CE4E5B9ULL * static_cast<uint64_t>(step + 1);
  return x >> 1;  // non-negative as int64
}

std::vector<Batch> fixed_batches(const Dataset& data, Split split, const TrainConfig& t,
                                 uint64_t salt) {
  Rng rng(static_cast<uint64_t>(t.seed) ^ salt);
  std::vector<Batch> out;
  for (int64_t i = 0; i < t.eval_batches; ++i)
    out.push_back(data.sample(split, t.batch_size, rng));
  return out;
}

void check_no_run_in(const std::string& dir) {
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

// While it lives, SIGINT and SIGTERM end the process at once with their default action
// (exit status 130 / 143), as for a rank blocked in the rendezvous, which would otherwise
// notice a stop request only after dist.timeout_s. A request already made acts at once.
class StopAtOnce {
 public:
  explicit StopAtOnce(const std::atomic<int>* stop) {
    struct sigaction dfl {};
    dfl.sa_handler = SIG_DFL;
    sigemptyset(&dfl.sa_mask);
    sigaction(SIGINT, &dfl, &old_int_);
    sigaction(SIGTERM, &dfl, &old_term_);
    if (stop != nullptr && stop->load() != 0) std::raise(stop->load());
  }
  ~StopAtOnce() {
    sigaction(SIGINT, &old_int_, nullptr);
    sigaction(SIGTERM, &old_term_, nullptr);
  }
  StopAtOnce(const StopAtOnce&) = delete;
  StopAtOnce& operator=(const StopAtOnce&) = delete;

 private:
  struct sigaction old_int_ {};
  struct sigaction old_term_ {};
};

DirLock lock_run_dir(const std::string& dir) {
  return DirLock::acquire(
      dir, "run directory",
      fmt::format("two processes cannot write one run. Wait for it to finish, stop it "
                  "(its checkpoint lets 'switch-train --out {} --resume' go on), or train "
                  "into another --out",
                  dir));
}

void create_run_dir(const std::string& dir) {
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir))
    throw Error(fmt::format("cannot create run directory '{}': {}", dir,
                            ec ? ec.message() : "not a directory"));
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

std::string default_run_dir() {
  std::time_t now = std::time(nullptr);
  std::tm tm{};
  localtime_r(&now, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y%m%d-%H%M%S", &tm);
  return std::string("runs/") + buf;
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

nlohmann::ordered_json train(const Config& cfg, const TrainOptions& opt) {
  validate(cfg);
  const std::optional<DistEnv> env = dist_env_from_environment();
  Ranks par;
  par.world = env ? env->world_size : 1;
  par.rank = env ? env->rank : 0;
  validate_world(cfg, par.world);
  par.expert_parallel = expert_parallel_ranks(cfg, par.world) > 1 && cfg.n_moe_layers() > 0;
  auto say = [&](const std::string& line) {
    if (!opt.quiet && par.root()) std::cout << line << std::endl;
  };
  int64_t local_ranks = par.world;
  if (const char* v = std::getenv("LOCAL_WORLD_SIZE")) local_ranks = std::max(1, std::atoi(v));
  const int64_t threads = configure_threads(cfg.train.threads, local_ranks);
  say(fmt::format("threads: {} (intra-op){}", threads,
                  par.world > 1 ? fmt::format(" per rank, {} ranks", par.world) : ""));

  // One writer per run directory: rank 0 holds its lock from here to the end, taken before
  // anything in it is read for resuming (a new run's, once its directory exists, below).
  DirLock lock;
  if (opt.resume && par.root()) lock = lock_run_dir(opt.out_dir);

  // Where the run starts from (every rank reads the checkpoint).
  std::optional<CheckpointMeta> ckpt;
  if (opt.resume) {
    if (auto dir = newest_checkpoint(opt.out_dir)) {
      ckpt = read_checkpoint_meta(*dir);
      say(fmt::format("resuming {} from step {}", *dir, ckpt->state.step));
    } else {
      say(fmt::format("{} has no complete checkpoint yet: starting it from step 0", opt.out_dir));
    }
  }

  // Data, before anything is written: a resumed run keeps its checkpoint's vocabulary.
  const std::u32string text = Dataset::read_text(cfg.data.path);
  const std::string source = "data file '" + cfg.data.path + "'";
  Dataset data = ckpt ? Dataset(text, ckpt->vocab, cfg.data.val_fraction, cfg.model.seq_len, source)
                      : Dataset(text, cfg.data.val_fraction, cfg.model.seq_len, source);
  const int64_t V = data.vocab().size();
  say(fmt::format("data: {} ({} characters, vocabulary {}, train {} / val {})", cfg.data.path,
                  text.size(), V, data.size(Split::Train), data.size(Split::Val)));
  // Memory, before the model is allocated and before a new run's directory is created.
  const MemoryEstimate need = estimate_memory(cfg, V, par.world, static_cast<int64_t>(text.size()));
  say("memory: about " + need.describe() + (par.world > 1 ? " per rank" : ""));
  // The ranks sharing this machine's memory: LOCAL_WORLD_SIZE (set by --nproc and torchrun).
  const char* local = std::getenv("LOCAL_WORLD_SIZE");
  check_fits(cfg, need, local != nullptr ? std::max(1, std::atoi(local)) : 1, memory_limit());
  if (!opt.resume) {
    if (par.root()) {
      create_run_dir(opt.out_dir);
      lock = lock_run_dir(opt.out_dir);  // a writer already there is named, not overwritten
    }
    check_no_run_in(opt.out_dir);  // every rank fails alike, before rendezvous
  }

  if (env && par.world > 1) {
    const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(cfg.dist.timeout_s * 1e3));
    {
      const StopAtOnce at_once(opt.stop);  // nothing to save while waiting for the others
      par.comm = Comm::connect(*env, timeout);
    }
    say(fmt::format("ranks: {} joined at {}:{} ({}; global batch {} = {} per rank)", par.world,
                    env->master_addr, env->master_port,
                    par.expert_parallel ? fmt::format("{} experts per rank per layer",
                                                      cfg.moe.n_experts / par.world)
                                        : std::string("experts replicated"),
                    cfg.train.batch_size, cfg.train.batch_size / par.world));
  }
  if ((!opt.resume || opt.config_changed) && par.root()) write_config_file(opt.out_dir, cfg);

  // Every rank builds the whole model from the same seed, so an expert's initial weights do
  // not depend on the number of ranks; then each keeps its slice.
  torch::manual_seed(static_cast<uint64_t>(cfg.train.seed));
  Transformer model(cfg, V);
  model->train();
  const int64_t n_params = model->n_params(), n_active = model->n_active_params();
  auto optimizer = make_optimizer(*model, cfg.train);
  say(fmt::format("model: {} layers ({} MoE, {} experts each), {} parameters, {} active per token",
                  cfg.model.n_layers, cfg.n_moe_layers(), cfg.moe.n_experts,
                  human_count(static_cast<double>(n_params)),
                  human_count(static_cast<double>(n_active))));

  Rng data_rng(static_cast<uint64_t>(cfg.train.seed));  // the same global stream on every rank
  TrainState state;
  const std::string metrics_path = (fs::path(opt.out_dir) / "metrics.jsonl").string();
  bool rng_restored = false;
  if (ckpt) {
    load_weights(ckpt->dir, *model);
    rng_restored = load_optimizer_and_rng(ckpt->dir, *optimizer, par.rank, par.world);
    state = ckpt->state;
    data_rng.set_state(state.data_rng);
  }
  // Rank 0 continues the single-process generator stream; the others get their own.
  if (par.rank > 0 && !rng_restored)
    torch::manual_seed(rank_seed(cfg.train.seed, par.rank, state.step));
  if (par.expert_parallel) shard_experts(model, *optimizer, par.comm);
  const ParamSplit params = split_parameters(model, par.expert_parallel);

  if (opt.resume && par.root()) truncate_metrics(metrics_path, state.step);
  std::optional<MetricsWriter> metrics;
  if (par.root()) metrics.emplace(metrics_path);

  const std::vector<Batch> val_batches = fixed_batches(data, Split::Val, cfg.train, 0x76616cULL);
  const std::vector<Batch> train_eval_batches =
      fixed_batches(data, Split::Train, cfg.train, 0x747261ULL);

  const int64_t tokens_per_step = cfg.train.batch_size * cfg.model.seq_len;  // global
  const auto t_start = Clock::now();
  const double time_offset = state.time_s;
  auto now_s = [&] { return time_offset + seconds_since(t_start); };

  RoutingAccumulator routing;
  double interval_ce = 0, interval_lb = 0, interval_z = 0, interval_step_s = 0;
  double interval_fwd_s = 0, interval_bwd_s = 0, interval_opt_s = 0;  // phases of the steps
  int64_t interval_steps = 0;
  int64_t consecutive_skips = 0;  // non-finite steps in a row (train.on_nonfinite = skip)
  CommStats interval_comm;        // this rank's collectives in the interval's training steps
  double session_step_s = 0;
  int64_t session_steps = 0;
  double last_val = std::nan(""), last_train = std::nan("");

  for (int64_t step = state.step; step < cfg.train.steps; ++step) {
    const auto t_step = Clock::now();
    const CommStats comm_before = par.comm ? par.comm->stats() : CommStats{};
    const double lr = lr_at(cfg.train, step);
    set_lr(*optimizer, lr);

    Batch batch = data.sample(Split::Train, cfg.train.batch_size, data_rng);
    std::vector<double> v;  // the step's cross-entropy, lb and z losses, and a stop request
    std::vector<std::vector<MoeStats>> step_moe;
    if (cfg.train.micro_batches == 1) {
      ModelOutput out = model->forward(par.share(batch.x_BS));
      const StepLoss l = step_loss(out, par.share(batch.y_BS), cfg);

      const auto t_backward = Clock::now();
      interval_fwd_s += std::chrono::duration<double>(t_backward - t_step).count();
      model->zero_grad(/*set_to_none=*/true);  // backward then hands over its gradients
      l.total.backward();
      interval_bwd_s += seconds_since(t_backward);
      v = {l.ce.item<double>(), l.aux.lb.item<double>(), l.aux.z.item<double>()};
      step_moe.push_back(std::move(out.moe));
    } else {
      model->zero_grad(/*set_to_none=*/true);
      MicroBatchStep mb =
          forward_backward_micro(model, par.share(batch.x_BS), par.share(batch.y_BS), cfg, par);
      // The phases overlap on the threads: the step's wall time so far, split between
      // them as the micro-batches' own times were.
      const double wall = seconds_since(t_step);
      const double f = mb.forward_s / std::max(mb.forward_s + mb.backward_s, 1e-12);
      interval_fwd_s += wall * f;
      interval_bwd_s += wall * (1 - f);
      v = {mb.ce, mb.lb, mb.z};
      step_moe = std::move(mb.moe);
    }
    const auto t_optimizer = Clock::now();

    // The step's values over all ranks: losses averaged, a stop request from any rank
    // stops every rank after this same step.
    v.push_back(static_cast<double>(opt.stop ? opt.stop->load() : 0));
    double grad_sq = std::nan("");
    if (par.comm) {
      grad_sq = reduce_gradients(*par.comm, params, v);
      for (int i = 0; i < 3; ++i)
        v[i] /= static_cast<double>(par.world);
    }
    const double ce_v = v[0], lb_v = v[1], z_v = v[2];
    const double loss_v = ce_v + cfg.moe.alpha * lb_v + cfg.moe.z_loss * z_v;
    GradNorm g{};
    if (par.comm) {
      g.norm = std::sqrt(grad_sq);
      g.clip_scale = std::min(1.0, cfg.train.grad_clip / (g.norm + 1e-6));
    } else {
      g = sw::grad_norm(model->parameters(), cfg.train.grad_clip);
    }
    const double grad_norm = g.norm;
    const bool finite = std::isfinite(loss_v) && std::isfinite(grad_norm);
    if (!finite) {
      // Name where it came from: the first stage of a forward pass on this batch whose
      // output is not finite, else the parameters whose gradients are not.
      std::string where = model->first_nonfinite(par.share(batch.x_BS));
      if (where.empty()) where = nonfinite_gradients(*model);
      std::string what = fmt::format(
          "step {}: {} (cross-entropy {}, load-balancing {}, gradient norm {}){}", step + 1,
          std::isfinite(loss_v) ? "the gradients are not finite" : "the loss is not finite", ce_v,
          lb_v, grad_norm, where.empty() ? "" : "; first non-finite: " + where);
      if (cfg.train.on_nonfinite != OnNonfinite::Skip ||
          consecutive_skips >= kMaxConsecutiveSkips) {
        const auto kept = newest_checkpoint(opt.out_dir);
        throw Error(fmt::format(
            "{}{}. {}; try a lower train.lr{}.", what,
            consecutive_skips > 0 ? fmt::format(" ({} steps in a row)", consecutive_skips + 1) : "",
            kept ? "The last checkpoint is kept: " + *kept : std::string("No checkpoint yet"),
            cfg.train.on_nonfinite == OnNonfinite::Skip ? "" : " or train.on_nonfinite=skip"));
      }
      ++consecutive_skips;
      ++state.skipped_steps;
      model->zero_grad(/*set_to_none=*/true);
      say(what + "; step skipped (train.on_nonfinite=skip)");
    } else {
      consecutive_skips = 0;
      if (cfg.train.grad_clip > 0)
        optimizer->set_grad_scale(g.clip_scale);  // clipping, applied inside the update
      optimizer->step();
    }
    interval_opt_s += seconds_since(t_optimizer);

    const double step_s = seconds_since(t_step);
    if (par.comm) {
      const CommStats& c = par.comm->stats();
      interval_comm.all_to_all_calls += c.all_to_all_calls - comm_before.all_to_all_calls;
      interval_comm.all_to_all_bytes += c.all_to_all_bytes - comm_before.all_to_all_bytes;
      interval_comm.all_reduce_calls += c.all_reduce_calls - comm_before.all_reduce_calls;
      interval_comm.all_reduce_bytes += c.all_reduce_bytes - comm_before.all_reduce_bytes;
      interval_comm.seconds += c.seconds - comm_before.seconds;
    }
    interval_step_s += step_s;
    session_step_s += step_s;
    ++session_steps;
    if (finite) {  // a skipped step's values stay out of the averages
      ++interval_steps;
      interval_ce += ce_v;
      interval_lb += lb_v;
      interval_z += z_v;
      for (const auto& mo : step_moe)
        routing.add(mo);
    }
    state.step = step + 1;

    const bool last = state.step == cfg.train.steps;
    if ((state.step % cfg.train.log_every == 0 || last) && interval_steps > 0) {
      if (par.comm) routing.sum_over_ranks(*par.comm);
      const double tok_s = static_cast<double>(interval_steps * tokens_per_step) / interval_step_s;
      const double ce_mean = interval_ce / static_cast<double>(interval_steps);
      const double lb_mean = interval_lb / static_cast<double>(interval_steps);
      const double z_mean = interval_z / static_cast<double>(interval_steps);
      const double drop = routing.drop_fraction();
      nlohmann::ordered_json rec = {
          {"kind", "train"},
          {"step", state.step},
          {"time_s", now_s()},
          {"lr", lr},
          {"loss", ce_mean + cfg.moe.alpha * lb_mean + cfg.moe.z_loss * z_mean},
          {"ce", ce_mean},
          {"lb_loss", lb_mean},
          {"z_loss", z_mean},
          {"drop_frac", drop},
          {"tokens_per_s", tok_s},
          {"ms_forward", 1000.0 * interval_fwd_s / static_cast<double>(interval_steps)},
          {"ms_backward", 1000.0 * interval_bwd_s / static_cast<double>(interval_steps)},
          {"ms_optimizer", 1000.0 * interval_opt_s / static_cast<double>(interval_steps)},
          {"steps_in_record", interval_steps},
          {"layers", routing.to_json()}};
      rec["grad_norm"] = grad_norm;  // of the record's last step, before clipping
      if (state.skipped_steps > 0) rec["skipped_steps"] = state.skipped_steps;
      if (par.comm) {  // rank 0's collectives per training step
        const double n = static_cast<double>(interval_steps);
        rec["comm"] = {
            {"ms", 1000.0 * interval_comm.seconds / n},
            {"all_to_all_calls", static_cast<double>(interval_comm.all_to_all_calls) / n},
            {"all_to_all_bytes", static_cast<double>(interval_comm.all_to_all_bytes) / n},
            {"all_reduce_calls", static_cast<double>(interval_comm.all_reduce_calls) / n},
            {"all_reduce_bytes", static_cast<double>(interval_comm.all_reduce_bytes) / n}};
        interval_comm = CommStats{};
      }
      if (metrics) metrics->write(rec);
      const double eta = session_step_s / static_cast<double>(session_steps) *
                         static_cast<double>(cfg.train.steps - state.step);
      say(
          fmt::format("step {}/{} | loss {:.4f} | lb {:.3f} | drop {:.1f}% | lr {:.2e} | {:.0f} ms "
                      "| {} tok/s | eta {}",
                      state.step, cfg.train.steps, ce_mean, lb_mean, 100.0 * drop, lr,
                      1000.0 * interval_step_s / static_cast<double>(interval_steps),
                      human_count(tok_s), human_duration(eta)));
      interval_ce = interval_lb = interval_z = interval_step_s = 0;
      interval_fwd_s = interval_bwd_s = interval_opt_s = 0;
      interval_steps = 0;
      routing.reset();
    }
    if (state.step % cfg.train.eval_every == 0 || last) {
      last_val = evaluate(model, val_batches, par);
      last_train = evaluate(model, train_eval_batches, par);
      state.best_val_loss = std::min(state.best_val_loss, last_val);
      if (metrics)
        metrics->write(nlohmann::ordered_json{{"kind", "eval"},
                                              {"step", state.step},
                                              {"time_s", now_s()},
                                              {"val_loss", last_val},
                                              {"train_loss", last_train}});
      say(fmt::format("eval step {} | train {:.4f} | val {:.4f} | best val {:.4f}", state.step,
                      last_train, last_val, state.best_val_loss));
    }
    int stop_signal = 0;
    if (v[3] > 0) {  // this rank's own signal, or the one another rank received
      const int mine = opt.stop ? opt.stop->load() : 0;
      stop_signal = mine != 0 ? mine : SIGTERM;
    }
    if (opt.checkpoints &&
        (state.step % cfg.train.checkpoint_every == 0 || last || stop_signal != 0)) {
      state.time_s = now_s();
      state.data_rng = data_rng.state();
      auto save = [&](const torch::Tensor& rank_rng) {
        if (!par.root()) return;
        save_checkpoint(opt.out_dir, cfg, data.vocab(), *model, *optimizer, state, rank_rng);
        prune_checkpoints(opt.out_dir, cfg.train.keep_checkpoints);
      };
      if (par.comm) {
        const torch::Tensor rank_rng = gather_rng_states(*par.comm);
        if (par.expert_parallel)
          with_full_experts(*par.comm, model, *optimizer, [&] { save(rank_rng); });
        else
          save(rank_rng);
        par.comm->barrier();  // no rank goes on (or stops) before the checkpoint is on disk
      } else {
        save({});
      }
    }
    if (stop_signal != 0 && !last)
      throw Interrupted{stop_signal, state.step,
                        opt.checkpoints ? newest_checkpoint(opt.out_dir).value_or("") : ""};
  }

  if (!std::isfinite(last_val)) {  // resumed a finished run: evaluate what is there
    last_val = evaluate(model, val_batches, par);
    last_train = evaluate(model, train_eval_batches, par);
    state.best_val_loss = std::min(state.best_val_loss, last_val);
  }
  const double wall_s = now_s();
  nlohmann::ordered_json summary = {
      {"steps", state.step},
      {"final_train_loss", last_train},
      {"final_val_loss", last_val},
      {"best_val_loss", state.best_val_loss},
      {"wall_s", wall_s},
      {"tokens_per_s", session_steps > 0
                           ? static_cast<double>(session_steps * tokens_per_step) / session_step_s
                           : 0.0},
      {"tokens_trained", state.step * tokens_per_step},
      {"params_total", n_params},
      {"params_active", n_active},
      {"threads", threads},
      {"skipped_steps", state.skipped_steps},
      {"ranks", par.world},
      {"expert_parallel", par.expert_parallel},
  };
  if (par.root())
    write_file_atomic((fs::path(opt.out_dir) / "summary.json").string(), summary.dump(2) + "\n");
  say(fmt::format("done: {} steps in {} | val loss {:.4f} (best {:.4f}) | {} tok/s | run in {}",
                  state.step, human_duration(wall_s), last_val, state.best_val_loss,
                  human_count(summary["tokens_per_s"].get<double>()), opt.out_dir));
  return summary;
}

}  // namespace sw
