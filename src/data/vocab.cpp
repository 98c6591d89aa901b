#include "data/vocab.h"

#include <algorithm>

#include <fmt/format.h>

#include "util/error.h"

namespace sw {

int Utf8Stream::decode_one(const unsigned char* s, size_t avail, uint64_t at, char32_t& cp) const {
  auto invalid = [&](const char* why) {
    return Error(fmt::format("{}: not valid UTF-8 at byte {} (0x{:02x}): {}", source_, at,
                             static_cast<unsigned>(s[0]), why));
  };
  const unsigned char b = s[0];
  int len;
  if ((b & 0xE0) == 0xC0) {
    len = 2;
    cp = b & 0x1F;
  } else if ((b & 0xF0) == 0xE0) {
    len = 3;
    cp = b & 0x0F;
  } else if ((b & 0xF8) == 0xF0) {
    len = 4;
    cp = b & 0x07;
  } else {
    throw invalid((b & 0xC0) == 0x80 ? "unexpected continuation byte" : "invalid lead byte");
  }
  if (avail < static_cast<size_t>(len)) return 0;
  for (int k = 1; k < len; ++k) {
    if ((s[k] & 0xC0) != 0x80) throw invalid("truncated sequence");
    cp = (cp << 6) | (s[k] & 0x3F);
  }
  static const char32_t min_for_len[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < min_for_len[len]) throw invalid("overlong encoding");
  if (cp >= 0xD800 && cp <= 0xDFFF) throw invalid("encoded surrogate");
  if (cp > 0x10FFFF) throw invalid("code point above U+10FFFF");
  return len;
}

void Utf8Stream::finish() const {
  if (pending_ > 0)
    throw Error(
        fmt::format("{}: not valid UTF-8 at byte {} (0x{:02x}): truncated sequence at "
                    "end of file",
                    source_, held_at_, static_cast<unsigned>(held_[0])));
}

std::u32string utf8_decode(const std::string& bytes, const std::string& source) {
  std::u32string out;
  out.reserve(bytes.size());
  Utf8Stream stream(source);
  stream.feed(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(),
              [&](char32_t c) { out.push_back(c); });
  stream.finish();
  return out;
}

std::string utf8_encode(char32_t c) {
  std::string out;
  if (c < 0x80) {
    out.push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (c >> 6)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (c >> 12)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (c >> 18)));
    out.push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
  return out;
}

std::string utf8_encode(const std::u32string& text) {
  std::string out;
  out.reserve(text.size());
  for (char32_t c : text)
    out += utf8_encode(c);
  return out;
}

std::string describe_char(char32_t c) {
  switch (c) {
    case '\n':
      return "'\\n'";
    case '\t':
      return "'\\t'";
    case '\r':
      return "'\\r'";
    default:
      break;
  }
  if (c < 0x20 || c == 0x7F) return fmt::format("U+{:04X}", static_cast<uint32_t>(c));
  if (c < 0x80) return fmt::format("'{}'", utf8_encode(c));
  return fmt::format("U+{:04X} '{}'", static_cast<uint32_t>(c), utf8_encode(c));
}

Vocab::Vocab(std::u32string chars) : chars_(std::move(chars)) {
  std::sort(chars_.begin(), chars_.end());
  chars_.erase(std::unique(chars_.begin(), chars_.end()), chars_.end());
  for (size_t i = 0; i < chars_.size(); ++i)
    index_[chars_[i]] = static_cast<int64_t>(i);
}

Vocab Vocab::from_text(const std::u32string& text) {
  return Vocab(text);
}

int64_t Vocab::id(char32_t c) const {
  auto it = index_.find(c);
  if (it == index_.end())
    throw Error(fmt::format("character {} is not in the vocabulary ({} characters)",
                            describe_char(c), chars_.size()));
  return it->second;
}

std::vector<int64_t> Vocab::encode(const std::u32string& text) const {
  std::vector<int64_t> ids;
  ids.reserve(text.size());
  for (char32_t c : text)
    ids.push_back(id(c));
  return ids;
}

std::vector<int64_t> Vocab::encode_flag(const std::string& utf8, const std::string& flag) const {
  const std::u32string text = utf8_decode(utf8, flag);
  std::vector<int64_t> ids;
  for (size_t i = 0; i < text.size(); ++i) {
    if (!contains(text[i]))
      throw Error(
          fmt::format("{}: character {} at position {} is not in the model's "
                      "vocabulary of {} characters",
                      flag, describe_char(text[i]), i, size()));
    ids.push_back(id(text[i]));
  }
  return ids;
}

std::string Vocab::decode(const std::vector<int64_t>& ids) const {
  std::u32string text;
  text.reserve(ids.size());
  for (int64_t i : ids)
    text.push_back(chr(i));
  return utf8_encode(text);
}

}  // namespace sw
