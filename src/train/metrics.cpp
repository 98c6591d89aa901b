#include "train/metrics.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>

#include <fmt/format.h>

#include "util/error.h"
#include "util/fs.h"
#include "util/json_depth.h"

namespace sw {

MetricsWriter::MetricsWriter(const std::string& path) : path_(path) {
  // Never through a link planted in the run directory: the records stay inside it.
  const int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd < 0)
    throw Error(fmt::format("cannot open '{}' for appending: {}", path, std::strerror(errno)));
  f_ = ::fdopen(fd, "ab");
  if (!f_) {
    ::close(fd);
    throw Error(fmt::format("cannot open '{}' for appending", path));
  }
}

MetricsWriter::~MetricsWriter() {
  if (f_) std::fclose(f_);
}

void MetricsWriter::write(const nlohmann::ordered_json& record) {
  const std::string line = record.dump() + "\n";
  if (std::fwrite(line.data(), 1, line.size(), f_) != line.size() || std::fflush(f_) != 0)
    throw Error(fmt::format("cannot append to '{}' (disk full?)", path_));
}

namespace {

// A record as switch writes it: `kind` a string, `step` a count, the numbers numbers, and
// `layers` (when present) a list of objects whose counts are numbers. Others are not ours
// (or were torn by a crash) and are left out, so readers can take the types for granted.
bool well_formed(const nlohmann::json& j) {
  if (!j.is_object()) return false;
  const auto kind = j.find("kind");
  const auto step = j.find("step");
  if (kind == j.end() || !kind->is_string() || step == j.end() || !step->is_number_unsigned())
    return false;
  for (const char* k : {"time_s", "steps_in_record", "drop_frac"}) {  // always finite
    const auto v = j.find(k);
    if (v != j.end() && !v->is_number()) return false;
  }
  for (const char* k : {"val_loss", "train_loss", "loss", "ce", "lb_loss", "z_loss", "balance_loss",
                        "lr", "tokens_per_s", "grad_norm", "ms_forward", "ms_backward",
                        "ms_optimizer"}) {  // null where a value was not finite
    const auto v = j.find(k);
    if (v != j.end() && !v->is_number() && !v->is_null()) return false;
  }
  const auto layers = j.find("layers");
  if (layers == j.end()) return true;
  if (!layers->is_array()) return false;
  for (const auto& l : *layers) {
    if (!l.is_object()) return false;
    for (const char* k : {"counts", "prob_sum"}) {
      const auto v = l.find(k);
      if (v == l.end()) continue;
      if (!v->is_array()) return false;
      for (const auto& x : *v)
        if (!x.is_number()) return false;
    }
  }
  return true;
}

}  // namespace

std::vector<nlohmann::json> read_metrics(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) return out;  // none yet (or a dangling link)
  // A regular file only (a FIFO planted in its place would block), of a bounded size.
  const std::string text = read_file(path, "metrics file", size_t{4} << 30);
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(start, end - start);
    start = end + 1;
    if (line.empty() || json_depth(line) > kMaxJsonDepth) continue;  // not a record of ours
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !well_formed(j)) continue;  // a torn line from a crash
    out.push_back(std::move(j));
  }
  return out;
}

void truncate_metrics(const std::string& path, int64_t max_step) {
  std::string kept;
  for (const auto& j : read_metrics(path))
    if (j.value("step", int64_t{0}) <= max_step) kept += j.dump() + "\n";
  write_file_atomic(path, kept);
}

void RoutingAccumulator::add(const std::vector<MoeStats>& stats) {
  if (layers_.size() != stats.size()) layers_.assign(stats.size(), Layer{});
  for (size_t i = 0; i < stats.size(); ++i) {
    Layer& l = layers_[i];
    l.layer = stats[i].layer;
    l.tokens += stats[i].assignments;
    l.dropped += stats[i].dropped;
    l.rerouted += stats[i].rerouted;
    if (l.counts_E.defined()) {
      l.counts_E += stats[i].counts_E;
      l.prob_sum_E += stats[i].prob_sum_E;
    } else {
      l.counts_E = stats[i].counts_E.clone();
      l.prob_sum_E = stats[i].prob_sum_E.clone();
    }
  }
}

nlohmann::ordered_json RoutingAccumulator::to_json(bool rerouting) const {
  nlohmann::ordered_json arr = nlohmann::ordered_json::array();
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& l = layers_[i];
    if (!l.counts_E.defined()) continue;
    torch::Tensor c = l.counts_E.contiguous(), p = l.prob_sum_E.to(torch::kFloat64).contiguous();
    arr.push_back(
        {{"layer", l.layer},
         {"tokens", l.tokens},
         {"counts", std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel())},
         {"dropped", l.dropped}});
    if (rerouting) arr.back()["rerouted"] = l.rerouted;
    arr.back()["prob_sum"] =
        std::vector<double>(p.data_ptr<double>(), p.data_ptr<double>() + p.numel());
  }
  return arr;
}

void RoutingAccumulator::sum_over_ranks(Comm& comm, bool rerouting) {
  // One float64 all-reduce of [tokens, dropped, counts..., prob sums...] per layer, then
  // the rerouted counts when rerouting; counts stay exact in a double far beyond any run's
  // token count.
  std::vector<torch::Tensor> parts;
  for (const Layer& l : layers_) {
    auto opts = torch::TensorOptions().dtype(torch::kFloat64);
    parts.push_back(
        torch::tensor({static_cast<double>(l.tokens), static_cast<double>(l.dropped)}, opts));
    parts.push_back(l.counts_E.to(torch::kFloat64));
    parts.push_back(l.prob_sum_E.to(torch::kFloat64));
  }
  if (parts.empty()) return;
  if (rerouting)
    for (const Layer& l : layers_)
      parts.push_back(torch::full({1}, static_cast<double>(l.rerouted), torch::kFloat64));
  torch::Tensor buf = torch::cat(parts);
  comm.all_reduce_sum(buf);
  int64_t off = 0;
  for (Layer& l : layers_) {
    const int64_t E = l.counts_E.numel();
    l.tokens = std::llround(buf[off].item<double>());
    l.dropped = std::llround(buf[off + 1].item<double>());
    l.counts_E = buf.narrow(0, off + 2, E).round().to(torch::kInt64);
    l.prob_sum_E = buf.narrow(0, off + 2 + E, E).to(l.prob_sum_E.scalar_type());
    off += 2 + 2 * E;
  }
  if (rerouting)
    for (Layer& l : layers_)
      l.rerouted = std::llround(buf[off++].item<double>());
}

double RoutingAccumulator::drop_fraction() const {
  int64_t tokens = 0, dropped = 0;
  for (const auto& l : layers_) {
    tokens += l.tokens;
    dropped += l.dropped;
  }
  return tokens > 0 ? static_cast<double>(dropped) / static_cast<double>(tokens) : 0.0;
}

}  // namespace sw
