// UTF-8 decoding, the vocabulary, the train/val split and batch sampling.
#include <doctest/doctest.h>

#include "data/dataset.h"
#include "helpers.h"
#include "util/error.h"

using sw::Dataset;
using sw::Split;

namespace {

std::u32string repeat(const std::u32string& s, int n) {
  std::u32string out;
  for (int i = 0; i < n; ++i)
    out += s;
  return out;
}

}  // namespace

TEST_CASE("UTF-8 decodes multi-byte characters and round-trips") {
  const std::string bytes = "h\xC3\xA9llo \xE2\x98\x83 \xF0\x9F\x98\x80";  // hé llo ☃ 😀
  std::u32string text = sw::utf8_decode(bytes, "t");
  CHECK(text == U"h\u00e9llo \u2603 \U0001F600");
  CHECK(sw::utf8_encode(text) == bytes);
}

TEST_CASE("invalid UTF-8 is an error naming the source and byte offset") {
  CHECK(test::contains(test::error_of([] { sw::utf8_decode("ab\x80", "f.txt"); }),
                       "f.txt: not valid UTF-8 at byte 2 (0x80): unexpected continuation byte"));
  CHECK(test::contains(test::error_of([] { sw::utf8_decode("a\xC3", "f.txt"); }), "truncated"));
  CHECK(test::contains(test::error_of([] { sw::utf8_decode("a\xC3x", "f.txt"); }), "truncated"));
  CHECK(test::contains(test::error_of([] { sw::utf8_decode("\xC0\xAF", "f.txt"); }), "overlong"));
  CHECK(test::contains(test::error_of([] { sw::utf8_decode("\xED\xA0\x80", "f.txt"); }),
                       "surrogate"));
  CHECK(test::contains(test::error_of([] { sw::utf8_decode("\xF4\x90\x80\x80", "f.txt"); }),
                       "above U+10FFFF"));
  CHECK(test::contains(test::error_of([] { sw::utf8_decode("\xFF", "f.txt"); }),
                       "invalid lead byte"));
}

TEST_CASE("the vocabulary is the sorted set of characters") {
  sw::Vocab v = sw::Vocab::from_text(U"hello world");
  CHECK(v.chars() == U" dehlorw");
  CHECK(v.size() == 8);
  CHECK(v.id(U' ') == 0);
  CHECK(v.id(U'w') == 7);
  std::vector<int64_t> ids = v.encode(U"low");
  CHECK(ids == std::vector<int64_t>{4, 5, 7});
  CHECK(v.decode(ids) == "low");
  std::string e = test::error_of([&] { v.id(U'z'); });
  CHECK(test::contains(e, "'z' is not in the vocabulary"));
  e = test::error_of([&] { v.id(U'\u00e9'); });
  CHECK(test::contains(e, "U+00E9"));
}

TEST_CASE("90/10 split by characters, and batches are shifted windows of their split") {
  // 1000 characters cycling through 10 letters: position i holds letter i % 10.
  std::u32string text;
  for (int i = 0; i < 1000; ++i)
    text.push_back(U'a' + i % 10);
  Dataset d(text, 0.1, 16, "cycle");
  CHECK(d.vocab().size() == 10);
  CHECK(d.size(Split::Train) == 900);
  CHECK(d.size(Split::Val) == 100);
  // The val split starts at character 900, i.e. with letter 'a' (id 0).
  CHECK(d.tokens(Split::Val).at(0) == 0);

  sw::Rng rng(7);
  sw::Batch b = d.sample(Split::Train, 5, rng);
  CHECK(b.x_BS.sizes() == torch::IntArrayRef({5, 16}));
  CHECK(b.y_BS.sizes() == torch::IntArrayRef({5, 16}));
  // Each row is consecutive characters; targets are the next character.
  CHECK(torch::equal(b.y_BS, (b.x_BS + 1).remainder(10)));
  CHECK(torch::equal(b.x_BS.slice(1, 1), b.y_BS.slice(1, 0, 15)));
}

TEST_CASE("sampling is deterministic for a seed and stays inside the split") {
  std::u32string text;
  for (int i = 0; i < 2000; ++i)
    text.push_back(i < 1800 ? U'a' + i % 3 : U'x' + i % 2);
  Dataset d(text, 0.1, 8, "t");
  sw::Rng r1(42), r2(42), r3(43);
  sw::Batch a = d.sample(Split::Train, 16, r1);
  sw::Batch b = d.sample(Split::Train, 16, r2);
  sw::Batch c = d.sample(Split::Train, 16, r3);
  CHECK(torch::equal(a.x_BS, b.x_BS));
  CHECK_FALSE(torch::equal(a.x_BS, c.x_BS));
  // Train holds only a/b/c; val holds only x/y, whose ids are 3 and 4.
  CHECK(a.x_BS.max().item<int64_t>() <= 2);
  CHECK(a.y_BS.max().item<int64_t>() <= 2);
  sw::Batch v = d.sample(Split::Val, 64, r1);
  CHECK(v.x_BS.min().item<int64_t>() >= 3);
  CHECK(v.y_BS.min().item<int64_t>() >= 3);
}

TEST_CASE("a non-ASCII corpus works") {
  std::u32string text = repeat(U"Schöne Grüße, ☃! ", 40);
  Dataset d(text, 0.1, 10, "t");
  CHECK(d.vocab().contains(U'ö'));
  CHECK(d.vocab().contains(U'☃'));
  CHECK(d.vocab().size() == 14);
}

TEST_CASE("text errors: empty, shorter than a window, missing, empty and invalid files") {
  CHECK(test::contains(test::error_of([] { Dataset(U"", 0.1, 8, "t"); }), "empty"));
  std::string e = test::error_of([] { Dataset(std::u32string(50, U'a'), 0.1, 8, "short.txt"); });
  CHECK(test::contains(e, "short.txt"));
  CHECK(test::contains(e, "model.seq_len = 8"));
  const std::string dir = test::scratch_dir("data_errors");
  e = test::error_of([&] { Dataset::read_text(dir + "/missing.txt"); });
  CHECK(test::contains(e, "missing.txt"));
  CHECK(test::contains(e, "does not exist"));
  test::write_file(dir + "/empty.txt", "");
  CHECK(
      test::contains(test::error_of([&] { Dataset::read_text(dir + "/empty.txt"); }), "is empty"));
  test::write_file(dir + "/latin1.txt", "caf\xE9 au lait");
  e = test::error_of([&] { Dataset::read_text(dir + "/latin1.txt"); });
  CHECK(test::contains(e, "latin1.txt"));
  CHECK(test::contains(e, "not valid UTF-8 at byte 3"));
}

TEST_CASE("Tiny Shakespeare: 65 characters, the standard split") {
  std::u32string text = Dataset::read_text(test::data_path());
  REQUIRE(text.size() == 1115394);
  Dataset d(text, 0.1, 64, "tinyshakespeare");
  CHECK(d.vocab().size() == 65);
  CHECK(d.size(Split::Train) == 1003854);
  CHECK(d.size(Split::Val) == 111540);
  CHECK(d.vocab().chars().front() == U'\n');
}
