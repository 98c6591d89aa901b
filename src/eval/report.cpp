// eval_report: switch-eval's printed text, from the JSON document.
#include <cmath>

#include <fmt/format.h>

#include "eval/eval.h"
#include "util/text.h"

namespace sw {

namespace {

using Json = nlohmann::ordered_json;

// Text from the model's vocabulary as one line: a newline shown as \n, other control bytes
// as \xNN.
std::string one_line(const std::string& s) {
  std::string out;
  for (char c : s)
    out += c == '\n' ? std::string("\\n") : std::string(1, c);
  return printable(out);
}

std::string percent(double v) {
  return fmt::format("{:.2f} %", v);
}

// Each expert's share of the assignments: every one for a few experts, else the range.
std::string load_text(const Json& load) {
  std::vector<double> v = load.get<std::vector<double>>();
  if (v.size() <= 16) {
    std::string out;
    for (double x : v)
      out += fmt::format("{}{:.1f}", out.empty() ? "" : " ", 100 * x);
    return out;
  }
  double lo = v[0], hi = v[0], mean = 0, var = 0;
  for (double x : v) {
    lo = std::min(lo, x);
    hi = std::max(hi, x);
    mean += x / static_cast<double>(v.size());
  }
  for (double x : v)
    var += (x - mean) * (x - mean) / static_cast<double>(v.size());
  return fmt::format("{:.2f} .. {:.2f} (CV {:.2f})", 100 * lo, 100 * hi, std::sqrt(var) / mean);
}

std::string data_line(const Json& d) {
  const std::string batches = d["batches"].is_string()
                                  ? std::string("every window")
                                  : fmt::format("{} fixed batch{}", d["batches"].get<int64_t>(),
                                                d["batches"].get<int64_t>() == 1 ? "" : "es");
  const std::string split = d["split"].get<std::string>();
  return fmt::format(
      "data: {}, {}, {} of {} x {}: {} character{} predicted{}",
      printable(d["file"].get<std::string>()),
      split == "all" ? std::string("the whole file") : split + " split", batches,
      d["batch_size"].get<int64_t>(), d["seq_len"].get<int64_t>(), d["characters"].get<int64_t>(),
      d["characters"].get<int64_t>() == 1 ? "" : "s",
      d["skipped"].get<int64_t>() > 0
          ? fmt::format(" ({} unknown character{} left out)", d["skipped"].get<int64_t>(),
                        d["skipped"].get<int64_t>() == 1 ? "" : "s")
          : std::string());
}

std::string curve_text(const Json& curve) {
  std::string out = "capacity curve (dropped % per MoE layer):\n";
  out += fmt::format("  {:<12} {:>6} {:>8} {:>9}  dropped %\n", "drop policy", "factor", "loss",
                     "bits/char");
  for (const Json& p : curve) {
    std::string dropped;
    for (const Json& l : p["layers"])
      dropped += fmt::format(" {:6.2f}", l["dropped_pct"].get<double>());
    const std::string factor = p["capacity_factor"].is_string()
                                   ? std::string("none")
                                   : fmt::format("{:g}", p["capacity_factor"].get<double>());
    out += fmt::format("  {:<12} {:>6} {:>8.4f} {:>9.4f} {}\n", p["drop_policy"].get<std::string>(),
                       factor, p["loss"].get<double>(), p["bits_per_char"].get<double>(), dropped);
  }
  return out;
}

std::string routing_text(const Json& r) {
  std::string out;
  for (const Json& l : r["layers"]) {
    out += fmt::format(
        "routing, layer {}: router entropy {:.2f} of {:.2f} bits; I(character; expert) {:.2f} "
        "of H(expert) {:.2f} bits\n",
        l["layer"].get<int64_t>(), l["entropy_bits"].get<double>(),
        l["entropy_max_bits"].get<double>(), l["mutual_information_bits"].get<double>(),
        l["expert_entropy_bits"].get<double>());
    out += fmt::format("  {:>6} {:>7}  {:<34}  {}\n", "expert", "load %", "commonest characters",
                       "surest tokens (probability)");
    for (size_t e = 0; e < l["experts"].size(); ++e) {
      const Json& x = l["experts"][e];
      std::string common;
      for (const Json& c : x["top_characters"])
        common +=
            fmt::format("{}{} {:.0f}%", common.empty() ? "" : ", ",
                        one_line(c["label"].get<std::string>()), 100 * c["share"].get<double>());
      std::string sure;
      for (const Json& s : x["surest"])
        sure += fmt::format("{}\"{}[{}]\" {:.3f}", sure.empty() ? "" : "  ",
                            one_line(s["before"].get<std::string>()),
                            one_line(s["token"].get<std::string>()), s["prob"].get<double>());
      out += fmt::format("  {:>6} {:>7.2f}  {:<34}  {}\n", e, 100 * l["load"][e].get<double>(),
                         common, sure);
    }
  }
  return out;
}

}  // namespace

std::string eval_report(const Json& doc) {
  const Json& c = doc["checkpoint"];
  const Json& s = doc["settings"];
  std::string out =
      fmt::format("checkpoint {}: step {}{}\n", printable(c["dir"].get<std::string>()),
                  c["step"].get<int64_t>(),
                  c["ranks"].get<int64_t>() > 1
                      ? fmt::format(", routed as its {} ranks", c["ranks"].get<int64_t>())
                      : std::string());
  out += data_line(doc["data"]) + "\n";
  out += fmt::format("loss {:.4f} | {:.4f} bits per character", doc["loss"].get<double>(),
                     doc["bits_per_char"].get<double>());
  if (!doc["layers"].empty())
    out += s["drop_tokens"].get<bool>()
               ? fmt::format(" | eval capacity factor {:g}, drop policy {}",
                             s["eval_capacity_factor"].get<double>(),
                             s["drop_policy"].get<std::string>())
               : std::string(" | dropless");
  out += "\n";
  if (!doc["layers"].empty()) {
    out +=
        fmt::format("  {:>5} {:>9} {:>9}  load per expert (%)\n", "layer", "dropped", "rerouted");
    for (const Json& l : doc["layers"])
      out += fmt::format("  {:>5} {:>9} {:>9}  {}\n", l["layer"].get<int64_t>(),
                         percent(l["dropped_pct"].get<double>()),
                         percent(l["rerouted_pct"].get<double>()), load_text(l["load"]));
  }
  if (doc.contains("capacity_curve")) out += curve_text(doc["capacity_curve"]);
  if (doc.contains("routing")) out += routing_text(doc["routing"]);
  if (doc.contains("logits"))
    out += fmt::format("logits of {} characters (dropless routing) written to {}\n",
                       doc["logits"]["characters"].get<int64_t>(),
                       printable(doc["logits"]["file"].get<std::string>()));
  return out;
}

}  // namespace sw
