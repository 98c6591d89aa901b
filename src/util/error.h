// The project's one exception type. Anything a user can cause (bad flags, bad config, bad
// data, unreadable files) is reported by throwing sw::Error with a message that names
// the file, key or value and what would be accepted; the mains print it and exit non-zero.
#pragma once

#include <stdexcept>
#include <string>

namespace sw {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace sw
