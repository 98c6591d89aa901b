#include "train/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <regex>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "util/error.h"
#include "util/fs.h"

namespace sw {
namespace fs = std::filesystem;

namespace {

const std::regex kCkptName(R"(ckpt-(\d{6,}))");

std::string ckpt_name(int64_t step) {
  return fmt::format("ckpt-{:06d}", step);
}

std::vector<std::pair<int64_t, std::string>> complete_checkpoints(const std::string& run_dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(run_dir, ec)) {
    std::smatch m;
    const std::string name = entry.path().filename().string();
    if (entry.is_directory() && std::regex_match(name, m, kCkptName) &&
        fs::exists(entry.path() / "state.json"))
      out.emplace_back(std::stoll(m[1].str()), entry.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace

c10::Dict<std::string, at::Tensor> state_dict(const torch::nn::Module& model) {
  c10::Dict<std::string, at::Tensor> dict;
  for (const auto& item : model.named_parameters())
    dict.insert(item.key(), item.value().detach());
  for (const auto& item : model.named_buffers())
    dict.insert(item.key(), item.value().detach());
  return dict;
}

void save_checkpoint(const std::string& run_dir, const Config& cfg, const Vocab& vocab,
                     const torch::nn::Module& model, torch::optim::Optimizer& opt,
                     const TrainState& state, const torch::Tensor& rank_rng) {
  const fs::path final_dir = fs::path(run_dir) / ckpt_name(state.step);
  const fs::path tmp_dir = fs::path(run_dir) / (ckpt_name(state.step) + ".tmp");
  std::error_code ec;
  fs::remove_all(tmp_dir, ec);
  if (!fs::create_directories(tmp_dir, ec) || ec)
    throw Error(fmt::format("cannot create checkpoint directory '{}': {}", tmp_dir.string(),
                            ec ? ec.message() : "unknown error"));
  try {
    write_file_atomic((tmp_dir / "model.pt").string(), torch::pickle_save(state_dict(model)));

    const std::string optim_path = (tmp_dir / "optim.pt").string();
    torch::save(opt, optim_path);
    fsync_path(optim_path);

    c10::Dict<std::string, at::Tensor> rng;
    rng.insert("torch_cpu", at::detail::getDefaultCPUGenerator().get_state());
    if (rank_rng.defined()) rng.insert("torch_cpu_ranks", rank_rng);
    write_file_atomic((tmp_dir / "rng.pt").string(), torch::pickle_save(rng));

    write_file_atomic((tmp_dir / "state.json").string(), checkpoint_state_json(cfg, vocab, state));
  } catch (const c10::Error& e) {
    fs::remove_all(tmp_dir, ec);
    throw Error(fmt::format("cannot write checkpoint '{}': {}", tmp_dir.string(),
                            e.what_without_backtrace()));
  } catch (...) {
    fs::remove_all(tmp_dir, ec);
    throw;
  }
  fs::remove_all(final_dir, ec);  // a checkpoint of the same step from an abandoned attempt
  fs::rename(tmp_dir, final_dir, ec);
  if (ec)
    throw Error(fmt::format("cannot rename '{}' to '{}': {}", tmp_dir.string(), final_dir.string(),
                            ec.message()));
  fsync_path(run_dir);
}

std::optional<std::string> newest_checkpoint(const std::string& run_dir) {
  auto all = complete_checkpoints(run_dir);
  if (all.empty()) return std::nullopt;
  return all.back().second;
}

CheckpointMeta read_checkpoint_meta(const std::string& ckpt_dir) {
  const std::string path = (fs::path(ckpt_dir) / "state.json").string();
  CheckpointMeta m = parse_checkpoint_state(read_file(path, "checkpoint state"), path);
  m.dir = ckpt_dir;
  return m;
}

void load_weights(const std::string& ckpt_dir, torch::nn::Module& model) {
  const std::string path = (fs::path(ckpt_dir) / "model.pt").string();
  const std::string bytes = read_file(path, "checkpoint weights");
  c10::impl::GenericDict dict{c10::StringType::get(), c10::TensorType::get()};
  try {
    dict = torch::pickle_load(std::vector<char>(bytes.begin(), bytes.end())).toGenericDict();
  } catch (const c10::Error& e) {
    throw Error(fmt::format("{}: not a readable weights file (truncated or corrupted?): {}", path,
                            e.what_without_backtrace()));
  }
  torch::NoGradGuard no_grad;
  auto params = model.named_parameters();
  auto buffers = model.named_buffers();
  size_t matched = 0;
  auto load_one = [&](const std::string& name, torch::Tensor& dst) {
    auto it = dict.find(name);
    if (it == dict.end())
      throw Error(
          fmt::format("{}: has no tensor '{}' that this model needs (a checkpoint of "
                      "another architecture?)",
                      path, name));
    const at::Tensor src = it->value().toTensor();
    if (src.sizes() != dst.sizes())
      throw Error(fmt::format("{}: tensor '{}' has shape {} but the model expects {}", path, name,
                              fmt::join(src.sizes(), "x"), fmt::join(dst.sizes(), "x")));
    dst.copy_(src);
    ++matched;
  };
  for (auto& item : params)
    load_one(item.key(), item.value());
  for (auto& item : buffers)
    load_one(item.key(), item.value());
  if (matched != dict.size()) {
    for (const auto& entry : dict) {
      const std::string name = entry.key().toStringRef();
      if (!params.contains(name) && !buffers.contains(name))
        throw Error(fmt::format(
            "{}: holds tensor '{}' that this model does not have (another architecture?)", path,
            name));
    }
  }
}

bool load_optimizer_and_rng(const std::string& ckpt_dir, torch::optim::Optimizer& opt, int64_t rank,
                            int64_t world) {
  const std::string optim_path = (fs::path(ckpt_dir) / "optim.pt").string();
  const std::string rng_path = (fs::path(ckpt_dir) / "rng.pt").string();
  try {
    torch::load(opt, optim_path);
  } catch (const c10::Error& e) {
    throw Error(fmt::format("{}: cannot load the optimizer state: {}", optim_path,
                            e.what_without_backtrace()));
  }
  const std::string bytes = read_file(rng_path, "checkpoint RNG state");
  try {
    auto dict = torch::pickle_load(std::vector<char>(bytes.begin(), bytes.end())).toGenericDict();
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    if (dict.contains("torch_cpu_ranks")) {
      const at::Tensor all = dict.at("torch_cpu_ranks").toTensor();
      if (all.size(0) == world) {
        gen.set_state(all[rank].contiguous());
        return true;
      }
    }
    if (rank != 0) return false;
    gen.set_state(dict.at("torch_cpu").toTensor());
    return true;
  } catch (const c10::Error& e) {
    throw Error(
        fmt::format("{}: cannot load the RNG state: {}", rng_path, e.what_without_backtrace()));
  }
}

void prune_checkpoints(const std::string& run_dir, int64_t keep) {
  auto all = complete_checkpoints(run_dir);
  std::error_code ec;
  for (size_t i = 0; i + static_cast<size_t>(keep) < all.size(); ++i)
    fs::remove_all(all[i].second, ec);
  static const std::regex tmp_name(R"(ckpt-\d{6,}\.tmp)");
  for (const auto& entry : fs::directory_iterator(run_dir, ec))
    if (std::regex_match(entry.path().filename().string(), tmp_name))
      fs::remove_all(entry.path(), ec);
}

}  // namespace sw
