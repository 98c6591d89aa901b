#include "train/tensor_files.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include <caffe2/serialize/inline_container.h>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "util/error.h"
#include "util/json_depth.h"

namespace sw {

namespace {

struct DtypeNames {
  at::ScalarType type;
  const char* storage;      // PyTorch's typed storage class
  const char* safetensors;  // the safetensors dtype
};

constexpr DtypeNames kDtypes[] = {
    {at::kFloat, "FloatStorage", "F32"}, {at::kDouble, "DoubleStorage", "F64"},
    {at::kHalf, "HalfStorage", "F16"},   {at::kBFloat16, "BFloat16Storage", "BF16"},
    {at::kLong, "LongStorage", "I64"},   {at::kInt, "IntStorage", "I32"},
    {at::kShort, "ShortStorage", "I16"}, {at::kChar, "CharStorage", "I8"},
    {at::kByte, "ByteStorage", "U8"},    {at::kBool, "BoolStorage", "BOOL"},
};

const DtypeNames& dtype_names(const std::string& name, const at::Tensor& t) {
  for (const DtypeNames& d : kDtypes)
    if (d.type == t.scalar_type()) return d;
  throw Error(fmt::format("tensor '{}' has dtype {}, which has no typed storage to save it as",
                          name, c10::toString(t.scalar_type())));
}

// A CPU tensor's elements, contiguous, in a tensor of their own.
at::Tensor plain(const std::string& name, const at::Tensor& t) {
  if (!t.defined() || t.layout() != at::kStrided || t.device() != at::kCPU)
    throw Error(fmt::format("tensor '{}' is not a dense CPU tensor", name));
  return t.detach().contiguous();
}

// The opcodes of pickle protocol 2 that a tensor dict takes, as Python's pickler writes them.
class Pickle {
 public:
  Pickle() { out_ = "\x80\x02"; }  // PROTO 2

  void op(char c) { out_.push_back(c); }
  void integer(int64_t v) {
    if (v >= 0 && v < 256) {
      op('K');  // BININT1
      le(static_cast<uint64_t>(v), 1);
    } else if (v >= 0 && v < 65536) {
      op('M');  // BININT2
      le(static_cast<uint64_t>(v), 2);
    } else if (v >= std::numeric_limits<int32_t>::min() &&
               v <= std::numeric_limits<int32_t>::max()) {
      op('J');  // BININT: signed 32-bit
      le(static_cast<uint64_t>(static_cast<uint32_t>(static_cast<int32_t>(v))), 4);
    } else {
      op('\x8a');  // LONG1: a length byte, then two's complement, little-endian
      le(8, 1);
      le(static_cast<uint64_t>(v), 8);
    }
  }
  void unicode(const std::string& s) {
    op('X');  // BINUNICODE
    le(s.size(), 4);
    out_ += s;
  }
  void global(const std::string& module, const std::string& name) {
    op('c');
    out_ += module + "\n" + name + "\n";
  }
  void int_tuple(at::IntArrayRef v) {
    if (v.empty()) return op(')');  // EMPTY_TUPLE
    if (v.size() > 3) op('(');
    for (int64_t x : v)
      integer(x);
    op(v.size() > 3 ? 't' : static_cast<char>(0x84 + v.size()));  // TUPLE or TUPLE1..3
  }
  // torch._utils._rebuild_tensor_v2((storage persistent id), 0, shape, stride, False,
  // OrderedDict()): what torch.save writes for a tensor with its own storage `key`.
  void tensor(const at::Tensor& t, const char* storage, const std::string& key) {
    global("torch._utils", "_rebuild_tensor_v2");
    op('(');
    op('(');
    unicode("storage");
    global("torch", storage);
    unicode(key);
    unicode("cpu");
    integer(t.numel());
    op('t');
    op('Q');  // BINPERSID
    integer(0);
    int_tuple(t.sizes());
    int_tuple(t.strides());
    op('\x89');  // NEWFALSE: requires_grad
    global("collections", "OrderedDict");
    op(')');
    op('R');
    op('t');
    op('R');
  }
  std::string& bytes() { return out_; }

 private:
  void le(uint64_t v, int n) {
    for (int i = 0; i < n; ++i)
      out_.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
  }
  std::string out_;
};

// The entry of a safetensors dtype name, null for one outside kDtypes.
const DtypeNames* safetensors_dtype(const std::string& dtype) {
  for (const DtypeNames& d : kDtypes)
    if (dtype == d.safetensors) return &d;
  return nullptr;
}

constexpr uint64_t kMaxHeaderBytes = 100000000;    // the format's own bound
constexpr size_t kMaxTensors = 65536;              // switch's models hold a few hundred
constexpr uint64_t kMaxBytes = uint64_t{1} << 62;  // a bound on sizes, far past any file

}  // namespace

NamedTensors named_tensors(const c10::Dict<std::string, at::Tensor>& dict) {
  NamedTensors out;
  out.reserve(dict.size());
  for (const auto& e : dict)
    out.emplace_back(e.key(), e.value());
  return out;
}

std::string torch_save_bytes(const NamedTensors& tensors) {
  Pickle p;
  std::vector<at::Tensor> data;
  p.op('}');  // EMPTY_DICT
  if (!tensors.empty()) p.op('(');
  for (const auto& [name, t] : tensors) {
    const DtypeNames& d = dtype_names(name, t);
    data.push_back(plain(name, t));
    p.unicode(name);
    p.tensor(data.back(), d.storage, std::to_string(data.size() - 1));
  }
  if (!tensors.empty()) p.op('u');  // SETITEMS
  p.op('.');

  std::string out;
  caffe2::serialize::PyTorchStreamWriter writer([&](const void* buf, size_t n) -> size_t {
    out.append(static_cast<const char*>(buf), n);
    return n;
  });
  writer.writeRecord("data.pkl", p.bytes().data(), p.bytes().size());
  static const char empty = 0;
  for (size_t i = 0; i < data.size(); ++i) {
    const size_t n = data[i].nbytes();
    writer.writeRecord(fmt::format("data/{}", i), n > 0 ? data[i].data_ptr() : &empty, n);
  }
  writer.writeRecord("byteorder", "little", 6);
  writer.writeEndOfFile();  // the "version" record
  return out;
}

std::string safetensors_bytes(const NamedTensors& tensors,
                              const std::map<std::string, std::string>& metadata) {
  // Widest elements first, so every tensor starts at a multiple of its element size.
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i)
    order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return tensors[a].second.element_size() > tensors[b].second.element_size();
  });
  nlohmann::json header = nlohmann::json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::vector<at::Tensor> data;
  uint64_t offset = 0;
  for (size_t i : order) {
    const auto& [name, t] = tensors[i];
    if (name == "__metadata__" || header.contains(name))
      throw Error(fmt::format("tensor name '{}' cannot be stored in a safetensors file", name));
    const DtypeNames& d = dtype_names(name, t);
    data.push_back(plain(name, t));
    const uint64_t n = data.back().nbytes();
    header[name] = {{"dtype", d.safetensors},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-aligned
  std::string out;
  out.reserve(8 + text.size() + offset);
  for (int i = 0; i < 8; ++i)
    out.push_back(static_cast<char>((static_cast<uint64_t>(text.size()) >> (8 * i)) & 0xff));
  out += text;
  for (const at::Tensor& t : data)
    out.append(static_cast<const char*>(t.data_ptr()), t.nbytes());
  return out;
}

namespace {

struct Entry {
  std::string name;
  at::ScalarType type;
  std::vector<int64_t> shape;
  uint64_t begin, end;
};

// One tensor's header entry, checked against the format and the `data_size` bytes of data;
// `fail` throws.
template <typename Fail>
Entry parse_entry(const std::string& name, const nlohmann::json& v, uint64_t data_size,
                  const Fail& fail) {
  const auto bad = [&](const std::string& why) { fail(fmt::format("tensor '{}': {}", name, why)); };
  if (!v.is_object() || !v.contains("dtype") || !v.contains("shape") || !v.contains("data_offsets"))
    bad("not an object with dtype, shape and data_offsets");
  const DtypeNames* type =
      v["dtype"].is_string() ? safetensors_dtype(v["dtype"].get<std::string>()) : nullptr;
  if (type == nullptr)
    bad(fmt::format("dtype {} is not one of F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL",
                    v["dtype"].dump()));
  const std::string dtype = type->safetensors;
  const nlohmann::json& shape = v["shape"];
  const nlohmann::json& offsets = v["data_offsets"];
  if (!shape.is_array() || shape.size() > 16) bad("shape is not an array of at most 16 sizes");
  Entry e{name, type->type, {}, 0, 0};
  // The product of the sizes, zeros counted as ones, stays within 2^62: no element count and
  // no stride overflows, even for a shape with a 0 in it.
  uint64_t elements = 1, span = 1;
  for (const auto& s : shape) {
    if (!s.is_number_unsigned() || s.get<uint64_t>() > (uint64_t{1} << 48))
      bad(fmt::format("shape {} holds a size that is not an integer in [0, 2^48]", shape.dump()));
    const uint64_t d = s.get<uint64_t>();
    if (span > kMaxBytes / std::max<uint64_t>(d, 1))
      bad(fmt::format("shape {} spans more than 2^62 elements", shape.dump()));
    span *= std::max<uint64_t>(d, 1);
    elements *= d;
    e.shape.push_back(static_cast<int64_t>(d));
  }
  const unsigned __int128 bytes_needed =
      static_cast<unsigned __int128>(elements) * c10::elementSize(type->type);
  if (!offsets.is_array() || offsets.size() != 2 || !offsets[0].is_number_unsigned() ||
      !offsets[1].is_number_unsigned() || offsets[0].get<uint64_t>() > offsets[1].get<uint64_t>())
    bad(fmt::format("data_offsets {} is not [begin, end] with begin <= end", offsets.dump()));
  e.begin = offsets[0].get<uint64_t>();
  e.end = offsets[1].get<uint64_t>();
  if (e.end > data_size)
    bad(fmt::format("data_offsets {} reach past the {} bytes of data (truncated?)", offsets.dump(),
                    data_size));
  if (bytes_needed != e.end - e.begin)
    bad(fmt::format("shape {} of {} takes {} bytes, data_offsets {} hold {}", shape.dump(), dtype,
                    static_cast<uint64_t>(bytes_needed), offsets.dump(), e.end - e.begin));
  return e;
}

}  // namespace

Safetensors read_safetensors(const std::string& bytes, const std::string& path) {
  auto fail = [&](const std::string& why) {
    throw Error(fmt::format("{}: not a valid safetensors file: {}", path, why));
  };
  if (bytes.size() < 8)
    fail(fmt::format("{} bytes, shorter than the 8-byte header length", bytes.size()));
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i)
    n |= static_cast<uint64_t>(static_cast<uint8_t>(bytes[i])) << (8 * i);
  if (n > kMaxHeaderBytes || n > bytes.size() - 8)
    fail(fmt::format("a header of {} bytes in a file of {} (truncated?)", n, bytes.size()));
  const std::string_view text(bytes.data() + 8, n);
  if (json_depth(text) >= kMaxJsonDepth) fail("the header is nested too deep");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    fail(fmt::format("the header is not JSON: {}", e.what()));
  }
  if (!header.is_object()) fail("the header is not a JSON object");
  if (header.size() > kMaxTensors)
    fail(fmt::format("{} entries; at most {} tensors are read", header.size(), kMaxTensors));

  Safetensors out;
  std::vector<Entry> entries;
  const uint64_t data_size = bytes.size() - 8 - n;
  for (auto item = header.begin(); item != header.end(); ++item) {
    if (item.key() != "__metadata__") {
      entries.push_back(parse_entry(item.key(), item.value(), data_size, fail));
      continue;
    }
    const nlohmann::json& v = item.value();
    if (v.is_null()) continue;  // as the format's own reader: no metadata
    if (!v.is_object()) fail("__metadata__ is not an object");
    for (auto m = v.begin(); m != v.end(); ++m) {
      if (!m.value().is_string())
        fail(fmt::format("__metadata__ entry '{}' is not a string", m.key()));
      out.metadata[m.key()] = m.value().get<std::string>();
    }
  }
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return std::tie(a.begin, a.end) < std::tie(b.begin, b.end);
  });
  uint64_t covered = 0;
  for (const Entry& e : entries) {
    if (e.begin != covered)
      fail(
          fmt::format("tensor '{}' starts at data byte {}, where {} were expected (the data "
                      "must be covered exactly: no gap, no overlap)",
                      e.name, e.begin, covered));
    covered = e.end;
  }
  if (covered != data_size)
    fail(fmt::format("the tensors cover {} of the {} bytes of data", covered, data_size));
  const char* data = bytes.data() + 8 + n;
  for (const Entry& e : entries) {
    at::Tensor t;
    try {
      t = torch::empty(e.shape, torch::TensorOptions().dtype(e.type));
    } catch (const c10::Error& err) {
      fail(fmt::format("tensor '{}': {}", e.name, first_line(err.what_without_backtrace())));
    }
    if (e.end > e.begin) std::memcpy(t.data_ptr(), data + e.begin, e.end - e.begin);
    out.tensors.emplace_back(e.name, std::move(t));
  }
  return out;
}

}  // namespace sw
