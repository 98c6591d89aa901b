// libFuzzer target: every input goes through the config parser (JSON file and one --set
// assignment), the sweep-file parser, the checkpoint state.json parser and the pickle
// check that stands before LibTorch's unpickler. Rejecting an
// input with sw::Error is the expected outcome; any other exception, a crash, a leak, an
// out-of-bounds access or undefined behaviour is a bug.
#include <cstddef>
#include <cstdint>
#include <string>

#include "config/config.h"
#include "sweep/sweep.h"
#include "train/checkpoint_state.h"
#include "train/pickle_check.h"
#include "util/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    sw::Config c;
    sw::apply_json(c, sw::parse_json_text(text, "fuzz.json"), "fuzz.json");
    sw::validate(c);
  } catch (const sw::Error&) {
  }
  try {
    sw::Config c;
    sw::apply_override(c, text.substr(0, text.find('\n')));
    sw::validate(c);
  } catch (const sw::Error&) {
  }
  // A sweep's base may name any file; device and process files could block or be endless.
  if (text.find("/dev") == std::string::npos && text.find("/proc") == std::string::npos &&
      text.find("/sys") == std::string::npos) {
    try {
      sw::parse_sweep(text, "sweep.json", "/nonexistent");
    } catch (const sw::Error&) {
    }
  }
  try {
    sw::parse_checkpoint_state(text, "state.json");
  } catch (const sw::Error&) {
  }
  try {
    sw::check_pickle(text, "data.pkl");
  } catch (const sw::Error&) {
  }
  return 0;
}
