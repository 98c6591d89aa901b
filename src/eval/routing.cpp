#include "eval/routing.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <set>

#include <fmt/format.h>

namespace sw {

namespace {

std::string ids_text(const Vocab& vocab, const int64_t* ids, int64_t n) {
  std::u32string s;
  for (int64_t i = 0; i < n; ++i)
    s += vocab.chr(ids[i]);
  return utf8_encode(s);
}

// Entropy in bits of a distribution given by counts (0 log 0 = 0).
double entropy_bits(const std::vector<double>& counts) {
  const double total = std::accumulate(counts.begin(), counts.end(), 0.0);
  double h = 0;
  for (double c : counts)
    if (c > 0) h -= c / total * std::log2(c / total);
  return total > 0 ? h : 0;
}

}  // namespace

std::string char_label(char32_t c) {
  if (c == U' ') return "\u2423";
  if (c == U'\n') return "\\n";
  if (c == U'\t') return "\\t";
  if (c == U'\r') return "\\r";
  if (c < 0x20 || c == 0x7f) return fmt::format("U+{:04X}", static_cast<uint32_t>(c));
  return utf8_encode(c);
}

RoutingAnalysis::RoutingAnalysis(Vocab vocab, int64_t n_experts, int64_t top_k, int64_t top_tokens,
                                 int64_t context)
    : vocab_(std::move(vocab)),
      experts_(n_experts),
      top_k_(top_k),
      top_tokens_(top_tokens),
      context_(context) {}

void RoutingAnalysis::observe(size_t slot, const torch::Tensor& x_BS, const ModelOutput& out) {
  const int64_t V = vocab_.size(), E = experts_, S = x_BS.size(1);
  const torch::Tensor x = x_BS.contiguous();
  const torch::Tensor x_T = x.reshape({-1});
  const int64_t* xs = x.data_ptr<int64_t>();
  std::vector<LayerRouting>& dst = slots_.at(slot);
  dst.clear();
  for (const MoeStats& s : out.moe) {
    LayerRouting L;
    L.layer = s.layer;
    L.tokens = x_T.size(0);
    const torch::Tensor assign = (x_T.unsqueeze(1) * E + s.routed_TK).reshape({-1});
    L.counts_VE = torch::bincount(assign, {}, V * E).view({V, E});
    const torch::Tensor p = s.probs_TE.to(torch::kFloat64);
    L.entropy_sum = (-(p * p.clamp_min(1e-300).log2()).sum(1)).sum().item<double>();
    // Each expert's surest tokens among those the router sent to it.
    const torch::Tensor chosen_TE =
        torch::zeros({L.tokens, E}, torch::kBool).scatter_(1, s.routed_TK, true);
    const torch::Tensor score_TE = torch::where(chosen_TE, p, torch::full({}, -1.0, p.options()));
    const int64_t n = std::min(top_tokens_, L.tokens);
    auto [val_NE, idx_NE] = score_TE.topk(n, 0);
    const auto val = val_NE.accessor<double, 2>();
    const auto idx = idx_NE.accessor<int64_t, 2>();
    L.sure.resize(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e)
      for (int64_t j = 0; j < n && val[j][e] >= 0; ++j) {
        const int64_t t = idx[j][e], row = t / S, pos = t % S;
        const int64_t from = std::max<int64_t>(0, pos - context_);
        L.sure[static_cast<size_t>(e)].push_back({val[j][e],
                                                  ids_text(vocab_, xs + row * S + from, pos - from),
                                                  ids_text(vocab_, xs + t, 1)});
      }
    dst.push_back(std::move(L));
  }
}

std::vector<LayerRouting> RoutingAnalysis::combine() const {
  std::vector<LayerRouting> out;
  for (const auto& slot : slots_)
    for (size_t l = 0; l < slot.size(); ++l) {
      const LayerRouting& s = slot[l];
      if (out.size() <= l) {
        LayerRouting fresh;
        fresh.layer = s.layer;
        fresh.counts_VE = torch::zeros_like(s.counts_VE);
        fresh.sure.resize(s.sure.size());
        out.push_back(std::move(fresh));
      }
      LayerRouting& L = out[l];
      L.counts_VE += s.counts_VE;
      L.entropy_sum += s.entropy_sum;
      L.tokens += s.tokens;
      for (size_t e = 0; e < s.sure.size(); ++e)
        L.sure[e].insert(L.sure[e].end(), s.sure[e].begin(), s.sure[e].end());
    }
  // The surest first, ties by text; a token seen twice (windows overlap) counts once.
  for (LayerRouting& L : out)
    for (auto& list : L.sure) {
      std::sort(list.begin(), list.end(), [](const SureToken& a, const SureToken& b) {
        if (a.prob != b.prob) return a.prob > b.prob;
        return std::tie(a.before, a.token) < std::tie(b.before, b.token);
      });
      std::set<std::pair<std::string, std::string>> seen;
      std::vector<SureToken> kept;
      for (const SureToken& s : list)
        if (static_cast<int64_t>(kept.size()) < top_tokens_ &&
            seen.insert({s.before, s.token}).second)
          kept.push_back(s);
      list = std::move(kept);
    }
  return out;
}

nlohmann::ordered_json RoutingAnalysis::json(const std::vector<LayerRouting>& layers) const {
  nlohmann::ordered_json j;
  const int64_t V = vocab_.size(), E = experts_;
  j["experts"] = E;
  j["top_k"] = top_k_;
  if (layers.empty()) {
    j["characters"] = nlohmann::ordered_json::array();
    j["layers"] = nlohmann::ordered_json::array();
    return j;
  }
  // Occurrences of each character: its assignments (the same in every layer) over k.
  const torch::Tensor occ_t = layers.front().counts_VE.sum(1).div(top_k_, "floor").contiguous();
  const std::vector<int64_t> occ_V(occ_t.data_ptr<int64_t>(), occ_t.data_ptr<int64_t>() + V);
  std::vector<int64_t> order;
  for (int64_t c = 0; c < V; ++c)
    if (occ_V[c] > 0) order.push_back(c);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return occ_V[a] > occ_V[b]; });
  nlohmann::ordered_json chars = nlohmann::ordered_json::array();
  for (int64_t c : order)
    chars.push_back({{"char", utf8_encode(vocab_.chr(c))},
                     {"label", char_label(vocab_.chr(c))},
                     {"count", occ_V[c]}});
  j["characters"] = chars;
  nlohmann::ordered_json out_layers = nlohmann::ordered_json::array();
  for (const LayerRouting& L : layers) {
    const torch::Tensor counts = L.counts_VE.to(torch::kFloat64);
    const double total = counts.sum().item<double>();
    nlohmann::ordered_json lj;
    lj["layer"] = L.layer;
    std::vector<double> load(static_cast<size_t>(E));
    for (int64_t e = 0; e < E; ++e)
      load[static_cast<size_t>(e)] = counts.select(1, e).sum().item<double>();
    const double h_expert = entropy_bits(load);
    // I(character; expert) = H(expert) - H(expert | character).
    double h_given = 0;
    for (int64_t c : order) {
      const torch::Tensor row = counts[c].contiguous();
      const std::vector<double> r(row.data_ptr<double>(), row.data_ptr<double>() + E);
      h_given += std::accumulate(r.begin(), r.end(), 0.0) / total * entropy_bits(r);
    }
    for (double& l : load)
      l /= total;
    lj["load"] = load;
    lj["entropy_bits"] = L.entropy_sum / static_cast<double>(L.tokens);
    lj["entropy_max_bits"] = std::log2(static_cast<double>(E));
    lj["expert_entropy_bits"] = h_expert;
    lj["mutual_information_bits"] = std::max(0.0, h_expert - h_given);
    nlohmann::ordered_json fraction = nlohmann::ordered_json::array();
    for (int64_t c : order) {
      const torch::Tensor row = (counts[c] / counts[c].sum()).contiguous();
      fraction.push_back(std::vector<double>(row.data_ptr<double>(), row.data_ptr<double>() + E));
    }
    lj["fraction"] = fraction;
    nlohmann::ordered_json experts = nlohmann::ordered_json::array();
    for (int64_t e = 0; e < E; ++e) {
      nlohmann::ordered_json ej;
      const torch::Tensor col = counts.select(1, e);
      const double col_total = col.sum().item<double>();
      auto [top_v, top_i] = col.topk(std::min<int64_t>(5, V));
      nlohmann::ordered_json top = nlohmann::ordered_json::array();
      for (int64_t i = 0; i < top_v.size(0) && top_v[i].item<double>() > 0; ++i)
        top.push_back({{"label", char_label(vocab_.chr(top_i[i].item<int64_t>()))},
                       {"share", top_v[i].item<double>() / col_total}});
      ej["top_characters"] = top;
      nlohmann::ordered_json sure = nlohmann::ordered_json::array();
      for (const SureToken& s : L.sure[static_cast<size_t>(e)])
        sure.push_back({{"before", s.before}, {"token", s.token}, {"prob", s.prob}});
      ej["surest"] = sure;
      experts.push_back(ej);
    }
    lj["experts"] = experts;
    out_layers.push_back(lj);
  }
  j["layers"] = out_layers;
  return j;
}

}  // namespace sw
