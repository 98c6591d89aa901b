#include "board/catalog.h"

#include <sys/stat.h>
#include <sys/sysmacros.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <fmt/format.h>

#include "util/error.h"
#include "util/fs.h"
#include "util/text.h"

namespace sw {

namespace fs = std::filesystem;

namespace {

constexpr int kMaxDepth = 3;
constexpr size_t kMaxFolders = 20000;

bool is_file(const fs::path& p) {  // a regular file, not a link to one
  std::error_code ec;
  return fs::symlink_status(p, ec).type() == fs::file_type::regular;
}

bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    const size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k)
      if ((static_cast<unsigned char>(s[i + k]) >> 6) != 2) return false;
    i += n;
  }
  return true;
}

// A real, absolute path, or empty when it does not exist.
std::string real_path(const std::string& p) {
  char* r = ::realpath(p.c_str(), nullptr);
  if (r == nullptr) return "";
  std::string out(r);
  std::free(r);
  return out;
}

bool inside(const std::string& path, const std::string& root) {
  if (path == root) return true;
  const std::string prefix = root == "/" ? root : root + "/";
  return path.compare(0, prefix.size(), prefix) == 0;
}

struct Scanner {
  const Roots& roots;
  size_t max_runs;
  Catalog cat;
  size_t folders = 0;
  std::set<std::string> seen;  // folders listed: roots may overlap or repeat

  void visit(size_t root, const fs::path& dir, const std::string& rel, int depth,
             const std::string& sweep) {
    if (++folders > kMaxFolders || cat.runs.size() >= max_runs) {
      cat.truncated = true;
      return;
    }
    if (!seen.insert(dir.string()).second) return;
    const std::string id = rel.empty() ? std::to_string(root) : std::to_string(root) + "/" + rel;
    const std::string name = rel.empty() ? roots.labels[root] : roots.labels[root] + "/" + rel;
    if (is_run_dir(dir.string())) {
      cat.runs.push_back({id, name, dir.string(), sweep});
      if (!sweep.empty()) {
        for (auto& s : cat.sweeps)
          if (s.id == sweep) s.points.push_back(id);
      }
      return;
    }
    std::string inner = sweep;
    const bool is_sweep = is_sweep_dir(dir.string());
    if (is_sweep) {
      cat.sweeps.push_back({id, name, dir.string(), {}});
      inner = id;
    }
    if (depth >= kMaxDepth && !is_sweep) return;  // a sweep's points are always listed
    for (const auto& c : child_folders(dir.string()))
      visit(root, dir / c, rel.empty() ? c : rel + "/" + c, depth + 1, inner);
  }
};

}  // namespace

bool servable_name(const std::string& name) {
  if (name.empty() || name[0] == '.' || !valid_utf8(name)) return false;
  for (unsigned char c : name)
    if (c < 0x20 || c == 0x7f || c == '\\') return false;
  return true;
}

Roots make_roots(const std::vector<std::string>& args) {
  Roots r;
  for (const auto& a : args) {
    const std::string p = real_path(a);
    std::error_code ec;
    if (p.empty()) throw Error(fmt::format("'{}': no such directory", printable(a)));
    if (!fs::is_directory(p, ec))
      throw Error(
          fmt::format("'{}' is not a directory: give a run directory, a sweep "
                      "directory or a folder of them",
                      printable(a)));
    r.paths.push_back(p);
    const std::string label = fs::path(p).filename().string();
    r.labels.push_back(label.empty() ? "/" : label);
  }
  return r;
}

Resolved resolve_id(const Roots& roots, const std::string& id) {
  if (id.empty() || id.size() > 4096) return {400, "", "an id is 1 to 4096 bytes"};
  for (unsigned char c : id)
    if (c < 0x20 || c == 0x7f || c == '\\')
      return {400, "", "an id holds no control bytes and no backslash"};
  std::vector<std::string> parts;
  std::stringstream ss(id);
  for (std::string seg; std::getline(ss, seg, '/');)
    parts.push_back(seg);
  if (id.back() == '/') parts.push_back("");
  if (parts.empty() || parts[0].empty() ||
      parts[0].find_first_not_of("0123456789") != std::string::npos || parts[0].size() > 6)
    return {400, "", "an id starts with the index of a served folder"};
  const size_t root = std::stoul(parts[0]);
  if (root >= roots.paths.size()) return {404, "", "no served folder has that index"};
  fs::path p = roots.paths[root];
  for (size_t i = 1; i < parts.size(); ++i) {
    if (parts[i].empty() || parts[i][0] == '.')
      return {400, "", "an id has no empty, '.', '..' or hidden segments"};
    p /= parts[i];
  }
  const std::string real = real_path(p.string());
  if (real.empty()) return {404, "", "no such directory"};
  if (!inside(real, roots.paths[root])) return {403, "", "outside the served folders"};
  std::error_code ec;
  if (!fs::is_directory(real, ec)) return {404, "", "not a directory"};
  return {200, real, ""};
}

std::vector<std::string> child_folders(const std::string& dir) {
  std::vector<std::string> children;
  std::error_code ec;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string n = it->path().filename().string();
    if (servable_name(n) && !it->is_symlink(ec) && it->is_directory(ec)) children.push_back(n);
  }
  std::sort(children.begin(), children.end());
  return children;
}

bool is_run_dir(const std::string& dir) {
  const fs::path d(dir);
  return is_file(d / "config.json") &&
         (is_file(d / "metrics.jsonl") || is_file(d / "summary.json") || is_file(d / ".lock"));
}

bool is_sweep_dir(const std::string& dir) {
  return is_file(fs::path(dir) / "sweep.json");
}

Catalog scan(const Roots& roots, size_t max_runs) {
  Scanner s{roots, max_runs, {}, 0, {}};
  for (size_t r = 0; r < roots.paths.size(); ++r)
    s.visit(r, roots.paths[r], "", 0, "");
  auto by_id = [](const auto& a, const auto& b) { return a.id < b.id; };
  std::sort(s.cat.runs.begin(), s.cat.runs.end(), by_id);
  std::sort(s.cat.sweeps.begin(), s.cat.sweeps.end(), by_id);
  return s.cat;
}

bool lock_held(const std::string& dir) {
  const std::string lock = (fs::path(dir) / ".lock").string();
  struct stat st {};
  if (::stat(lock.c_str(), &st) != 0) return false;
  long pid = -1;
  try {
    const auto j = nlohmann::json::parse(read_file(lock, "lock file", 1 << 16));
    pid = j.at("pid").get<long>();
  } catch (const std::exception&) {
    // a lock file being written, or of another format: the device and inode still tell
  }
  std::ifstream locks("/proc/locks");
  for (std::string line; std::getline(locks, line);) {
    // "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234567 0 EOF" ("->" marks a waiter)
    std::istringstream in(line);
    std::string num, type, advisory, mode, who, where;
    in >> num >> type;
    if (type == "->") continue;
    in >> advisory >> mode >> who >> where;
    if (type != "FLOCK") continue;
    unsigned maj = 0, min = 0;
    unsigned long long ino = 0;
    if (std::sscanf(where.c_str(), "%x:%x:%llu", &maj, &min, &ino) != 3) continue;
    if (ino != static_cast<unsigned long long>(st.st_ino)) continue;
    const bool same_dev = maj == major(st.st_dev) && min == minor(st.st_dev);
    if (same_dev || std::to_string(pid) == who) return true;
  }
  return false;
}

std::string run_status(const std::string& dir) {
  if (lock_held(dir)) return "training";
  if (is_file(fs::path(dir) / "summary.json")) return "finished";
  return "stopped";
}

nlohmann::json flatten_config(const nlohmann::json& config) {
  nlohmann::json flat = nlohmann::json::object();
  if (!config.is_object()) return flat;
  for (const auto& [section, body] : config.items()) {
    if (!body.is_object()) {
      flat[section] = body;
      continue;
    }
    for (const auto& [key, value] : body.items())
      flat[section + "." + key] = value;
  }
  return flat;
}

}  // namespace sw
