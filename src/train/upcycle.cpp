#include "train/upcycle.h"

#include <filesystem>

#include <fmt/format.h>

#include "train/checkpoint.h"
#include "util/error.h"

namespace sw {
namespace {

namespace fs = std::filesystem;

// "blocks.3.ffn.experts.w_in" -> {"blocks.3.ffn.", "w_in"}; {"", ""} for other names.
std::pair<std::string, std::string> expert_tensor(const std::string& name) {
  const std::string marker = "ffn.experts.";
  const size_t at = name.find(marker);
  if (at == std::string::npos) return {"", ""};
  return {name.substr(0, at + 4), name.substr(at + marker.size())};
}

bool is_router(const std::string& name) {
  return name.find(".ffn.router.") != std::string::npos;
}

}  // namespace

CheckpointMeta upcycle_source(const std::string& run_dir, const Config& cfg) {
  std::error_code ec;
  if (!fs::is_directory(run_dir, ec))
    throw Error(fmt::format("--init-from '{}': no such run directory", run_dir));
  const auto dir = newest_checkpoint(run_dir);
  if (!dir)
    throw Error(fmt::format(
        "--init-from '{}': no complete checkpoint there (a run directory of switch-train "
        "holds ckpt-<step>/ folders)",
        run_dir));
  CheckpointMeta src = read_checkpoint_meta(*dir);
  const Config& d = src.config;
  if (d.n_moe_layers() > 0)
    throw Error(fmt::format(
        "--init-from '{}': that run is not dense (moe.every = {}); upcycling starts from a "
        "dense model, moe.every = 0",
        run_dir, d.moe.every));
  auto differ = [&](const std::string& key, const std::string& there, const std::string& here) {
    if (there != here)
      throw Error(fmt::format(
          "--init-from '{}': {} is {} there but {} here; the upcycled model copies the dense "
          "one's tensors, so it must agree (set {}={})",
          run_dir, key, there, here, key, there));
  };
  const ModelConfig &a = d.model, &b = cfg.model;
  differ("model.d_model", std::to_string(a.d_model), std::to_string(b.d_model));
  differ("model.n_layers", std::to_string(a.n_layers), std::to_string(b.n_layers));
  differ("model.n_heads", std::to_string(a.n_heads), std::to_string(b.n_heads));
  differ("model.seq_len", std::to_string(a.seq_len), std::to_string(b.seq_len));
  differ("model.pos_emb", a.pos_emb ? "true" : "false", b.pos_emb ? "true" : "false");
  differ("model.activation", name_of(a.activation), name_of(b.activation));
  differ("model.d_ff", std::to_string(a.d_ff), std::to_string(b.d_ff));
  if (cfg.moe.d_expert != 0) differ("moe.d_expert", "0", std::to_string(cfg.moe.d_expert));
  if (cfg.moe.shared_experts != 0)
    throw Error(fmt::format(
        "--init-from '{}': moe.shared_experts = {}: upcycling copies the dense FFN into the "
        "routed experts and has nothing to start shared experts from; set "
        "moe.shared_experts=0",
        run_dir, cfg.moe.shared_experts));
  return src;
}

void upcycle(const CheckpointMeta& source, Transformer& model) {
  Transformer dense(source.config, source.vocab.size());
  load_weights(source.dir, *dense);
  auto from = dense->named_parameters();
  for (const auto& b : dense->named_buffers())
    from.insert(b.key(), b.value());
  auto get = [&](const std::string& name, at::IntArrayRef shape) {
    const torch::Tensor* t = from.find(name);
    if (!t)
      throw Error(fmt::format("{}: has no tensor '{}' for the upcycled model", source.dir, name));
    if (t->sizes() != shape)
      throw Error(fmt::format("{}: tensor '{}' has shape {}, the upcycled model needs {}",
                              source.dir, name, fmt::join(t->sizes(), "x"), fmt::join(shape, "x")));
    return *t;
  };
  torch::NoGradGuard no_grad;
  auto fill = [&](torch::Tensor& dst, const std::string& name) {
    const auto [prefix, which] = expert_tensor(name);
    if (prefix.empty()) {
      if (!is_router(name)) dst.copy_(get(name, dst.sizes()));
      return;
    }
    // Every expert e gets the dense FFN: w_in[e] = fc_in.weight^T, b_in[e] = fc_in.bias, ...
    const bool in = which.rfind("_in") == which.size() - 3;
    const bool weight = which[0] == 'w';
    const std::string dense_name =
        prefix + (in ? "fc_in." : "fc_out.") + (weight ? "weight" : "bias");
    const auto one = dst.sizes().slice(1);
    torch::Tensor t = weight ? get(dense_name, {one[1], one[0]}).t() : get(dense_name, one);
    dst.copy_(t.unsqueeze(0).expand_as(dst));
  };
  for (auto& p : model->named_parameters())
    fill(p.value(), p.key());
  for (auto& b : model->named_buffers())
    fill(b.value(), b.key());
}

}  // namespace sw
