#include "data/dataset.h"

#include <algorithm>
#include <cmath>
#include <filesystem>

#include <fmt/format.h>

#include "util/error.h"
#include "util/fs.h"

namespace sw {

const char* split_name(Split s) {
  return s == Split::Train ? "train" : s == Split::Val ? "val" : "test";
}

namespace {

// floor(n * f), but n * f a hair below an integer through rounding (1000 * 0.05 ...) counts
// as that integer.
int64_t part_of(int64_t n, double f) {
  const long double x = static_cast<long double>(n) * f;
  const long double r = std::round(x);
  return static_cast<int64_t>(
      std::fabs(x - r) <= 1e-9L * std::max<long double>(1, x) ? r : std::floor(x));
}

}  // namespace

SplitBounds split_bounds(int64_t n, double val_fraction, double test_fraction) {
  if (!(test_fraction > 0)) {  // the split of every run before the test part existed
    const auto train_end = static_cast<int64_t>(static_cast<double>(n) * (1.0 - val_fraction));
    return {std::max<int64_t>(0, std::min(train_end, n)), n, n};
  }
  const int64_t n_test = std::min(n, part_of(n, test_fraction));
  const int64_t n_val = std::min(n - n_test, part_of(n, val_fraction));
  return {n - n_test - n_val, n - n_test, n};
}

Tokens encode_tokens(const std::u32string& text, const Vocab& vocab, const std::string& source) {
  std::vector<int64_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    const char32_t c = text[i];
    if (!vocab.contains(c))
      throw Error(fmt::format("{}: character {} at position {} is not in the vocabulary", source,
                              describe_char(c), i));
    ids[i] = vocab.id(c);
  }
  return Tokens::from_ids(ids, token_width(vocab.size()));
}

Tokens remap_tokens(const Tokens& ids, const Vocab& from, const Vocab& to,
                    const std::string& source) {
  std::vector<int64_t> lut(static_cast<size_t>(from.size()), -1);
  for (int64_t i = 0; i < from.size(); ++i)
    if (to.contains(from.chr(i))) lut[static_cast<size_t>(i)] = to.id(from.chr(i));
  std::vector<int64_t> out(static_cast<size_t>(ids.size()));
  for (int64_t i = 0; i < ids.size(); ++i) {
    const int64_t id = ids.at(i);
    out[static_cast<size_t>(i)] = lut.at(static_cast<size_t>(id));
    if (out[static_cast<size_t>(i)] < 0)
      throw Error(fmt::format("{}: character {} at position {} is not in the vocabulary", source,
                              describe_char(from.chr(id)), i));
  }
  return Tokens::from_ids(out, token_width(to.size()));
}

Dataset::Dataset(Tokens all, Vocab vocab, double val_fraction, double test_fraction,
                 int64_t seq_len, const std::string& source)
    : vocab_(std::move(vocab)), seq_len_(seq_len) {
  init(std::move(all), val_fraction, test_fraction, source);
}

Dataset::Dataset(const std::u32string& text, double val_fraction, int64_t seq_len,
                 const std::string& source)
    : vocab_(Vocab::from_text(text)), seq_len_(seq_len) {
  if (text.empty()) throw Error(fmt::format("{}: the text is empty", source));
  init(encode_tokens(text, vocab_, source), val_fraction, 0.0, source);
}

Dataset::Dataset(const std::u32string& text, const Vocab& vocab, double val_fraction,
                 int64_t seq_len, const std::string& source)
    : vocab_(vocab), seq_len_(seq_len) {
  if (text.empty()) throw Error(fmt::format("{}: the text is empty", source));
  init(encode_tokens(text, vocab_, source), val_fraction, 0.0, source);
}

void Dataset::init(Tokens all, double val_fraction, double test_fraction,
                   const std::string& source) {
  const int64_t n = all.size();
  if (n == 0) throw Error(fmt::format("{}: the text is empty", source));
  const SplitBounds b = split_bounds(n, val_fraction, test_fraction);
  const int64_t window = seq_len_ + 1;
  const int64_t n_train = b.train_end, n_val = b.val_end - b.train_end, n_test = n - b.val_end;
  if (n_train < window || n_val < window || (test_fraction > 0 && n_test < window)) {
    const std::string test_part =
        test_fraction > 0 ? fmt::format(" and a test split of {}", n_test) : "";
    throw Error(fmt::format(
        "{}: {} characters give a train split of {}{} a validation split of {}{}, but "
        "model.seq_len = {} needs at least {} in each; use a longer text or a shorter "
        "model.seq_len",
        source, n, n_train, test_fraction > 0 ? "," : " and", n_val, test_part, seq_len_, window));
  }
  all.set_bound(vocab_.size(), source);
  train_ = all.slice(0, b.train_end);
  val_ = all.slice(b.train_end, b.val_end);
  test_ = all.slice(b.val_end, n);
}

const Tokens& Dataset::tokens(Split s) const {
  return s == Split::Train ? train_ : s == Split::Val ? val_ : test_;
}

std::string missing_text_message(const std::string& path) {
  return fmt::format(
      "data file '{}' does not exist or cannot be read (tools/setup.sh fetches Tiny "
      "Shakespeare into data/; or set data.path)",
      path);
}

std::u32string Dataset::read_text(const std::string& path) {
  if (!std::filesystem::is_regular_file(path)) throw Error(missing_text_message(path));
  const std::string bytes = read_file(path, "data file");
  if (bytes.empty()) throw Error(fmt::format("data file '{}' is empty", path));
  return utf8_decode(bytes, "data file '" + path + "'");
}

Batch sample_windows(const Tokens& ids, int64_t seq_len, int64_t batch_size, Rng& rng) {
  const uint64_t n_offsets = static_cast<uint64_t>(ids.size() - seq_len);  // >= 1
  Batch b{torch::empty({batch_size, seq_len}, torch::kInt64),
          torch::empty({batch_size, seq_len}, torch::kInt64)};
  int64_t* x = b.x_BS.data_ptr<int64_t>();
  int64_t* y = b.y_BS.data_ptr<int64_t>();
  for (int64_t r = 0; r < batch_size; ++r) {
    const int64_t off = static_cast<int64_t>(rng.below(n_offsets));
    ids.copy_to(off, seq_len, x + r * seq_len);
    // The targets are the inputs shifted by one, plus the window's last character.
    std::copy(x + r * seq_len + 1, x + (r + 1) * seq_len, y + r * seq_len);
    ids.copy_to(off + seq_len, 1, y + (r + 1) * seq_len - 1);
  }
  return b;
}

std::vector<Batch> all_windows(const torch::Tensor& ids, int64_t seq_len, int64_t batch_size) {
  const int64_t targets = ids.size(0) - 1;
  const int64_t full = targets / seq_len, tail = targets % seq_len;
  std::vector<Batch> out;
  for (int64_t w = 0; w < full; w += batch_size) {
    const int64_t rows = std::min(batch_size, full - w);
    out.push_back({ids.narrow(0, w * seq_len, rows * seq_len).view({rows, seq_len}),
                   ids.narrow(0, w * seq_len + 1, rows * seq_len).view({rows, seq_len})});
  }
  if (tail > 0)
    out.push_back({ids.narrow(0, full * seq_len, tail).view({1, tail}),
                   ids.narrow(0, full * seq_len + 1, tail).view({1, tail})});
  return out;
}

Batch Dataset::sample(Split s, int64_t batch_size, Rng& rng) const {
  return sample_windows(tokens(s), seq_len_, batch_size, rng);
}

}  // namespace sw
