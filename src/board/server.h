// switch-board's HTTP side: the page, its scripts and the JSON API, on cpp-httplib.
//
//   GET /                      the page (src/board/page/, built into the binary)
//   GET /board.js, /board.css  its script and style; /chart.js: Debian's Chart.js
//   GET /api/runs              every run and sweep found now (Board::runs)
//   GET /api/run?id=ID[&max=N][&have=V]    one run's series (Board::run)
//   GET /api/sweep?id=ID[&max=N]           one sweep's val curves (Board::sweep)
//
// Nothing else is served: no route maps a request path onto the disk. Bound to a loopback
// address, it also answers only requests whose Host header names a loopback host, so a web
// page elsewhere cannot read the runs through the browser (DNS rebinding).
#pragma once

#include <functional>
#include <string>

#include "board/board.h"

namespace sw {

struct ServeOptions {
  std::string host = "127.0.0.1";
  int port = 8080;  // 0: any free port (the one taken is printed)
  std::string chart_js = "/usr/share/javascript/chart.js/chart.min.js";
  int poll_ms = 2000;  // how often the page asks for news
};

// Whether `host` is a loopback address or name (127.0.0.0/8, ::1, localhost).
bool is_loopback_host(const std::string& host);

// Called once the socket is bound, with the page's URL and a function that asks the server
// to stop: it returns at once, may be called from any thread (the main's signal-waiting
// thread calls it) and at any time, also before the server listens or after it ended.
using OnListening = std::function<void(const std::string& url, std::function<void()> stop)>;

// Serves `board` until stopped. Throws sw::Error when Chart.js cannot be read or the
// address cannot be bound.
void serve(Board& board, const ServeOptions& opt, const OnListening& on_listening);

}  // namespace sw
