// Prepared token files: streaming UTF-8, the compact ids, the metadata, their checks against
// the text, concurrent preparation, the cache folder and the test split.
#include <sys/stat.h>
#include <unistd.h>
#include <utime.h>

#include <doctest/doctest.h>
#include <nlohmann/json.hpp>

#include "data/corpus.h"
#include "data/dataset.h"
#include "helpers.h"
#include "util/error.h"

namespace {

const std::string kTrain = SWITCH_TRAIN_BIN;

// 1- to 4-byte characters: ASCII, Latin, Greek, CJK, emoji.
const std::string kMixed =
    "Hello, w\xC3\xB6rld! \xCE\xB1\xCE\xB2\xCE\xB3 \xE6\xBC\xA2\xE5\xAD\x97 "
    "\xF0\x9F\x98\x80\xF0\x9F\x8E\x89 end\n";

std::u32string streamed(const std::string& bytes, size_t piece) {
  sw::Utf8Stream s("t");
  std::u32string out;
  for (size_t i = 0; i < bytes.size(); i += piece) {
    const size_t n = std::min(piece, bytes.size() - i);
    s.feed(reinterpret_cast<const unsigned char*>(bytes.data()) + i, n,
           [&](char32_t c) { out.push_back(c); });
  }
  s.finish();
  return out;
}

std::vector<std::string> said_by(const std::string& path, size_t chunk, sw::Corpus& out,
                                 const std::string& cache = "") {
  std::vector<std::string> said;
  out = sw::open_corpus(
      path, cache, [&](const std::string& m) { said.push_back(m); }, chunk);
  return said;
}

std::string joined(const std::vector<std::string>& lines) {
  std::string s;
  for (const auto& l : lines)
    s += l + "\n";
  return s;
}

std::vector<int64_t> ids_of(const sw::Tokens& t) {
  std::vector<int64_t> v(static_cast<size_t>(t.size()));
  t.copy_to(0, t.size(), v.data());
  return v;
}

// A text of `n` distinct code points from U+0100 up (surrogates skipped), each once, then
// the first `repeat` of them again.
std::u32string distinct(int n, int repeat) {
  std::u32string s;
  for (char32_t c = 0x100; static_cast<int>(s.size()) < n; ++c)
    if (c < 0xD800 || c > 0xDFFF) s.push_back(c);
  return s + s.substr(0, static_cast<size_t>(repeat));
}

}  // namespace

TEST_CASE("UTF-8 streamed in pieces of any size decodes as the whole, errors at the same byte") {
  const std::u32string whole = sw::utf8_decode(kMixed, "t");
  for (size_t piece = 1; piece <= 9; ++piece)
    CHECK(streamed(kMixed, piece) == whole);
  // Each bad sequence, placed so that pieces cut it: the message is the whole decode's.
  for (const std::string bad :
       {"\x80", "\xC3(", "\xE6\xBC", "\xF4\x90\x80\x80", "\xED\xA0\x80", "\xC0\xAF", "\xFF"}) {
    const std::string bytes = kMixed + bad + kMixed;
    const std::string expected = test::error_of([&] { sw::utf8_decode(bytes, "t"); });
    REQUIRE(test::contains(expected, "at byte " + std::to_string(kMixed.size())));
    for (size_t piece = 1; piece <= 5; ++piece)
      CHECK(test::error_of([&] { streamed(bytes, piece); }) == expected);
  }
  // A sequence cut by the end of the stream.
  const std::string cut = kMixed + "\xF0\x9F\x98";
  const std::string expected = test::error_of([&] { sw::utf8_decode(cut, "t"); });
  CHECK(test::contains(expected, "truncated"));
  for (size_t piece = 1; piece <= 5; ++piece)
    CHECK(test::error_of([&] { streamed(cut, piece); }) == expected);
}

TEST_CASE("a text is prepared once into uint8 ids and metadata, then mapped as it is") {
  const std::string dir = test::scratch_dir("corpus_prepare");
  std::string bytes;
  for (int i = 0; i < 300; ++i)
    bytes += kMixed;
  test::write_file(dir + "/t.txt", bytes);
  const std::u32string text = sw::utf8_decode(bytes, "t");

  sw::Corpus c;
  std::string said = joined(said_by(dir + "/t.txt", 1000, c));  // pieces cut characters
  CHECK(test::contains(
      said, "data: preparing " + dir + "/t.txt into " + dir + "/t.txt.tokens (not prepared yet)"));
  CHECK(test::contains(said, "uint8 ids, vocabulary"));
  CHECK(c.prepared_now);
  const sw::Vocab v = sw::Vocab::from_text(text);
  CHECK(c.vocab == v);
  CHECK(c.tokens.width() == 1);
  CHECK(ids_of(c.tokens) == v.encode(text));
  CHECK(test::fs::file_size(dir + "/t.txt.tokens") == text.size());

  const auto meta = nlohmann::json::parse(test::read_file(dir + "/t.txt.tokens.json"));
  CHECK(meta["format"] == "switch tokens");
  CHECK(meta["source"] == dir + "/t.txt");
  CHECK(meta["source_bytes"] == bytes.size());
  CHECK(meta["characters"] == text.size());
  CHECK(meta["dtype"] == "uint8");
  CHECK(meta["tokens"] == "t.txt.tokens");
  CHECK(meta["vocab_size"] == v.size());
  CHECK(meta["vocab"][0] == static_cast<int64_t>(v.chr(0)));
  CHECK(meta["sha256"].get<std::string>().size() == 64);
  CHECK(meta["sha256"] ==
        test::run("sha256sum " + test::quote(dir + "/t.txt")).output.substr(0, 64));

  // Again: nothing said, nothing written, the same ids.
  const auto before = test::fs::last_write_time(dir + "/t.txt.tokens");
  sw::Corpus again;
  CHECK(said_by(dir + "/t.txt", 1000, again).empty());
  CHECK_FALSE(again.prepared_now);
  CHECK(ids_of(again.tokens) == ids_of(c.tokens));
  CHECK(test::fs::last_write_time(dir + "/t.txt.tokens") == before);
  CHECK_FALSE(test::fs::exists(dir + "/t.txt.tokens.tmp"));
}

TEST_CASE("batches read from the mapped file are bitwise those of the text in memory") {
  const std::string dir = test::scratch_dir("corpus_batches");
  std::string bytes;
  for (int i = 0; i < 200; ++i)
    bytes += kMixed + std::to_string(i * 7919 % 1000);
  test::write_file(dir + "/t.txt", bytes);
  const std::u32string text = sw::utf8_decode(bytes, "t");
  sw::Corpus c;
  said_by(dir + "/t.txt", 4096, c);
  const sw::Dataset mapped(c.tokens, c.vocab, 0.1, 0.0, 32, "t");
  const sw::Dataset memory(text, 0.1, 32, "t");
  for (sw::Split s : {sw::Split::Train, sw::Split::Val}) {
    CHECK(mapped.size(s) == memory.size(s));
    sw::Rng r1(11), r2(11);
    for (int i = 0; i < 5; ++i) {
      const sw::Batch a = mapped.sample(s, 8, r1), b = memory.sample(s, 8, r2);
      CHECK(torch::equal(a.x_BS, b.x_BS));
      CHECK(torch::equal(a.y_BS, b.y_BS));
    }
  }
}

TEST_CASE("vocabularies over 256 and over 65,536 characters get uint16 and uint32 ids") {
  const std::string dir = test::scratch_dir("corpus_wide");
  struct Case {
    int distinct;
    int width;
    const char* dtype;
  };
  for (const Case k : {Case{300, 2, "uint16"}, Case{70000, 4, "uint32"}}) {
    const std::u32string text = distinct(k.distinct, 1000);
    const std::string path = dir + "/" + k.dtype + ".txt";
    test::write_file(path, sw::utf8_encode(text));
    sw::Corpus c;
    CHECK(test::contains(joined(said_by(path, 777, c)), std::string(k.dtype) + " ids"));
    CHECK(c.tokens.width() == k.width);
    CHECK(c.vocab.size() == k.distinct);
    CHECK(test::fs::file_size(path + ".tokens") == text.size() * k.width);
    const std::vector<int64_t> ids = ids_of(c.tokens);
    CHECK(ids == c.vocab.encode(text));
    CHECK(ids[k.distinct - 1] == k.distinct - 1);  // ascending code points, ascending ids
    CHECK(c.tokens.at(k.distinct + 99) == 99);
    // The file holds them little-endian, nothing else.
    const std::string raw = test::read_file(path + ".tokens");
    const auto* u = reinterpret_cast<const unsigned char*>(raw.data());
    const size_t last = static_cast<size_t>(k.distinct - 1) * k.width;
    CHECK((u[last] | u[last + 1] << 8) == ((k.distinct - 1) & 0xFFFF));
  }
}

TEST_CASE("a changed text is prepared again, a touched or copied one is kept") {
  const std::string dir = test::scratch_dir("corpus_changed");
  const std::string path = dir + "/t.txt";
  test::write_file(path, std::string(5000, 'a') + "bc");
  sw::Corpus c;
  said_by(path, 1 << 20, c);
  CHECK(c.vocab.size() == 3);

  // The same size, other bytes: found by the times, confirmed by the sha256.
  test::write_file(path, std::string(5000, 'a') + "bd");
  std::string said = joined(said_by(path, 1 << 20, c));
  CHECK(test::contains(said, "(the text has changed: another sha256)"));
  CHECK(c.prepared_now);
  CHECK(c.tokens.at(5001) == 2);
  CHECK(c.vocab.chr(2) == U'd');

  // Another size.
  test::write_file(path, std::string(5000, 'a') + "bdx");
  said = joined(said_by(path, 1 << 20, c));
  CHECK(test::contains(said, "(the text has changed (5003 bytes, prepared from 5002))"));
  CHECK(c.vocab.size() == 4);

  // New times, same bytes (touch, cp): the token file stands, its metadata follows.
  const std::string tokens_before = test::read_file(path + ".tokens");
  struct utimbuf t {
    1000000000, 1000000000
  };
  REQUIRE(::utime(path.c_str(), &t) == 0);
  said = joined(said_by(path, 1 << 20, c));
  CHECK(test::contains(said, "has new times but the same sha256: its token file"));
  CHECK_FALSE(c.prepared_now);
  CHECK(test::read_file(path + ".tokens") == tokens_before);
  CHECK(said_by(path, 1 << 20, c).empty());  // and then it is up to date
}

TEST_CASE("damaged metadata or token files are prepared again, with the reason") {
  const std::string dir = test::scratch_dir("corpus_damaged");
  const std::string path = dir + "/t.txt";
  test::write_file(path, "the quick brown fox jumps over the lazy dog\n");
  sw::Corpus c;
  said_by(path, 1 << 20, c);
  const std::vector<int64_t> good = ids_of(c.tokens);

  test::write_file(path + ".tokens.json", "{\"format\": \"switch tokens\", \"vers");
  std::string said = joined(said_by(path, 1 << 20, c));
  CHECK(test::contains(said, "t.txt.tokens.json' is unreadable"));
  CHECK(c.prepared_now);
  CHECK(ids_of(c.tokens) == good);

  test::write_file(path + ".tokens", "short");
  said = joined(said_by(path, 1 << 20, c));
  CHECK(test::contains(said, "holds 5 bytes where 44 ids of 1 bytes need 44"));
  CHECK(ids_of(c.tokens) == good);

  test::fs::remove(path + ".tokens");
  said = joined(said_by(path, 1 << 20, c));
  CHECK(test::contains(said, "cannot open token file"));
  CHECK(ids_of(c.tokens) == good);

  // Another program's JSON, a vocabulary out of order: refused, prepared again.
  auto meta = nlohmann::json::parse(test::read_file(path + ".tokens.json"));
  meta["vocab"] = {98, 97};
  test::write_file(path + ".tokens.json", meta.dump());
  said = joined(said_by(path, 1 << 20, c));
  CHECK(test::contains(said, "its vocabulary is not ascending code points"));
  CHECK(ids_of(c.tokens) == good);

  // Ids the vocabulary does not have, at the right size: the batches refuse them.
  std::string raw = test::read_file(path + ".tokens");
  raw[7] = static_cast<char>(200);
  test::write_file(path + ".tokens", raw);
  said_by(path, 1 << 20, c);
  const sw::Dataset d(c.tokens, c.vocab, 0.5, 0.0, 8, "data file 't.txt'");
  const std::string e = test::error_of([&] { d.tokens(sw::Split::Train).to_int64(); });
  CHECK(test::contains(e, "data file 't.txt': id 200 at position 7 is outside the vocabulary"));
  CHECK(test::contains(e, "delete it and it is prepared again"));
}

TEST_CASE("bad texts: invalid UTF-8 deep in a streamed file names its byte, nothing is left") {
  const std::string dir = test::scratch_dir("corpus_bad");
  std::string bytes(100000, 'x');
  bytes[70001] = '\xC3';  // a lead byte followed by 'x'
  test::write_file(dir + "/bad.txt", bytes);
  sw::Corpus c;
  const std::string e = test::error_of([&] { said_by(dir + "/bad.txt", 4096, c); });
  CHECK(test::contains(e, "data file '" + dir + "/bad.txt': not valid UTF-8 at byte 70001"));
  CHECK_FALSE(test::fs::exists(dir + "/bad.txt.tokens"));
  CHECK_FALSE(test::fs::exists(dir + "/bad.txt.tokens.tmp"));
  CHECK_FALSE(test::fs::exists(dir + "/bad.txt.tokens.json"));

  test::write_file(dir + "/empty.txt", "");
  CHECK(test::contains(test::error_of([&] { said_by(dir + "/empty.txt", 4096, c); }),
                       "data file '" + dir + "/empty.txt' is empty"));
  CHECK(test::contains(test::error_of([&] { said_by(dir + "/none.txt", 4096, c); }),
                       "data file '" + dir + "/none.txt' does not exist"));
  CHECK(test::contains(test::error_of([&] { said_by(dir, 4096, c); }), dir));
}

TEST_CASE("data.cache_dir holds the files under a name from the text's path, none beside it") {
  const std::string dir = test::scratch_dir("corpus_cache");
  test::fs::create_directories(dir + "/a");
  test::fs::create_directories(dir + "/b");
  test::write_file(dir + "/a/t.txt", "first text, long enough");
  test::write_file(dir + "/b/t.txt", "second");
  sw::Corpus a, b;
  said_by(dir + "/a/t.txt", 1 << 20, a, dir + "/cache");
  said_by(dir + "/b/t.txt", 1 << 20, b, dir + "/cache");
  CHECK_FALSE(test::fs::exists(dir + "/a/t.txt.tokens"));
  CHECK(a.files.tokens != b.files.tokens);  // one name, two texts: two files
  CHECK(test::fs::path(a.files.tokens).parent_path() == test::fs::path(dir + "/cache"));
  CHECK(test::contains(a.files.tokens, "/t.txt."));
  CHECK(a.tokens.size() == 23);
  CHECK(b.tokens.size() == 6);
  CHECK(said_by(dir + "/a/t.txt", 1 << 20, a, dir + "/cache").empty());
}

TEST_CASE("a text in a read-only folder is prepared into $XDG_CACHE_HOME/switch/tokens") {
  // As a user who cannot write the text's folder (root writes anywhere: as root the binary
  // runs as nobody), from a folder under /tmp that user can reach.
  char tmpl[] = "/tmp/switch-corpus-ro-XXXXXX";
  REQUIRE(::mkdtemp(tmpl) != nullptr);
  const std::string base = tmpl;
  test::fs::create_directories(base + "/ro");
  test::fs::create_directories(base + "/cache");
  test::write_file(base + "/ro/t.txt", "to be, or not to be\n");
  test::fs::copy_file(kTrain, base + "/switch-train");
  const auto all = test::fs::perms::all;
  const auto rx = test::fs::perms::owner_read | test::fs::perms::owner_exec |
                  test::fs::perms::group_read | test::fs::perms::group_exec |
                  test::fs::perms::others_read | test::fs::perms::others_exec;
  test::fs::permissions(base, rx);
  test::fs::permissions(base + "/ro", rx);
  test::fs::permissions(base + "/cache", all);
  const std::string as_user =
      ::geteuid() == 0 ? "setpriv --reuid=65534 --regid=65534 --clear-groups " : "";
  const std::string cmd = "cd " + test::quote(base) + " && " + as_user +
                          "env XDG_CACHE_HOME=" + test::quote(base + "/cache") +
                          " ./switch-train --prepare-data --set data.path=ro/t.txt";
  const test::CmdResult r = test::run(cmd);
  const test::CmdResult again = test::run(cmd);
  test::fs::permissions(base, all);
  test::fs::permissions(base + "/ro", all);
  INFO(r.output);
  CHECK(r.rc == 0);
  CHECK(test::contains(r.output,
                       "data: preparing ro/t.txt into " + base + "/cache/switch/tokens/t.txt."));
  CHECK(test::contains(r.output, "prepared: 20 characters, vocabulary 9, uint8 ids"));
  CHECK(test::contains(again.output, "up to date: 20 characters"));
  CHECK_FALSE(test::fs::exists(base + "/ro/t.txt.tokens"));
  int in_cache = 0;
  for (const auto& e : test::fs::directory_iterator(base + "/cache/switch/tokens"))
    in_cache += e.path().extension() == ".tokens";
  CHECK(in_cache == 1);
  test::fs::remove_all(base);
}

TEST_CASE("two processes preparing one text at once: it is prepared once, both map it") {
  const std::string dir = test::scratch_dir("corpus_concurrent");
  std::string bytes;
  while (bytes.size() < (size_t{6} << 20))
    bytes += kMixed;
  test::write_file(dir + "/t.txt", bytes);
  std::string script;
  for (int i = 0; i < 4; ++i)
    script += kTrain + " --prepare-data --set data.path=" + test::quote(dir + "/t.txt") + " > " +
              test::quote(dir + "/out" + std::to_string(i)) + " 2>&1 & ";
  script += "wait";
  test::run(script);
  int prepared = 0, up_to_date = 0;
  for (int i = 0; i < 4; ++i) {
    const std::string out = test::read_file(dir + "/out" + std::to_string(i));
    INFO(out);
    prepared += test::contains(out, ".tokens prepared: ");
    up_to_date += test::contains(out, ".tokens up to date: ");
  }
  CHECK(prepared == 1);
  CHECK(up_to_date == 3);
  sw::Corpus c;
  CHECK(said_by(dir + "/t.txt", 1 << 20, c).empty());
  CHECK(c.tokens.size() == static_cast<int64_t>(sw::utf8_decode(bytes, "t").size()));
  CHECK_FALSE(test::fs::exists(dir + "/t.txt.tokens.tmp"));
}

TEST_CASE("the test split: train first, validation, then test at the very end") {
  const sw::SplitBounds b = sw::split_bounds(1000, 0.05, 0.05);
  CHECK(b.train_end == 900);
  CHECK(b.val_end == 950);
  const sw::SplitBounds none = sw::split_bounds(1000, 0.1, 0.0);
  CHECK(none.train_end == 900);
  CHECK(none.val_end == 1000);
  // enwik8's usual split: 90 M / 5 M / 5 M.
  const sw::SplitBounds e8 = sw::split_bounds(100000000, 0.05, 0.05);
  CHECK(e8.train_end == 90000000);
  CHECK(e8.val_end - e8.train_end == 5000000);

  std::u32string text;
  for (int i = 0; i < 1000; ++i)
    text.push_back(i < 900 ? U'a' : i < 950 ? U'v' : U't');
  const sw::Vocab v = sw::Vocab::from_text(text);
  const sw::Tokens all = sw::encode_tokens(text, v, "t");
  const sw::Dataset d(all, v, 0.05, 0.05, 16, "t");
  CHECK(d.size(sw::Split::Train) == 900);
  CHECK(d.size(sw::Split::Val) == 50);
  CHECK(d.size(sw::Split::Test) == 50);
  sw::Rng rng(3);
  CHECK(torch::all(d.sample(sw::Split::Test, 8, rng).x_BS == v.id(U't')).item<bool>());
  CHECK(torch::all(d.sample(sw::Split::Val, 8, rng).y_BS == v.id(U'v')).item<bool>());

  const std::string e = test::error_of([&] { sw::Dataset(all, v, 0.05, 0.01, 16, "f.txt"); });
  CHECK(test::contains(e,
                       "f.txt: 1000 characters give a train split of 940, a validation "
                       "split of 50 and a test split of 10, but model.seq_len = 16 needs at "
                       "least 17 in each"));
}
