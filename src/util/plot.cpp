#include "util/plot.h"

#include <filesystem>

#include "util/error.h"
#include "util/process.h"

namespace sw {

namespace {

// A python3 that has matplotlib: Debian's first (python3-matplotlib), then PATH's.
std::string plotting_python() {
  for (const char* py : {"/usr/bin/python3", "python3"}) {
    try {
      if (run_program({py, "-c", "import matplotlib"}, /*quiet=*/true).ok()) return py;
    } catch (const Error&) {  // no such program: try the next
    }
  }
  return "";
}

}  // namespace

PlotResult run_plot_script(const std::vector<std::string>& args, bool quiet) {
  const std::string script = std::string(SWITCH_TOOLS_DIR) + "/plot.py";
  if (!std::filesystem::exists(script)) return {PlotResult::Unavailable, script + " is missing"};
  const std::string py = plotting_python();
  if (py.empty())
    return {PlotResult::Unavailable, "no python3 with matplotlib (tools/setup.sh installs it)"};
  std::vector<std::string> argv = {py, script};
  argv.insert(argv.end(), args.begin(), args.end());
  try {
    const ProgramResult r = run_program(argv, quiet);
    if (!r.ok()) return {PlotResult::Failed, script + " " + r.describe()};
  } catch (const Error& e) {
    return {PlotResult::Failed, e.what()};
  }
  return {};
}

}  // namespace sw
