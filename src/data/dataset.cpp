#include "data/dataset.h"

#include <filesystem>

#include <fmt/format.h>

#include "util/error.h"
#include "util/fs.h"

namespace sw {

Dataset::Dataset(const std::u32string& text, double val_fraction, int64_t seq_len,
                 const std::string& source)
    : vocab_(Vocab::from_text(text)), seq_len_(seq_len) {
  init(text, val_fraction, source);
}

Dataset::Dataset(const std::u32string& text, const Vocab& vocab, double val_fraction,
                 int64_t seq_len, const std::string& source)
    : vocab_(vocab), seq_len_(seq_len) {
  init(text, val_fraction, source);
}

void Dataset::init(const std::u32string& text, double val_fraction, const std::string& source) {
  if (text.empty()) throw Error(fmt::format("{}: the text is empty", source));
  const int64_t n = static_cast<int64_t>(text.size());
  const int64_t n_train = static_cast<int64_t>(static_cast<double>(n) * (1.0 - val_fraction));
  const int64_t window = seq_len_ + 1;
  if (n_train < window || n - n_train < window)
    throw Error(
        fmt::format("{}: {} characters give a train split of {} and a validation split of {}, but "
                    "model.seq_len = {} needs at least {} in each; use a longer text or a shorter "
                    "model.seq_len",
                    source, n, n_train, n - n_train, seq_len_, window));
  torch::Tensor all = torch::empty({n}, torch::kInt64);
  int64_t* p = all.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    char32_t c = text[static_cast<size_t>(i)];
    if (!vocab_.contains(c))
      throw Error(fmt::format("{}: character {} at position {} is not in the vocabulary", source,
                              describe_char(c), i));
    p[i] = vocab_.id(c);
  }
  train_ = all.slice(0, 0, n_train).clone();
  val_ = all.slice(0, n_train, n).clone();
}

std::u32string Dataset::read_text(const std::string& path) {
  if (!std::filesystem::is_regular_file(path))
    throw Error(
        fmt::format("data file '{}' does not exist or cannot be read (tools/setup.sh "
                    "fetches Tiny Shakespeare into data/; or set data.path)",
                    path));
  const std::string bytes = read_file(path, "data file");
  if (bytes.empty()) throw Error(fmt::format("data file '{}' is empty", path));
  return utf8_decode(bytes, "data file '" + path + "'");
}

Batch sample_windows(const torch::Tensor& ids, int64_t seq_len, int64_t batch_size, Rng& rng) {
  const int64_t* d = ids.data_ptr<int64_t>();
  const uint64_t n_offsets = static_cast<uint64_t>(ids.size(0) - seq_len);  // >= 1
  Batch b{torch::empty({batch_size, seq_len}, torch::kInt64),
          torch::empty({batch_size, seq_len}, torch::kInt64)};
  int64_t* x = b.x_BS.data_ptr<int64_t>();
  int64_t* y = b.y_BS.data_ptr<int64_t>();
  for (int64_t r = 0; r < batch_size; ++r) {
    const int64_t off = static_cast<int64_t>(rng.below(n_offsets));
    std::copy(d + off, d + off + seq_len, x + r * seq_len);
    std::copy(d + off + 1, d + off + 1 + seq_len, y + r * seq_len);
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
  return sample_windows(ids(s), seq_len_, batch_size, rng);
}

}  // namespace sw
