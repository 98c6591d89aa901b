#include "train/trained_model.h"

#include <filesystem>

#include <fmt/format.h>

#include "train/footprint.h"
#include "util/error.h"

namespace sw {
namespace fs = std::filesystem;

namespace {

std::string steps_text(const std::vector<std::pair<int64_t, std::string>>& all) {
  std::string out;
  for (const auto& c : all)
    out += (out.empty() ? "" : ", ") + std::to_string(c.first);
  return out;
}

std::string find_checkpoint(const std::string& run_dir, int64_t step, const std::string& use) {
  const auto all = list_checkpoints(run_dir);
  if (all.empty())
    throw Error(
        fmt::format("run directory '{}' has no complete checkpoint (ckpt-*/) to {}; train it "
                    "first with 'switch-train --out {}'",
                    run_dir, use, run_dir));
  if (step < 0) return all.back().second;
  for (const auto& c : all)
    if (c.first == step) return c.second;
  throw Error(
      fmt::format("run directory '{}' has no complete checkpoint of step {}; it has step{} {}",
                  run_dir, step, all.size() == 1 ? "" : "s", steps_text(all)));
}

TrainedModel load_from(const std::string& dir, bool ranks) {
  TrainedModel t;
  t.meta = read_checkpoint_meta(dir);
  if (ranks) t.world = checkpoint_world(dir);
  // The checkpoint's config says how big a model to build: checked before it is allocated.
  const MemoryEstimate need = estimate_memory(t.meta.config, t.meta.vocab.size(), 1, 0);
  const MemoryLimit limit = memory_limit();
  if (limit.bytes >= 0 && need.build + need.runtime > limit.bytes)
    throw Error(
        fmt::format("{}: the checkpoint's model does not fit in memory: its weights "
                    "need about {}, and this process may use {} ({})",
                    dir, human_bytes(need.build), human_bytes(limit.bytes), limit.source));
  t.model = Transformer(t.meta.config, t.meta.vocab.size());
  load_weights(dir, *t.model);
  t.model->eval();
  return t;
}

}  // namespace

TrainedModel load_trained_model(const std::string& run_dir, int64_t step, const std::string& use,
                                bool ranks) {
  if (!fs::is_directory(run_dir))
    throw Error(fmt::format("--run '{}' is not a directory", run_dir));
  // A run still training deletes its older checkpoints (train.keep_checkpoints) once a newer
  // one is in place: the newest, when it goes while it is read, is taken again.
  for (int attempt = 0;; ++attempt) {
    const std::string dir = find_checkpoint(run_dir, step, use);
    try {
      return load_from(dir, ranks);
    } catch (const Error&) {
      const std::optional<std::string> newest = newest_checkpoint(run_dir);
      if (step < 0 && newest && *newest != dir && attempt < 4) continue;
      std::error_code ec;
      if (fs::exists(dir, ec)) throw;
      throw Error(fmt::format(
          "{} was deleted while it was read: its run, still training, keeps only its newest "
          "checkpoints (train.keep_checkpoints); ask for a newer one",
          dir));
    }
  }
}

}  // namespace sw
