#include "sample/sampler.h"

#include <cmath>

#include <fmt/format.h>

#include "train/trained_model.h"
#include "util/error.h"

namespace sw {

Sampler::Sampler(const std::string& run_dir) {
  TrainedModel t = load_trained_model(run_dir, -1, "sample from");
  // Generation routes every token to its expert: a capacity computed from one short
  // sequence would drop most tokens (capacity is a training-time device).
  t.model->configure_moe([](MoeConfig& m) { m.drop_tokens = false; });
  cfg_ = t.model->cfg;
  vocab_ = t.meta.vocab;
  ckpt_dir_ = t.meta.dir;
  model_ = t.model;
}

std::string Sampler::generate(const SampleOptions& opt,
                              const std::function<void(const std::string&)>& emit) {
  if (!(opt.temperature >= 0) || !std::isfinite(opt.temperature))
    throw Error(fmt::format("--temperature {}: must be a finite number >= 0", opt.temperature));
  if (opt.top_k < 0) throw Error(fmt::format("--top-k {}: must be >= 0", opt.top_k));
  if (opt.chars < 0) throw Error(fmt::format("--chars {}: must be >= 0", opt.chars));
  std::vector<int64_t> ids = vocab_.encode_flag(opt.prompt, "--prompt");
  if (ids.empty()) throw Error("--prompt is empty; give at least one character");

  if (emit) emit(opt.prompt);

  torch::NoGradGuard no_grad;
  at::Generator gen = at::detail::createCPUGenerator(opt.seed);
  const int64_t ctx = cfg_.model.seq_len;
  const int64_t keep = std::max<int64_t>(1, ctx / 2);  // kept when the context is full
  int64_t begin = std::max<int64_t>(0, static_cast<int64_t>(ids.size()) - ctx);
  std::vector<KVCache> caches;  // hold positions begin .. begin + caches[0].len - 1
  std::string out;
  for (int64_t n = 0; n < opt.chars; ++n) {
    if (static_cast<int64_t>(ids.size()) - begin > ctx) {
      begin = static_cast<int64_t>(ids.size()) - keep;
      caches.clear();
    }
    torch::Tensor logits_V;
    if (opt.kv_cache) {
      // Feed what the caches have not seen: the whole context after a reset, else the
      // newest character.
      const int64_t seen = caches.empty() ? 0 : caches[0].len;
      torch::Tensor idx_BS =
          torch::tensor(std::vector<int64_t>(ids.begin() + begin + seen, ids.end()), torch::kInt64)
              .unsqueeze(0);
      logits_V = model_->forward_cached(idx_BS, caches)[0][-1].to(torch::kFloat32);
    } else {
      torch::Tensor idx_BS =
          torch::tensor(std::vector<int64_t>(ids.begin() + begin, ids.end()), torch::kInt64)
              .unsqueeze(0);
      logits_V = model_->forward(idx_BS).logits_BSV[0][-1].to(torch::kFloat32);
    }
    int64_t next;
    if (opt.temperature == 0) {
      next = logits_V.argmax().item<int64_t>();
    } else {
      logits_V = logits_V / opt.temperature;
      if (opt.top_k > 0 && opt.top_k < logits_V.size(0)) {
        const double kth = std::get<0>(logits_V.topk(opt.top_k))[-1].item<double>();
        logits_V = logits_V.masked_fill(logits_V < kth, -std::numeric_limits<float>::infinity());
      }
      torch::Tensor probs_V = torch::softmax(logits_V, -1);
      next = torch::multinomial(probs_V, 1, /*replacement=*/false, gen).item<int64_t>();
    }
    ids.push_back(next);
    const std::string piece = utf8_encode(vocab_.chr(next));
    out += piece;
    if (emit) emit(piece);
  }
  return out;
}

}  // namespace sw
