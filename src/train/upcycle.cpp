#include "train/upcycle.h"

#include <filesystem>

#include <fmt/format.h>

#include "train/checkpoint.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/json_depth.h"

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

UpcycleSource upcycle_source(const std::string& run_dir, const Config& cfg) {
  std::error_code ec;
  if (!fs::is_directory(run_dir, ec))
    throw Error(fmt::format("--init-from '{}': no such run directory", run_dir));
  const bool is_checkpoint = fs::exists(fs::path(run_dir) / "state.json", ec);
  const auto dir = is_checkpoint ? std::optional<std::string>(run_dir) : newest_checkpoint(run_dir);
  if (!dir)
    throw Error(fmt::format(
        "--init-from '{}': no complete checkpoint there (a run directory of switch-train "
        "holds ckpt-<step>/ folders)",
        run_dir));
  UpcycleSource src;
  src.meta = read_checkpoint_meta(*dir);
  const std::string why = upcycle_mismatch(src.meta.config, cfg);
  if (!why.empty()) throw Error(fmt::format("--init-from '{}': {}", run_dir, why));
  src.dense = Transformer(src.meta.config, src.meta.vocab.size());
  load_weights(src.meta.dir, *src.dense);
  return src;
}

void upcycle(const UpcycleSource& source, Transformer& model) {
  auto from = source.dense->named_parameters();
  for (const auto& b : source.dense->named_buffers())
    from.insert(b.key(), b.value());
  const std::string& where = source.meta.dir;
  auto get = [&](const std::string& name, at::IntArrayRef shape) {
    const torch::Tensor* t = from.find(name);
    if (!t) throw Error(fmt::format("{}: has no tensor '{}' for the upcycled model", where, name));
    if (t->sizes() != shape)
      throw Error(fmt::format("{}: tensor '{}' has shape {}, the upcycled model needs {}", where,
                              name, fmt::join(t->sizes(), "x"), fmt::join(shape, "x")));
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

void record_upcycle_source(const std::string& run_dir, const UpcycleSource& source) {
  std::error_code ec;
  const fs::path abs = fs::absolute(source.meta.dir, ec);
  const nlohmann::json j = {{"checkpoint", ec ? source.meta.dir : abs.string()}};
  write_file_atomic((fs::path(run_dir) / "init_from.json").string(), j.dump() + "\n");
}

std::string recorded_upcycle_source(const std::string& run_dir) {
  const fs::path path = fs::path(run_dir) / "init_from.json";
  std::error_code ec;
  if (!fs::exists(path, ec)) return "";
  const nlohmann::json j = parse_json_text(
      read_file(path.string(), "upcycling record", kMaxJsonFileBytes), path.string());
  if (!j.is_object() || !j.contains("checkpoint") || !j["checkpoint"].is_string())
    throw Error(fmt::format("{}: expected {{\"checkpoint\": \"<dense checkpoint folder>\"}}",
                            path.string()));
  return j["checkpoint"].get<std::string>();
}

}  // namespace sw
