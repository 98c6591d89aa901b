// switch-train --nproc N: runs N ranks of one command on this machine, as torchrun would
// (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a free
// MASTER_PORT in each rank's environment).
#pragma once

#include <string>
#include <vector>

namespace sw {

struct LaunchOptions {
  std::string exe;                // the program each rank runs
  std::vector<std::string> args;  // its arguments (without the program name)
  int nproc = 2;
  double grace_s = 10;  // after a rank fails: how long the others get to exit before SIGKILL
};

// Starts the ranks and forwards their stdout and stderr line by line, prefixed "[rank r] ".
// SIGINT and SIGTERM sent to the launcher are forwarded to every rank (the ranks run in
// their own process group, so a terminal's Ctrl-C reaches them once, through here). When a
// rank fails, the others get SIGTERM, then SIGKILL after grace_s. A rank dies with the
// launcher. Returns 0 when every rank succeeded, else the exit code of the first rank that
// failed (128 + signal for a rank killed by a signal).
int launch_local(const LaunchOptions& opt);

}  // namespace sw
