#pragma once
// A minimal GGUF writer for the tests: builds small files byte by byte so that every field (value
// types, alignment, offsets) can be set on purpose, including wrongly.

#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

namespace spectralkv::llama::test {

class GgufWriter {
 public:
  explicit GgufWriter(std::uint32_t version = 3) { version_ = version; }

  // --- metadata ---------------------------------------------------------------------------------------
  template <class T>
  GgufWriter& scalar(const std::string& key, std::uint32_t type, T value) {
    key_header(key, type);
    put(meta_, value);
    return *this;
  }
  GgufWriter& u8(const std::string& k, std::uint8_t v) { return scalar(k, 0, v); }
  GgufWriter& i8(const std::string& k, std::int8_t v) { return scalar(k, 1, v); }
  GgufWriter& u16(const std::string& k, std::uint16_t v) { return scalar(k, 2, v); }
  GgufWriter& i16(const std::string& k, std::int16_t v) { return scalar(k, 3, v); }
  GgufWriter& u32(const std::string& k, std::uint32_t v) { return scalar(k, 4, v); }
  GgufWriter& i32(const std::string& k, std::int32_t v) { return scalar(k, 5, v); }
  GgufWriter& f32(const std::string& k, float v) { return scalar(k, 6, v); }
  GgufWriter& boolean(const std::string& k, bool v) { return scalar(k, 7, static_cast<std::uint8_t>(v)); }
  GgufWriter& u64(const std::string& k, std::uint64_t v) { return scalar(k, 10, v); }
  GgufWriter& i64(const std::string& k, std::int64_t v) { return scalar(k, 11, v); }
  GgufWriter& f64(const std::string& k, double v) { return scalar(k, 12, v); }
  GgufWriter& str(const std::string& k, const std::string& v) {
    key_header(k, 8);
    put_string(meta_, v);
    return *this;
  }
  GgufWriter& strings(const std::string& k, const std::vector<std::string>& v) {
    key_header(k, 9);
    put(meta_, std::uint32_t{8});
    put(meta_, static_cast<std::uint64_t>(v.size()));
    for (const auto& s : v) put_string(meta_, s);
    return *this;
  }
  GgufWriter& i32s(const std::string& k, const std::vector<std::int32_t>& v) {
    key_header(k, 9);
    put(meta_, std::uint32_t{5});
    put(meta_, static_cast<std::uint64_t>(v.size()));
    for (auto x : v) put(meta_, x);
    return *this;
  }
  /// A key with an arbitrary (possibly invalid) value type and raw value bytes.
  GgufWriter& raw_value(const std::string& k, std::uint32_t type, const std::vector<std::uint8_t>& bytes) {
    key_header(k, type);
    meta_.insert(meta_.end(), bytes.begin(), bytes.end());
    return *this;
  }

  // --- tensors ----------------------------------------------------------------------------------------
  /// Adds a tensor with raw data bytes; its offset is the next multiple of `alignment` unless given.
  GgufWriter& tensor(const std::string& name, const std::vector<std::uint64_t>& ne, std::uint32_t type,
                     const std::vector<std::uint8_t>& data, std::int64_t offset = -1) {
    std::uint64_t off = offset >= 0 ? static_cast<std::uint64_t>(offset) : align(data_.size());
    if (data_.size() < off) data_.resize(off, 0);
    if (data_.size() < off + data.size()) data_.resize(off + data.size(), 0);
    std::memcpy(data_.data() + off, data.data(), data.size());
    put_string(infos_, name);
    put(infos_, static_cast<std::uint32_t>(ne.size()));
    for (auto d : ne) put(infos_, d);
    put(infos_, type);
    put(infos_, off);
    ++n_tensors_;
    return *this;
  }
  GgufWriter& alignment(std::uint64_t a) {
    alignment_ = a;
    return u32("general.alignment", static_cast<std::uint32_t>(a));
  }

  std::vector<std::uint8_t> bytes() const {
    std::vector<std::uint8_t> out;
    out.insert(out.end(), {'G', 'G', 'U', 'F'});
    put(out, version_);
    put(out, n_tensors_);
    put(out, n_kv_);
    out.insert(out.end(), meta_.begin(), meta_.end());
    out.insert(out.end(), infos_.begin(), infos_.end());
    out.resize(align(out.size()), 0);
    out.insert(out.end(), data_.begin(), data_.end());
    return out;
  }
  void write(const std::string& path) const { write_bytes(path, bytes()); }
  static void write_bytes(const std::string& path, const std::vector<std::uint8_t>& b) {
    std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
  }

  template <class T>
  static void put(std::vector<std::uint8_t>& out, T v) {
    const auto* p = reinterpret_cast<const std::uint8_t*>(&v);
    out.insert(out.end(), p, p + sizeof(T));
  }
  static void put_string(std::vector<std::uint8_t>& out, const std::string& s) {
    put(out, static_cast<std::uint64_t>(s.size()));
    out.insert(out.end(), s.begin(), s.end());
  }

 private:
  void key_header(const std::string& key, std::uint32_t type) {
    put_string(meta_, key);
    put(meta_, type);
    ++n_kv_;
  }
  std::uint64_t align(std::uint64_t n) const { return (n + alignment_ - 1) / alignment_ * alignment_; }

  std::uint32_t version_;
  std::uint64_t n_tensors_ = 0, n_kv_ = 0, alignment_ = 32;
  std::vector<std::uint8_t> meta_, infos_, data_;
};

}  // namespace spectralkv::llama::test
