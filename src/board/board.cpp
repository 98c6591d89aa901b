#include "board/board.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <random>
#include <set>

#include <fmt/format.h>

#include "util/json_depth.h"

namespace sw {

namespace fs = std::filesystem;

namespace {

constexpr size_t kMaxJsonFile = size_t{1} << 20;  // config.json, summary.json
constexpr size_t kMaxDiffKeys = 12;

// A file's change stamp (mtime in ns, xor its size), -1 when it is missing.
int64_t stamp(const std::string& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return -1;
  return (static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec) ^
         (static_cast<int64_t>(st.st_size) << 20);
}

// A JSON file of at most 1 MiB and 64 levels, or null when it is missing, too big, too
// deep, malformed (a file being replaced is read again at the next request), a link (which
// could lead out of the served folders) or not a regular file.
nlohmann::json read_json(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOFOLLOW);
  if (fd < 0) return nullptr;
  struct stat st {};
  std::string text;
  if (::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
      static_cast<size_t>(st.st_size) <= kMaxJsonFile) {
    text.resize(static_cast<size_t>(st.st_size));
    size_t got = 0;
    while (got < text.size()) {
      const ssize_t n = ::read(fd, text.data() + got, text.size() - got);
      if (n <= 0) break;
      got += static_cast<size_t>(n);
    }
    text.resize(got);
  }
  ::close(fd);
  if (text.empty() || json_depth(text) > kMaxJsonDepth) return nullptr;
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, false);
  return j.is_discarded() ? nlohmann::json() : j;
}

// The keys whose values are not the same in every one of `configs` (a key one lacks
// counts as differing).
std::vector<std::string> differing_keys(const std::vector<const nlohmann::json*>& configs) {
  std::set<std::string> all;
  for (const auto* c : configs)
    for (const auto& [k, _] : c->items())
      all.insert(k);
  std::vector<std::string> out;
  for (const auto& k : all) {
    const nlohmann::json* first = nullptr;
    bool differs = false;
    for (const auto* c : configs) {
      auto it = c->find(k);
      if (it == c->end()) {
        differs = true;
        break;
      }
      if (first == nullptr) {
        first = &*it;
      } else if (*first != *it) {
        differs = true;
        break;
      }
    }
    if (differs) out.push_back(k);
  }
  return out;
}

// The fields of a sweep summary's row the sweep table shows beside the live figures.
nlohmann::json summary_rows(const nlohmann::json& summary) {
  nlohmann::json rows = nlohmann::json::object();
  if (!summary.is_object() || !summary.contains("points") || !summary["points"].is_array())
    return rows;
  for (const auto& r : summary["points"]) {
    if (!r.is_object() || !r.contains("point") || !r["point"].is_string()) continue;
    nlohmann::json row = nlohmann::json::object();
    for (const char* k : {"status", "val_at_equal_time", "step_at_equal_time", "drop_frac",
                          "load_cv", "params_active", "params_total", "final_val_loss"})
      if (r.contains(k)) row[k] = r[k];
    rows[r["point"].get<std::string>()] = row;
  }
  return rows;
}

}  // namespace

Board::Board(Roots roots, size_t max_runs)
    : roots_(std::move(roots)),
      max_runs_(max_runs),
      epoch_(fmt::format("{:08x}", std::random_device{}())) {}

std::string Board::version_of(const Cached& c) const {
  return epoch_ + "-" + std::to_string(c.tail->version());
}

Board::Cached& Board::refresh(const std::string& dir) {
  Cached& c = cache_[dir];
  if (!c.tail) c.tail = std::make_unique<MetricsTail>((fs::path(dir) / "metrics.jsonl").string());
  c.tail->update(size_t{16} << 20);
  const std::string cfg = (fs::path(dir) / "config.json").string();
  const std::string sum = (fs::path(dir) / "summary.json").string();
  if (const int64_t s = stamp(cfg); s != c.config_mtime) {
    const nlohmann::json raw = read_json(cfg);
    c.config = flatten_config(raw);
    c.config_mtime = raw.is_object() ? s : -1;
  }
  if (const int64_t s = stamp(sum); s != c.summary_mtime) {
    c.summary = read_json(sum);
    c.summary_mtime = c.summary.is_null() ? -1 : s;
  }
  return c;
}

nlohmann::json Board::run_info(const RunRef& ref, Cached& c) {
  const MetricsTail& t = *c.tail;
  const std::string status = run_status(ref.dir);
  nlohmann::json info = {
      {"id", ref.id},
      {"name", ref.name},
      {"sweep", ref.sweep.empty() ? nlohmann::json() : nlohmann::json(ref.sweep)},
      {"status", status},
      {"step", t.last_step() < 0 ? nlohmann::json() : nlohmann::json(t.last_step())},
      {"steps", c.config.value("train.steps", nlohmann::json())},
      {"best_val", finite_or_null(t.best_val())},
      {"last_val", finite_or_null(t.last_val())},
      {"train_loss", finite_or_null(t.last_train_loss())},
      {"lr", finite_or_null(t.last_lr())},
      {"tokens_per_s", finite_or_null(t.last_tokens_per_s())},
      {"wall_s", finite_or_null(t.last_time_s())},
      {"records", t.records()},
      {"malformed", t.malformed()},
      {"version", version_of(c)}};
  // A finished run's own summary: its whole-run throughput and wall time (and its best
  // val loss, should its metrics have gone).
  if (status == "finished" && c.summary.is_object()) {
    for (const char* k : {"tokens_per_s", "wall_s"})
      if (c.summary.contains(k) && c.summary[k].is_number()) info[k] = c.summary[k];
    if (info["best_val"].is_null() && c.summary.contains("best_val_loss") &&
        c.summary["best_val_loss"].is_number())
      info["best_val"] = c.summary["best_val_loss"];
  }
  return info;
}

Reply Board::runs() {
  std::lock_guard<std::mutex> lock(mu_);
  const Catalog cat = scan(roots_, max_runs_);
  nlohmann::json runs = nlohmann::json::array();
  std::vector<const nlohmann::json*> configs;
  std::set<std::string> listed;
  for (const RunRef& r : cat.runs) {
    runs.push_back(run_info(r, refresh(r.dir)));
    listed.insert(r.dir);
  }
  for (auto it = cache_.begin(); it != cache_.end();)  // runs gone from disk leave the cache
    it = listed.count(it->first) ? std::next(it) : cache_.erase(it);
  for (const RunRef& r : cat.runs)
    configs.push_back(&cache_[r.dir].config);
  auto diff_of = [&](const std::vector<std::string>& keys, const RunRef& r) {
    nlohmann::json d = nlohmann::json::object();
    const nlohmann::json& cfg = cache_[r.dir].config;
    for (const auto& k : keys)
      d[k] = cfg.value(k, nlohmann::json());
    return d;
  };
  std::vector<std::string> keys = differing_keys(configs);
  if (keys.size() > kMaxDiffKeys) keys.resize(kMaxDiffKeys);
  for (size_t i = 0; i < cat.runs.size(); ++i)
    runs[i]["diff"] = diff_of(keys, cat.runs[i]);
  nlohmann::json sweeps = nlohmann::json::array();
  for (const SweepRef& s : cat.sweeps) {
    std::vector<const nlohmann::json*> own;
    std::vector<const RunRef*> points;
    for (const RunRef& r : cat.runs)
      if (r.sweep == s.id) {
        own.push_back(&cache_[r.dir].config);
        points.push_back(&r);
      }
    const std::vector<std::string> sk = differing_keys(own);
    nlohmann::json overrides = nlohmann::json::object();
    for (const RunRef* r : points)
      overrides[r->id] = diff_of(sk, *r);
    sweeps.push_back(
        {{"id", s.id},
         {"name", s.name},
         {"points", s.points},
         {"keys", sk},
         {"overrides", overrides},
         {"summary", summary_rows(read_json((fs::path(s.dir) / "summary.json").string()))}});
  }
  return {200,
          {{"roots", roots_.paths},
           {"truncated", cat.truncated},
           {"runs", runs},
           {"diff_keys", keys},
           {"sweeps", sweeps}}};
}

Reply Board::run(const std::string& id, size_t max_points, const std::string& have) {
  const Resolved r = resolve_id(roots_, id);
  if (r.status != 200) return {r.status, {{"error", r.why}}};
  if (!is_run_dir(r.path)) return {404, {{"error", "not a run directory"}}};
  std::lock_guard<std::mutex> lock(mu_);
  Cached& c = refresh(r.path);
  const std::string version = version_of(c);
  if (!have.empty() && have == version) return {200, {{"unchanged", true}, {"version", version}}};
  nlohmann::json j = c.tail->to_json(max_points);
  j["version"] = version;
  j["id"] = id;
  j["status"] = run_status(r.path);
  j["steps"] = c.config.value("train.steps", nlohmann::json());
  return {200, std::move(j)};
}

Reply Board::sweep(const std::string& id, size_t max_points) {
  const Resolved r = resolve_id(roots_, id);
  if (r.status != 200) return {r.status, {{"error", r.why}}};
  if (!is_sweep_dir(r.path)) return {404, {{"error", "not a sweep directory"}}};
  std::vector<std::string> names;
  for (const auto& n : child_folders(r.path))
    if (names.size() < max_runs_ && is_run_dir((fs::path(r.path) / n).string())) names.push_back(n);
  std::lock_guard<std::mutex> lock(mu_);
  nlohmann::json points = nlohmann::json::array();
  for (const auto& n : names) {
    Cached& c = refresh((fs::path(r.path) / n).string());
    points.push_back({{"id", id + "/" + n}, {"name", n}, {"eval", c.tail->eval_json(max_points)}});
  }
  return {200, {{"id", id}, {"points", points}}};
}

}  // namespace sw
