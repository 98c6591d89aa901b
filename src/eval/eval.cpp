#include "eval/eval.h"

#include <cmath>
#include <filesystem>
#include <iostream>
#include <map>

#include <fmt/format.h>

#include "data/corpus.h"
#include "data/dataset.h"
#include "eval/routing.h"
#include "train/evaluate.h"
#include "train/tensor_files.h"
#include "train/trained_model.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/text.h"

namespace sw {

namespace {

constexpr double kLn2 = 0.69314718055994530942;

std::string trim(const std::string& s) {
  const size_t a = s.find_first_not_of(' '), b = s.find_last_not_of(' ');
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

std::vector<std::string> split_list(const std::string& list) {
  std::vector<std::string> out;
  size_t start = 0;
  while (true) {
    const size_t comma = list.find(',', start);
    out.push_back(trim(list.substr(start, comma == std::string::npos ? comma : comma - start)));
    if (comma == std::string::npos) return out;
    start = comma + 1;
  }
}

// `text` with the characters outside `vocab` removed (skip) or refused: the message names
// each such character (five at most) and where it first occurs.
std::u32string checked_text(const std::u32string& text, const Vocab& vocab, bool skip,
                            const std::string& source, int64_t& skipped) {
  std::map<char32_t, std::vector<size_t>> unknown;  // character -> its first positions
  std::u32string kept;
  kept.reserve(text.size());
  skipped = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    if (vocab.contains(text[i])) {
      kept.push_back(text[i]);
      continue;
    }
    ++skipped;
    auto& at = unknown[text[i]];
    if (at.size() < 3) at.push_back(i);
  }
  if (skipped == 0 || skip) return kept;
  std::string which;
  int shown = 0;
  for (const auto& [c, at] : unknown) {
    if (shown++ == 5) {
      which += fmt::format("; and {} more", unknown.size() - 5);
      break;
    }
    which += fmt::format("{}{} at position{} {}", shown > 1 ? "; " : "", describe_char(c),
                         at.size() > 1 ? "s" : "", fmt::join(at, ", "));
  }
  throw Error(fmt::format(
      "{}: {} character{} not in the model's vocabulary of {} characters: {} (positions count "
      "characters from 0). Pass --skip-unknown to leave them out",
      source, skipped, skipped == 1 ? " is" : "s are", vocab.size(), which));
}

const char* split_name(EvalSplit s) {
  switch (s) {
    case EvalSplit::Val:
      return "val";
    case EvalSplit::Train:
      return "train";
    case EvalSplit::Test:
      return "test";
    default:
      return "all";
  }
}

Split dataset_split(EvalSplit s) {
  return s == EvalSplit::Val ? Split::Val : s == EvalSplit::Train ? Split::Train : Split::Test;
}

uint64_t split_salt(EvalSplit s) {
  return s == EvalSplit::Val ? kValSalt : s == EvalSplit::Train ? kTrainSalt : kTestSalt;
}

// The evaluated text and its batches.
struct EvalData {
  std::string file;
  EvalSplit split = EvalSplit::Val;
  int64_t batches = 0;  // fixed batches; 0: every window
  int64_t skipped = 0;
  Tokens ids;  // the text evaluated (the split's, or the whole file's)
  std::vector<Batch> list;
};

// A text read whole, its characters outside `vocab` refused or (skip) left out.
Tokens text_tokens(const std::string& file, const Vocab& vocab, bool skip, int64_t& skipped) {
  const std::string source = "data file '" + file + "'";
  const std::u32string text = checked_text(Dataset::read_text(file), vocab, skip, source, skipped);
  return encode_tokens(text, vocab, source);
}

// The run's own text: its prepared token file, mapped (prepared first if need be), or read
// whole when its vocabulary is not the model's (a text changed since).
Tokens run_tokens(const Config& cfg, const Vocab& vocab, bool skip, int64_t& skipped) {
  const std::string& file = cfg.data.path;
  try {
    Corpus c = open_corpus(file, cfg.data.cache_dir,
                           [](const std::string& m) { std::cerr << m << std::endl; });
    if (c.vocab == vocab) return c.tokens;
    return text_tokens(file, vocab, skip, skipped);
  } catch (const Error& e) {
    if (std::filesystem::is_regular_file(file)) throw;
    throw Error(
        fmt::format("{}; it is the run's data.path, read from the current folder: run "
                    "switch-eval where the run was trained, or give the file with --data",
                    e.what()));
  }
}

EvalData load_data(const EvalOptions& opt, const Config& cfg, const Vocab& vocab) {
  EvalData d;
  d.file = opt.data_file.empty() ? cfg.data.path : opt.data_file;
  d.split = opt.split.value_or(opt.data_file.empty() ? EvalSplit::Val : EvalSplit::All);
  d.batches = opt.batches.value_or(d.split == EvalSplit::All ? 0 : cfg.train.eval_batches);
  if (d.split == EvalSplit::Test && !(cfg.data.test_fraction > 0))
    throw Error(
        fmt::format("--split test: the run holds out no test part (its "
                    "data.test_fraction is {}); train with data.test_fraction > 0",
                    cfg.data.test_fraction));
  const std::string source = "data file '" + d.file + "'";
  const Tokens all = opt.data_file.empty()
                         ? run_tokens(cfg, vocab, opt.skip_unknown, d.skipped)
                         : text_tokens(d.file, vocab, opt.skip_unknown, d.skipped);
  const int64_t S = cfg.model.seq_len, B = cfg.train.batch_size;
  std::optional<Dataset> data;
  if (d.split == EvalSplit::All) {
    d.ids = all;
  } else {
    data.emplace(all, vocab, cfg.data.val_fraction, cfg.data.test_fraction, S, source);
    d.ids = data->tokens(dataset_split(d.split));
  }
  const int64_t n = d.ids.size();
  if (d.batches == 0) {
    if (n < 2)
      throw Error(
          fmt::format("{} holds {} character{} (after leaving out unknown ones): "
                      "nothing to predict",
                      source, n, n == 1 ? "" : "s"));
    d.list = all_windows(d.ids.to_int64(), S, B);
  } else if (data) {
    TrainConfig t = cfg.train;
    t.eval_batches = d.batches;  // the first N of the run's batches
    d.list = fixed_batches(*data, dataset_split(d.split), t, split_salt(d.split));
  } else {
    if (n < S + 1)
      throw Error(
          fmt::format("{} holds {} characters: a fixed batch needs windows of {} "
                      "(model.seq_len + 1); use --batches all",
                      source, n, S + 1));
    Rng rng(static_cast<uint64_t>(cfg.train.seed) ^ kValSalt);
    for (int64_t i = 0; i < d.batches; ++i)
      d.list.push_back(sample_windows(d.ids, S, B, rng));
  }
  return d;
}

// The JSON of one evaluation: loss, bits per character, and per MoE layer what it dropped.
nlohmann::ordered_json result_json(const EvalResult& r) {
  nlohmann::ordered_json j;
  j["loss"] = r.loss;
  j["bits_per_char"] = r.loss / kLn2;
  nlohmann::ordered_json layers = nlohmann::ordered_json::array();
  int64_t dropped = 0, assignments = 0;
  for (const LayerEval& l : r.layers) {
    const torch::Tensor load = l.counts_E.to(torch::kFloat64) / static_cast<double>(l.assignments);
    layers.push_back({{"layer", l.layer},
                      {"dropped_pct",
                       100.0 * static_cast<double>(l.dropped) / static_cast<double>(l.assignments)},
                      {"rerouted_pct", 100.0 * static_cast<double>(l.rerouted) /
                                           static_cast<double>(l.assignments)},
                      {"load", std::vector<double>(load.data_ptr<double>(),
                                                   load.data_ptr<double>() + load.numel())}});
    dropped += l.dropped;
    assignments += l.assignments;
  }
  j["dropped_pct"] = assignments > 0
                         ? 100.0 * static_cast<double>(dropped) / static_cast<double>(assignments)
                         : 0.0;
  j["layers"] = layers;
  return j;
}

nlohmann::ordered_json settings_json(const MoeConfig& m) {
  return {{"eval_capacity_factor", m.eval_capacity_factor},
          {"drop_tokens", m.drop_tokens},
          {"drop_policy", name_of(m.drop_policy)},
          {"overflow", name_of(m.overflow)},
          {"dropped", name_of(m.dropped)}};
}

// The same checkpoint at each capacity factor (nullopt: dropless) and drop policy.
nlohmann::ordered_json capacity_curve(Transformer& model, const EvalData& d, int64_t world,
                                      const EvalOptions& opt) {
  const MoeConfig before = model->cfg.moe;
  std::vector<DropPolicy> policies = opt.drop_policies;
  if (policies.empty()) policies.push_back(before.drop_policy);
  std::vector<std::optional<double>> factors = opt.capacity_factors;
  if (factors.empty())  // the run's own setting
    factors.push_back(before.drop_tokens ? std::optional<double>(before.eval_capacity_factor)
                                         : std::nullopt);
  nlohmann::ordered_json curve = nlohmann::ordered_json::array();
  for (DropPolicy policy : policies)
    for (const std::optional<double>& f : factors) {
      model->configure_moe([&](MoeConfig& m) {
        m.drop_policy = policy;
        m.drop_tokens = f.has_value();
        if (f) m.eval_capacity_factor = *f;
      });
      nlohmann::ordered_json point;
      point["capacity_factor"] = f ? nlohmann::ordered_json(*f) : nlohmann::ordered_json("none");
      point["drop_policy"] = name_of(policy);
      point.update(result_json(evaluate_shares(model, d.list, world)));
      curve.push_back(point);
    }
  model->configure_moe([&](MoeConfig& m) { m = before; });
  return curve;
}

// The logits of one window (the prompt, or the text's first seq_len characters), routed
// without capacity as in generation, saved as a dict of tensors torch.load reads.
nlohmann::ordered_json write_logits(TrainedModel& t, const EvalData& d, const EvalOptions& opt) {
  Transformer& model = t.model;
  const Vocab& vocab = t.meta.vocab;
  const int64_t S = t.meta.config.model.seq_len;
  std::vector<int64_t> ids;
  if (opt.prompt) {
    ids = vocab.encode_flag(*opt.prompt, "--prompt");
    if (ids.empty() || static_cast<int64_t>(ids.size()) > S)
      throw Error(
          fmt::format("--prompt holds {} characters: give 1 to {} (model.seq_len)", ids.size(), S));
  } else {
    ids.resize(static_cast<size_t>(std::min<int64_t>(S, d.ids.size())));
    d.ids.copy_to(0, static_cast<int64_t>(ids.size()), ids.data());
  }
  const MoeConfig before = model->cfg.moe;
  model->configure_moe([](MoeConfig& m) { m.drop_tokens = false; });
  torch::Tensor logits;
  const torch::Tensor idx = torch::tensor(ids, torch::kInt64).unsqueeze(0);
  {
    torch::NoGradGuard no_grad;
    logits = model->forward(idx).logits_BSV.to(torch::kFloat32).contiguous();
  }
  model->configure_moe([&](MoeConfig& m) { m = before; });
  std::vector<int64_t> points;
  for (char32_t c : vocab.chars())
    points.push_back(static_cast<int64_t>(c));
  write_file_atomic(opt.logits_file,
                    torch_save_bytes({{"logits", logits},
                                      {"input_ids", idx},
                                      {"vocab", torch::tensor(points, torch::kInt64)}}));
  return {{"file", opt.logits_file},
          {"characters", static_cast<int64_t>(ids.size())},
          {"text", vocab.decode(ids)},
          {"routing", "dropless"}};
}

}  // namespace

std::vector<std::optional<double>> parse_capacity_factors(const std::string& list) {
  std::vector<std::optional<double>> out;
  for (const std::string& item : split_list(list)) {
    if (item == "none") {
      out.push_back(std::nullopt);
      continue;
    }
    size_t used = 0;
    double v = 0;
    try {
      v = std::stod(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (item.empty() || used != item.size() || !(v > 0 && v <= 1e6))
      throw Error(
          fmt::format("--capacity-factors '{}': '{}' is not a positive number (up to 1e6) or "
                      "'none' (give a comma-separated list, e.g. 0.5,1,1.25,2,none)",
                      printable(list), printable(item)));
    out.push_back(v);
  }
  return out;
}

std::vector<DropPolicy> parse_drop_policies(const std::string& list) {
  std::vector<DropPolicy> out;
  for (const std::string& item : split_list(list)) {
    const auto p = choice_named<DropPolicy>(item);
    if (!p)
      throw Error(fmt::format("--drop-policies '{}': '{}' is not a drop policy (one of {})",
                              printable(list), printable(item), choice_list<DropPolicy>()));
    out.push_back(*p);
  }
  return out;
}

EvalSplit parse_split(const std::string& s) {
  if (s == "val") return EvalSplit::Val;
  if (s == "train") return EvalSplit::Train;
  if (s == "test") return EvalSplit::Test;
  if (s == "all") return EvalSplit::All;
  throw Error(fmt::format("--split '{}': give val, train, test or all", printable(s)));
}

int64_t parse_batches(const std::string& s) {
  if (s == "all") return 0;
  size_t used = 0;
  long long v = 0;
  try {
    v = std::stoll(s, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (s.empty() || used != s.size() || v <= 0 || v > 1000000)
    throw Error(fmt::format("--batches '{}': give a number of batches from 1 to 1000000, or all",
                            printable(s)));
  return v;
}

nlohmann::ordered_json evaluate_checkpoint(const EvalOptions& opt) {
  TrainedModel t = load_trained_model(opt.run_dir, opt.step, "evaluate", /*ranks=*/true);
  const Config& cfg = t.meta.config;
  const int64_t world = t.world;
  const bool moe = cfg.n_moe_layers() > 0;
  if (!moe && (opt.routing || !opt.capacity_factors.empty() || !opt.drop_policies.empty()))
    throw Error(
        fmt::format("{}: the model has no MoE layer (moe.every = 0): no routing, "
                    "capacity or drop policy to look at",
                    t.meta.dir));
  const EvalData d = load_data(opt, cfg, t.meta.vocab);
  // The logits first: a prompt or a path they refuse is said before the long passes.
  nlohmann::ordered_json logits;
  if (!opt.logits_file.empty()) logits = write_logits(t, d, opt);
  std::optional<RoutingAnalysis> routing;
  EvalObserver observe;
  if (opt.routing) {
    routing.emplace(t.meta.vocab, cfg.moe.n_experts, cfg.moe.top_k, opt.top_tokens);
    routing->reserve(d.list.size() * static_cast<size_t>(world));
    observe = [&](size_t batch, int64_t share, const torch::Tensor& x_BS, const ModelOutput& out) {
      routing->observe(static_cast<size_t>(share) * d.list.size() + batch, x_BS, out);
    };
  }
  const EvalResult base = evaluate_shares(t.model, d.list, world, observe);
  nlohmann::ordered_json doc;
  doc["checkpoint"] = {
      {"run", opt.run_dir}, {"dir", t.meta.dir}, {"step", t.meta.state.step}, {"ranks", world}};
  doc["data"] = {{"file", d.file},
                 {"split", split_name(d.split)},
                 {"batches", d.batches > 0 ? nlohmann::ordered_json(d.batches)
                                           : nlohmann::ordered_json("all")},
                 {"batch_size", cfg.train.batch_size},
                 {"seq_len", cfg.model.seq_len},
                 {"characters", base.tokens},
                 {"skipped", d.skipped}};
  doc["settings"] = settings_json(cfg.moe);
  doc.update(result_json(base));
  if (!opt.capacity_factors.empty() || !opt.drop_policies.empty())
    doc["capacity_curve"] = capacity_curve(t.model, d, world, opt);
  if (routing) doc["routing"] = routing->json(routing->combine());
  if (!logits.is_null()) doc["logits"] = logits;
  return doc;
}

}  // namespace sw
