// A bound on JSON nesting, checked on the text before it is parsed: every JSON file switch
// reads (configs, sweep files, state.json, metrics lines) is at most a few levels deep,
// and walking a deeper tree (comparing, dumping, applying it) recurses once per level.
#pragma once

#include <cstddef>
#include <string_view>

namespace sw {

constexpr size_t kMaxJsonDepth = 64;
// The largest JSON file read whole (configs, sweep files, summaries, state.json).
constexpr size_t kMaxJsonFileBytes = size_t{64} << 20;

// The deepest nesting of arrays and objects in `text` (strings skipped); stops counting
// and returns the byte offset at which kMaxJsonDepth is passed through `too_deep_at`.
inline size_t json_depth(std::string_view text, size_t* too_deep_at = nullptr) {
  size_t depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (escaped)
        escaped = false;
      else if (c == '\\')
        escaped = true;
      else if (c == '"')
        in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > deepest) deepest = depth;
      if (depth > kMaxJsonDepth) {
        if (too_deep_at != nullptr) *too_deep_at = i;
        return deepest;
      }
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}

}  // namespace sw
