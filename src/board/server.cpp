#include "board/server.h"

#include <arpa/inet.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

#include <fmt/format.h>
#include <httplib.h>

#include "board/assets.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/text.h"

namespace sw {

namespace {

constexpr size_t kMaxChartJs = size_t{8} << 20;
constexpr size_t kDefaultPoints = 2000, kMaxPoints = 20000;

const char* content_type(const std::string& name) {
  if (name.size() >= 5 && name.compare(name.size() - 5, 5, ".html") == 0)
    return "text/html; charset=utf-8";
  if (name.size() >= 3 && name.compare(name.size() - 3, 3, ".js") == 0)
    return "text/javascript; charset=utf-8";
  if (name.size() >= 4 && name.compare(name.size() - 4, 4, ".css") == 0)
    return "text/css; charset=utf-8";
  return "application/octet-stream";
}

std::string_view asset(const std::string& name) {
  for (const Asset* a = kBoardAssets; a->name != nullptr; ++a)
    if (name == a->name) return a->body;
  throw Error(fmt::format("switch-board was built without its page's '{}'", name));
}

// The host part of a Host header ("localhost:8080" -> "localhost", "[::1]:80" -> "::1").
std::string host_of(const std::string& header) {
  if (!header.empty() && header[0] == '[') {
    const size_t end = header.find(']');
    return end == std::string::npos ? header : header.substr(1, end - 1);
  }
  return header.substr(0, header.find(':'));
}

void send_json(httplib::Response& res, const Reply& r) {
  res.status = r.status;
  res.set_content(r.body.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace),
                  "application/json");
}

// The `max` parameter: points a series is downsampled to.
bool points_param(const httplib::Request& req, httplib::Response& res, size_t& points) {
  points = kDefaultPoints;
  if (!req.has_param("max")) return true;
  const std::string v = req.get_param_value("max");
  if (v.empty() || v.size() > 6 || v.find_first_not_of("0123456789") != std::string::npos ||
      std::stoul(v) < 2 || std::stoul(v) > kMaxPoints) {
    send_json(res, {400, {{"error", fmt::format("max: a whole number from 2 to {}", kMaxPoints)}}});
    return false;
  }
  points = std::stoul(v);
  return true;
}

void add_routes(httplib::Server& svr, Board& board, const std::string& chart_js, int poll_ms) {
  for (const std::string name : {"index.html", "board.js", "board.css"}) {
    const std::string path = name == "index.html" ? "/" : "/" + name;
    svr.Get(path, [name](const httplib::Request&, httplib::Response& res) {
      const std::string_view body = asset(name);
      res.set_content(body.data(), body.size(), content_type(name));
    });
  }
  svr.Get("/chart.js", [&chart_js](const httplib::Request&, httplib::Response& res) {
    res.set_content(chart_js, "text/javascript; charset=utf-8");
  });
  svr.Get("/api/runs", [&board, poll_ms](const httplib::Request&, httplib::Response& res) {
    Reply r = board.runs();
    r.body["poll_ms"] = poll_ms;
    send_json(res, r);
  });
  svr.Get("/api/run", [&board](const httplib::Request& req, httplib::Response& res) {
    size_t points = 0;
    if (!points_param(req, res, points)) return;
    send_json(res, board.run(req.get_param_value("id"), points, req.get_param_value("have")));
  });
  svr.Get("/api/sweep", [&board](const httplib::Request& req, httplib::Response& res) {
    size_t points = 0;
    if (!points_param(req, res, points)) return;
    send_json(res, board.sweep(req.get_param_value("id"), points));
  });
}

// Refuses a request before routing: a Host header that is not loopback while bound to
// loopback, and every method but GET and HEAD.
httplib::Server::HandlerResponse pre_route(const httplib::Request& req, httplib::Response& res,
                                           bool loopback) {
  if (req.method != "GET" && req.method != "HEAD") {
    res.status = 405;
    res.set_content("switch-board is read-only: GET only\n", "text/plain");
    return httplib::Server::HandlerResponse::Handled;
  }
  if (loopback && !is_loopback_host(host_of(req.get_header_value("Host")))) {
    res.status = 403;
    res.set_content("switch-board: this server answers only to a loopback host name\n",
                    "text/plain");
    return httplib::Server::HandlerResponse::Handled;
  }
  return httplib::Server::HandlerResponse::Unhandled;
}

}  // namespace

bool is_loopback_host(const std::string& host) {
  std::string h = host;
  std::transform(h.begin(), h.end(), h.begin(), [](unsigned char c) { return std::tolower(c); });
  if (h == "localhost" || h == "::1") return true;
  in_addr a{};
  return inet_pton(AF_INET, h.c_str(), &a) == 1 && (ntohl(a.s_addr) >> 24) == 127;
}

void serve(Board& board, const ServeOptions& opt, const OnListening& on_listening) {
  std::string chart_js;
  try {
    chart_js = read_file(opt.chart_js, "Chart.js", kMaxChartJs);
  } catch (const Error& e) {
    throw Error(
        fmt::format("{} (switch-board serves Debian's Chart.js: install libjs-chart.js, "
                    "as tools/setup.sh does, or name the file with --chart-js)",
                    e.what()));
  }
  httplib::Server svr;
  const bool loopback = is_loopback_host(opt.host);
  svr.set_payload_max_length(size_t{64} << 10);
  svr.set_read_timeout(5, 0);
  svr.set_keep_alive_timeout(1);  // idle connections let go soon: Ctrl-C ends at once
  svr.new_task_queue = [] { return new httplib::ThreadPool(16); };
  svr.set_write_timeout(30, 0);
  svr.set_default_headers({{"Cache-Control", "no-store"},
                           {"X-Content-Type-Options", "nosniff"},
                           {"Referrer-Policy", "no-referrer"},
                           {"Content-Security-Policy",
                            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"}});
  svr.set_pre_routing_handler([loopback](const httplib::Request& req, httplib::Response& res) {
    return pre_route(req, res, loopback);
  });
  svr.set_exception_handler(
      [](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
        std::string what = "unknown error";
        try {
          std::rethrow_exception(ep);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        send_json(res, {500, {{"error", what}}});
      });
  // SO_REUSEADDR alone: cpp-httplib's default adds SO_REUSEPORT, with which a second server
  // binds a port already served and takes half of its connections.
  svr.set_socket_options([](socket_t sock) {
    int yes = 1;
    setsockopt(sock, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
  });
  add_routes(svr, board, chart_js, opt.poll_ms);
  int port = opt.port;
  if (port == 0) {
    port = svr.bind_to_any_port(opt.host);
    if (port < 0)
      throw Error(fmt::format("cannot listen on {}: no free port", printable(opt.host)));
  } else if (!svr.bind_to_port(opt.host, port)) {
    throw Error(
        fmt::format("cannot listen on {} port {}: in use, or not an address of this "
                    "machine (--port 0 takes any free port)",
                    printable(opt.host), port));
  }
  const bool v6 = opt.host.find(':') != std::string::npos;
  const std::string url =
      fmt::format("http://{}{}{}:{}/", v6 ? "[" : "", opt.host, v6 ? "]" : "", port);
  // The stop request may come at any time, even before the server listens (cpp-httplib's
  // stop() does nothing then): it is recorded, and this thread stops the server once
  // it runs. The request function owns what it touches, so a late call is harmless.
  struct StopState {
    std::mutex mu;
    std::condition_variable cv;
    bool requested = false, ended = false;
  };
  auto state = std::make_shared<StopState>();
  on_listening(url, [state] {
    std::lock_guard<std::mutex> lock(state->mu);
    state->requested = true;
    state->cv.notify_all();
  });
  std::thread listener([&svr, state] {
    svr.listen_after_bind();
    std::lock_guard<std::mutex> lock(state->mu);
    state->ended = true;
    state->cv.notify_all();
  });
  {
    std::unique_lock<std::mutex> lock(state->mu);
    state->cv.wait(lock, [&] { return state->requested || state->ended; });
  }
  // Stopped once, as soon as it runs (or not at all, when listening ended by itself).
  for (bool stopped = false; !stopped;) {
    {
      std::lock_guard<std::mutex> lock(state->mu);
      if (state->ended) break;
    }
    if (svr.is_running()) {
      svr.stop();
      stopped = true;
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  listener.join();
}

}  // namespace sw
