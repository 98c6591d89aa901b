// Shared test helpers: scratch directories, files, running the binaries, the tiny config.
#pragma once

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include <doctest/doctest.h>

#include "config/config.h"
#include "model/small_gemm.h"
#include "util/error.h"

namespace test {

namespace fs = std::filesystem;

// A fresh, empty directory under the build tree, named after the test.
inline std::string scratch_dir(const std::string& name) {
  fs::path p = fs::current_path() / "scratch" / name;
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

inline void write_file(const std::string& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary);
  out << content;
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct CmdResult {
  int rc;
  std::string output;  // stdout and stderr together
};

// Runs a shell command, capturing its output and exit status.
inline CmdResult run(const std::string& cmd) {
  CmdResult r{0, ""};
  std::FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  REQUIRE(p != nullptr);
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, p)) > 0)
    r.output.append(buf, n);
  int status = pclose(p);
  r.rc = WIFEXITED(status) ? WEXITSTATUS(status) : 128;
  return r;
}

// `s` as one shell word, whatever it holds (for the commands test::run builds).
inline std::string quote(const std::string& s) {
  std::string out = "'";
  for (char c : s)
    out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

// A shell loop that waits, 120 s at most, until `file` holds `pattern` (grep -F): the event a
// test waits for before it acts, never a fixed delay. Giving up is said in the output
// ("wait_for: gave up ..."), which every test that uses it prints when it fails.
inline std::string wait_for(const std::string& file, const std::string& pattern) {
  return "for i in $(seq 1200); do grep -qsF " + quote(pattern) + " " + quote(file) +
         " && break; sleep 0.1; done; grep -qsF " + quote(pattern) + " " + quote(file) +
         " || echo " +
         quote("wait_for: gave up after 120 s waiting for " + pattern + " in " + file);
}

inline bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

inline std::string data_path() {
  return SWITCH_TEST_DATA;
}
inline std::string source_path(const std::string& rel) {
  return std::string(SWITCH_SOURCE_DIR) + "/" + rel;
}

// configs/tiny.json pointed at the test data.
// Sets the small-matrix backend while it lives and restores the one before, also when a
// check throws.
struct BackendScope {
  explicit BackendScope(sw::SmallGemmBackend b) : before(sw::small_gemm_backend()) {
    sw::set_small_gemm_backend(b);
  }
  ~BackendScope() { sw::set_small_gemm_backend(before); }
  BackendScope(const BackendScope&) = delete;
  BackendScope& operator=(const BackendScope&) = delete;
  sw::SmallGemmBackend before;
};

// The backends that compute the small-matrix products (all but `off`), the default first.
inline constexpr sw::SmallGemmBackend kProductBackends[] = {
    sw::SmallGemmBackend::Dnnl, sw::SmallGemmBackend::Kernel, sw::SmallGemmBackend::Blas};

inline sw::Config tiny_config() {
  sw::Config c;
  sw::apply_file(c, source_path("configs/tiny.json"));
  c.data.path = data_path();
  return c;
}

// The step of a run directory's newest complete checkpoint (ckpt-<step>/), -1 if none.
inline int64_t newest_checkpoint_step(const std::string& run_dir) {
  int64_t step = -1;
  for (const auto& entry : fs::directory_iterator(run_dir)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind("ckpt-", 0) == 0 && name.find(".tmp") == std::string::npos)
      step = std::max<int64_t>(step, std::stoll(name.substr(5)));
  }
  return step;
}

// Runs `f` and returns the sw::Error message it throws (fails the test if it does not).
template <typename F>
std::string error_of(F f) {
  try {
    f();
  } catch (const sw::Error& e) {
    return e.what();
  }
  FAIL("expected an sw::Error");
  return "";
}

}  // namespace test
