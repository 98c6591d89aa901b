// Small helpers for starting child processes (switch-train --nproc, switch-sweep).
#pragma once

#include <string>
#include <vector>

namespace sw {

// argv/envp-style pointers into `v` (which must outlive them), null-terminated.
std::vector<char*> c_strings(std::vector<std::string>& v);

// This program's own path (/proc/self/exe); throws sw::Error when it cannot be read.
std::string self_exe();

}  // namespace sw
