// Text from files and flags as it may be shown in a message.
#pragma once

#include <string>

namespace sw {

// `s` with control bytes written as \xNN (a NUL would cut a message, an escape sequence
// would reach the terminal).
std::string printable(const std::string& s);

}  // namespace sw
