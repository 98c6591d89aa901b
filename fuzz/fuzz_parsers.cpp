// libFuzzer target: every input goes through the config parser (JSON file and one --set
// assignment), the sweep-file parser, the checkpoint state.json parser and the pickle
// check that stands before LibTorch's unpickler. Rejecting an
// input with sw::Error is the expected outcome; any other exception, a crash, a leak, an
// out-of-bounds access or undefined behaviour is a bug. So is a broken round trip: a config
// that parsed, written as JSON (as config.json is) and read back, must be the same config;
// a parsed sweep, written back as one variant per point with every key set, must expand to
// the same configs. And UTF-8 fed in pieces (cut where the input's first byte says) must
// decode as the whole does: the same characters, or the same error at the same byte.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <iostream>
#include <string>

#include "config/config.h"
#include "data/vocab.h"
#include "sweep/sweep.h"
#include "train/checkpoint_state.h"
#include "train/pickle_check.h"
#include "util/error.h"

namespace {

[[noreturn]] void broken(const std::string& what) {
  std::cerr << "round trip broken: " << what << std::endl;
  std::abort();
}

// config -> JSON -> config is the identity, and a valid config stays valid.
void config_round_trip(const sw::Config& c) {
  const nlohmann::json j = sw::to_json(c);
  sw::Config back;
  try {
    sw::apply_json(back, j, "round trip");
    sw::validate(back);
  } catch (const sw::Error& e) {
    broken(std::string("a valid config written as JSON is refused: ") + e.what());
  }
  if (sw::to_json(back) != j) broken("config -> JSON -> config changed it: " + j.dump());
}

// A sweep's points, written back as one variant each with every key set, expand to the
// same configs in the same order.
void sweep_round_trip(const sw::Sweep& s) {
  nlohmann::json variants = nlohmann::json::array();
  for (size_t i = 0; i < s.points.size(); ++i) {
    nlohmann::json set = nlohmann::json::object();
    const nlohmann::json config = sw::to_json(s.points[i].config);
    for (const auto& [section, body] : config.items())
      for (const auto& [key, value] : body.items())
        set[section + "." + key] = value;
    variants.push_back({{"name", "p" + std::to_string(i)}, {"set", set}});
  }
  sw::Sweep again;
  try {
    again = sw::parse_sweep(nlohmann::json({{"variants", variants}}).dump(), "again.json",
                            "/nonexistent");
  } catch (const sw::Error& e) {
    broken(std::string("a sweep's points written back are refused: ") + e.what());
  }
  if (again.points.size() != s.points.size()) broken("the sweep re-expanded to another count");
  for (size_t i = 0; i < s.points.size(); ++i)
    if (sw::to_json(again.points[i].config) != sw::to_json(s.points[i].config))
      broken("point " + s.points[i].name + " re-expanded to another config");
}

// The decode of `text` streamed in pieces of 1 + (first byte % 8) bytes is the whole decode.
void utf8_stream_matches(const std::string& text) {
  std::u32string whole, streamed;
  std::string whole_error, streamed_error;
  try {
    whole = sw::utf8_decode(text, "f");
  } catch (const sw::Error& e) {
    whole_error = e.what();
  }
  const size_t piece = text.empty() ? 1 : 1 + static_cast<unsigned char>(text[0]) % 8;
  try {
    sw::Utf8Stream s("f");
    for (size_t i = 0; i < text.size(); i += piece)
      s.feed(reinterpret_cast<const unsigned char*>(text.data()) + i,
             std::min(piece, text.size() - i), [&](char32_t c) { streamed.push_back(c); });
    s.finish();
  } catch (const sw::Error& e) {
    streamed_error = e.what();
  }
  if (streamed_error != whole_error)
    broken("streamed UTF-8 error: " + streamed_error + " vs " + whole_error);
  if (whole_error.empty() && streamed != whole) broken("streamed UTF-8 decoded otherwise");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    sw::Config c;
    sw::apply_json(c, sw::parse_json_text(text, "fuzz.json"), "fuzz.json");
    sw::validate(c);
    config_round_trip(c);
  } catch (const sw::Error&) {
  }
  try {
    sw::Config c;
    sw::apply_override(c, text.substr(0, text.find('\n')));
    sw::validate(c);
    config_round_trip(c);
  } catch (const sw::Error&) {
  }
  // A sweep's base may name any file; device and process files could block or be endless.
  if (text.find("/dev") == std::string::npos && text.find("/proc") == std::string::npos &&
      text.find("/sys") == std::string::npos) {
    sw::Sweep s;
    bool parsed = false;
    try {
      s = sw::parse_sweep(text, "sweep.json", "/nonexistent");
      parsed = true;
    } catch (const sw::Error&) {
    }
    if (parsed) sweep_round_trip(s);
  }
  try {
    sw::parse_checkpoint_state(text, "state.json");
  } catch (const sw::Error&) {
  }
  try {
    sw::check_pickle(text, "data.pkl");
  } catch (const sw::Error&) {
  }
  utf8_stream_matches(text);
  return 0;
}
