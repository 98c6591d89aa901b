#include "sweep/sweep.h"

#include <cstdint>
#include <filesystem>
#include <map>
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

// The base config: compiled-in defaults, then 'base' (a file, relative to the sweep's
// folder, or an object), then 'set'.
Config read_base(const ojson& j, const std::string& source, const std::string& dir) {
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
  return base;
}

struct Variant {
  std::string name;
  ojson set;
  std::string init_from;  // an earlier variant's name, or ""
};

// 'variants': a name and overrides each; without them, one unnamed variant.
std::vector<Variant> read_variants(const ojson& j, const std::string& source) {
  if (!j.contains("variants")) return {{"", ojson::object(), ""}};
  const ojson& v = j["variants"];
  if (!v.is_array() || v.empty())
    throw Error(
        fmt::format("{}: 'variants' must be a non-empty array of {{\"name\", \"set\"}}", source));
  std::vector<Variant> variants;
  std::set<std::string> names;
  for (size_t i = 0; i < v.size(); ++i) {
    const std::string where = fmt::format("{}: variants[{}]", source, i);
    if (!v[i].is_object() || !v[i].contains("name") || !v[i]["name"].is_string())
      throw Error(where + ": needs a \"name\" (a string)");
    for (const auto& [key, _] : v[i].items())
      if (key != "name" && key != "set" && key != "init_from")
        throw Error(fmt::format("{}: unknown key '{}' (known: name, set, init_from)", where, key));
    Variant var{v[i]["name"].get<std::string>(), v[i].value("set", ojson::object()), ""};
    if (v[i].contains("init_from")) {
      if (!v[i]["init_from"].is_string() || !names.count(v[i]["init_from"].get<std::string>()))
        throw Error(fmt::format(
            "{}: \"init_from\" must name an earlier variant (the dense run this one upcycles), "
            "got {}",
            where, printable(v[i]["init_from"].dump())));
      var.init_from = v[i]["init_from"].get<std::string>();
    }
    if (!valid_name(var.name))
      throw Error(fmt::format("{}: name '{}' must be letters, digits, '.', '-', '_' or '+'", where,
                              printable(var.name)));
    if (!names.insert(var.name).second)
      throw Error(fmt::format("{}: name '{}' is used twice", where, var.name));
    if (!var.set.is_object()) throw Error(where + ": \"set\" must be an object of key: value");
    variants.push_back(std::move(var));
  }
  return variants;
}

using Grid = std::vector<std::pair<std::string, ojson>>;  // key -> its values, in file order

Grid read_grid(const ojson& j, const std::string& source) {
  Grid grid;
  if (!j.contains("grid")) return grid;
  if (!j["grid"].is_object())
    throw Error(fmt::format("{}: 'grid' must be an object of key: [values]", source));
  for (const auto& [key, values] : j["grid"].items()) {
    if (!values.is_array() || values.empty())
      throw Error(fmt::format("{}: grid key '{}' needs a non-empty list of values", source, key));
    grid.emplace_back(key, values);
  }
  return grid;
}

// 'seeds'; without them, one null entry (the config's own train.seed).
std::vector<ojson> read_seeds(const ojson& j, const std::string& source) {
  if (!j.contains("seeds")) return {ojson()};
  if (!j["seeds"].is_array() || j["seeds"].empty())
    throw Error(fmt::format("{}: 'seeds' must be a non-empty list of integers", source));
  std::vector<ojson> seeds;
  for (const auto& v : j["seeds"]) {
    if (!v.is_number_integer() || v.get<int64_t>() < 0)
      throw Error(fmt::format("{}: seed {} is not a non-negative integer", source, v.dump()));
    seeds.push_back(v);
  }
  return seeds;
}

// The number of grid points. A sweep is a list of training runs: products no one could run
// (and that would not fit in memory) are refused, checked before multiplying past the limit.
size_t grid_size(const Grid& grid, size_t outer, const std::string& source) {
  constexpr size_t kMaxPoints = 10000;
  size_t points = 1;
  for (const auto& g : grid) {
    if (g.second.size() > kMaxPoints / (points * outer))
      throw Error(fmt::format("{}: the sweep has more than {} points", source, kMaxPoints));
    points *= g.second.size();
  }
  if (points * outer > kMaxPoints)
    throw Error(fmt::format("{}: the sweep has more than {} points", source, kMaxPoints));
  return points;
}

// Grid point `gi` (last key fastest) as {key: value}, and its name parts.
ojson grid_point(const Grid& grid, size_t gi, const std::vector<std::string>& shorts,
                 std::vector<std::string>& parts) {
  ojson set = ojson::object();
  std::vector<size_t> idx(grid.size());
  for (size_t k = grid.size(), rest = gi; k-- > 0;) {
    idx[k] = rest % grid[k].second.size();
    rest /= grid[k].second.size();
  }
  for (size_t k = 0; k < grid.size(); ++k) {
    const ojson& v = grid[k].second[idx[k]];
    set[grid[k].first] = v;
    parts.push_back(shorts[k] + "-" + name_value(v));
  }
  return set;
}

// One point: the base with the variant's, the grid point's, the seed's and the command
// line's overrides, validated.
SweepPoint make_point(const Config& base, const Variant& var, const ojson& grid_set,
                      std::vector<std::string> parts, const ojson& seed,
                      const std::vector<std::string>& sets, const std::string& where_) {
  SweepPoint p;
  if (!seed.is_null()) parts.push_back("seed-" + seed.dump());
  p.name = parts.empty() ? "base" : bounded_name(fmt::format("{}", fmt::join(parts, "_")));
  const std::string where = where_ + " (" + p.name + ")";
  p.config = base;
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
  return p;
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
  const Config base = read_base(j, source, dir);
  const std::vector<Variant> variants = read_variants(j, source);
  const Grid grid = read_grid(j, source);
  const std::vector<ojson> seeds = read_seeds(j, source);
  s.has_variants = j.contains("variants");
  s.has_seeds = j.contains("seeds");
  for (const auto& g : grid)
    s.grid_keys.push_back(g.first);
  const std::vector<std::string> shorts = short_keys(s.grid_keys);

  // The product: variants x grid (last key fastest) x seeds. A point's index is
  // (variant * grid_points + gi) * seeds + seed: an upcycled point finds its source there.
  const size_t grid_points = grid_size(grid, variants.size() * seeds.size(), source);
  std::set<std::string> names;
  std::map<std::string, size_t> variant_index;
  for (size_t vi = 0; vi < variants.size(); ++vi) {
    const Variant& var = variants[vi];
    variant_index[var.name] = vi;
    for (size_t gi = 0; gi < grid_points; ++gi)
      for (size_t si = 0; si < seeds.size(); ++si) {
        std::vector<std::string> parts;
        if (!var.name.empty()) parts.push_back(var.name);
        const ojson grid_set = grid_point(grid, gi, shorts, parts);
        SweepPoint p = make_point(base, var, grid_set, parts, seeds[si], sets,
                                  fmt::format("{}: point {}", source, s.points.size() + 1));
        if (!names.insert(p.name).second)
          throw Error(fmt::format("{}: two points are both named '{}'", source, p.name));
        if (!var.init_from.empty()) {
          p.init_from = static_cast<int64_t>(
              (variant_index.at(var.init_from) * grid_points + gi) * seeds.size() + si);
          const SweepPoint& src = s.points[static_cast<size_t>(p.init_from)];
          const std::string why = upcycle_mismatch(src.config, p.config);
          if (!why.empty())
            throw Error(fmt::format("{}: point {} ({}) cannot upcycle '{}': {}", source,
                                    s.points.size() + 1, p.name, src.name, why));
        }
        s.points.push_back(std::move(p));
      }
  }
  return s;
}

Sweep load_sweep(const std::string& path, const std::vector<std::string>& sets) {
  const std::string text = read_file(path, "sweep file", kMaxJsonFileBytes);
  std::string dir = fs::path(path).parent_path().string();
  return parse_sweep(text, path, dir.empty() ? "." : dir, sets);
}

}  // namespace sw
