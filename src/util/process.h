// Small helpers for starting child processes (switch-train --nproc, switch-sweep). No child
// is ever started through a shell: paths and names are data, passed as one argument each.
#pragma once

#include <string>
#include <vector>

namespace sw {

// argv/envp-style pointers into `v` (which must outlive them), null-terminated.
std::vector<char*> c_strings(std::vector<std::string>& v);

// This program's own path (/proc/self/exe); throws sw::Error when it cannot be read.
std::string self_exe();

// How a program run by run_program ended.
struct ProgramResult {
  int exit_code = -1;  // its exit status when it exited, else -1
  int signal = 0;      // the signal that ended it, else 0
  std::string err;     // the last few KiB of what it wrote to stderr

  bool ok() const { return exit_code == 0; }
  // "exited with status 1", "was killed by signal 9 (Killed)"; then its last stderr line.
  std::string describe() const;
};

// Runs argv[0] (found in PATH when it holds no '/') with exactly these arguments, no shell
// between: stdin is /dev/null, stdout is this process's unless `quiet` (then /dev/null),
// stderr is captured into the result (and echoed unless `quiet`). Waits for it to end.
// Throws sw::Error naming the program when it cannot be started (not found, not executable).
ProgramResult run_program(const std::vector<std::string>& argv, bool quiet = false);

}  // namespace sw
