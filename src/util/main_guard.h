// The mains' last line of defence: whatever escapes `run` is printed as one line with exit 3
// (SWITCH_DEBUG=1 shows LibTorch's whole message and stack).
#pragma once

#include <exception>
#include <iostream>

#include "util/error.h"

namespace sw {

template <typename Run>
int guarded_main(const char* program, Run run, int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << program << ": internal error: " << unexpected_error_message(e) << std::endl;
    return 3;
  }
}

}  // namespace sw
