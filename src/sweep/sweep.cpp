#include "sweep/sweep.h"

#include <cstdint>
#include <filesystem>
#include <set>

#include <fmt/format.h>

#include "util/error.h"
#include "util/fs.h"
#include "util/json_depth.h"
#include "util/text.h"

namespace sw {
namespace fs = std::filesystem;

namespace {

using ojson = nlohmann::ordered_json;

// A value as it appears in a point name: strings bare, numbers as written, booleans as
// true/false; characters a directory name should not carry are dropped.
std::string name_value(const ojson& v) {
  std::string s = v.is_string() ? v.get<std::string>() : v.dump();
  std::string out;
  for (char c : s)
    if (std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '+') out += c;
  return out.empty() ? "x" : out;
}

// The last component of each key when those are unique, else the whole dotted key.
std::vector<std::string> short_keys(const std::vector<std::string>& keys) {
  std::vector<std::string> out;
  std::set<std::string> seen;
  bool unique = true;
  for (const auto& k : keys) {
    const std::string last = k.substr(k.rfind('.') + 1);
    unique = unique && seen.insert(last).second;
    out.push_back(last);
  }
  return unique ? out : keys;
}

// A point's folder name within what file systems take (255 bytes, with room for the
// ".json" and ".stale" suffixes switch-sweep adds): a longer name keeps its first 180
// characters and gains a hash of the whole, so distinct points keep distinct folders.
std::string bounded_name(const std::string& name) {
  constexpr size_t kMaxName = 200, kKeep = 180;
  if (name.size() <= kMaxName) return name;
  uint64_t h = 1469598103934665603ull;  // FNV-1a, 64-bit
  for (unsigned char c : name)
    h = (h ^ c) * 1099511628211ull;
  return fmt::format("{}-{:016x}", name.substr(0, kKeep), h);
}

bool valid_name(const std::string& n) {
  if (n.empty() || n == "." || n == "..") return false;
  for (char c : n)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == '_' ||
          c == '+'))
      return false;
  return true;
}

// Applies {"dotted.key": value, ...} (or nested objects) to a config.
void apply_overrides(Config& c, const ojson& set, const std::string& where) {
  apply_json(c, nlohmann::json::parse(set.dump()), where);
}

}  // namespace

nlohmann::json comparable_config(const Config& c) {
  nlohmann::json j = to_json(c);
  j["train"].erase("threads");
  return j;
}

Sweep parse_sweep(const std::string& text, const std::string& source, const std::string& dir,
                  const std::vector<std::string>& sets) {
  parse_json_text(text, source);  // malformed JSON: an error with line and column
  const ojson j = ojson::parse(text);
  if (!j.is_object())
    throw Error(fmt::format("{}: a sweep must be a JSON object, got {}", source, j.type_name()));
  for (const auto& [key, _] : j.items())
    if (key != "base" && key != "set" && key != "grid" && key != "variants" && key != "seeds")
      throw Error(fmt::format(
          "{}: unknown sweep key '{}' (known: base, set, grid, variants, seeds)", source, key));

  Sweep s;
  s.path = source;
  Config base;
  if (j.contains("base")) {
    const ojson& b = j["base"];
    if (b.is_string()) {
      fs::path p = b.get<std::string>();
      if (p.is_relative()) p = fs::path(dir) / p;
      apply_file(base, p.string());
    } else if (b.is_object()) {
      apply_overrides(base, b, source + " base");
    } else {
      throw Error(fmt::format("{}: 'base' must be a config file path or a config object, got {}",
                              source, b.type_name()));
    }
  }
  if (j.contains("set")) {
    if (!j["set"].is_object())
      throw Error(fmt::format("{}: 'set' must be an object of key: value", source));
    apply_overrides(base, j["set"], source + " set");
  }

  // Variants: a name and overrides each.
  struct Variant {
    std::string name;
    ojson set;
  };
  std::vector<Variant> variants;
  if (j.contains("variants")) {
    const ojson& v = j["variants"];
    if (!v.is_array() || v.empty())
      throw Error(
          fmt::format("{}: 'variants' must be a non-empty array of {{\"name\", \"set\"}}", source));
    std::set<std::string> names;
    for (size_t i = 0; i < v.size(); ++i) {
      const std::string where = fmt::format("{}: variants[{}]", source, i);
      if (!v[i].is_object() || !v[i].contains("name") || !v[i]["name"].is_string())
        throw Error(where + ": needs a \"name\" (a string)");
      for (const auto& [key, _] : v[i].items())
        if (key != "name" && key != "set")
          throw Error(fmt::format("{}: unknown key '{}' (known: name, set)", where, key));
      Variant var{v[i]["name"].get<std::string>(), v[i].value("set", ojson::object())};
      if (!valid_name(var.name))
        throw Error(fmt::format("{}: name '{}' must be letters, digits, '.', '-', '_' or '+'",
                                where, printable(var.name)));
      if (!names.insert(var.name).second)
        throw Error(fmt::format("{}: name '{}' is used twice", where, var.name));
      if (!var.set.is_object()) throw Error(where + ": \"set\" must be an object of key: value");
      variants.push_back(std::move(var));
    }
    s.has_variants = true;
  } else {
    variants.push_back({"", ojson::object()});
  }

  // Grid: key -> non-empty list of values, in the file's order.
  std::vector<std::pair<std::string, ojson>> grid;
  if (j.contains("grid")) {
    if (!j["grid"].is_object())
      throw Error(fmt::format("{}: 'grid' must be an object of key: [values]", source));
    for (const auto& [key, values] : j["grid"].items()) {
      if (!values.is_array() || values.empty())
        throw Error(fmt::format("{}: grid key '{}' needs a non-empty list of values", source, key));
      grid.emplace_back(key, values);
      s.grid_keys.push_back(key);
    }
  }
  const std::vector<std::string> shorts = short_keys(s.grid_keys);

  std::vector<ojson> seeds = {ojson()};
  if (j.contains("seeds")) {
    if (!j["seeds"].is_array() || j["seeds"].empty())
      throw Error(fmt::format("{}: 'seeds' must be a non-empty list of integers", source));
    seeds.clear();
    for (const auto& v : j["seeds"]) {
      if (!v.is_number_integer() || v.get<int64_t>() < 0)
        throw Error(fmt::format("{}: seed {} is not a non-negative integer", source, v.dump()));
      seeds.push_back(v);
    }
    s.has_seeds = true;
  }

  // The product: variants x grid (last key fastest) x seeds.
  // A sweep is a list of training runs: refuse products no one could run (and that would
  // not fit in memory), checking before multiplying past the limit.
  constexpr size_t kMaxPoints = 10000;
  size_t grid_points = 1;
  const size_t outer = variants.size() * seeds.size();
  for (const auto& g : grid) {
    if (g.second.size() > kMaxPoints / (grid_points * outer))
      throw Error(fmt::format("{}: the sweep has more than {} points", source, kMaxPoints));
    grid_points *= g.second.size();
  }
  if (grid_points * outer > kMaxPoints)
    throw Error(fmt::format("{}: the sweep has more than {} points", source, kMaxPoints));
  std::set<std::string> names;
  for (const Variant& var : variants)
    for (size_t gi = 0; gi < grid_points; ++gi)
      for (const ojson& seed : seeds) {
        SweepPoint p;
        std::vector<std::string> parts;
        if (!var.name.empty()) parts.push_back(var.name);
        p.config = base;
        std::string where = fmt::format("{}: point {}", source, s.points.size() + 1);
        ojson grid_set = ojson::object();
        size_t rest = gi;
        std::vector<size_t> idx(grid.size());
        for (size_t k = grid.size(); k-- > 0;) {
          idx[k] = rest % grid[k].second.size();
          rest /= grid[k].second.size();
        }
        for (size_t k = 0; k < grid.size(); ++k) {
          const ojson& v = grid[k].second[idx[k]];
          grid_set[grid[k].first] = v;
          parts.push_back(shorts[k] + "-" + name_value(v));
        }
        if (!seed.is_null()) parts.push_back("seed-" + seed.dump());
        p.name = parts.empty() ? "base" : bounded_name(fmt::format("{}", fmt::join(parts, "_")));
        where += " (" + p.name + ")";
        apply_overrides(p.config, var.set, where);
        apply_overrides(p.config, grid_set, where);
        if (!seed.is_null()) p.config.train.seed = seed.get<int64_t>();
        for (const auto& a : sets)
          apply_override(p.config, a);
        try {
          validate(p.config);
        } catch (const Error& e) {
          throw Error(fmt::format("{}: {}", where, e.what()));
        }
        for (const auto& [k, v] : var.set.items())
          p.overrides[k] = v;
        for (const auto& [k, v] : grid_set.items())
          p.overrides[k] = v;
        if (!seed.is_null()) p.overrides["train.seed"] = seed;
        if (!names.insert(p.name).second)
          throw Error(fmt::format("{}: two points are both named '{}'", source, p.name));
        s.points.push_back(std::move(p));
      }
  return s;
}

Sweep load_sweep(const std::string& path, const std::vector<std::string>& sets) {
  const std::string text = read_file(path, "sweep file", kMaxJsonFileBytes);
  std::string dir = fs::path(path).parent_path().string();
  return parse_sweep(text, path, dir.empty() ? "." : dir, sets);
}

}  // namespace sw
