// The GGUF reader on small files written by the test itself: every metadata value type, integer keys
// of any width, alignment, every supported tensor type dequantised against hand-computed values, and a
// typed error for each way a file can be wrong.

#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "gguf.hpp"
#include "gguf_writer.hpp"

namespace spectralkv::llama {
namespace {

using test::GgufWriter;

std::uint16_t half_bits(float f) { return Half::from_float(f); }

void put_half(std::vector<std::uint8_t>& out, float f) { GgufWriter::put(out, half_bits(f)); }

class GgufTest : public ::testing::Test {
 protected:
  std::string path(const std::string& name) {
    const auto dir = std::filesystem::temp_directory_path() /
                     ("spectralkv_gguf_" + std::string(::testing::UnitTest::GetInstance()->current_test_info()->name()));
    std::filesystem::create_directories(dir);
    dirs_.push_back(dir);
    return (dir / name).string();
  }
  GgufFile open_bytes(const std::vector<std::uint8_t>& b) {
    const std::string p = path("f.gguf");
    GgufWriter::write_bytes(p, b);
    return GgufFile::open(p);
  }
  void TearDown() override {
    for (const auto& d : dirs_) std::filesystem::remove_all(d);
  }
  std::vector<std::filesystem::path> dirs_;
};

TEST_F(GgufTest, ReadsEveryMetadataType) {
  GgufWriter w;
  w.u8("a.u8", 200).i8("a.i8", -100).u16("a.u16", 60000).i16("a.i16", -30000).u32("a.u32", 4000000000u)
      .i32("a.i32", -2000000000).u64("a.u64", 1ull << 40).i64("a.i64", -(1ll << 40)).f32("a.f32", 1.5f)
      .f64("a.f64", -2.25).boolean("a.bool", true).str("a.str", "héllo\nworld")
      .strings("a.strs", {"x", "", "yz"}).i32s("a.ints", {3, -1, 7});
  const GgufFile f = open_bytes(w.bytes());
  EXPECT_EQ(f.version(), 3u);
  EXPECT_EQ(f.metadata().size(), 14u);
  EXPECT_EQ(f.get_int("a.u8"), 200);
  EXPECT_EQ(f.get_int("a.i8"), -100);
  EXPECT_EQ(f.get_int("a.u16"), 60000);
  EXPECT_EQ(f.get_int("a.i16"), -30000);
  EXPECT_EQ(f.get_int("a.u32"), 4000000000ll);
  EXPECT_EQ(f.get_int("a.i32"), -2000000000);
  EXPECT_EQ(f.get_int("a.u64"), 1ll << 40);
  EXPECT_EQ(f.get_int("a.i64"), -(1ll << 40));
  EXPECT_EQ(f.get_float("a.f32"), 1.5);
  EXPECT_EQ(f.get_float("a.f64"), -2.25);
  EXPECT_EQ(f.get_float("a.u8"), 200.0);  // an integer is a number too
  EXPECT_TRUE(f.get_bool("a.bool", false));
  EXPECT_EQ(f.get_string("a.str"), "héllo\nworld");
  EXPECT_EQ(f.get_strings("a.strs"), (std::vector<std::string>{"x", "", "yz"}));
  EXPECT_EQ(f.get_ints("a.ints"), (std::vector<std::int64_t>{3, -1, 7}));
  EXPECT_EQ(f.value("a.u16").type, GgufValueType::kUInt16);
  EXPECT_EQ(f.value("a.ints").element_type, GgufValueType::kInt32);
  // Fallbacks apply only to absent keys.
  EXPECT_EQ(f.get_int("absent", 42), 42);
  EXPECT_EQ(f.get_string("absent", "d"), "d");
}

TEST_F(GgufTest, MissingKeyAndWrongTypeAreTypedErrors) {
  GgufWriter w;
  w.str("name", "x").u32("count", 3).strings("list", {"a"});
  w.u64("huge", ~0ull);
  const GgufFile f = open_bytes(w.bytes());
  EXPECT_THROW(f.get_int("nope"), GgufMissingKey);
  EXPECT_THROW(f.get_string("nope"), GgufMissingKey);
  EXPECT_THROW(f.tensor("nope.weight"), GgufMissingKey);
  EXPECT_THROW(f.dequantize("nope.weight"), GgufMissingKey);
  EXPECT_THROW(f.get_int("name"), GgufTypeMismatch);
  EXPECT_THROW(f.get_string("count"), GgufTypeMismatch);
  EXPECT_THROW(f.get_strings("count"), GgufTypeMismatch);
  EXPECT_THROW(f.get_ints("list"), GgufTypeMismatch);
  EXPECT_THROW(f.get_int("huge"), GgufTypeMismatch);  // does not fit in int64
  try {
    f.get_int("missing.key");
    FAIL() << "no exception";
  } catch (const Error& e) {  // every reader error is a spectralkv::Error and names the key
    EXPECT_NE(std::string(e.what()).find("missing.key"), std::string::npos) << e.what();
  }
}

/// Two tensors of every supported type with known contents.
std::vector<std::uint8_t> typed_tensors_file(std::uint64_t alignment, std::vector<std::vector<float>>& expected,
                                             std::vector<std::string>& names) {
  GgufWriter w;
  if (alignment != 32) w.alignment(alignment);
  w.str("general.architecture", "test");
  // F32 [3, 2]
  {
    std::vector<float> v{1.0f, -2.5f, 3.25f, 0.0f, 1e-3f, -7.0f};
    std::vector<std::uint8_t> b;
    for (float x : v) GgufWriter::put(b, x);
    w.tensor("f32", {3, 2}, 0, b);
    expected.push_back(v);
    names.push_back("f32");
  }
  // F16 [4]: values exact in FP16
  {
    std::vector<float> v{0.5f, -1.25f, 1024.0f, 0.099975586f};
    std::vector<std::uint8_t> b;
    for (float x : v) put_half(b, x);
    w.tensor("f16", {4}, 1, b);
    expected.push_back(v);
    names.push_back("f16");
  }
  // BF16 [2]
  {
    std::vector<std::uint8_t> b;
    GgufWriter::put(b, BFloat16::from_float(3.0f));
    GgufWriter::put(b, BFloat16::from_float(-0.5f));
    w.tensor("bf16", {2}, 30, b);
    expected.push_back({3.0f, -0.5f});
    names.push_back("bf16");
  }
  // Q8_0 [32, 2]: block b has d = 0.25·(b+1), q[i] = i − 16 (block 0) or 127 − 8i (block 1, includes −121)
  {
    std::vector<std::uint8_t> b;
    std::vector<float> v;
    for (int blk = 0; blk < 2; ++blk) {
      const float d = 0.25f * static_cast<float>(blk + 1);
      put_half(b, d);
      for (int i = 0; i < 32; ++i) {
        const int q = blk == 0 ? i - 16 : 127 - 8 * i;
        b.push_back(static_cast<std::uint8_t>(static_cast<std::int8_t>(q)));
        v.push_back(d * static_cast<float>(q));
      }
    }
    w.tensor("q8_0", {32, 2}, 8, b);
    expected.push_back(v);
    names.push_back("q8_0");
  }
  // Q4_0 [32]: byte i holds element i in the low nibble and element i + 16 in the high nibble
  {
    std::vector<std::uint8_t> b;
    std::vector<float> v(32);
    const float d = 0.5f;
    put_half(b, d);
    for (int i = 0; i < 16; ++i) {
      const int lo = i, hi = 15 - i;
      b.push_back(static_cast<std::uint8_t>(lo | (hi << 4)));
      v[i] = d * static_cast<float>(lo - 8);
      v[i + 16] = d * static_cast<float>(hi - 8);
    }
    w.tensor("q4_0", {32}, 2, b);
    expected.push_back(v);
    names.push_back("q4_0");
  }
  // Q4_1 [32]: x = d·nibble + m
  {
    std::vector<std::uint8_t> b;
    std::vector<float> v(32);
    const float d = 0.125f, m = -1.0f;
    put_half(b, d);
    put_half(b, m);
    for (int i = 0; i < 16; ++i) {
      const int lo = (3 * i) % 16, hi = (5 * i + 7) % 16;
      b.push_back(static_cast<std::uint8_t>(lo | (hi << 4)));
      v[i] = d * static_cast<float>(lo) + m;
      v[i + 16] = d * static_cast<float>(hi) + m;
    }
    w.tensor("q4_1", {32}, 3, b);
    expected.push_back(v);
    names.push_back("q4_1");
  }
  return w.bytes();
}

TEST_F(GgufTest, DequantisesEverySupportedType) {
  for (std::uint64_t alignment : {32ull, 8ull, 64ull}) {
    std::vector<std::vector<float>> expected;
    std::vector<std::string> names;
    const GgufFile f = open_bytes(typed_tensors_file(alignment, expected, names));
    EXPECT_EQ(f.alignment(), alignment);
    EXPECT_EQ(f.data_offset() % alignment, 0u);
    ASSERT_EQ(f.tensors().size(), names.size());
    for (std::size_t i = 0; i < names.size(); ++i) {
      const std::vector<float> got = f.dequantize(names[i]);
      ASSERT_EQ(got.size(), expected[i].size()) << names[i];
      for (std::size_t j = 0; j < got.size(); ++j) {
        // Exact: every expected value is d·q (+ m) with FP16-exact d and m, computed the same way in FP32.
        EXPECT_EQ(got[j], expected[i][j]) << names[i] << "[" << j << "] alignment " << alignment;
      }
    }
    EXPECT_EQ(f.tensor("q8_0").ne, (std::vector<std::int64_t>{32, 2}));
    EXPECT_EQ(f.tensor("q8_0").bytes(), 68);
  }
}

TEST_F(GgufTest, EveryTruncationIsAFormatError) {
  std::vector<std::vector<float>> expected;
  std::vector<std::string> names;
  const std::vector<std::uint8_t> full = typed_tensors_file(32, expected, names);
  EXPECT_NO_THROW(GgufFile(full, "full"));
  for (std::size_t n = 0; n < full.size(); ++n) {
    const std::vector<std::uint8_t> cut(full.begin(), full.begin() + static_cast<std::ptrdiff_t>(n));
    EXPECT_THROW(GgufFile(cut, "cut"), GgufFormatError) << "truncated to " << n << " of " << full.size() << " bytes";
  }
}

TEST_F(GgufTest, MalformedHeadersAreFormatErrors) {
  auto base = [] {
    GgufWriter w;
    w.str("k", "v");
    return w;
  };
  std::vector<std::uint8_t> b = base().bytes();
  b[0] = 'X';
  EXPECT_THROW(GgufFile(b, "magic"), GgufFormatError);
  EXPECT_THROW(GgufFile(GgufWriter(7).bytes(), "version"), GgufFormatError);
  EXPECT_THROW(GgufFile(base().raw_value("bad", 13, {0, 0, 0, 0}).bytes(), "value type"), GgufFormatError);
  EXPECT_THROW(GgufFile(base().raw_value("b", 7, {2}).bytes(), "bool"), GgufFormatError);
  // An array claiming 2^60 elements: rejected before anything is allocated for it.
  std::vector<std::uint8_t> huge;
  GgufWriter::put(huge, std::uint32_t{4});
  GgufWriter::put(huge, std::uint64_t{1} << 60);
  EXPECT_THROW(GgufFile(base().raw_value("arr", 9, huge).bytes(), "array"), GgufFormatError);
  // A string claiming more bytes than the file has.
  std::vector<std::uint8_t> long_string;
  GgufWriter::put(long_string, std::uint64_t{1} << 62);
  EXPECT_THROW(GgufFile(base().raw_value("s", 8, long_string).bytes(), "string"), GgufFormatError);
  EXPECT_THROW(GgufFile(GgufWriter().u32("general.alignment", 24).bytes(), "alignment"), GgufFormatError);
  // Duplicate key.
  EXPECT_THROW(GgufFile(base().str("k", "again").bytes(), "duplicate"), GgufFormatError);
}

TEST_F(GgufTest, BadTensorInfosAreTypedErrors) {
  const std::vector<std::uint8_t> four_floats(16, 0);
  // Offset not a multiple of the alignment.
  EXPECT_THROW(GgufFile(GgufWriter().tensor("t", {4}, 0, four_floats, 4).bytes(), "misaligned"), GgufFormatError);
  // Data past the end of the file (the offset points beyond what was written).
  {
    GgufWriter w;
    w.tensor("t", {4}, 0, four_floats);
    std::vector<std::uint8_t> b = w.bytes();
    b.resize(b.size() - 1);
    EXPECT_THROW(GgufFile(b, "short data"), GgufFormatError);
  }
  // Zero-sized dimension, too many dimensions, a quantised row that is not whole blocks.
  EXPECT_THROW(GgufFile(GgufWriter().tensor("t", {0}, 0, {}).bytes(), "ne 0"), GgufFormatError);
  EXPECT_THROW(GgufFile(GgufWriter().tensor("t", {1, 1, 1, 1, 1}, 0, four_floats).bytes(), "5 dims"), GgufFormatError);
  EXPECT_THROW(GgufFile(GgufWriter().tensor("t", {16}, 8, std::vector<std::uint8_t>(34, 0)).bytes(), "partial block"),
               GgufFormatError);
  // A type id nobody knows cannot even be sized.
  EXPECT_THROW(GgufFile(GgufWriter().tensor("t", {4}, 99, four_floats).bytes(), "type 99"), GgufUnsupportedType);
  // A known type the reader does not dequantise: the file opens (and lists it), dequantising throws.
  const GgufFile f(GgufWriter().tensor("k", {256}, 12, std::vector<std::uint8_t>(144, 0)).bytes(), "q4_k");
  EXPECT_EQ(std::string(type_traits(f.tensor("k").type).name), "Q4_K");
  EXPECT_THROW(f.dequantize("k"), GgufUnsupportedType);
}

TEST_F(GgufTest, UnreadableFileIsAGgufError) {
  EXPECT_THROW(GgufFile::open(path("does_not_exist.gguf")), GgufError);
}

}  // namespace
}  // namespace spectralkv::llama
