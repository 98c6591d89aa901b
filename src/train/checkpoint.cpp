#include "train/checkpoint.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <unordered_map>

#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/unpickler.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "train/adamw_state.h"
#include "train/pickle_check.h"
#include "train/tensor_files.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/json_depth.h"

namespace sw {
namespace fs = std::filesystem;

namespace {

const std::regex kCkptName(R"(ckpt-(\d{6,18}))");  // 18 digits: any step an int64 holds

std::string ckpt_name(int64_t step) {
  return fmt::format("ckpt-{:06d}", step);
}

std::vector<std::pair<int64_t, std::string>> complete_checkpoints(const std::string& run_dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(run_dir, ec)) {
    std::smatch m;
    const std::string name = entry.path().filename().string();
    std::error_code e1, e2;  // a link loop or an unreadable entry is no checkpoint
    if (entry.is_directory(e1) && std::regex_match(name, m, kCkptName) &&
        fs::exists(entry.path() / "state.json", e2))
      out.emplace_back(std::stoll(m[1].str()), entry.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Every tensor reachable from `v` (dict values, lists, tuples).
void collect_tensors(const c10::IValue& v, std::vector<at::Tensor>& out, int depth = 0) {
  if (depth > 8) return;
  if (v.isTensor()) {
    out.push_back(v.toTensor());
  } else if (v.isGenericDict()) {
    for (const auto& e : v.toGenericDict())
      collect_tensors(e.value(), out, depth + 1);
  } else if (v.isList()) {
    for (const auto& e : v.toListRef())
      collect_tensors(e, out, depth + 1);
  } else if (v.isTuple()) {
    for (const auto& e : v.toTupleRef().elements())
      collect_tensors(e, out, depth + 1);
  }
}

// Reads a pickle archive (torch::pickle_save's zip: data.pkl and one record per storage)
// and checks, before anything uses them, that every tensor lies within the bytes its record
// really holds: LibTorch's reader trusts the sizes and offsets the pickle declares.
c10::IValue read_pickle_archive(const std::string& bytes, const std::string& path) {
  std::unordered_map<const void*, size_t> record_bytes;  // storage data -> its record's size
  c10::IValue value;
  try {
    std::istringstream in(bytes);
    caffe2::serialize::PyTorchStreamReader reader(&in);
    at::DataPtr pickle;
    size_t pickle_size = 0;
    std::tie(pickle, pickle_size) = reader.getRecord("data.pkl");
    const char* data = static_cast<const char*>(pickle.get());
    check_pickle(std::string(data, pickle_size), path + " (data.pkl)");
    size_t pos = 0;
    auto read = [&](char* buf, size_t n) -> size_t {
      n = std::min(n, pickle_size - pos);
      if (n > 0) std::memcpy(buf, data + pos, n);
      pos += n;
      return n;
    };
    auto read_record = [&](const std::string& key) -> at::DataPtr {
      at::DataPtr ptr;
      size_t size = 0;
      std::tie(ptr, size) = reader.getRecord("data/" + key);
      record_bytes[ptr.get()] = size;
      return ptr;
    };
    torch::jit::Unpickler unpickler(read, nullptr, nullptr, read_record, c10::nullopt);
    unpickler.set_version(reader.version());
    value = unpickler.parse_ivalue();
  } catch (const Error&) {
    throw;
  } catch (const c10::Error& e) {
    throw Error(fmt::format("{}: not a readable archive (truncated or corrupted?): {}", path,
                            first_line(e.what_without_backtrace())));
  } catch (const std::exception& e) {  // the reader's own std::stoull, vector::at, bad_alloc
    throw Error(fmt::format("{}: not a readable archive (truncated or corrupted?): {}", path,
                            first_line(e.what())));
  }
  std::vector<at::Tensor> tensors;
  collect_tensors(value, tensors);
  for (const at::Tensor& t : tensors) {
    if (t.numel() == 0) continue;
    if (t.layout() != at::kStrided || !t.has_storage() || t.device() != at::kCPU)
      throw Error(fmt::format("{}: holds a tensor that is not a plain CPU tensor", path));
    const auto it = record_bytes.find(t.storage().data());
    const int64_t item = static_cast<int64_t>(t.element_size());
    const bool inside =
        it != record_bytes.end() && t.storage().nbytes() <= it->second && t.is_contiguous() &&
        t.storage_offset() >= 0 &&
        t.numel() <= (static_cast<int64_t>(t.storage().nbytes()) / item) - t.storage_offset();
    if (!inside)
      throw Error(
          fmt::format("{}: a tensor of shape {} does not lie whole in the data its "
                      "archive holds (truncated or corrupted?)",
                      path, fmt::join(t.sizes(), "x")));
  }
  return value;
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
    // Serialized in memory, then written like every other file: a full disk is an error
    // of that write, not a throw from LibTorch's file writer as it closes.
    const NamedTensors weights = named_tensors(state_dict(model));
    write_file_atomic((tmp_dir / "model.pt").string(), torch_save_bytes(weights));
    write_file_atomic((tmp_dir / "model.safetensors").string(),
                      safetensors_bytes(weights, {{"format", "pt"},
                                                  {"config", to_json(cfg).dump()},
                                                  {"vocab", utf8_encode(vocab.chars())},
                                                  {"step", std::to_string(state.step)}}));
    write_file_atomic((tmp_dir / "optim.pt").string(),
                      torch_save_bytes(named_tensors(optimizer_dict(opt))));

    NamedTensors rng = {{"torch_cpu", at::detail::getDefaultCPUGenerator().get_state()}};
    if (rank_rng.defined()) rng.emplace_back("torch_cpu_ranks", rank_rng);
    write_file_atomic((tmp_dir / "rng.pt").string(), torch_save_bytes(rng));

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

std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& run_dir) {
  return complete_checkpoints(run_dir);
}

int64_t checkpoint_world(const std::string& ckpt_dir) {
  const std::string path = (fs::path(ckpt_dir) / "rng.pt").string();
  const c10::IValue archive =
      read_pickle_archive(read_file(path, "checkpoint RNG state", 64u << 20), path);
  if (!archive.isGenericDict()) throw Error(fmt::format("{}: not an RNG state file", path));
  const auto dict = archive.toGenericDict();
  if (!dict.contains("torch_cpu_ranks")) return 1;
  const c10::IValue all = dict.at("torch_cpu_ranks");
  if (!all.isTensor() || all.toTensor().dim() != 2 || all.toTensor().size(0) < 1)
    throw Error(fmt::format("{}: 'torch_cpu_ranks' is not a [ranks, state] tensor", path));
  return all.toTensor().size(0);
}

CheckpointMeta read_checkpoint_meta(const std::string& ckpt_dir) {
  const std::string path = (fs::path(ckpt_dir) / "state.json").string();
  CheckpointMeta m =
      parse_checkpoint_state(read_file(path, "checkpoint state", kMaxJsonFileBytes), path);
  m.dir = ckpt_dir;
  return m;
}

namespace {

// The tensors of a checkpoint's weights: model.pt, or model.safetensors where there is no
// model.pt. `path` is set to the file read.
std::map<std::string, at::Tensor> read_weights_file(const std::string& ckpt_dir, uint64_t limit,
                                                    std::string& path) {
  std::map<std::string, at::Tensor> out;
  const fs::path pt = fs::path(ckpt_dir) / "model.pt";
  const fs::path st = fs::path(ckpt_dir) / "model.safetensors";
  std::error_code ec1, ec2;
  if (!fs::exists(pt, ec1) && fs::exists(st, ec2)) {
    path = st.string();
    for (auto& [name, t] :
         read_safetensors(read_file(path, "checkpoint weights", limit), path).tensors)
      out.emplace(name, std::move(t));
    return out;
  }
  path = pt.string();
  const c10::IValue archive =
      read_pickle_archive(read_file(path, "checkpoint weights", limit), path);
  if (!archive.isGenericDict())
    throw Error(fmt::format("{}: not a weights file: it holds a {}, not a dict of tensors", path,
                            archive.tagKind()));
  for (const auto& entry : archive.toGenericDict()) {
    if (!entry.key().isString())
      throw Error(fmt::format("{}: holds an entry with a key of type {}, not a parameter name",
                              path, entry.key().tagKind()));
    const std::string& name = entry.key().toStringRef();
    if (!entry.value().isTensor())
      throw Error(fmt::format("{}: entry '{}' holds a {}, not a tensor", path, name,
                              entry.value().tagKind()));
    out.emplace(name, entry.value().toTensor());
  }
  return out;
}

}  // namespace

void load_weights(const std::string& ckpt_dir, torch::nn::Module& model) {
  // At most what this model's tensors take, with room for the archive's names and headers:
  // a larger file is not this model's (and a sparse one could claim any size).
  uint64_t expected = 0;
  for (const auto& t : model.parameters())
    expected += static_cast<uint64_t>(t.numel()) * 4;
  for (const auto& t : model.buffers())
    expected += static_cast<uint64_t>(t.numel()) * 4;
  std::string path;
  const std::map<std::string, at::Tensor> dict =
      read_weights_file(ckpt_dir, 2 * expected + (16u << 20), path);
  for (const auto& [name, t] : dict)
    if (t.scalar_type() != at::kFloat)
      throw Error(fmt::format("{}: tensor '{}' has dtype {}; switch's weights are float32", path,
                              name, c10::toString(t.scalar_type())));
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
    const at::Tensor& src = it->second;
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
    for (const auto& [name, t] : dict)
      if (!params.contains(name) && !buffers.contains(name))
        throw Error(fmt::format(
            "{}: holds tensor '{}' that this model does not have (another architecture?)", path,
            name));
  }
}

namespace {

// A moment tensor of a loaded optimizer state that the fused update may stream over `p`:
// same dtype and shape, contiguous, its declared storage large enough.
void check_moment(const torch::Tensor& m, const torch::Tensor& p, const std::string& path,
                  const std::string& what, size_t index) {
  const auto fail = [&](const std::string& why) {
    throw Error(
        fmt::format("{}: the {} of parameter {} {} (an optimizer state of another "
                    "model?)",
                    path, what, index, why));
  };
  if (!m.defined()) fail("is missing");
  if (m.scalar_type() != p.scalar_type())
    fail(fmt::format("has dtype {}, the parameter {}", c10::toString(m.scalar_type()),
                     c10::toString(p.scalar_type())));
  if (m.sizes() != p.sizes())
    fail(fmt::format("has shape {}, the parameter {}", fmt::join(m.sizes(), "x"),
                     fmt::join(p.sizes(), "x")));
  if (!m.is_contiguous() || m.storage_offset() < 0 ||
      (m.storage_offset() + m.numel()) * static_cast<int64_t>(m.element_size()) >
          static_cast<int64_t>(m.storage().nbytes()))
    fail("does not lie whole and contiguous in its storage");
}

}  // namespace

namespace {

// Every parameter of `opt`, in the order of its groups.
std::vector<torch::Tensor> optimizer_params(torch::optim::Optimizer& opt) {
  std::vector<torch::Tensor> out;
  for (auto& group : opt.param_groups())
    for (const auto& p : group.params())
      out.push_back(p);
  return out;
}

// Reads the plain optim.pt (see optimizer_dict) into `opt`, every entry checked first.
void load_optimizer_dict(const std::string& bytes, const std::string& path,
                         torch::optim::Optimizer& opt) {
  const c10::IValue archive = read_pickle_archive(bytes, path);
  if (!archive.isGenericDict())
    throw Error(fmt::format("{}: not an optimizer state: it holds a {}", path, archive.tagKind()));
  const std::vector<torch::Tensor> params = optimizer_params(opt);
  struct Entry {
    at::Tensor step, m, v;
  };
  std::map<size_t, Entry> entries;
  const std::regex name(R"(state\.(\d{1,9})\.(step|exp_avg|exp_avg_sq))");
  for (const auto& e : archive.toGenericDict()) {
    std::smatch match;
    const std::string key = e.key().isString() ? e.key().toStringRef() : "";
    if (!e.value().isTensor() || !std::regex_match(key, match, name))
      throw Error(fmt::format(
          "{}: holds an entry {} that is not state.<i>.step, .exp_avg or "
          ".exp_avg_sq with a tensor",
          path, e.key().isString() ? "'" + key + "'" : "with a key of type " + e.key().tagKind()));
    const size_t i = std::stoul(match[1].str());
    if (i >= params.size())
      throw Error(
          fmt::format("{}: holds state for parameter {}, the model has {} (an optimizer "
                      "state of another model?)",
                      path, i, params.size()));
    Entry& entry = entries[i];
    (match[2] == "step"      ? entry.step
     : match[2] == "exp_avg" ? entry.m
                             : entry.v) = e.value().toTensor();
  }
  auto& state = opt.state();
  using Key = typename std::decay_t<decltype(state)>::key_type;
  std::set<const void*> storages;  // the fused update writes every moment: none may alias
  for (auto& [i, entry] : entries) {
    const torch::Tensor& p = params[i];
    check_moment(entry.m, p, path, "first moment", i);
    check_moment(entry.v, p, path, "second moment", i);
    for (const at::Tensor* t : {&entry.m, &entry.v})
      if (t->numel() > 0 && !storages.insert(t->storage().data()).second)
        throw Error(
            fmt::format("{}: the moments of parameter {} share their data with another "
                        "tensor",
                        path, i));
    if (!entry.step.defined() || entry.step.scalar_type() != at::kLong || entry.step.numel() != 1 ||
        entry.step.item<int64_t>() < 0 || entry.step.item<int64_t>() > (int64_t{1} << 62))
      throw Error(
          fmt::format("{}: the step of parameter {} is not one int64 in [0, 2^62]", path, i));
  }
  state.clear();
  for (auto& [i, entry] : entries) {
    const torch::Tensor& p = params[i];
    auto st = std::make_unique<torch::optim::AdamWParamState>();
    st->step(entry.step.item<int64_t>());
    st->exp_avg(entry.m);
    st->exp_avg_sq(entry.v);
    state[state_key<Key>(p.unsafeGetTensorImpl())] = std::move(st);
  }
}

}  // namespace

c10::Dict<std::string, at::Tensor> optimizer_dict(torch::optim::Optimizer& opt) {
  c10::Dict<std::string, at::Tensor> dict;
  const std::vector<torch::Tensor> params = optimizer_params(opt);
  for (size_t i = 0; i < params.size(); ++i)
    if (const auto* st = adamw_state(opt, params[i])) {
      dict.insert(fmt::format("state.{}.step", i), torch::tensor(st->step(), torch::kLong));
      dict.insert(fmt::format("state.{}.exp_avg", i), st->exp_avg().detach());
      dict.insert(fmt::format("state.{}.exp_avg_sq", i), st->exp_avg_sq().detach());
    }
  return dict;
}

bool load_optimizer_and_rng(const std::string& ckpt_dir, torch::optim::Optimizer& opt, int64_t rank,
                            int64_t world) {
  const std::string optim_path = (fs::path(ckpt_dir) / "optim.pt").string();
  const std::string rng_path = (fs::path(ckpt_dir) / "rng.pt").string();
  uint64_t expected = 0;  // two fp32 moments per parameter, as for the weights above
  for (const auto& t : optimizer_params(opt))
    expected += static_cast<uint64_t>(t.numel()) * 8;
  const std::string optim_bytes =
      read_file(optim_path, "checkpoint optimizer state", 2 * expected + (16u << 20));
  bool legacy = false;  // LibTorch's module archive, as torch::save(optimizer) writes it
  try {
    std::istringstream in(optim_bytes);
    legacy = caffe2::serialize::PyTorchStreamReader(&in).hasRecord("constants.pkl");
  } catch (const std::exception&) {  // not an archive at all: read_pickle_archive says so
  }
  if (legacy)
    throw Error(fmt::format(
        "{}: an optimizer state in LibTorch's module format, as versions before the plain "
        "optim.pt wrote it; it carries TorchScript code, which switch does not run. Resume "
        "from a checkpoint this version wrote",
        optim_path));
  load_optimizer_dict(optim_bytes, optim_path, opt);
  const c10::IValue archive =
      read_pickle_archive(read_file(rng_path, "checkpoint RNG state",
                                    (static_cast<size_t>(std::max<int64_t>(world, 1)) + 2) << 20),
                          rng_path);
  try {
    if (!archive.isGenericDict()) throw Error(fmt::format("{}: not an RNG state file", rng_path));
    auto dict = archive.toGenericDict();
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
  } catch (const Error&) {
    throw;
  } catch (const c10::Error& e) {
    throw Error(fmt::format("{}: cannot load the RNG state: {}", rng_path,
                            first_line(e.what_without_backtrace())));
  } catch (const std::exception& e) {  // an entry missing (std::out_of_range)
    throw Error(fmt::format("{}: cannot load the RNG state: {}", rng_path, first_line(e.what())));
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
