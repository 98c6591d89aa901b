#include "train/checkpoint_state.h"

#include <cmath>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "util/error.h"

namespace sw {

std::string checkpoint_state_json(const Config& cfg, const Vocab& vocab, const TrainState& state) {
  nlohmann::json j;
  j["format_version"] = kCheckpointFormat;
  j["step"] = state.step;
  j["time_s"] = state.time_s;
  j["data_rng"] = state.data_rng;
  j["skipped_steps"] = state.skipped_steps;
  j["best_val_loss"] = std::isfinite(state.best_val_loss) ? nlohmann::json(state.best_val_loss)
                                                          : nlohmann::json(nullptr);
  j["vocab"] = utf8_encode(vocab.chars());
  j["config"] = to_json(cfg);
  return j.dump(2) + "\n";
}

namespace {

// Field readers that check the JSON type first (converting a huge float to an integer is
// undefined behaviour).
int64_t int_field(const nlohmann::json& j, const char* key, const std::string& source) {
  const nlohmann::json& v = j.at(key);
  if (!v.is_number_integer())
    throw Error(fmt::format("{}: '{}' must be an integer, got {}", source, key, v.dump()));
  return v.get<int64_t>();
}

double number_field(const nlohmann::json& j, const char* key, const std::string& source) {
  const nlohmann::json& v = j.at(key);
  if (!v.is_number())
    throw Error(fmt::format("{}: '{}' must be a number, got {}", source, key, v.dump()));
  return v.get<double>();
}

}  // namespace

CheckpointMeta parse_checkpoint_state(const std::string& text, const std::string& source) {
  nlohmann::json j = parse_json_text(text, source);
  CheckpointMeta m;
  try {
    if (!j.is_object()) throw Error(fmt::format("{}: not a checkpoint state object", source));
    const int64_t version = int_field(j, "format_version", source);
    if (version != kCheckpointFormat)
      throw Error(
          fmt::format("{}: checkpoint format version {} is not supported (this build "
                      "reads version {})",
                      source, version, kCheckpointFormat));
    m.state.step = int_field(j, "step", source);
    if (m.state.step < 0) throw Error(fmt::format("{}: step {} is negative", source, m.state.step));
    m.state.time_s = number_field(j, "time_s", source);
    if (!(m.state.time_s >= 0) || !std::isfinite(m.state.time_s))
      throw Error(fmt::format("{}: time_s {} is not a finite number of seconds >= 0", source,
                              m.state.time_s));
    const nlohmann::json& rng = j.at("data_rng");
    if (!rng.is_array() || rng.size() != 4)
      throw Error(fmt::format("{}: 'data_rng' must be 4 unsigned integers", source));
    for (size_t i = 0; i < 4; ++i) {
      if (!rng[i].is_number_unsigned())
        throw Error(fmt::format("{}: 'data_rng' must be 4 unsigned integers, got {}", source,
                                rng[i].dump()));
      m.state.data_rng[i] = rng[i].get<uint64_t>();
    }
    if (m.state.data_rng == std::array<uint64_t, 4>{})
      throw Error(fmt::format("{}: 'data_rng' is all zeros, not a generator state", source));
    if (!j.at("best_val_loss").is_null())
      m.state.best_val_loss = number_field(j, "best_val_loss", source);
    if (!(m.state.best_val_loss >= 0))
      throw Error(
          fmt::format("{}: best_val_loss {} is not a loss (>= 0)", source, m.state.best_val_loss));
    if (j.contains("skipped_steps")) m.state.skipped_steps = int_field(j, "skipped_steps", source);
    if (m.state.skipped_steps < 0 || m.state.skipped_steps > m.state.step)
      throw Error(fmt::format("{}: skipped_steps {} is not between 0 and step {}", source,
                              m.state.skipped_steps, m.state.step));
    m.vocab = Vocab(utf8_decode(j.at("vocab").get<std::string>(), source + " vocab"));
    if (m.vocab.size() == 0) throw Error(fmt::format("{}: the vocabulary is empty", source));
    apply_json(m.config, j.at("config"), source + " config");
    validate(m.config);
  } catch (const nlohmann::json::exception& e) {
    throw Error(fmt::format("{}: malformed checkpoint state: {}", source, e.what()));
  }
  return m;
}

}  // namespace sw
