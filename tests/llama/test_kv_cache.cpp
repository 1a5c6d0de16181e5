// The example's two KV caches: dense attention against a plain double-precision loop, and the FP32
// GEMM attention over the cold layout (spectral_attention) against the library's reference
// SpectralCache::attend on the same cache — GQA, several blocks, sinks, mean-centering, multi-query.

#include <gtest/gtest.h>

#include <cmath>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "kv_cache.hpp"
#include "synthetic_tokens.hpp"

namespace spectralkv::llama {
namespace {

constexpr int kQHeads = 6, kKvHeads = 2, kDim = 32;

std::vector<float> tokens(std::int64_t n, int heads, std::uint32_t seed) {
  return test::structured_tokens(n, heads, kDim, seed);
}

/// Causal GQA attention of the last n of len tokens, in double, straight from the definition.
std::vector<float> naive_attention(const std::vector<float>& k, const std::vector<float>& v, std::int64_t len,
                                   const std::vector<float>& q, std::int64_t n, float scale) {
  std::vector<float> out(q.size());
  for (std::int64_t i = 0; i < n; ++i) {
    for (int h = 0; h < kQHeads; ++h) {
      const int g = h / (kQHeads / kKvHeads);
      const float* qi = &q[(static_cast<std::size_t>(i) * kQHeads + h) * kDim];
      std::vector<double> p;
      double m = -1e300;
      for (std::int64_t t = 0; t <= len - n + i; ++t) {
        double s = 0;
        for (int d = 0; d < kDim; ++d) s += static_cast<double>(qi[d]) * k[(static_cast<std::size_t>(t) * kKvHeads + g) * kDim + d];
        p.push_back(s * scale);
        m = std::max(m, p.back());
      }
      double z = 0;
      for (double& x : p) z += (x = std::exp(x - m));
      for (int d = 0; d < kDim; ++d) {
        double o = 0;
        for (std::size_t t = 0; t < p.size(); ++t) o += p[t] * v[(t * kKvHeads + g) * kDim + d];
        out[(static_cast<std::size_t>(i) * kQHeads + h) * kDim + d] = static_cast<float>(o / z);
      }
    }
  }
  return out;
}

/// Blocks of 32 tokens, 8 hot tokens: small enough that a few hundred tokens make several cold blocks.
CacheConfig small_config(int layers, int sinks, LayerRanks ranks) {
  CacheConfig c;
  c.num_layers = layers;
  c.num_q_heads = kQHeads;
  c.num_kv_heads = kKvHeads;
  c.head_dim = kDim;
  c.block_size = 32;
  c.hot_tokens = 8;
  c.sink_tokens = sinks;
  c.default_ranks = ranks;
  return c;
}

using test::relative_error;

TEST(DenseKvCache, MatchesTheDefinition) {
  const std::int64_t len = 150;
  const auto k = tokens(len, kKvHeads, 1), v = tokens(len, kKvHeads, 2);
  DenseKvCache cache(1, kKvHeads, kDim);
  // Appended in uneven pieces: the cache is one contiguous sequence whatever the chunking.
  std::int64_t at = 0;
  for (std::int64_t m : {1, 3, 9, 27, 110}) {
    cache.append(0, {k.data() + at * kKvHeads * kDim, m, kKvHeads, kDim}, {v.data() + at * kKvHeads * kDim, m, kKvHeads, kDim});
    at += m;
  }
  ASSERT_EQ(cache.length(0), len);
  for (std::int64_t n : {1, 9}) {
    const auto q = tokens(n, kQHeads, 3);
    std::vector<float> out(q.size(), std::nanf(""));
    cache.attend(0, {q.data(), n, kQHeads, kDim}, {out.data(), n, kQHeads, kDim}, 0.2f);
    // FP32 GEMMs of length 32 and 150 against double: ~1e-6 relative.
    EXPECT_LT(relative_error(out, naive_attention(k, v, len, q, n, 0.2f)), 1e-5) << "n = " << n;
  }
  EXPECT_EQ(cache.bytes().stored, len * 2 * kKvHeads * kDim * 2);
}

struct Case {
  int sinks;
  bool mean_center;
  std::int64_t q_len;
};

void PrintTo(const Case& c, std::ostream* os) {
  *os << "sinks " << c.sinks << ", mean_center " << c.mean_center << ", q_len " << c.q_len;
}

class SpectralAttention : public ::testing::TestWithParam<Case> {};

TEST_P(SpectralAttention, FastPathEqualsLibraryReference) {
  CacheConfig c = small_config(2, GetParam().sinks, {6, 10});
  c.mean_center = GetParam().mean_center;
  SpectralCache<float> cache(c);
  cache.add_sequence(7);
  const std::int64_t len = 150;  // sinks, 3-4 cold blocks and a tail
  const auto k = tokens(len, kKvHeads, 11), v = tokens(len, kKvHeads, 12);
  for (int layer = 0; layer < 2; ++layer) cache.append(layer, 7, {k.data(), len, kKvHeads, kDim}, {v.data(), len, kKvHeads, kDim});
  ASSERT_GE(cache.state(7, 1).num_blocks, 3);
  const std::int64_t n = GetParam().q_len;
  const auto q = tokens(n, kQHeads, 13);
  std::vector<float> fast(q.size(), std::nanf("")), reference(q.size(), std::nanf(""));
  spectral_attention(cache, 7, 1, {q.data(), n, kQHeads, kDim}, {fast.data(), n, kQHeads, kDim}, 0.2f);
  cache.attend(1, 7, TensorView<const float>{q.data(), n, kQHeads, kDim}, {reference.data(), n, kQHeads, kDim}, 0.2f);
  // Same stored bytes and algebra; FP32 GEMM accumulation against the reference's double: ~1e-6.
  EXPECT_LT(relative_error(fast, reference), 1e-5);
  // And the compressed cache is a real approximation: dense attention differs by far more.
  EXPECT_GT(relative_error(reference, naive_attention(k, v, len, q, n, 0.2f)), 1e-3);
}

INSTANTIATE_TEST_SUITE_P(Configs, SpectralAttention,
                         ::testing::Values(Case{0, false, 1}, Case{0, false, 17}, Case{3, false, 5}, Case{3, true, 1},
                                           Case{0, true, 17}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return "sinks" + std::to_string(info.param.sinks) + (info.param.mean_center ? "_mc" : "") +
                                  "_q" + std::to_string(info.param.q_len);
                         });

TEST(SpectralKvCache, ShadowRecordsFidelityAndBytesCountColdBlocks) {
  const CacheConfig c = small_config(1, 0, {6, 10});
  SpectralKvCache cache(c, /*shadow=*/true);
  EXPECT_EQ(cache.tokens_until_compression(0), 39);
  const std::int64_t len = 100;
  const auto k = tokens(len, kKvHeads, 21), v = tokens(len, kKvHeads, 22), q = tokens(1, kQHeads, 23);
  cache.append(0, {k.data(), len, kKvHeads, kDim}, {v.data(), len, kKvHeads, kDim});
  std::vector<float> out(q.size());
  cache.attend(0, {q.data(), 1, kQHeads, kDim}, {out.data(), 1, kQHeads, kDim}, 0.2f);
  const LayerFidelity& f = cache.fidelity()[0];
  EXPECT_GT(f.relative_error(), 0.0);
  EXPECT_LT(f.relative_error(), 0.5);
  EXPECT_EQ(f.score_probes, kQHeads);
  EXPECT_GT(f.score_corr(), 0.5);
  const KvBytes b = cache.bytes();
  EXPECT_EQ(b.tokens, len);
  EXPECT_EQ(b.cold_tokens, 64);
  EXPECT_EQ(b.stored, 2 * cache.cache().layout(0).block_bytes + (len - 64) * 2 * kKvHeads * kDim * 2);
  cache.clear();
  EXPECT_EQ(cache.length(0), 0);
  EXPECT_EQ(cache.bytes().tokens, 0);
}

/// The experimental outlier rows: with every token of every block kept exact, spectral attention is dense
/// attention over FP16-rounded cold tokens, whatever the ranks.
TEST(SpectralKvCache, AllTokensAsOutliersIsDenseAttention) {
  const CacheConfig c = small_config(1, 2, {2, 2});  // a poor approximation, so any compressed row left in would show
  SpectralKvCache all_exact(c, false, AttendPath::kFast, c.block_size), compressed(c);
  const std::int64_t len = 120;
  const auto k = tokens(len, kKvHeads, 31), v = tokens(len, kKvHeads, 32);
  // Appended in strict-sized pieces and in one bulk piece: the outlier rows must follow either way.
  for (std::int64_t at = 0; at < len;) {
    const std::int64_t m = std::min<std::int64_t>(std::max<std::int64_t>(all_exact.tokens_until_compression(0), 1), len - at);
    all_exact.append(0, {k.data() + at * kKvHeads * kDim, m, kKvHeads, kDim}, {v.data() + at * kKvHeads * kDim, m, kKvHeads, kDim});
    at += m;
  }
  compressed.append(0, {k.data(), len, kKvHeads, kDim}, {v.data(), len, kKvHeads, kDim});
  ASSERT_EQ(all_exact.cache().state(0, 0).num_blocks, 3);
  const std::int64_t n = 4;
  const auto q = tokens(n, kQHeads, 33);
  std::vector<float> out(q.size(), std::nanf("")), approx(q.size(), std::nanf(""));
  all_exact.attend(0, {q.data(), n, kQHeads, kDim}, {out.data(), n, kQHeads, kDim}, 0.2f);
  compressed.attend(0, {q.data(), n, kQHeads, kDim}, {approx.data(), n, kQHeads, kDim}, 0.2f);
  const auto ref = naive_attention(k, v, len, q, n, 0.2f);
  // FP16 rounding of keys and values (2^-11 relative) through softmax: ~1e-3.
  EXPECT_LT(relative_error(out, ref), 3e-3);
  EXPECT_GT(relative_error(approx, ref), 3e-2);  // the rank-2 cache without outliers is far off
  const std::int64_t row_bytes = 2 * kDim * 2 + 2;
  EXPECT_EQ(all_exact.bytes().stored - compressed.bytes().stored, 3 * kKvHeads * c.block_size * row_bytes);
}

/// Attention error against the definition and stored bytes of rank-8 caches holding three cold blocks,
/// one cache per entry of `codes`, all fed the same tokens.
struct NarrowRun {
  double error;
  std::int64_t bytes;
};
std::vector<NarrowRun> narrow_runs(const std::vector<NarrowCodes>& codes, std::uint32_t seed) {
  const CacheConfig c = small_config(1, 2, {8, 8});
  const std::int64_t len = 120, n = 4;
  const auto k = tokens(len, kKvHeads, seed), v = tokens(len, kKvHeads, seed + 1), q = tokens(n, kQHeads, seed + 2);
  const auto ref = naive_attention(k, v, len, q, n, 0.2f);
  std::vector<NarrowRun> runs;
  for (const NarrowCodes& code : codes) {
    SpectralKvCache cache(c, false, AttendPath::kFast, 0, code);
    cache.append(0, {k.data(), len, kKvHeads, kDim}, {v.data(), len, kKvHeads, kDim});
    EXPECT_EQ(cache.cache().state(0, 0).num_blocks, 3);
    std::vector<float> out(q.size(), std::nanf(""));
    cache.attend(0, {q.data(), n, kQHeads, kDim}, {out.data(), n, kQHeads, kDim}, 0.2f);
    runs.push_back({relative_error(out, ref), cache.bytes().stored});
  }
  return runs;
}

/// The experimental narrower coefficients: 8 bits is the stored INT8 exactly; fewer bits round every
/// coefficient to a coarser grid (the error against dense attention grows) unless its column leads, and
/// the bytes count the code sections at their width.
TEST(SpectralKvCache, NarrowerCoefficientsCoarsenAndShrink) {
  // INT8 (default), 8 bits, 4, 2, 2 with all 8 columns leading, 4 with 3 leading.
  const auto r = narrow_runs({{}, {8, 0}, {4, 0}, {2, 0}, {2, 8}, {4, 3}}, 41);
  EXPECT_EQ(r[1].error, r[0].error);
  EXPECT_EQ(r[4].error, r[0].error);  // every column (rank 8) leads: all INT8
  EXPECT_GT(r[2].error, r[0].error);
  EXPECT_GT(r[3].error, r[2].error);
  EXPECT_GT(r[5].error, r[0].error);  // the leading columns carry most of the energy: INT8 there recovers most of it
  EXPECT_LT(r[5].error, r[2].error);
  // Each block: kKvHeads heads × L = 32 rows × (r_K + r_V) codes, 8 − b bits fewer each.
  const std::int64_t codes = 3 * kKvHeads * 32 * (8 + 8);
  EXPECT_EQ(r[0].bytes - r[2].bytes, codes / 2);
  EXPECT_EQ(r[0].bytes - r[3].bytes, codes * 6 / 8);
  EXPECT_EQ(r[0].bytes, r[4].bytes);
  EXPECT_EQ(r[0].bytes - r[5].bytes, codes * 5 / 8 / 2);  // 5 of 8 columns at 4 bits
  const CacheConfig c = small_config(1, 2, {8, 8});
  for (NarrowCodes bad : std::vector<NarrowCodes>{{1, 0}, {9, 0}, {4, -1}, {8, 0, 1}, {8, 0, 17}})
    EXPECT_THROW(SpectralKvCache(c, false, AttendPath::kFast, 0, bad), InvalidArgument);
  EXPECT_THROW(SpectralKvCache(c, false, AttendPath::kLibrary, 0, {4, 0}), InvalidArgument);
}

/// Narrower bases: 16 bits is the stored FP16; 8-bit rows add little error, 3-bit rows much more; the
/// bytes count the basis sections at their width plus a scale per row.
TEST(SpectralKvCache, NarrowerBasesCoarsenAndShrink) {
  const auto r = narrow_runs({{}, {8, 0, 16}, {8, 0, 8}, {8, 0, 3}}, 51);
  EXPECT_EQ(r[1].error, r[0].error);
  EXPECT_GT(r[3].error, r[2].error);
  EXPECT_LT(std::fabs(r[2].error - r[0].error), 0.1 * r[0].error);  // 8-bit rows: ~1/254 of each row's range
  // Each block: kKvHeads heads × (r_K + r_V) rows of kDim values, (16 − P) bits fewer each, + 4 B scale.
  const std::int64_t rows = 3 * kKvHeads * (8 + 8);
  EXPECT_EQ(r[0].bytes - r[2].bytes, rows * (kDim * 8 / 8 - 4));
  EXPECT_EQ(r[0].bytes - r[3].bytes, rows * (kDim * 13 / 8 - 4));
}

}  // namespace
}  // namespace spectralkv::llama
