// The character-level corpus: a UTF-8 text file turned into ids over its vocabulary, split
// into a leading train part and a trailing validation part, and random windows of
// seq_len + 1 characters cut from either (inputs and next-character targets).
#pragma once

#include <string>
#include <vector>

#include <torch/torch.h>

#include "data/vocab.h"
#include "util/rng.h"

namespace sw {

enum class Split { Train, Val };

struct Batch {
  torch::Tensor x_BS;  // int64 input ids
  torch::Tensor y_BS;  // int64 target ids (inputs shifted by one)
};

// batch_size windows of `ids` (int64) at offsets drawn uniformly from `rng`: inputs of
// seq_len characters and their next characters. `ids` holds at least seq_len + 1.
Batch sample_windows(const torch::Tensor& ids, int64_t seq_len, int64_t batch_size, Rng& rng);

// Every character of `ids` but the first as a target exactly once: consecutive windows of
// seq_len inputs, batch_size of them a batch (the last batch may hold fewer), and the
// shorter window at the end alone in a batch of its own. `ids` holds at least 2.
std::vector<Batch> all_windows(const torch::Tensor& ids, int64_t seq_len, int64_t batch_size);

class Dataset {
 public:
  // Builds the vocabulary from the whole text; the first (1 - val_fraction) of the
  // characters are the train split. Throws sw::Error if either split is shorter than one
  // window of seq_len + 1 characters.
  Dataset(const std::u32string& text, double val_fraction, int64_t seq_len,
          const std::string& source = "text");
  // Uses a given vocabulary (a checkpoint's); a character outside it is an error.
  Dataset(const std::u32string& text, const Vocab& vocab, double val_fraction, int64_t seq_len,
          const std::string& source = "text");

  // Reads and decodes `path`: missing, unreadable, empty and non-UTF-8 files are errors.
  static std::u32string read_text(const std::string& path);

  const Vocab& vocab() const { return vocab_; }
  int64_t seq_len() const { return seq_len_; }
  int64_t size(Split s) const { return ids(s).size(0); }
  const torch::Tensor& ids(Split s) const { return s == Split::Train ? train_ : val_; }

  // batch_size windows at offsets drawn uniformly from `rng`.
  Batch sample(Split s, int64_t batch_size, Rng& rng) const;

 private:
  void init(const std::u32string& text, double val_fraction, const std::string& source);

  Vocab vocab_;
  int64_t seq_len_;
  torch::Tensor train_, val_;  // int64 ids
};

}  // namespace sw
