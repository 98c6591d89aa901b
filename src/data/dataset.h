// The character-level corpus: ids over its vocabulary, split into a leading train part, a
// validation part after it and an optional test part at the end, and random windows of
// seq_len + 1 characters cut from any of them (inputs and next-character targets).
#pragma once

#include <string>
#include <vector>

#include <torch/torch.h>

#include "data/tokens.h"
#include "data/vocab.h"
#include "util/rng.h"

namespace sw {

enum class Split { Train, Val, Test };
const char* split_name(Split s);  // "train", "val", "test"

struct Batch {
  torch::Tensor x_BS;  // int64 input ids
  torch::Tensor y_BS;  // int64 target ids (inputs shifted by one)
};

// Where n characters split: train [0, train_end), validation [train_end, val_end), test
// [val_end, n). With test_fraction 0 the validation part is the last val_fraction (as it
// always was); else test and validation take floor(n * fraction) characters each.
struct SplitBounds {
  int64_t train_end, val_end, n;
};
SplitBounds split_bounds(int64_t n, double val_fraction, double test_fraction);

// batch_size windows of `ids` at offsets drawn uniformly from `rng`: inputs of seq_len
// characters and their next characters. `ids` holds at least seq_len + 1.
Batch sample_windows(const Tokens& ids, int64_t seq_len, int64_t batch_size, Rng& rng);

// Every character of `ids` (int64) but the first as a target exactly once: consecutive
// windows of seq_len inputs, batch_size of them a batch (the last batch may hold fewer), and
// the shorter window at the end alone in a batch of its own. `ids` holds at least 2.
std::vector<Batch> all_windows(const torch::Tensor& ids, int64_t seq_len, int64_t batch_size);

class Dataset {
 public:
  // `all` holds the corpus's ids over `vocab`. Throws sw::Error naming `source` if a split
  // in use (test only when test_fraction > 0) is shorter than one window of seq_len + 1.
  Dataset(Tokens all, Vocab vocab, double val_fraction, double test_fraction, int64_t seq_len,
          const std::string& source);
  // A text in memory, over the vocabulary of its own characters, or over a given one (a
  // checkpoint's: a character outside it is an error); no test part.
  Dataset(const std::u32string& text, double val_fraction, int64_t seq_len,
          const std::string& source = "text");
  Dataset(const std::u32string& text, const Vocab& vocab, double val_fraction, int64_t seq_len,
          const std::string& source = "text");

  // Reads and decodes `path`: missing, unreadable, empty and non-UTF-8 files are errors.
  static std::u32string read_text(const std::string& path);

  const Vocab& vocab() const { return vocab_; }
  int64_t seq_len() const { return seq_len_; }
  int64_t size(Split s) const { return tokens(s).size(); }
  const Tokens& tokens(Split s) const;

  // batch_size windows at offsets drawn uniformly from `rng`.
  Batch sample(Split s, int64_t batch_size, Rng& rng) const;

 private:
  void init(Tokens all, double val_fraction, double test_fraction, const std::string& source);

  Vocab vocab_;
  int64_t seq_len_;
  Tokens train_, val_, test_;
};

// "data file 'PATH' does not exist or cannot be read (...)": a text that cannot be opened.
std::string missing_text_message(const std::string& path);

// The ids of `text` over `vocab`, compact; a character outside it is an error naming
// `source` and its position.
Tokens encode_tokens(const std::u32string& text, const Vocab& vocab, const std::string& source);

// `ids` over vocabulary `from` as ids over `to` (in memory); a character `to` lacks is an
// error naming `source` and its position.
Tokens remap_tokens(const Tokens& ids, const Vocab& from, const Vocab& to,
                    const std::string& source);

}  // namespace sw
