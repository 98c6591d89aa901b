#include "train/metrics.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>

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

std::vector<nlohmann::json> read_metrics(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || json_depth(line) > kMaxJsonDepth) continue;  // not a record of ours
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) continue;  // a torn line from a crash
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
    if (l.counts_E.defined()) {
      l.counts_E += stats[i].counts_E;
      l.prob_sum_E += stats[i].prob_sum_E;
    } else {
      l.counts_E = stats[i].counts_E.clone();
      l.prob_sum_E = stats[i].prob_sum_E.clone();
    }
  }
}

nlohmann::ordered_json RoutingAccumulator::to_json() const {
  nlohmann::ordered_json arr = nlohmann::ordered_json::array();
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& l = layers_[i];
    if (!l.counts_E.defined()) continue;
    torch::Tensor c = l.counts_E.contiguous(), p = l.prob_sum_E.to(torch::kFloat64).contiguous();
    arr.push_back(
        {{"layer", l.layer},
         {"tokens", l.tokens},
         {"counts", std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel())},
         {"dropped", l.dropped},
         {"prob_sum",
          std::vector<double>(p.data_ptr<double>(), p.data_ptr<double>() + p.numel())}});
  }
  return arr;
}

void RoutingAccumulator::sum_over_ranks(Comm& comm) {
  // One float64 all-reduce of [tokens, dropped, counts..., prob sums...] per layer; counts
  // stay exact in a double far beyond any run's token count.
  std::vector<torch::Tensor> parts;
  for (const Layer& l : layers_) {
    auto opts = torch::TensorOptions().dtype(torch::kFloat64);
    parts.push_back(
        torch::tensor({static_cast<double>(l.tokens), static_cast<double>(l.dropped)}, opts));
    parts.push_back(l.counts_E.to(torch::kFloat64));
    parts.push_back(l.prob_sum_E.to(torch::kFloat64));
  }
  if (parts.empty()) return;
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
