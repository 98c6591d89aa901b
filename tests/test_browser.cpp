// switch-board's page in a real browser: Debian's Chromium, headless, driven over the
// WebDriver protocol by Debian's chromedriver. The page lists a run and a sweep, draws their
// charts and heatmaps, takes new records without a reload, ignores a line being written,
// sorts a sweep's table, and survives a run deleted while shown. A screenshot is saved
// (scratch/board_browser/board.png; also to $SWITCH_BOARD_SCREENSHOT when set).
#include <cstdlib>

#include <nlohmann/json.hpp>

#include "board_helpers.h"

namespace {

using nlohmann::json;
namespace fs = std::filesystem;

constexpr const char* kChromium = "/usr/bin/chromium";
constexpr const char* kChromedriver = "/usr/bin/chromedriver";

std::string base64_decode(const std::string& in) {
  static const std::string chars =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  uint32_t acc = 0;
  int bits = 0;
  for (char c : in) {
    const size_t v = chars.find(c);
    if (v == std::string::npos) continue;  // '=' and line breaks
    acc = (acc << 6) | static_cast<uint32_t>(v);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out += static_cast<char>((acc >> bits) & 0xff);
    }
  }
  return out;
}

// A WebDriver session (W3C protocol) on a chromedriver.
class Browser {
 public:
  Browser(int port, const std::string& profile) : http_("127.0.0.1", port) {
    http_.set_read_timeout(120, 0);
    const json caps = {
        {"capabilities",
         {{"alwaysMatch",
           {{"browserName", "chrome"},
            {"goog:chromeOptions",
             {{"binary", kChromium},
              {"args",
               {"--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1400,1500",
                "--user-data-dir=" + profile}}}}}}}}};
    const json r = call("POST", "/session", caps);
    session_ = r["sessionId"].get<std::string>();
  }
  ~Browser() {
    if (!session_.empty()) http_.Delete("/session/" + session_);
  }

  json call(const std::string& method, const std::string& path, const json& body = json::object()) {
    httplib::Result res = method == "GET"      ? http_.Get(path)
                          : method == "DELETE" ? http_.Delete(path)
                                               : http_.Post(path, body.dump(), "application/json");
    REQUIRE(res);
    INFO(method, " ", path, " -> ", res->status, ": ", res->body.substr(0, 2000));
    REQUIRE(res->status == 200);
    return json::parse(res->body)["value"];
  }
  void open(const std::string& url) { call("POST", at("/url"), {{"url", url}}); }
  // Runs `script` (a function body) in the page and returns what it returns.
  json eval(const std::string& script) {
    return call("POST", at("/execute/sync"), {{"script", script}, {"args", json::array()}});
  }
  // Waits, 60 s at most, until `script` returns true; says what the page last showed if not.
  void wait_until(const std::string& script, const std::string& what) {
    const bool ok = test::eventually([&] { return eval(script) == true; }, 60);
    if (!ok && !failure_shot_.empty()) test::write_file(failure_shot_, screenshot());
    INFO("waiting for: ", what, " (the page then: ", failure_shot_, "); page errors: ",
         eval("return window.switchBoard ? String(window.switchBoard.lastError) : 'no board'"));
    REQUIRE(ok);
  }
  std::string screenshot() {
    return base64_decode(call("GET", at("/screenshot")).get<std::string>());
  }

 private:
  std::string at(const std::string& p) const { return "/session/" + session_ + p; }
  httplib::Client http_;
  std::string session_;

 public:
  std::string failure_shot_;  // where wait_until saves what the page showed when it gave up
};

void append(const std::string& path, const std::string& s) {
  std::ofstream out(path, std::ios::binary | std::ios::app);
  out << s;
}

// The run's last train record again, `ahead` steps later and with a lower loss.
std::string next_train_record(const std::string& run, int ahead) {
  std::ifstream in(run + "/metrics.jsonl");
  json last;
  for (std::string line; std::getline(in, line);) {
    const json r = json::parse(line);
    if (r["kind"] == "train") last = r;
  }
  last["step"] = last["step"].get<int64_t>() + ahead;
  last["time_s"] = last["time_s"].get<double>() + ahead;
  last["loss"] = last["loss"].get<double>() * 0.9;
  return last.dump() + "\n";
}

}  // namespace

TEST_CASE(
    "switch-board in headless Chromium: lists - draws - updates live - sorts - survives deletion") {
  REQUIRE_MESSAGE(fs::exists(kChromium), "Chromium is missing: tools/setup.sh installs it");
  REQUIRE_MESSAGE(fs::exists(kChromedriver), "chromedriver is missing: tools/setup.sh installs it");
  const std::string root = test::scratch_dir("board_browser");
  const std::string run = root + "/tiny";
  test::train_tiny(run);
  // A sweep of two points (copies of the run, one with another capacity factor).
  fs::create_directories(root + "/sweep");
  test::write_file(root + "/sweep/sweep.json", "{}");
  for (const std::string p : {"cf-1.0", "cf-2.0"}) {
    fs::copy(run, root + "/sweep/" + p, fs::copy_options::recursive);
    fs::remove(root + "/sweep/" + p + "/.lock");
  }
  json cfg = json::parse(test::read_file(root + "/sweep/cf-2.0/config.json"));
  cfg["moe"]["capacity_factor"] = 2.0;
  test::write_file(root + "/sweep/cf-2.0/config.json", cfg.dump(2));
  append(
      root + "/sweep/cf-2.0/metrics.jsonl",
      json({{"kind", "eval"}, {"step", 70}, {"time_s", 100.0}, {"val_loss", 1.0}}).dump() + "\n");

  test::Child board({SWITCH_BOARD_BIN, "--port", "0", "--poll-ms", "300", root});
  const std::string url = test::start_board(board);
  INFO(board.output());
  REQUIRE(!url.empty());
  test::Child driver({kChromedriver, "--port=0"});
  const std::string started = driver.wait_line("started successfully on port", 60);
  INFO(driver.output());
  REQUIRE(!started.empty());
  const int driver_port = std::stoi(started.substr(started.rfind(' ') + 1));
  Browser b(driver_port, test::scratch_dir("board_browser_profile"));
  b.failure_shot_ = root + "/failure.png";
  b.open(url);

  // The list: three runs, all ticked by default (none trains, and the list is short).
  b.wait_until("return document.querySelectorAll('#runs tbody tr').length === 3", "three runs");
  CHECK(b.eval("return document.querySelector('#runs tbody tr[data-id=\"0/tiny\"] "
               ".status').textContent") == "finished");
  CHECK(b.eval("return [...document.querySelectorAll('#runs thead th')].map(t => t.textContent)"
               ".includes('moe.capacity_factor')") == true);
  // Its charts: train and val loss for each ticked run, points in each.
  b.wait_until(
      "const c = Chart.getChart(document.getElementById('chart-loss'));"
      "return c !== undefined && c.data.datasets.length === 6 &&"
      "c.data.datasets.every(d => d.data.length > 0)",
      "loss chart with 3 runs x (train, val)");
  const json counts = b.eval(
      "const c = Chart.getChart(document.getElementById('chart-loss'));"
      "return c.data.datasets.filter(d => d.label === 'tiny train')[0].data.length");
  CHECK(counts.get<int>() == 6);  // tiny.json logs every 10 of 60 steps
  for (const std::string id : {"chart-lr", "chart-dropped", "chart-speed"})
    CHECK(b.eval("return Chart.getChart(document.getElementById('" + id +
                 "')).data.datasets.length") == 3);
  // A heatmap per ticked run and MoE layer (of 4 experts in tiny.json), drawn.
  const size_t moe_layers =
      json::parse(test::read_file_line(run + "/metrics.jsonl"))["layers"].size();
  REQUIRE(moe_layers > 0);
  b.wait_until("return document.querySelectorAll('#heatmaps canvas[data-run]').length === " +
                   std::to_string(3 * moe_layers),
               "heatmaps");
  CHECK(b.eval("const c = document.querySelector('#heatmaps canvas[data-run]');"
               "return [c.width, c.height]") == json::array({6, 4}));
  CHECK(b.eval("const c = document.querySelector('#heatmaps canvas[data-run]');"
               "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
               "return d.some((v, i) => i % 4 !== 3 && v !== 0)") == true);

  // The sweep: its table, sorted by best val; a click on the header reverses it.
  b.wait_until("return document.querySelectorAll('.sweep-table tbody tr').length === 2",
               "sweep table");
  CHECK(b.eval("return document.querySelector('.sweep-table tbody tr').dataset.id") ==
        "0/sweep/cf-2.0");
  b.eval(
      "[...document.querySelectorAll('.sweep-table th')].find(t => t.textContent === 'best "
      "val').click(); return 0");
  CHECK(b.eval("return document.querySelector('.sweep-table tbody tr').dataset.id") ==
        "0/sweep/cf-1.0");
  CHECK(
      b.eval(
          "return Chart.getChart(document.querySelector('.sweep canvas')).data.datasets.length") ==
      2);

  // Against wall time: the x of the last point is the last train record's time_s.
  const json last = json::parse(next_train_record(run, 0));
  b.eval(
      "const s = document.getElementById('xaxis'); s.value = 'time_s';"
      "s.dispatchEvent(new Event('change')); return 0");
  CHECK(b.eval("return Chart.getChart(document.getElementById('chart-loss')).options.scales.x"
               ".title.text") == "wall time (s)");
  CHECK(b.eval("const c = Chart.getChart(document.getElementById('chart-loss'));"
               "return c.data.datasets.filter(d => d.label === 'tiny train')[0].data.at(-1).x")
            .get<double>() == doctest::Approx(last["time_s"].get<double>()));
  b.eval(
      "const s = document.getElementById('xaxis'); s.value = 'step';"
      "s.dispatchEvent(new Event('change')); return 0");

  // New records appear without a reload; a line being written is left alone.
  const int polls = b.eval("return window.switchBoard.polls").get<int>();
  append(run + "/metrics.jsonl", next_train_record(run, 10));
  b.wait_until(
      "const c = Chart.getChart(document.getElementById('chart-loss'));"
      "return c.data.datasets.filter(d => d.label === 'tiny train')[0]"
      ".data.length === 7",
      "the appended record drawn");
  append(run + "/metrics.jsonl", next_train_record(run, 20).substr(0, 40));
  b.wait_until("return window.switchBoard.polls >= " + std::to_string(polls + 6), "more polls");
  CHECK(b.eval("return window.switchBoard.errors") == 0);
  CHECK(b.eval("return document.querySelector('#runs tbody tr[data-id=\"0/tiny\"] .warn')") ==
        nullptr);
  CHECK(b.eval("return document.querySelector('#runs tbody tr[data-id=\"0/tiny\"]').textContent"
               ".includes('70 / 60')") == true);

  // The screenshot, taken with everything drawn.
  const std::string png = b.screenshot();
  CHECK(png.substr(1, 3) == "PNG");
  CHECK(png.size() > 20000);
  test::write_file(root + "/board.png", png);
  if (const char* out = std::getenv("SWITCH_BOARD_SCREENSHOT")) test::write_file(out, png);

  // A run deleted while shown leaves the list and its charts, and nothing breaks.
  fs::remove_all(root + "/sweep/cf-1.0");
  b.wait_until(
      "return document.querySelectorAll('#runs tbody tr').length === 2 &&"
      "Chart.getChart(document.getElementById('chart-loss')).data.datasets.length === 4",
      "the deleted run gone");
  CHECK(b.eval("return window.switchBoard.errors") == 0);
  CHECK(board.stop(SIGTERM) == 0);
}
