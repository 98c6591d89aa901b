#include "util/error.h"

#include <cstdlib>
#include <cstring>

#include <c10/util/Exception.h>

namespace sw {

std::string first_line(const std::string& s) {
  return s.substr(0, s.find('\n'));
}

std::string unexpected_error_message(const std::exception& e) {
  const char* debug = std::getenv("SWITCH_DEBUG");
  bool full = debug != nullptr;
  for (const char* off : {"", "0", "false", "no", "off"})
    full = full && std::strcmp(debug, off) != 0;
  if (full) return e.what();
  const auto* c10 = dynamic_cast<const c10::Error*>(&e);
  std::string msg = c10 ? c10->what_without_backtrace() : e.what();
  const size_t nl = msg.find('\n');
  if (nl != std::string::npos) msg.resize(nl);
  if (c10 != nullptr || nl != std::string::npos) msg += " (SWITCH_DEBUG=1 shows the details)";
  return msg;
}

}  // namespace sw
