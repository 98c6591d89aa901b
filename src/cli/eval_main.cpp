// switch-eval: measures and looks inside a checkpoint of a trained run. CLI wiring only.
#include <filesystem>
#include <iostream>

#include <fmt/format.h>

#include <CLI/CLI.hpp>

#include "eval/eval.h"
#include "train/trainer.h"
#include "util/error.h"
#include "util/fs.h"
#include "util/main_guard.h"
#include "util/malloc_tuning.h"
#include "util/plot.h"

namespace {

namespace fs = std::filesystem;

struct Args {
  sw::EvalOptions opt;
  std::string split, batches, factors, policies, out_dir;
  std::string prompt;
  int64_t threads = 0;
  bool json = false, no_plot = false;
};

void add_options(CLI::App& app, Args& a) {
  app.add_option("--run", a.opt.run_dir, "run directory written by switch-train")->required();
  app.add_option("--ckpt", a.opt.step, "the checkpoint's step (default: the newest)");
  app.add_option("--data", a.opt.data_file,
                 "score this UTF-8 text file (whole, unless --split) instead of the run's data");
  app.add_flag("--skip-unknown", a.opt.skip_unknown,
               "leave out characters outside the model's vocabulary instead of refusing the text");
  app.add_option("--split", a.split,
                 "val | train | test: the run's split (default val; test needs a run trained with "
                 "data.test_fraction > 0), all: the whole text (default with --data)");
  app.add_option("--batches", a.batches,
                 "N fixed batches (the run's evaluation batches: default train.eval_batches "
                 "for a split), or all: every window once (default for a whole text)");
  app.add_option("--capacity-factors", a.factors,
                 "the capacity curve: evaluation capacity factors, 'none' for dropless, e.g. "
                 "0.5,1,1.25,2,none");
  app.add_option("--drop-policies", a.policies,
                 "the capacity curve for each of these drop policies (random, position, "
                 "probability)");
  auto* routing = app.add_flag("--routing", a.opt.routing,
                               "what each expert receives: characters x experts, entropy, "
                               "load, surest tokens");
  app.add_option("--top-tokens", a.opt.top_tokens, "surest tokens listed per expert")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{1}, int64_t{100}))
      ->needs(routing);
  app.add_option("--out", a.out_dir,
                 "where eval.json and the pictures of --routing and the capacity curve go "
                 "(default RUN/eval/step-N)");
  app.add_flag("--no-plot", a.no_plot, "write eval.json but draw no pictures");
  auto* logits = app.add_option("--logits", a.opt.logits_file,
                                "write the logits of one window (dropless routing) to FILE, "
                                "a dict of tensors torch.load reads");
  app.add_option("--prompt", a.prompt,
                 "the logits' window (default the text's first seq_len "
                 "characters)")
      ->needs(logits);
  app.add_flag("--json", a.json, "print everything as JSON instead of tables");
  app.add_option("--threads", a.threads, "intra-op threads (0: all cores)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t{0}, int64_t{1024}));
}

// The flags' lists and words, checked before anything is loaded.
void parse_values(const CLI::App& app, Args& a) {
  if (!a.split.empty()) a.opt.split = sw::parse_split(a.split);
  if (!a.batches.empty()) a.opt.batches = sw::parse_batches(a.batches);
  if (app.count("--capacity-factors") > 0)
    a.opt.capacity_factors = sw::parse_capacity_factors(a.factors);
  if (app.count("--drop-policies") > 0) a.opt.drop_policies = sw::parse_drop_policies(a.policies);
  if (app.count("--prompt") > 0) a.opt.prompt = a.prompt;
  if (app.count("--ckpt") > 0 && a.opt.step < 0)
    throw sw::Error(fmt::format("--ckpt {}: give a step >= 0", a.opt.step));
}

// The output folder: --out, or RUN/eval/step-N. Refused (sw::Error) when it is a file or
// cannot be made.
std::string output_dir(const Args& a, int64_t step) {
  const std::string dir =
      a.out_dir.empty() ? (fs::path(a.opt.run_dir) / "eval" / fmt::format("step-{}", step)).string()
                        : a.out_dir;
  std::error_code ec;
  if (fs::exists(dir, ec) && !fs::is_directory(dir, ec))
    throw sw::Error(fmt::format("--out '{}' is a file, not a folder", dir));
  fs::create_directories(dir, ec);
  if (ec)
    throw sw::Error(fmt::format("--out '{}': cannot create the folder: {}", dir, ec.message()));
  return dir;
}

// eval.json and its pictures in the output folder; the files, or why there are no pictures,
// go to stderr (stdout may be JSON).
bool write_outputs(const nlohmann::ordered_json& doc, const Args& a) {
  const std::string dir = output_dir(a, doc["checkpoint"]["step"].get<int64_t>());
  const std::string json_path = (fs::path(dir) / "eval.json").string();
  sw::write_file_atomic(json_path, doc.dump(2) + "\n");
  std::vector<std::string> files = {json_path}, pictures;
  if (doc.contains("capacity_curve")) pictures.push_back((fs::path(dir) / "capacity.png").string());
  if (doc.contains("routing")) pictures.push_back((fs::path(dir) / "routing.png").string());
  bool ok = true;
  if (!a.no_plot) {
    std::error_code ec;
    for (const std::string& p : pictures)
      fs::remove(p, ec);  // an older evaluation's, about to be drawn again
    const sw::PlotResult r =
        sw::run_plot_script({"--eval", fs::absolute(dir).string()}, /*quiet=*/true);
    if (r.state != sw::PlotResult::Drawn) {
      std::cerr << "switch-eval: "
                << (r.state == sw::PlotResult::Failed ? "plotting failed: " : "no pictures: ")
                << r.why << std::endl;
      ok = r.state != sw::PlotResult::Failed;
    }
    for (const std::string& p : pictures)
      if (fs::exists(p, ec)) files.push_back(p);
  }
  std::cerr << fmt::format("switch-eval: wrote {}", fmt::join(files, ", ")) << std::endl;
  return ok;
}

int run(int argc, char** argv) {
  sw::keep_freed_memory();
  CLI::App app{
      "Measure a checkpoint of a run trained by switch-train: loss and bits per character, "
      "the capacity curve, what each expert receives, logits."};
  Args a;
  add_options(app, a);
  try {
    app.parse(argc, argv);
    parse_values(app, a);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);  // prints help, or the parse error and a hint
    return rc == 0 ? 0 : 2;
  } catch (const sw::Error& e) {
    std::cerr << "switch-eval: error: " << e.what() << std::endl;
    return 2;
  }
  try {
    sw::configure_threads(a.threads);
    if (!a.out_dir.empty()) output_dir(a, 0);  // a bad --out is said before the passes
    const nlohmann::ordered_json doc = sw::evaluate_checkpoint(a.opt);
    if (a.json)
      std::cout << doc.dump(2) << std::endl;
    else
      std::cout << sw::eval_report(doc) << std::flush;
    if (doc.contains("routing") || doc.contains("capacity_curve"))
      return write_outputs(doc, a) ? 0 : 1;
  } catch (const sw::Error& e) {
    std::cerr << "switch-eval: error: " << e.what() << std::endl;
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "switch-eval: internal error: " << sw::unexpected_error_message(e) << std::endl;
    return 3;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return sw::guarded_main("switch-eval", run, argc, argv);
}
