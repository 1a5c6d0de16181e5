#pragma once
// A small reader of GGUF files (the llama.cpp model format, version 2 and 3): header, metadata of
// every value type, tensor infos, and dequantisation of F32, F16, BF16, Q8_0, Q4_0 and Q4_1 tensors
// to float.
//
// File layout (all little-endian):
//   "GGUF" | version u32 | tensor_count u64 | metadata_count u64
//   metadata_count × (key: string | value_type u32 | value)
//   tensor_count   × (name: string | n_dims u32 | ne[n_dims] u64 | type u32 | offset u64)
//   padding to `general.alignment` (default 32) | tensor data (offsets relative to this point)
// A string is a u64 byte count followed by the bytes (no terminator). An array value is
// element_type u32 | count u64 | count values. `ne[0]` is the contiguous dimension: a weight that
// PyTorch stores as [out, in] has ne = [in, out], i.e. ne[1] rows of ne[0] elements, and quantisation
// blocks run along ne[0].
//
// The whole file is read into memory once; a model dequantises what it needs and drops the file.
// Every problem with the bytes is a typed error that says what and where.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "spectralkv/error.hpp"
#include "spectralkv/numeric.hpp"

namespace spectralkv::llama {

/// Base of every error about a GGUF file.
class GgufError : public Error {
 public:
  using Error::Error;
};
/// The bytes are not a well-formed GGUF file: bad magic or version, a count or offset that runs past
/// the end (a truncated file), a misaligned tensor, an unknown value type.
class GgufFormatError : public GgufError {
 public:
  using GgufError::GgufError;
};
/// A tensor whose element type this reader cannot dequantise (or does not know at all).
class GgufUnsupportedType : public GgufError {
 public:
  using GgufError::GgufError;
};
/// A metadata key or tensor that the caller needs is absent.
class GgufMissingKey : public GgufError {
 public:
  using GgufError::GgufError;
};
/// A metadata value is present but of a type the caller cannot use (e.g. a string where a count was expected).
class GgufTypeMismatch : public GgufError {
 public:
  using GgufError::GgufError;
};

/// Metadata value types, as numbered by the format.
enum class GgufValueType : std::uint32_t {
  kUInt8 = 0, kInt8 = 1, kUInt16 = 2, kInt16 = 3, kUInt32 = 4, kInt32 = 5, kFloat32 = 6,
  kBool = 7, kString = 8, kArray = 9, kUInt64 = 10, kInt64 = 11, kFloat64 = 12,
};

/// Tensor element types (ggml_type numbering). Only some can be dequantised here; the others are
/// known by block size so a file that holds them can still be listed.
enum class GgmlType : std::uint32_t {
  kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ8_1 = 9,
  kQ2_K = 10, kQ3_K = 11, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kQ8_K = 15,
  kI8 = 24, kI16 = 25, kI32 = 26, kI64 = 27, kF64 = 28, kBF16 = 30,
};

/// Elements per block and bytes per block of a tensor type; {0, 0} for an unknown type.
struct TypeTraits {
  const char* name;
  std::int64_t block_elems;
  std::int64_t block_bytes;
  bool dequantizable;
};
inline TypeTraits type_traits(std::uint32_t type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::kF32: return {"F32", 1, 4, true};
    case GgmlType::kF16: return {"F16", 1, 2, true};
    case GgmlType::kBF16: return {"BF16", 1, 2, true};
    case GgmlType::kQ4_0: return {"Q4_0", 32, 18, true};
    case GgmlType::kQ4_1: return {"Q4_1", 32, 20, true};
    case GgmlType::kQ8_0: return {"Q8_0", 32, 34, true};
    case GgmlType::kQ5_0: return {"Q5_0", 32, 22, false};
    case GgmlType::kQ5_1: return {"Q5_1", 32, 24, false};
    case GgmlType::kQ8_1: return {"Q8_1", 32, 36, false};
    case GgmlType::kQ2_K: return {"Q2_K", 256, 84, false};
    case GgmlType::kQ3_K: return {"Q3_K", 256, 110, false};
    case GgmlType::kQ4_K: return {"Q4_K", 256, 144, false};
    case GgmlType::kQ5_K: return {"Q5_K", 256, 176, false};
    case GgmlType::kQ6_K: return {"Q6_K", 256, 210, false};
    case GgmlType::kQ8_K: return {"Q8_K", 256, 292, false};
    case GgmlType::kI8: return {"I8", 1, 1, false};
    case GgmlType::kI16: return {"I16", 1, 2, false};
    case GgmlType::kI32: return {"I32", 1, 4, false};
    case GgmlType::kI64: return {"I64", 1, 8, false};
    case GgmlType::kF64: return {"F64", 1, 8, false};
  }
  return {"unknown", 0, 0, false};
}

/// One metadata value. Integers of every width are held as int64 (uint64 values above INT64_MAX as
/// uint64) so that callers can ask for "an integer" whatever width the writer chose.
struct GgufValue {
  GgufValueType type = GgufValueType::kUInt8;
  GgufValueType element_type = GgufValueType::kUInt8;  ///< arrays only
  std::variant<std::int64_t, std::uint64_t, double, bool, std::string, std::vector<GgufValue>> data;

  bool is_integer() const {
    return std::holds_alternative<std::int64_t>(data) || std::holds_alternative<std::uint64_t>(data);
  }
};

inline const char* value_type_name(GgufValueType t) {
  static const char* const kNames[] = {"uint8", "int8",   "uint16", "int16", "uint32", "int32", "float32",
                                       "bool",  "string", "array",  "uint64", "int64", "float64"};
  const auto i = static_cast<std::uint32_t>(t);
  return i < 13 ? kNames[i] : "unknown";
}

/// Where a tensor is and what it holds. `ne[0]` is the contiguous dimension.
struct GgufTensorInfo {
  std::string name;
  std::vector<std::int64_t> ne;
  std::uint32_t type = 0;
  std::uint64_t offset = 0;  ///< from the start of the data section
  std::int64_t elements() const {
    std::int64_t n = 1;
    for (std::int64_t d : ne) n *= d;
    return n;
  }
  std::int64_t bytes() const {
    const TypeTraits t = type_traits(type);
    return elements() / t.block_elems * t.block_bytes;
  }
  std::string shape() const {
    std::string s = "[";
    for (std::size_t i = 0; i < ne.size(); ++i) s += (i ? ", " : "") + std::to_string(ne[i]);
    return s + "]";
  }
};

namespace gguf_detail {
/// Bounds-checked little-endian cursor over the file bytes; every overrun is a GgufFormatError.
class Cursor {
 public:
  Cursor(const std::vector<std::uint8_t>& bytes, const std::string& path) : bytes_(bytes), path_(path) {}
  std::uint64_t pos() const { return pos_; }

  void need(std::uint64_t n, const char* what) const {
    if (n > bytes_.size() - pos_) {
      throw GgufFormatError(spectralkv::detail::concat(path_, ": truncated file: reading ", what, " needs ", n,
                                                       " bytes at offset ", pos_, " but the file has ",
                                                       bytes_.size(), " bytes"));
    }
  }
  template <class T>
  T read(const char* what) {
    need(sizeof(T), what);
    T v;
    std::memcpy(&v, bytes_.data() + pos_, sizeof(T));  // hosts are little-endian (x86, ARM)
    pos_ += sizeof(T);
    return v;
  }
  std::string read_string(const char* what) {
    const auto n = read<std::uint64_t>(what);
    need(n, what);
    std::string s(reinterpret_cast<const char*>(bytes_.data() + pos_), static_cast<std::size_t>(n));
    pos_ += n;
    return s;
  }

 private:
  const std::vector<std::uint8_t>& bytes_;
  const std::string& path_;
  std::uint64_t pos_ = 0;
};
}  // namespace gguf_detail

class GgufFile {
 public:
  /// Reads and parses `path`. \throws GgufError (or a subclass) naming the file and the problem.
  static GgufFile open(const std::string& path) {
    std::ifstream in(path, std::ios::binary | std::ios::ate);
    if (!in) throw GgufError(spectralkv::detail::concat(path, ": cannot open the file"));
    const std::streamoff size = in.tellg();
    std::vector<std::uint8_t> bytes(static_cast<std::size_t>(size));
    in.seekg(0);
    if (size > 0 && !in.read(reinterpret_cast<char*>(bytes.data()), size)) {
      throw GgufError(spectralkv::detail::concat(path, ": cannot read ", size, " bytes"));
    }
    return GgufFile(std::move(bytes), path);
  }

  /// Parses a file image already in memory; `path` only names it in errors.
  GgufFile(std::vector<std::uint8_t> bytes, std::string path) : bytes_(std::move(bytes)), path_(std::move(path)) {
    parse();
  }

  const std::string& path() const { return path_; }
  std::uint32_t version() const { return version_; }
  std::uint64_t alignment() const { return alignment_; }
  std::uint64_t data_offset() const { return data_offset_; }
  const std::map<std::string, GgufValue>& metadata() const { return metadata_; }
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }

  bool has(const std::string& key) const { return metadata_.count(key) != 0; }
  const GgufValue& value(const std::string& key) const {
    const auto it = metadata_.find(key);
    if (it == metadata_.end()) throw GgufMissingKey(path_ + ": metadata key '" + key + "' is missing");
    return it->second;
  }

  /// Any integer type (writers differ: block_count is often uint32 where the spec suggests uint64).
  std::int64_t get_int(const std::string& key) const { return as_int(key, value(key)); }
  std::int64_t get_int(const std::string& key, std::int64_t fallback) const {
    return has(key) ? get_int(key) : fallback;
  }
  /// float32 or float64, or an integer.
  double get_float(const std::string& key) const {
    const GgufValue& v = value(key);
    if (const auto* d = std::get_if<double>(&v.data)) return *d;
    if (v.is_integer()) return static_cast<double>(as_int(key, v));
    throw mismatch(key, v, "a number");
  }
  double get_float(const std::string& key, double fallback) const { return has(key) ? get_float(key) : fallback; }
  bool get_bool(const std::string& key, bool fallback) const {
    if (!has(key)) return fallback;
    const GgufValue& v = value(key);
    if (const auto* b = std::get_if<bool>(&v.data)) return *b;
    throw mismatch(key, v, "a bool");
  }
  std::string get_string(const std::string& key) const {
    const GgufValue& v = value(key);
    if (const auto* s = std::get_if<std::string>(&v.data)) return *s;
    throw mismatch(key, v, "a string");
  }
  std::string get_string(const std::string& key, const std::string& fallback) const {
    return has(key) ? get_string(key) : fallback;
  }
  std::vector<std::string> get_strings(const std::string& key) const {
    const auto& items = array(key, GgufValueType::kString, "an array of strings");
    std::vector<std::string> out;
    out.reserve(items.size());
    for (const GgufValue& e : items) out.push_back(std::get<std::string>(e.data));
    return out;
  }
  std::vector<std::int64_t> get_ints(const std::string& key) const {
    const GgufValue& v = value(key);
    const auto* items = std::get_if<std::vector<GgufValue>>(&v.data);
    if (!items) throw mismatch(key, v, "an array of integers");
    std::vector<std::int64_t> out;
    out.reserve(items->size());
    for (const GgufValue& e : *items) {
      if (!e.is_integer()) throw mismatch(key, v, "an array of integers");
      out.push_back(as_int(key, e));
    }
    return out;
  }

  const GgufTensorInfo& tensor(const std::string& name) const {
    for (const GgufTensorInfo& t : tensors_) {
      if (t.name == name) return t;
    }
    throw GgufMissingKey(path_ + ": tensor '" + name + "' is missing");
  }
  bool has_tensor(const std::string& name) const {
    for (const GgufTensorInfo& t : tensors_) {
      if (t.name == name) return true;
    }
    return false;
  }
  /// Raw bytes of a tensor (bounds were checked when the file was parsed).
  const std::uint8_t* tensor_data(const GgufTensorInfo& t) const { return bytes_.data() + data_offset_ + t.offset; }

  /// All elements of tensor `name` as float, in storage order (ne[0] fastest).
  /// \throws GgufMissingKey, GgufUnsupportedType
  std::vector<float> dequantize(const std::string& name) const {
    const GgufTensorInfo& t = tensor(name);
    const TypeTraits traits = type_traits(t.type);
    if (!traits.dequantizable) {
      throw GgufUnsupportedType(spectralkv::detail::concat(path_, ": tensor '", name, "' has type ", traits.name, " (",
                                                           t.type, "), which this reader cannot dequantise"));
    }
    std::vector<float> out(static_cast<std::size_t>(t.elements()));
    dequantize_row(t.type, tensor_data(t), out.data(), t.elements());
    return out;
  }

  /// Dequantises `n` elements of type `type` (n a multiple of the type's block size).
  static void dequantize_row(std::uint32_t type, const std::uint8_t* src, float* dst, std::int64_t n) {
    auto half = [](const std::uint8_t* p) {
      std::uint16_t h;
      std::memcpy(&h, p, 2);
      return Half::to_float(h);
    };
    switch (static_cast<GgmlType>(type)) {
      case GgmlType::kF32:
        std::memcpy(dst, src, static_cast<std::size_t>(n) * 4);
        return;
      case GgmlType::kF16:
        for (std::int64_t i = 0; i < n; ++i) dst[i] = half(src + 2 * i);
        return;
      case GgmlType::kBF16:
        for (std::int64_t i = 0; i < n; ++i) {
          std::uint16_t b;
          std::memcpy(&b, src + 2 * i, 2);
          dst[i] = BFloat16::to_float(b);
        }
        return;
      case GgmlType::kQ8_0:  // block: fp16 d, int8 q[32]; x = d·q
        for (std::int64_t b = 0; b < n / 32; ++b, src += 34, dst += 32) {
          const float d = half(src);
          for (int i = 0; i < 32; ++i) dst[i] = d * static_cast<float>(static_cast<std::int8_t>(src[2 + i]));
        }
        return;
      case GgmlType::kQ4_0:  // block: fp16 d, 16 bytes; low nibbles are x[0..15], high nibbles x[16..31]
        for (std::int64_t b = 0; b < n / 32; ++b, src += 18, dst += 32) {
          const float d = half(src);
          for (int i = 0; i < 16; ++i) {
            dst[i] = d * static_cast<float>((src[2 + i] & 0x0F) - 8);
            dst[i + 16] = d * static_cast<float>((src[2 + i] >> 4) - 8);
          }
        }
        return;
      case GgmlType::kQ4_1:  // block: fp16 d, fp16 m, 16 bytes; x = d·nibble + m
        for (std::int64_t b = 0; b < n / 32; ++b, src += 20, dst += 32) {
          const float d = half(src), m = half(src + 2);
          for (int i = 0; i < 16; ++i) {
            dst[i] = d * static_cast<float>(src[4 + i] & 0x0F) + m;
            dst[i + 16] = d * static_cast<float>(src[4 + i] >> 4) + m;
          }
        }
        return;
      default:
        throw GgufUnsupportedType(spectralkv::detail::concat("GGUF: cannot dequantise tensor type ",
                                                             type_traits(type).name, " (", type, ")"));
    }
  }

 private:
  void parse() {
    using spectralkv::detail::concat;
    gguf_detail::Cursor c(bytes_, path_);
    c.need(4, "the magic");
    if (std::memcmp(bytes_.data(), "GGUF", 4) != 0) {
      throw GgufFormatError(path_ + ": not a GGUF file (the first 4 bytes are not \"GGUF\")");
    }
    c.read<std::uint32_t>("the magic");
    version_ = c.read<std::uint32_t>("the version");
    if (version_ != 2 && version_ != 3) {
      throw GgufFormatError(concat(path_, ": GGUF version ", version_, " is not supported (2 or 3)"));
    }
    const auto n_tensors = c.read<std::uint64_t>("the tensor count");
    const auto n_kv = c.read<std::uint64_t>("the metadata count");
    for (std::uint64_t i = 0; i < n_kv; ++i) {
      std::string key = c.read_string("a metadata key");
      const auto type = c.read<std::uint32_t>("a metadata value type");
      GgufValue v = read_value(c, type, key, 0);
      if (!metadata_.emplace(key, std::move(v)).second) {
        throw GgufFormatError(concat(path_, ": metadata key '", key, "' appears twice"));
      }
    }
    alignment_ = static_cast<std::uint64_t>(get_int("general.alignment", 32));
    if (alignment_ == 0 || (alignment_ & (alignment_ - 1)) != 0) {
      throw GgufFormatError(concat(path_, ": general.alignment = ", alignment_, " is not a power of two"));
    }
    // Each tensor info takes at least 24 bytes: reject absurd counts before reserving for them.
    c.need(n_tensors > bytes_.size() / 24 ? bytes_.size() : n_tensors * 24, "the tensor infos");
    tensors_.reserve(static_cast<std::size_t>(n_tensors));
    for (std::uint64_t i = 0; i < n_tensors; ++i) {
      GgufTensorInfo t;
      t.name = c.read_string("a tensor name");
      const auto n_dims = c.read<std::uint32_t>("a tensor's n_dims");
      if (n_dims == 0 || n_dims > 4) {
        throw GgufFormatError(concat(path_, ": tensor '", t.name, "' has n_dims = ", n_dims, " (must be 1..4)"));
      }
      for (std::uint32_t d = 0; d < n_dims; ++d) {
        const auto ne = c.read<std::uint64_t>("a tensor dimension");
        if (ne == 0 || ne > (std::uint64_t{1} << 40)) {
          throw GgufFormatError(concat(path_, ": tensor '", t.name, "' has ne[", d, "] = ", ne));
        }
        t.ne.push_back(static_cast<std::int64_t>(ne));
      }
      t.type = c.read<std::uint32_t>("a tensor type");
      t.offset = c.read<std::uint64_t>("a tensor offset");
      const TypeTraits traits = type_traits(t.type);
      if (traits.block_elems == 0) {
        throw GgufUnsupportedType(concat(path_, ": tensor '", t.name, "' has unknown type ", t.type));
      }
      if (t.ne[0] % traits.block_elems != 0) {
        throw GgufFormatError(concat(path_, ": tensor '", t.name, "' of type ", traits.name, " has ne[0] = ", t.ne[0],
                                     ", not a multiple of its block size ", traits.block_elems));
      }
      if (t.offset % alignment_ != 0) {
        throw GgufFormatError(concat(path_, ": tensor '", t.name, "' offset ", t.offset,
                                     " is not a multiple of the alignment ", alignment_));
      }
      tensors_.push_back(std::move(t));
    }
    data_offset_ = (c.pos() + alignment_ - 1) / alignment_ * alignment_;
    for (const GgufTensorInfo& t : tensors_) {
      const std::uint64_t end = data_offset_ + t.offset + static_cast<std::uint64_t>(t.bytes());
      if (end > bytes_.size()) {
        throw GgufFormatError(concat(path_, ": truncated file: tensor '", t.name, "' ends at byte ", end,
                                     " but the file has ", bytes_.size(), " bytes"));
      }
    }
  }

  GgufValue read_value(gguf_detail::Cursor& c, std::uint32_t type, const std::string& key, int depth) {
    using spectralkv::detail::concat;
    GgufValue v;
    v.type = static_cast<GgufValueType>(type);
    switch (v.type) {
      case GgufValueType::kUInt8: v.data = std::int64_t{c.read<std::uint8_t>("a uint8")}; break;
      case GgufValueType::kInt8: v.data = std::int64_t{c.read<std::int8_t>("an int8")}; break;
      case GgufValueType::kUInt16: v.data = std::int64_t{c.read<std::uint16_t>("a uint16")}; break;
      case GgufValueType::kInt16: v.data = std::int64_t{c.read<std::int16_t>("an int16")}; break;
      case GgufValueType::kUInt32: v.data = std::int64_t{c.read<std::uint32_t>("a uint32")}; break;
      case GgufValueType::kInt32: v.data = std::int64_t{c.read<std::int32_t>("an int32")}; break;
      case GgufValueType::kInt64: v.data = c.read<std::int64_t>("an int64"); break;
      case GgufValueType::kUInt64: {
        const auto u = c.read<std::uint64_t>("a uint64");
        if (u <= static_cast<std::uint64_t>(INT64_MAX)) {
          v.data = static_cast<std::int64_t>(u);
        } else {
          v.data = u;
        }
        break;
      }
      case GgufValueType::kFloat32: v.data = double{c.read<float>("a float32")}; break;
      case GgufValueType::kFloat64: v.data = c.read<double>("a float64"); break;
      case GgufValueType::kBool: {
        const auto b = c.read<std::uint8_t>("a bool");
        if (b > 1) throw GgufFormatError(concat(path_, ": metadata '", key, "': bool byte ", int{b}, " is not 0 or 1"));
        v.data = b == 1;
        break;
      }
      case GgufValueType::kString: v.data = c.read_string("a string value"); break;
      case GgufValueType::kArray: {
        if (depth > 0) throw GgufFormatError(concat(path_, ": metadata '", key, "': nested arrays are not supported"));
        const auto element = c.read<std::uint32_t>("an array element type");
        const auto count = c.read<std::uint64_t>("an array length");
        c.need(count > bytes_.size() ? bytes_.size() : count, "the array elements");  // >= 1 byte each
        v.element_type = static_cast<GgufValueType>(element);
        std::vector<GgufValue> items;
        items.reserve(static_cast<std::size_t>(count));
        for (std::uint64_t i = 0; i < count; ++i) items.push_back(read_value(c, element, key, depth + 1));
        v.data = std::move(items);
        break;
      }
      default:
        throw GgufFormatError(concat(path_, ": metadata '", key, "' has unknown value type ", type, " at offset ",
                                     c.pos() - 4));
    }
    return v;
  }

  std::int64_t as_int(const std::string& key, const GgufValue& v) const {
    if (const auto* i = std::get_if<std::int64_t>(&v.data)) return *i;
    if (std::holds_alternative<std::uint64_t>(v.data)) {
      throw GgufTypeMismatch(path_ + ": metadata '" + key + "' does not fit in int64");
    }
    throw mismatch(key, v, "an integer");
  }
  const std::vector<GgufValue>& array(const std::string& key, GgufValueType element, const char* expected) const {
    const GgufValue& v = value(key);
    const auto* items = std::get_if<std::vector<GgufValue>>(&v.data);
    if (!items || v.element_type != element) throw mismatch(key, v, expected);
    return *items;
  }
  GgufTypeMismatch mismatch(const std::string& key, const GgufValue& v, const char* expected) const {
    std::string got = value_type_name(v.type);
    if (v.type == GgufValueType::kArray) got += std::string(" of ") + value_type_name(v.element_type);
    return GgufTypeMismatch(path_ + ": metadata '" + key + "' is " + got + ", expected " + expected);
  }

  std::vector<std::uint8_t> bytes_;
  std::string path_;
  std::uint32_t version_ = 0;
  std::uint64_t alignment_ = 32;
  std::uint64_t data_offset_ = 0;
  std::map<std::string, GgufValue> metadata_;
  std::vector<GgufTensorInfo> tensors_;
};

}  // namespace spectralkv::llama
