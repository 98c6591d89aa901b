#include "board/series.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "util/json_depth.h"

namespace sw {

namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// The weighted mean of two values of which either may be absent (NaN).
double merge_value(double a, int64_t wa, double b, int64_t wb) {
  if (std::isnan(a)) return b;
  if (std::isnan(b)) return a;
  return (a * static_cast<double>(wa) + b * static_cast<double>(wb)) / static_cast<double>(wa + wb);
}

double number_or_nan(const nlohmann::json& r, const char* key) {
  auto it = r.find(key);
  return it != r.end() && it->is_number() ? it->get<double>() : kNaN;
}

const std::vector<std::string> kTrainNames = {"loss",      "ce",           "lb_loss",
                                              "z_loss",    "balance_loss", "lr",
                                              "drop_frac", "tokens_per_s", "grad_norm"};
const std::vector<std::string> kEvalNames = {"val_loss", "train_loss"};

}  // namespace

nlohmann::json finite_or_null(double v) {
  return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json();
}

Series::Series(std::vector<std::string> n, size_t c)
    : names(std::move(n)), values(names.size()), cap(std::max<size_t>(c, 2)) {}

void Series::add(double s, double t, const std::vector<double>& v) {
  // The stride: records a point stands for now. The newest point fills up to it before a
  // new one starts, so the newest record always shows.
  const int64_t stride = weight.empty() ? 1 : weight.front();
  if (!weight.empty() && weight.back() < stride) {
    const int64_t w = weight.back();
    for (size_t k = 0; k < names.size(); ++k)
      values[k].back() = merge_value(values[k].back(), w, v[k], 1);
    step.back() = s;
    time_s.back() = t;
    weight.back() = w + 1;
    return;
  }
  if (step.size() >= cap) {  // merge neighbours pairwise: half the points, twice the stride
    size_t out = 0;
    for (size_t i = 0; i < step.size(); i += 2, ++out) {
      const size_t j = std::min(i + 1, step.size() - 1);
      const int64_t wi = weight[i], wj = j == i ? 0 : weight[j];
      for (size_t k = 0; k < names.size(); ++k)
        values[k][out] = j == i ? values[k][i] : merge_value(values[k][i], wi, values[k][j], wj);
      step[out] = step[j];
      time_s[out] = time_s[j];
      weight[out] = wi + wj;
    }
    step.resize(out);
    time_s.resize(out);
    weight.resize(out);
    for (auto& col : values)
      col.resize(out);
    return add(s, t, v);
  }
  step.push_back(s);
  time_s.push_back(t);
  weight.push_back(1);
  for (size_t k = 0; k < names.size(); ++k)
    values[k].push_back(v[k]);
}

Series Series::downsampled(size_t max_points) const {
  const size_t n = step.size();
  const size_t bucket = max_points == 0 ? std::max<size_t>(n, 1)
                                        : std::max<size_t>(1, (n + max_points - 1) / max_points);
  Series out(names, cap);
  for (size_t b = 0; b < n; b += bucket) {
    const size_t e = std::min(n, b + bucket);
    out.step.push_back(step[e - 1]);
    out.time_s.push_back(time_s[e - 1]);
    int64_t total = 0;
    for (size_t i = b; i < e; ++i)
      total += weight[i];
    out.weight.push_back(total);
    for (size_t k = 0; k < names.size(); ++k) {
      double m = kNaN;
      int64_t w = 0;
      for (size_t i = b; i < e; ++i) {
        m = merge_value(m, w, values[k][i], weight[i]);
        if (!std::isnan(values[k][i])) w += weight[i];
      }
      out.values[k].push_back(m);
    }
  }
  return out;
}

nlohmann::json Series::to_json(size_t max_points) const {
  const Series d = downsampled(max_points);
  nlohmann::json j = {{"step", d.step}, {"time_s", d.time_s}};
  for (size_t k = 0; k < names.size(); ++k) {
    nlohmann::json col = nlohmann::json::array();
    for (double v : d.values[k])
      col.push_back(finite_or_null(v));
    j[names[k]] = std::move(col);
  }
  return j;
}

MetricsTail::MetricsTail(std::string path) : path_(std::move(path)) {
  reset();
}

void MetricsTail::reset() {
  offset_ = 0;
  inode_ = 0;
  records_ = malformed_ = 0;
  skipping_long_line_ = false;
  train_ = Series(kTrainNames);
  eval_ = Series(kEvalNames);
  layers_.clear();
  last_step_ = -1;
  last_time_ = last_val_ = last_loss_ = last_tok_s_ = last_lr_ = kNaN;
  best_val_ = kNaN;
  version_ = ++generation_ << 32;
}

bool MetricsTail::update(size_t max_bytes) {
  // O_NOFOLLOW: a metrics.jsonl that is a link (perhaps out of the served folders) is not
  // read; O_NONBLOCK: nor does a FIFO block the reader.
  const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOFOLLOW);
  if (fd < 0) {
    if (offset_ == 0 && records_ == 0) return false;
    reset();  // the file went away: so did its records
    return true;
  }
  struct stat st {};
  bool changed = false;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return false;
  }
  const auto size = static_cast<uint64_t>(st.st_size);
  if ((inode_ != 0 && inode_ != st.st_ino) || size < offset_) {
    reset();
    changed = true;
  }
  inode_ = st.st_ino;
  std::string buf;
  size_t read_now = 0;
  while (offset_ + buf.size() < size && read_now < max_bytes) {
    const uint64_t at = offset_ + buf.size();
    const size_t want = static_cast<size_t>(std::min<uint64_t>(size - at, 1 << 20));
    std::string chunk(want, '\0');
    const ssize_t got = ::pread(fd, chunk.data(), want, static_cast<off_t>(at));
    if (got <= 0) break;
    chunk.resize(static_cast<size_t>(got));
    read_now += chunk.size();
    buf += chunk;
    // Take every complete line in the buffer; keep the partial tail for the next chunk.
    size_t start = 0;
    for (size_t nl; (nl = buf.find('\n', start)) != std::string::npos; start = nl + 1) {
      if (skipping_long_line_) {
        skipping_long_line_ = false;  // the end of a line too long to read: already counted
      } else {
        take_line(buf.data() + start, buf.data() + nl);
      }
      changed = true;
    }
    offset_ += start;
    buf.erase(0, start);
    if (buf.size() > kMaxLineBytes) {  // a line too long to keep: skip to its end
      if (!skipping_long_line_) ++malformed_;
      skipping_long_line_ = true;
      offset_ += buf.size();
      buf.clear();
      changed = true;
    }
  }
  ::close(fd);
  if (changed) ++version_;
  return changed;
}

void MetricsTail::take_line(const char* begin, const char* end) {
  if (begin == end) return;
  try {
    take_record(begin, end);
  } catch (const std::exception&) {  // a record of an unexpected shape
    ++malformed_;
  }
}

void MetricsTail::take_record(const char* begin, const char* end) {
  if (json_depth(std::string_view(begin, static_cast<size_t>(end - begin))) > kMaxJsonDepth) {
    ++malformed_;
    return;
  }
  const nlohmann::json r = nlohmann::json::parse(begin, end, nullptr, false);
  if (!r.is_object() || !r.contains("kind") || !r["kind"].is_string()) {
    ++malformed_;
    return;
  }
  const double step = number_or_nan(r, "step"), t = number_or_nan(r, "time_s");
  if (!(step >= 0 && step < 1e15)) {  // no step, or none a run could reach
    ++malformed_;
    return;
  }
  ++records_;
  const std::string kind = r["kind"].get<std::string>();
  if (kind == "train") {
    take_train(r, step, t);
  } else if (kind == "eval") {
    const double val = number_or_nan(r, "val_loss");
    eval_.add(step, t, {val, number_or_nan(r, "train_loss")});
    if (std::isfinite(val)) {
      last_val_ = val;
      if (!(best_val_ <= val)) best_val_ = val;
    }
  }
  last_step_ = std::max(last_step_, static_cast<int64_t>(step));
  if (!std::isnan(t)) last_time_ = t;
}

void MetricsTail::take_train(const nlohmann::json& r, double step, double t) {
  std::vector<double> v(kTrainNames.size());
  for (size_t k = 0; k < kTrainNames.size(); ++k)
    v[k] = number_or_nan(r, kTrainNames[k].c_str());
  train_.add(step, t, v);
  last_loss_ = v[0];
  last_lr_ = v[5];
  last_tok_s_ = v[7];
  auto layers = r.find("layers");
  if (layers == r.end() || !layers->is_array()) return;
  for (const auto& l : *layers) {
    if (!l.is_object() || !l.contains("counts") || !l["counts"].is_array()) continue;
    const auto& counts = l["counts"];
    const auto& at = l.contains("layer") ? l["layer"] : nlohmann::json();
    if (!at.is_number_integer()) continue;
    const int64_t block = at.get<int64_t>();
    const auto experts = static_cast<int64_t>(counts.size());
    if (experts == 0 || experts > kMaxExperts) continue;
    auto it = std::find_if(layers_.begin(), layers_.end(),
                           [&](const LoadMap& m) { return m.layer == block; });
    if (it != layers_.end() && it->experts != experts) continue;  // not this run's layer
    if (it == layers_.end()) {
      if (layers_.size() >= kMaxLayers) continue;
      // Unnamed values, read by index: E experts' fractions, then the dropped one.
      layers_.push_back(
          {block, Series(std::vector<std::string>(static_cast<size_t>(experts) + 1), kHeatmapCap),
           experts});
      it = layers_.end() - 1;
    }
    double total = 0;
    for (const auto& c : counts)
      total += c.is_number() ? c.get<double>() : 0;
    std::vector<double> frac(static_cast<size_t>(experts) + 1, kNaN);
    for (int64_t e = 0; e < experts; ++e) {
      const auto& c = counts[static_cast<size_t>(e)];
      if (total > 0 && c.is_number()) frac[static_cast<size_t>(e)] = c.get<double>() / total;
    }
    const double dropped = number_or_nan(l, "dropped");
    if (total > 0) frac.back() = dropped / total;
    it->series.add(step, t, frac);
  }
}

nlohmann::json MetricsTail::to_json(size_t max_points) const {
  nlohmann::json j = {{"records", records_},
                      {"malformed", malformed_},
                      {"train", train_.to_json(max_points)},
                      {"eval", eval_.to_json(max_points)},
                      {"layers", nlohmann::json::array()}};
  for (const LoadMap& m : layers_) {
    const Series d = m.series.downsampled(std::min(max_points, kHeatmapCap));
    nlohmann::json load = nlohmann::json::array();
    for (size_t c = 0; c < d.size(); ++c) {
      nlohmann::json col = nlohmann::json::array();
      for (int64_t e = 0; e < m.experts; ++e)
        col.push_back(finite_or_null(d.values[static_cast<size_t>(e)][c]));
      load.push_back(std::move(col));
    }
    nlohmann::json dropped = nlohmann::json::array();
    for (double v : d.values.back())
      dropped.push_back(finite_or_null(v));
    j["layers"].push_back({{"layer", m.layer},
                           {"experts", m.experts},
                           {"step", d.step},
                           {"time_s", d.time_s},
                           {"load", std::move(load)},
                           {"dropped", std::move(dropped)}});
  }
  return j;
}

}  // namespace sw
