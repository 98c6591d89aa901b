#include "train/footprint.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include <fmt/format.h>

#include "data/tokens.h"
#include "util/error.h"

namespace sw {

namespace {

constexpr double kFloat = 4;  // bytes of an fp32 value

// The first line of a small text file, "" when it cannot be read.
std::string read_line(const std::string& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  return line;
}

// A byte count from a cgroup file; < 0 for "max", a v1 "no limit" (>= 2^60) or unreadable.
double read_bytes(const std::string& path) {
  const std::string s = read_line(path);
  if (s.empty() || s == "max") return -1;
  try {
    size_t used = 0;
    const double v = std::stod(s, &used);
    return v >= std::ldexp(1.0, 60) ? -1 : v;
  } catch (const std::exception&) {
    return -1;
  }
}

// The value of `key` in a cgroup memory.stat file ("key value" lines); 0 when absent.
double stat_value(const std::string& path, const std::string& key) {
  std::ifstream in(path);
  std::string k;
  double v = 0;
  while (in >> k >> v)
    if (k == key) return v;
  return 0;
}

// The process's cgroup path for a controller line of /proc/self/cgroup ("0::/a/b" for v2,
// "4:memory:/a/b" for v1).
std::string cgroup_path(const std::string& root, bool v2) {
  std::ifstream in(root + "/proc/self/cgroup");
  std::string line;
  while (std::getline(in, line)) {
    const size_t a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1);
    bool match = v2 ? line.compare(0, a, "0") == 0 && controllers.empty() : false;
    if (!v2) {
      std::stringstream ss(controllers);
      std::string c;
      while (std::getline(ss, c, ','))
        match = match || c == "memory";
    }
    if (match) return line.substr(b + 1);
  }
  return "/";
}

// The smallest (limit - usage) over the group at `mount`/`path` and every group above it;
// < 0 when none has a limit.
double cgroup_room(const std::string& mount, std::string path, const char* limit_file,
                   const char* usage_file, const char* inactive_key) {
  double room = -1;
  for (;;) {
    const std::string dir = mount + (path == "/" ? "" : path);
    const double limit = read_bytes(dir + "/" + limit_file);
    if (limit >= 0) {
      // Inactive page cache counts as used but is reclaimed on demand (the "working set").
      const double used = std::max(
          0.0, read_bytes(dir + "/" + usage_file) - stat_value(dir + "/memory.stat", inactive_key));
      const double r = std::max(0.0, limit - used);
      room = room < 0 ? r : std::min(room, r);
    }
    if (path.empty() || path == "/") break;
    const size_t slash = path.rfind('/');
    path = slash == 0 || slash == std::string::npos ? "/" : path.substr(0, slash);
  }
  return room;
}

double mem_available(const std::string& root) {
  std::ifstream in(root + "/proc/meminfo");
  std::string key;
  double kb = 0;
  std::string unit;
  while (in >> key >> kb) {
    std::getline(in, unit);
    if (key == "MemAvailable:") return kb * 1024;
  }
  return -1;
}

}  // namespace

ParamCount count_params(const Config& c, int64_t vocab) {
  const double D = static_cast<double>(c.model.d_model), F = static_cast<double>(c.model.d_ff);
  const double V = static_cast<double>(vocab), T = static_cast<double>(c.model.seq_len);
  const double E = static_cast<double>(c.moe.n_experts);
  const double L = static_cast<double>(c.model.n_layers);
  const double moe_layers = static_cast<double>(c.n_moe_layers());
  const double ln = 2 * D;
  const double attn = (D * 3 * D + 3 * D) + (D * D + D);
  const double Fe = static_cast<double>(c.expert_width());
  const double Fs = static_cast<double>(c.moe.shared_experts) * Fe;
  // An FFN of hidden width f: its input projection is twice as wide for swiglu.
  const double gated = c.model.activation == Activation::Swiglu ? 2 : 1;
  auto ffn_params = [&](double f) { return (D * gated * f + gated * f) + (f * D + D); };
  ParamCount p;
  p.experts = moe_layers * E * ffn_params(Fe);
  p.total = V * D + (c.model.pos_emb ? T * D : 0) + L * (2 * ln + attn) +
            (L - moe_layers) * ffn_params(F) + moe_layers * (D * E + E) + p.experts +
            (Fs > 0 ? moe_layers * ffn_params(Fs) : 0) + ln + (D * V + V);
  return p;
}

double MemoryEstimate::total() const {
  // Evaluation and a training step's activations are never alive at once.
  return std::max(build, params + grads + moments) + std::max(activations, eval) + data + runtime;
}

std::string MemoryEstimate::describe() const {
  return fmt::format(
      "{} (parameters {}, gradients {}, AdamW moments {}, activations {}, evaluation {}, "
      "data {}, runtime {})",
      human_bytes(total()), human_bytes(params), human_bytes(grads), human_bytes(moments),
      human_bytes(activations), human_bytes(eval), human_bytes(data), human_bytes(runtime));
}

MemoryEstimate estimate_memory(const Config& c, int64_t vocab, int64_t world,
                               int64_t corpus_chars) {
  const ParamCount p = count_params(c, vocab);
  const int64_t ep = world > 1 && c.n_moe_layers() > 0 ? expert_parallel_ranks(c, world) : 1;
  const double kept =
      p.total - p.experts + p.experts / static_cast<double>(std::max<int64_t>(1, ep));
  MemoryEstimate m;
  // The attention's causal mask, a context x context buffer in every block.
  const double masks = static_cast<double>(c.model.n_layers) *
                       static_cast<double>(c.model.seq_len) * static_cast<double>(c.model.seq_len);
  m.params = (kept + masks) * kFloat;
  m.grads = kept * kFloat;
  m.moments = 2 * kept * kFloat;
  m.build = (p.total + masks) * kFloat;

  // Floats kept per token for the backward, per block: the residual stream, LayerNorms,
  // q/k/v and the attention's output (8 x d_model), its probabilities (heads x context),
  // the FFN's hidden layer before and after the activation (for MoE blocks the routed
  // copies, at most k x the capacity factor per token, and the router's scores); plus one
  // block's worth of gradients in flight, the embeddings and the logits.
  const double D = static_cast<double>(c.model.d_model), F = static_cast<double>(c.model.d_ff);
  const double H = static_cast<double>(c.model.n_heads), T = static_cast<double>(c.model.seq_len);
  const double E = static_cast<double>(c.moe.n_experts), V = static_cast<double>(vocab);
  const double k = static_cast<double>(c.moe.top_k);
  // Rows the experts compute per token: k for the grouped and loop strategies (only routed
  // tokens); the capacity strategy pads every expert to its capacity, and without dropping
  // to the busiest expert's load, counted at its worst (every expert as busy as all).
  const bool padded = c.moe.strategy == Strategy::Capacity;
  auto rows = [&](double factor) {
    if (!padded) return k;
    return c.moe.drop_tokens ? k * std::max(1.0, factor) : k * std::max(1.0, E);
  };
  const double routed = rows(c.moe.capacity_factor);
  const double eval_routed = rows(c.moe.eval_capacity_factor);
  const double gated = c.model.activation == Activation::Swiglu ? 1.5 : 1;  // 3F instead of 2F
  const double dense_block = 8 * D + H * T + 2 * gated * F;
  const double Fe = static_cast<double>(c.expert_width());
  const double Fs = static_cast<double>(c.moe.shared_experts) * Fe;
  const double moe_block =
      8 * D + H * T + 4 * E + routed * (2 * D + 2 * gated * Fe) + 2 * gated * Fs;
  const double moe_layers = static_cast<double>(c.n_moe_layers());
  const double L = static_cast<double>(c.model.n_layers);
  const double widest = std::max(moe_layers > 0 ? moe_block : 0.0, dense_block);
  const double per_token =
      (L - moe_layers) * dense_block + moe_layers * moe_block + widest + 4 * D + 4 * V;
  const double rank_batch =
      std::ceil(static_cast<double>(c.train.batch_size) / static_cast<double>(world));
  m.activations = per_token * rank_batch * T * kFloat;
  // Evaluation runs between steps, one batch at a time without a graph (at the evaluation
  // capacity factor).
  const double batch_tokens = static_cast<double>(c.train.batch_size) * T;
  const double eval_block = std::max(
      dense_block, moe_layers > 0 ? 8 * D + H * T + 4 * E + eval_routed * (2 * D + 2 * gated * Fe) +
                                        2 * gated * Fs
                                  : 0.0);
  m.eval = (3 * eval_block + 4 * V) * batch_tokens * kFloat;
  // The prepared token file as mapped (its pages shared with every process reading it), and
  // the fixed evaluation batches (inputs and targets, for both splits).
  m.data = token_width(vocab) * static_cast<double>(corpus_chars) +
           4 * static_cast<double>(c.train.eval_batches) * batch_tokens * 8;
  m.runtime = 256.0 * 1024 * 1024;
  return m;
}

MemoryLimit memory_limit(const std::string& root) {
  MemoryLimit out{-1, ""};
  auto take = [&](double bytes, const std::string& source) {
    if (bytes >= 0 && (out.bytes < 0 || bytes < out.bytes)) out = {bytes, source};
  };
  take(cgroup_room(root + "/sys/fs/cgroup", cgroup_path(root, true), "memory.max", "memory.current",
                   "inactive_file"),
       "cgroup memory.max");
  take(cgroup_room(root + "/sys/fs/cgroup/memory", cgroup_path(root, false),
                   "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
       "cgroup memory.limit_in_bytes");
  take(mem_available(root), "MemAvailable");
  return out;
}

std::string human_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  while (bytes >= 1024 && u < 6) {
    bytes /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{:.0f} B", bytes) : fmt::format("{:.1f} {}", bytes, units[u]);
}

void check_fits(const Config& c, const MemoryEstimate& need, int64_t ranks_here,
                const MemoryLimit& limit) {
  if (limit.bytes < 0) return;  // nothing to compare with
  const double total = need.total() * static_cast<double>(std::max<int64_t>(1, ranks_here));
  if (total <= limit.bytes) return;
  throw ConfigError(fmt::format(
      "the run does not fit in memory: it needs about {}{}, and this process may use {} "
      "({}). Lower model.d_model ({}), model.d_ff ({}), model.n_layers ({}), "
      "moe.n_experts ({}), train.batch_size ({}) or model.seq_len ({})",
      need.describe(),
      ranks_here > 1 ? fmt::format(" per rank, {} for {} ranks on this machine", human_bytes(total),
                                   ranks_here)
                     : "",
      human_bytes(limit.bytes), limit.source, c.model.d_model, c.model.d_ff, c.model.n_layers,
      c.moe.n_experts, c.train.batch_size, c.model.seq_len));
}

}  // namespace sw
