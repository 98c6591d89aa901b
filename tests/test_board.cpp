// switch-board: reading metrics while they are written, bounded memory, the ids a request
// may name, finding runs and sweeps, telling a live run, and the server's answers and
// refusals over real HTTP.
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cmath>
#include <numeric>

#include <nlohmann/json.hpp>

#include "board/board.h"
#include "board/catalog.h"
#include "board/series.h"
#include "board/server.h"
#include "board_helpers.h"
#include "util/dir_lock.h"

namespace {

using nlohmann::json;
namespace fs = std::filesystem;

std::string train_line(int step, double loss, const std::vector<int>& counts, int dropped = 0) {
  int total = std::accumulate(counts.begin(), counts.end(), 0);
  json r = {{"kind", "train"},
            {"step", step},
            {"time_s", 0.5 * step},
            {"lr", 1e-3},
            {"loss", loss},
            {"ce", loss},
            {"drop_frac", 0.01},
            {"tokens_per_s", 1000.0},
            {"layers", json::array({{{"layer", 1},
                                     {"tokens", total},
                                     {"counts", counts},
                                     {"dropped", dropped},
                                     {"prob_sum", json::array()}}})}};
  return r.dump() + "\n";
}

std::string eval_line(int step, double val) {
  return json({{"kind", "eval"},
               {"step", step},
               {"time_s", 0.5 * step},
               {"val_loss", val},
               {"train_loss", val - 0.1}})
             .dump() +
         "\n";
}

void append(const std::string& path, const std::string& s) {
  std::ofstream out(path, std::ios::binary | std::ios::app);
  out << s;
}

// A run directory by hand: config.json with these overrides of a small config, metrics.
void fake_run(const std::string& dir, const json& moe = {{"n_experts", 4}}) {
  fs::create_directories(dir);
  test::write_file(
      dir + "/config.json",
      json({{"model", {{"d_model", 32}}}, {"moe", moe}, {"train", {{"steps", 100}}}}).dump());
  test::write_file(dir + "/metrics.jsonl", train_line(10, 3.0, {1, 2, 3, 2}) + eval_line(10, 2.9));
}

}  // namespace

TEST_CASE("Series: memory bounded however many points - the newest always shows - means kept") {
  sw::Series s({"v"}, 64);
  const int n = 100000;
  for (int i = 1; i <= n; ++i) {
    s.add(i, i * 0.1, {static_cast<double>(i)});
    REQUIRE(s.size() <= 64);
    REQUIRE(s.step.back() == i);  // the newest record is the last point at once
  }
  const int64_t weight = std::accumulate(s.weight.begin(), s.weight.end(), int64_t{0});
  CHECK(weight == n);
  double mean = 0;
  for (size_t i = 0; i < s.size(); ++i)
    mean += s.values[0][i] * static_cast<double>(s.weight[i]);
  CHECK(mean / n == doctest::Approx((n + 1) / 2.0).epsilon(1e-12));
  // Steps rise strictly; downsampling keeps the last step and the mean.
  for (size_t i = 1; i < s.size(); ++i)
    CHECK(s.step[i] > s.step[i - 1]);
  const sw::Series d = s.downsampled(10);
  CHECK(d.size() <= 10);
  CHECK(d.step.back() == n);
  double dmean = 0;
  for (size_t i = 0; i < d.size(); ++i)
    dmean += d.values[0][i] * static_cast<double>(d.weight[i]);
  CHECK(dmean / n == doctest::Approx((n + 1) / 2.0).epsilon(1e-12));
  // Absent values (NaN) neither count nor poison a mean; all-absent stays absent (null).
  sw::Series g({"a", "b"}, 4);
  g.add(1, 1, {1.0, NAN});
  g.add(2, 2, {NAN, NAN});
  g.add(3, 3, {3.0, NAN});
  const json j = g.to_json(1);
  CHECK(j["a"][0].get<double>() == 2.0);
  CHECK(j["b"][0].is_null());
}

TEST_CASE(
    "MetricsTail: a line being written waits - bad lines counted - rewritten files read anew") {
  const std::string dir = test::scratch_dir("board_tail");
  const std::string path = dir + "/metrics.jsonl";
  sw::MetricsTail t(path);
  CHECK_FALSE(t.update());  // no file yet: nothing, no error
  const std::string first = train_line(10, 3.0, {1, 2, 3, 2});
  const std::string second = eval_line(10, 2.9);
  test::write_file(path, first + second.substr(0, 7));  // the second line half written
  CHECK(t.update());
  CHECK(t.records() == 1);
  CHECK(t.malformed() == 0);
  const uint64_t v1 = t.version();
  CHECK_FALSE(t.update());  // nothing new
  CHECK(t.version() == v1);
  append(path, second.substr(7));
  CHECK(t.update());
  CHECK(t.records() == 2);
  CHECK(t.malformed() == 0);
  CHECK(t.best_val() == 2.9);
  CHECK(t.version() != v1);
  append(path, "{\"kind\": \"train\", \"step\": 2\n[1, 2]\n\n");  // torn, not an object, empty
  append(path, std::string(size_t{5} << 20, 'x') + "\n");         // past the line limit
  append(path, train_line(20, 2.0, {4, 0, 0, 4}, 2));
  t.update();
  CHECK(t.malformed() == 3);
  CHECK(t.records() == 3);
  CHECK(t.last_step() == 20);
  json j = t.to_json(100);
  REQUIRE(j["layers"].size() == 1);
  CHECK(j["layers"][0]["layer"] == 1);
  CHECK(j["layers"][0]["experts"] == 4);
  CHECK(j["layers"][0]["load"][1] == json::array({0.5, 0.0, 0.0, 0.5}));
  CHECK(j["layers"][0]["dropped"][1].get<double>() == 0.25);
  // Rewritten shorter: read again from the start.
  test::write_file(path, eval_line(5, 3.5));
  CHECK(t.update());
  CHECK(t.records() == 1);
  CHECK(t.best_val() == 3.5);
  CHECK(t.to_json(100)["layers"].empty());
  // Replaced by another file (another inode) at least as long: read anew too.
  const std::string longer = eval_line(7, 3.25) + eval_line(8, 3.0) + eval_line(9, 2.75);
  test::write_file(dir + "/other", longer);
  fs::rename(dir + "/other", path);
  CHECK(t.update());
  CHECK(t.records() == 3);
  CHECK(t.best_val() == 2.75);
  // Deleted: empty again.
  fs::remove(path);
  CHECK(t.update());
  CHECK(t.records() == 0);
}

TEST_CASE("MetricsTail: thousands of records come back downsampled - the last step kept") {
  const std::string dir = test::scratch_dir("board_many");
  std::string lines;
  for (int s = 1; s <= 20000; ++s) {
    std::vector<int> counts(16, 1);
    counts[s % 16] = 17;
    lines += train_line(s, 4.0 - s * 1e-4, counts);
    if (s % 100 == 0) lines += eval_line(s, 4.0 - s * 1e-4);
  }
  test::write_file(dir + "/metrics.jsonl", lines);
  sw::MetricsTail t(dir + "/metrics.jsonl");
  t.update();
  CHECK(t.records() == 20200);
  const json j = t.to_json(500);
  CHECK(j["train"]["step"].size() <= 500);
  CHECK(j["train"]["step"].back() == 20000);
  CHECK(j["eval"]["step"].size() == 200);  // under the cap: every eval
  const json& layer = j["layers"][0];
  CHECK(layer["load"].size() <= 500);
  CHECK(layer["step"].back() == 20000);
  for (const auto& col : layer["load"]) {
    double sum = 0;
    for (const auto& v : col)
      sum += v.get<double>();
    CHECK(sum == doctest::Approx(1.0));
  }
  CHECK(j.dump().size() < 2000000);  // the answer stays small
}

TEST_CASE("resolve_id: every spelling of a way out is refused") {
  const std::string root = test::scratch_dir("board_ids");
  const std::string outside = test::scratch_dir("board_ids_outside");
  fake_run(root + "/run");
  fake_run(outside + "/secret");
  fs::create_directory_symlink(outside + "/secret", root + "/link-out");
  fs::create_directory_symlink(root + "/run", root + "/link-in");
  fs::create_directories(root + "/.hidden");
  test::write_file(root + "/file.txt", "x");
  const sw::Roots roots = sw::make_roots({root});
  CHECK(sw::resolve_id(roots, "0").status == 200);
  CHECK(sw::resolve_id(roots, "0/run").status == 200);
  CHECK(sw::resolve_id(roots, "0/run").path == fs::canonical(root + "/run").string());
  CHECK(sw::resolve_id(roots, "0/link-in").status == 200);  // a link that stays inside
  for (const std::string& id : std::vector<std::string>{
           "", "/", "/etc", "0/..", "0/../board_ids_outside/secret", "0/run/..", "0/./run",
           "0//run", "0/run/", "0/.hidden", "0\\..\\x", "0/run\\..", std::string("0/r\0n", 5),
           "0/r\nn", "x/run", "-1/run", "0000001/run", "0 /run", "../0"}) {
    CAPTURE(id);
    CHECK(sw::resolve_id(roots, id).status == 400);
  }
  CHECK(sw::resolve_id(roots, "0/link-out").status == 403);
  CHECK(sw::resolve_id(roots, "0/link-out/").status == 400);
  CHECK(sw::resolve_id(roots, "1/run").status == 404);
  CHECK(sw::resolve_id(roots, "0/missing").status == 404);
  CHECK(sw::resolve_id(roots, "0/file.txt").status == 404);
  CHECK(sw::resolve_id(roots, "0/" + std::string(5000, 'a')).status == 400);
  // Folders that are not there or not folders are refused at the start, by name.
  CHECK(test::contains(test::error_of([&] { sw::make_roots({root + "/nope"}); }),
                       "board_ids/nope': no such directory"));
  CHECK(test::contains(test::error_of([&] { sw::make_roots({root + "/file.txt"}); }),
                       "is not a directory"));
}

TEST_CASE("scan: runs - sweeps and their points - hidden folders and links not entered") {
  const std::string root = test::scratch_dir("board_scan");
  const std::string elsewhere = test::scratch_dir("board_scan_elsewhere");
  fake_run(root + "/a");
  fs::create_directories(root + "/sw/.stale/old");
  test::write_file(root + "/sw/sweep.json", "{}");
  fake_run(root + "/sw/p2");
  fake_run(root + "/sw/p1");
  fake_run(root + "/sw/.stale/old");
  fs::create_directories(root + "/empty/deeper");
  fake_run(root + "/group/b");
  fs::create_directories(root + "/nested/one/two/three");
  fake_run(root + "/nested/one/two/three/too-deep");
  fake_run(elsewhere + "/c");
  fs::create_directory_symlink(elsewhere, root + "/link");
  const sw::Catalog cat = sw::scan(sw::make_roots({root}), 100);
  std::vector<std::string> ids;
  for (const auto& r : cat.runs)
    ids.push_back(r.id);
  CHECK(ids == std::vector<std::string>{"0/a", "0/group/b", "0/sw/p1", "0/sw/p2"});
  REQUIRE(cat.sweeps.size() == 1);
  CHECK(cat.sweeps[0].id == "0/sw");
  CHECK(cat.sweeps[0].points == std::vector<std::string>{"0/sw/p1", "0/sw/p2"});
  CHECK(cat.runs[2].sweep == "0/sw");
  CHECK(cat.runs[0].name == "board_scan/a");
  CHECK_FALSE(cat.truncated);
  const sw::Catalog few = sw::scan(sw::make_roots({root}), 2);
  CHECK(few.runs.size() == 2);
  CHECK(few.truncated);
  // A run given directly is the root itself, id "0".
  const sw::Catalog one = sw::scan(sw::make_roots({root + "/a"}), 100);
  REQUIRE(one.runs.size() == 1);
  CHECK(one.runs[0].id == "0");
}

TEST_CASE("run_status: training while a process holds the run's lock - then finished or stopped") {
  const std::string dir = test::scratch_dir("board_status");
  fake_run(dir);
  CHECK(sw::run_status(dir) == "stopped");
  {
    sw::DirLock lock = sw::DirLock::acquire(dir, "run directory", "");
    CHECK(sw::lock_held(dir));
    CHECK(sw::run_status(dir) == "training");
    // Looking again leaves the lock as it was (it takes none itself: see the loop below).
    CHECK(sw::lock_held(dir));
  }
  CHECK(fs::exists(dir + "/.lock"));  // the lock file stays behind, the lock does not
  CHECK_FALSE(sw::lock_held(dir));
  CHECK(sw::run_status(dir) == "stopped");
  test::write_file(dir + "/summary.json", "{}");
  CHECK(sw::run_status(dir) == "finished");
  // A writer can take the lock while the board looks, again and again.
  for (int i = 0; i < 3; ++i) {
    CHECK_FALSE(sw::lock_held(dir));
    sw::DirLock again = sw::DirLock::acquire(dir, "run directory", "");
    CHECK(again.held());
  }
}

TEST_CASE("Board: the differing config keys - unchanged answers - a run deleted while shown") {
  const std::string root = test::scratch_dir("board_board");
  fake_run(root + "/e4", {{"n_experts", 4}, {"capacity_factor", 1.0}});
  fake_run(root + "/e8", {{"n_experts", 8}, {"capacity_factor", 1.0}});
  sw::Board board(sw::make_roots({root}));
  sw::Reply r = board.runs();
  REQUIRE(r.status == 200);
  CHECK(r.body["diff_keys"] == json::array({"moe.n_experts"}));
  REQUIRE(r.body["runs"].size() == 2);
  CHECK(r.body["runs"][1]["diff"]["moe.n_experts"] == 8);
  CHECK(r.body["runs"][0]["status"] == "stopped");
  CHECK(r.body["runs"][0]["steps"] == 100);
  CHECK(r.body["runs"][0]["best_val"] == 2.9);
  const sw::Reply one = board.run("0/e4", 100, "");
  REQUIRE(one.status == 200);
  const std::string version = one.body["version"].get<std::string>();
  CHECK(board.run("0/e4", 100, version).body["unchanged"] == true);
  append(root + "/e4/metrics.jsonl", eval_line(20, 2.5));
  const sw::Reply two = board.run("0/e4", 100, version);
  CHECK_FALSE(two.body.contains("unchanged"));
  CHECK(two.body["eval"]["val_loss"] == json::array({2.9, 2.5}));
  fs::remove_all(root + "/e8");
  CHECK(board.runs().body["runs"].size() == 1);
  CHECK(board.run("0/e8", 100, "").status == 404);
  CHECK(board.run("0/../x", 100, "").status == 400);
  CHECK(board.sweep("0/e4", 100).status == 404);  // a run is not a sweep
}

TEST_CASE("Board: overlapping roots - odd records - deep and linked files - odd names") {
  const std::string root = test::scratch_dir("board_hostile");
  const std::string outside = test::scratch_dir("board_hostile_outside");
  fake_run(root + "/a");
  fake_run(root + "/b");
  // Records of unexpected shapes: a layer id that is no integer, a step no run reaches,
  // a thousand layers, a deep line. None stops the others.
  append(root + "/b/metrics.jsonl",
         R"({"kind":"train","step":70,"layers":[{"layer":null,"counts":[1,2]},)"
         R"({"layer":"x","counts":[1]},{"layer":[1],"counts":[3]}]})"
         "\n"
         R"({"kind":"train","step":1e300})"
         "\n" +
             std::string(100000, '[') + std::string(100000, ']') + "\n");
  json many = {{"kind", "train"}, {"step", 80}, {"layers", json::array()}};
  for (int l = 0; l < 1000; ++l)
    many["layers"].push_back({{"layer", l}, {"counts", {1, 1}}});
  append(root + "/b/metrics.jsonl", many.dump() + "\n");
  // A config nested past any config's depth (stack-deep when walked).
  fake_run(root + "/deep");
  test::write_file(root + "/deep/config.json", "{\"moe\": {\"x\": " + std::string(200000, '[') +
                                                   std::string(200000, ']') + "}}");
  // Files that are links out of the folder: never read.
  test::write_file(outside + "/creds.json", R"({"secret": {"token": "MARKER-7731"}})");
  fake_run(root + "/linked");
  fs::remove(root + "/linked/config.json");
  fs::create_symlink(outside + "/creds.json", root + "/linked/config.json");
  fake_run(root + "/linked-metrics");
  test::write_file(outside + "/m.jsonl", eval_line(5, 0.123));
  fs::remove(root + "/linked-metrics/metrics.jsonl");
  fs::create_symlink(outside + "/m.jsonl", root + "/linked-metrics/metrics.jsonl");
  test::write_file(root + "/linked-metrics/summary.json", "{}");
  // Names an id cannot carry (and JSON cannot, for invalid UTF-8): not listed.
  for (const std::string name : {"we\\ird", "new\nline", "bad\xffutf8"})
    fake_run(root + "/" + name);

  // The folder given twice and inside itself: each run once, and the board keeps answering.
  sw::Board board(sw::make_roots({root, root + "/a", root}));
  for (int pass = 0; pass < 2; ++pass) {
    const sw::Reply r = board.runs();
    REQUIRE(r.status == 200);
    std::vector<std::string> ids;
    for (const auto& run : r.body["runs"])
      ids.push_back(run["id"]);
    CHECK(ids == std::vector<std::string>{"0/a", "0/b", "0/deep", "0/linked-metrics"});
    CHECK_FALSE(test::contains(r.body.dump(), "MARKER-7731"));
    const json& b = r.body["runs"][1];
    CHECK(b["step"] == 80);
    CHECK(b["malformed"] == 2);                   // the unreachable step and the deep line
    CHECK(r.body["runs"][2]["steps"].is_null());  // the deep config: unreadable, no crash
    CHECK(r.body["runs"][3]["records"] == 0);     // the linked metrics: not read
  }
  const sw::Reply b = board.run("0/b", 100, "");
  REQUIRE(b.status == 200);
  CHECK(b.body["layers"].size() == sw::kMaxLayers);
  CHECK(board.run("0/a", 100, "").status == 200);
  // A restarted board never calls a run unchanged with an older board's version.
  sw::Board again(sw::make_roots({root}));
  CHECK(again.run("0/a", 100, "").body["version"] != board.run("0/a", 100, "").body["version"]);
}

// ---- the binary, over HTTP --------------------------------------------------------------

namespace {

struct Served {
  std::string root, run;
  std::unique_ptr<test::Child> board;
  std::string url;
  std::unique_ptr<httplib::Client> client;
};

// A folder with one tiny trained run ("run") and a link out of it, served on a free port.
void serve_tiny(Served& s, const std::string& name) {
  s.root = test::scratch_dir(name);
  s.run = s.root + "/run";
  test::train_tiny(s.run);
  const std::string outside = test::scratch_dir(name + "_outside");
  fake_run(outside + "/secret");
  fs::create_directory_symlink(outside + "/secret", s.root + "/link-out");
  fs::create_symlink("/etc/passwd", s.root + "/passwd");
  s.board = std::make_unique<test::Child>(
      std::vector<std::string>{SWITCH_BOARD_BIN, "--port", "0", s.root});
  s.url = test::start_board(*s.board);
  INFO(s.board->output());
  REQUIRE(!s.url.empty());
  const auto [host, port] = test::host_port(s.url);
  s.client = std::make_unique<httplib::Client>(host, port);
}

json get_json(httplib::Client& c, const std::string& path, int want = 200) {
  auto res = c.Get(path);
  REQUIRE(res);
  INFO(path, " -> ", res->status, " ", res->body);
  CHECK(res->status == want);
  return json::parse(res->body, nullptr, false);
}

}  // namespace

TEST_CASE("switch-board: serves the page - Chart.js and a real run's figures") {
  Served s;
  serve_tiny(s, "board_http");
  const auto before = test::snapshot(s.run);
  CHECK(test::contains(s.board->output(), "1 run and 0 sweeps at http://127.0.0.1:"));
  auto page = s.client->Get("/");
  REQUIRE(page);
  CHECK(page->status == 200);
  CHECK(test::contains(page->body, "<title>switch-board</title>"));
  CHECK(page->get_header_value("Content-Type") == "text/html; charset=utf-8");
  CHECK(test::contains(page->get_header_value("Content-Security-Policy"), "default-src 'self'"));
  auto chart = s.client->Get("/chart.js");
  REQUIRE(chart);
  CHECK(chart->status == 200);
  CHECK(test::contains(chart->body.substr(0, 100), "Chart.js v"));
  auto js = s.client->Get("/board.js");
  REQUIRE(js);
  CHECK(test::contains(js->body, "switchBoard"));

  const json summary = json::parse(test::read_file(s.run + "/summary.json"));
  const json runs = get_json(*s.client, "/api/runs");
  REQUIRE(runs["runs"].size() == 1);
  const json& r = runs["runs"][0];
  CHECK(r["id"] == "0/run");
  CHECK(r["status"] == "finished");
  CHECK(r["step"] == 60);
  CHECK(r["steps"] == 60);
  CHECK(r["best_val"] == summary["best_val_loss"]);
  CHECK(r["tokens_per_s"] == summary["tokens_per_s"]);
  CHECK(r["malformed"] == 0);
  CHECK(runs["poll_ms"] == 2000);

  const json one = get_json(*s.client, "/api/run?id=0/run&max=1000");
  std::vector<json> evals, trains;
  std::ifstream in(s.run + "/metrics.jsonl");
  for (std::string line; std::getline(in, line);) {
    const json rec = json::parse(line);
    (rec["kind"] == "eval" ? evals : trains).push_back(rec);
  }
  REQUIRE(one["eval"]["val_loss"].size() == evals.size());
  for (size_t i = 0; i < evals.size(); ++i)
    CHECK(one["eval"]["val_loss"][i] == evals[i]["val_loss"]);
  REQUIRE(one["train"]["loss"].size() == trains.size());
  CHECK(one["train"]["step"].back() == 60);
  CHECK(one["train"]["lr"][0] == trains[0]["lr"]);
  // One heatmap per MoE layer, each column the counts as fractions.
  REQUIRE(one["layers"].size() == trains[0]["layers"].size());
  const json& counts = trains.back()["layers"][0]["counts"];
  double total = 0;
  for (const auto& c : counts)
    total += c.get<double>();
  for (size_t e = 0; e < counts.size(); ++e)
    CHECK(one["layers"][0]["load"].back()[e].get<double>() ==
          doctest::Approx(counts[e].get<double>() / total));
  // Downsampled on request.
  CHECK(get_json(*s.client, "/api/run?id=0/run&max=2")["train"]["step"].size() == 2);

  // Read-only: not a byte, a name or a time changed in the run.
  CHECK(test::snapshot(s.run) == before);
  CHECK(s.board->stop(SIGTERM) == 0);
}

TEST_CASE(
    "switch-board: requests outside the served folders - foreign hosts and writes are refused") {
  Served s;
  serve_tiny(s, "board_refuse");
  const std::vector<std::pair<std::string, int>> cases = {
      {"/api/run?id=0/..", 400},
      {"/api/run?id=0/../board_refuse_outside/secret", 400},
      {"/api/run?id=0%2F..%2F..%2Fetc", 400},
      {"/api/run?id=%2e%2e", 400},
      {"/api/run?id=0/%2e%2e/%2e%2e", 400},
      {"/api/run?id=0/run/..%2F..%2Fboard_refuse_outside%2Fsecret", 400},
      {"/api/run?id=%2Fetc", 400},
      {"/api/run?id=0/..%5C..", 400},
      {"/api/run?id=0/run%00", 400},
      {"/api/run?id=0/link-out", 403},
      {"/api/run?id=0/link-out/", 400},
      {"/api/run?id=0/passwd", 403},             // a link to /etc/passwd
      {"/api/run?id=0/..%252F..", 400},          // decoded once: "..%2F..", a hidden name
      {"/api/run?id=0/run%252F..%252F..", 404},  // decoded once: a name, not a way out
      {"/api/run?id=1/run", 404},
      {"/api/run", 400},
      {"/api/sweep?id=0/run", 404},
      {"/api/run?id=0/run&max=0", 400},
      {"/api/run?id=0/run&max=abc", 400},
      {"/api/run?id=0/run&max=99999999", 400},
      {"/../../../../etc/passwd", 404},
      {"/%2e%2e/%2e%2e/etc/passwd", 404},
      {"/..%2f..%2fetc%2fpasswd", 404},
      {"/board.js/../../etc/passwd", 404},
      {"/api/../../etc/passwd", 404},
      {"/index.html", 404},
      {"/run/metrics.jsonl", 404},
      {"/0/run/config.json", 404},
  };
  for (const auto& [path, want] : cases) {
    auto res = s.client->Get(path);
    REQUIRE(res);
    INFO(path, " -> ", res->status, ": ", res->body);
    CHECK(res->status == want);
  }
  // Paths past the size bound.
  auto longer = s.client->Get("/api/run?id=0/" + std::string(9000, 'a'));
  REQUIRE(longer);
  CHECK(longer->status == 414);
  // Another Host (a DNS-rebinding page), and writes.
  auto foreign = s.client->Get("/api/runs", {{"Host", "attacker.example:8080"}});
  REQUIRE(foreign);
  CHECK(foreign->status == 403);
  auto local = s.client->Get("/api/runs", {{"Host", "localhost"}});
  REQUIRE(local);
  CHECK(local->status == 200);
  const std::function<httplib::Result()> writes[] = {
      [&] { return s.client->Post("/api/runs", "x", "text/plain"); },
      [&] { return s.client->Put("/api/run?id=0/run", "x", "text/plain"); },
      [&] { return s.client->Delete("/api/run?id=0/run"); }};
  for (const auto& write : writes) {
    auto res = write();
    REQUIRE(res);
    CHECK(res->status == 405);
  }
  CHECK(s.board->stop(SIGINT) == 0);
}

TEST_CASE(
    "switch-board: a run seen training - then stopped - malformed lines counted - not fatal") {
  const std::string root = test::scratch_dir("board_live");
  const std::string run = root + "/live";
  test::Child train({SWITCH_TRAIN_BIN, "--config", test::source_path("configs/tiny.json"), "--set",
                     "data.path=" + test::data_path(), "--set", "train.steps=100000", "--set",
                     "train.log_every=1", "--out", run});
  REQUIRE(!train.wait_line("step 1/", 120).empty());  // the first record is out
  test::Child board({SWITCH_BOARD_BIN, "--port", "0", root});
  const std::string url = test::start_board(board);
  INFO(board.output());
  REQUIRE(!url.empty());
  const auto [host, port] = test::host_port(url);
  httplib::Client c(host, port);
  json r = get_json(c, "/api/runs");
  REQUIRE(r["runs"].size() == 1);
  CHECK(r["runs"][0]["status"] == "training");
  // The step rises while the board watches.
  const int64_t first = r["runs"][0]["step"].get<int64_t>();
  CHECK(test::eventually([&] { return get_json(c, "/api/runs")["runs"][0]["step"] > first; }));
  CHECK(train.stop(SIGINT, 120) == 130);
  r = get_json(c, "/api/runs");
  CHECK(r["runs"][0]["status"] == "stopped");
  append(run + "/metrics.jsonl", "{\"kind\": \"tr\n");
  r = get_json(c, "/api/runs");
  CHECK(r["runs"][0]["malformed"] == 1);
  CHECK(board.stop(SIGTERM) == 0);
}

TEST_CASE("switch-board: SIGTERM at any moment of its start ends it - a second SIGINT at once") {
  const std::string root = test::scratch_dir("board_signals");
  fake_run(root + "/run");
  // 13 MB of records: reading them at the start takes a good part of a second, a wide
  // window between the signal handler's start and the server's listening.
  std::string lines;
  const std::vector<int> counts(64, 1);
  for (int step = 1; step <= 40000; ++step)
    lines += train_line(step, 3.0, counts);
  test::write_file(root + "/run/metrics.jsonl", lines);
  // Signals land at spread moments: loading, reading the folders, binding, serving. Each
  // start must end, none hang (the signal once went missing before the server listened).
  for (int delay_ms = 0; delay_ms <= 1200; delay_ms += 100) {
    CAPTURE(delay_ms);
    test::Child board({SWITCH_BOARD_BIN, "--port", "0", root});
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    const int rc = board.stop(SIGTERM, 30);
    INFO(board.output());
    CHECK((rc == 0 || rc == 128 + SIGTERM));  // served and stopped, or ended before serving
  }
  // A client that sent half a request holds a worker (5 s read timeout), so the stop waits
  // for it; a second SIGINT does not.
  test::Child board({SWITCH_BOARD_BIN, "--port", "0", root});
  const std::string url = test::start_board(board);
  REQUIRE(!url.empty());
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(test::host_port(url).second));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
  const std::string half = "GET /api/runs HTTP/1.1\r\nHost: 127.0.0.1\r\n";
  REQUIRE(::write(fd, half.data(), half.size()) == static_cast<ssize_t>(half.size()));
  kill(board.pid(), SIGINT);
  REQUIRE(!board.wait_line("stopping", 30).empty());
  const auto start = std::chrono::steady_clock::now();
  CHECK(board.stop(SIGINT, 30) == 130);
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(3));
  ::close(fd);
}

TEST_CASE("switch-board: bad folders - ports and flags exit with a message naming them") {
  const std::string root = test::scratch_dir("board_cli");
  test::write_file(root + "/file", "x");
  auto run = [](const std::string& args) {
    // `timeout`: a board that wrongly starts fails the test instead of hanging it.
    return test::run("timeout 60 " + std::string(SWITCH_BOARD_BIN) + " " + args + " </dev/null");
  };
  test::CmdResult r = run(test::quote(root + "/missing"));
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "board_cli/missing': no such directory"));
  r = run(test::quote(root + "/file"));
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "is not a directory"));
  r = run("");
  CHECK(r.rc == 2);
  CHECK(test::contains(r.output, "PATH is required"));
  r = run("--port 70000 " + test::quote(root));
  CHECK(r.rc == 2);
  r = run("--port=-1 " + test::quote(root));
  CHECK(r.rc == 2);
  r = run("--poll-ms 5 " + test::quote(root));
  CHECK(r.rc == 2);
  r = run("--port 0 --chart-js /nonexistent/chart.js " + test::quote(root));
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "libjs-chart.js"));
  r = run("--port 0 --host 256.1.2.3 " + test::quote(root));  // no address at all
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "warning: listening on 256.1.2.3, not loopback"));
  CHECK(test::contains(r.output, "cannot listen on 256.1.2.3"));
  // A port in use: the second board is refused, naming the port.
  test::Child first({SWITCH_BOARD_BIN, "--port", "0", root});
  const std::string url = test::start_board(first);
  REQUIRE(!url.empty());
  const int port = test::host_port(url).second;
  r = run("--port " + std::to_string(port) + " " + test::quote(root));
  CHECK(r.rc == 1);
  CHECK(test::contains(r.output, "cannot listen on 127.0.0.1 port " + std::to_string(port)));
  CHECK(first.stop(SIGTERM) == 0);
}
