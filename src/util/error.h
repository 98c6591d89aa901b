// The project's one exception type. Anything a user can cause (bad flags, bad config, bad
// data, unreadable files) is reported by throwing sw::Error with a message that names
// the file, key or value and what would be accepted; the mains print it and exit non-zero.
#pragma once

#include <exception>
#include <stdexcept>
#include <string>

namespace sw {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// A config this machine cannot run (a model that cannot fit in memory): the mains exit 2,
// as for any other bad config, where other errors found while running exit 1.
class ConfigError : public Error {
 public:
  using Error::Error;
};

// The first line of `s` (LibTorch's messages go on with notes and stacks).
std::string first_line(const std::string& s);

// The line a main prints for an exception it did not expect (exit 3): the first line of
// its message — LibTorch's c10::Error carries a C++ stack after it —, or the whole message
// when the environment sets SWITCH_DEBUG=1.
std::string unexpected_error_message(const std::exception& e);

}  // namespace sw
