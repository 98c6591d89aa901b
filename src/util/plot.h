// The project's pictures are drawn by tools/plot.py (matplotlib, Debian's
// python3-matplotlib) from this source tree; the binaries run it as a child process.
#pragma once

#include <string>
#include <vector>

namespace sw {

struct PlotResult {
  enum State { Drawn, Unavailable, Failed } state = Drawn;
  std::string why;  // Unavailable or Failed: what is missing or what went wrong
};

// Runs tools/plot.py with `args` (folders are made absolute by the caller); `quiet`: its
// output is not shown (the list of files it wrote, its warnings).
PlotResult run_plot_script(const std::vector<std::string>& args, bool quiet = false);

}  // namespace sw
