// The attention algebra: compressed-space attention against dense attention and against
// reconstruct-then-attend, and causality of multi-query attention.

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "spectralkv/attention.hpp"
#include "spectralkv/cache.hpp"
#include "spectralkv/cpu/svd.hpp"
#include "test_util.hpp"

namespace spectralkv {
namespace {

/// Textbook softmax attention, written independently of the library: the oracle of these tests.
std::vector<float> oracle(const std::vector<float>& k, const std::vector<float>& v, int dim, std::int64_t last,
                          const float* q, float scale) {
  std::vector<double> s(static_cast<std::size_t>(last + 1));
  double m = -INFINITY;
  for (std::int64_t t = 0; t <= last; ++t) {
    double acc = 0;
    for (int d = 0; d < dim; ++d) acc += static_cast<double>(q[d]) * k[static_cast<std::size_t>(t) * dim + d];
    s[static_cast<std::size_t>(t)] = scale * acc;
    m = std::max(m, s[static_cast<std::size_t>(t)]);
  }
  double l = 0;
  std::vector<double> o(static_cast<std::size_t>(dim), 0.0);
  for (std::int64_t t = 0; t <= last; ++t) {
    const double p = std::exp(s[static_cast<std::size_t>(t)] - m);
    l += p;
    for (int d = 0; d < dim; ++d) o[static_cast<std::size_t>(d)] += p * v[static_cast<std::size_t>(t) * dim + d];
  }
  std::vector<float> out(static_cast<std::size_t>(dim));
  for (int d = 0; d < dim; ++d) out[static_cast<std::size_t>(d)] = static_cast<float>(o[static_cast<std::size_t>(d)] / l);
  return out;
}

TEST(SpectralAttention, FullRankWithoutQuantisationEqualsDense) {
  // sinks (8) + two full-rank FP32-factored blocks (2×64) + tail (20), one head, D = 32.
  const int dim = 32, block = 64, sinks = 8, tail = 20;
  const std::int64_t n = sinks + 2 * block + tail;
  const auto k = test::normal_tokens<float>(n, 1, dim, 1);
  const auto v = test::normal_tokens<float>(n, 1, dim, 2);
  const auto q = test::normal_tokens<float>(1, 1, dim, 3);
  for (bool centre : {false, true}) {
    SCOPED_TRACE(centre ? "mean-centred" : "plain");
    std::vector<FactoredBlock> kf, vf;
    for (int b = 0; b < 2; ++b) {
      const std::size_t off = static_cast<std::size_t>(sinks + b * block) * dim;
      kf.push_back(cpu::truncated_svd(k.data() + off, dim, block, dim, dim, centre));
      vf.push_back(cpu::truncated_svd(v.data() + off, dim, block, dim, dim, centre));
    }
    std::vector<CompressedRun<FactoredBlockView, FactoredBlockView>> blocks;
    for (int b = 0; b < 2; ++b) blocks.push_back({FactoredBlockView(kf[b]), FactoredBlockView(vf[b]), sinks + b * block});
    const std::vector<DenseRun<float>> before{{k.data(), v.data(), dim, sinks, 0}};
    const std::size_t t0 = static_cast<std::size_t>(sinks + 2 * block) * dim;
    const std::vector<DenseRun<float>> after{{k.data() + t0, v.data() + t0, dim, tail, sinks + 2 * block}};
    for (std::int64_t last : {n - 1, std::int64_t{sinks + block + 10}, std::int64_t{3}}) {
      SCOPED_TRACE(last);
      std::vector<float> out(dim, NAN);
      attend_one(before, blocks, after, q.data(), dim, 0.2f, last, out.data());
      // Full rank: C·B = X up to FP32 rounding of the factors, so FP32-level agreement (1e-5).
      EXPECT_LE(test::max_rel_error(oracle(k, v, dim, last, q.data(), 0.2f), out), 1e-5);
    }
  }
}

template <class T>
class CacheAttention : public ::testing::Test {};
using StorageTypes = ::testing::Types<float, Half, BFloat16>;
TYPED_TEST_SUITE(CacheAttention, StorageTypes);

CacheConfig small_config(int sinks, bool centre) {
  CacheConfig c;
  c.num_layers = 2;
  c.num_q_heads = 6;
  c.num_kv_heads = 2;
  c.head_dim = 32;
  c.block_size = 64;
  c.hot_tokens = 16;
  c.sink_tokens = sinks;
  c.mean_center = centre;
  c.layer_ranks = {{8, 16}, {4, 12}};
  return c;
}

TYPED_TEST(CacheAttention, SpectralEqualsReconstructThenAttend) {
  using T = TypeParam;
  for (int sinks : {0, 4}) {
    for (bool centre : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "sinks " << sinks << " centre " << centre);
      const CacheConfig c = small_config(sinks, centre);
      SpectralCache<T> cache(c);
      cache.add_sequence(1);
      const std::int64_t n = 300;  // sinks + 4 blocks + a tail of 300 − 4·64 − sinks
      const auto k = test::low_rank_tokens<T>(n, c.num_kv_heads, c.head_dim, 12, 10);
      const auto v = test::low_rank_tokens<T>(n, c.num_kv_heads, c.head_dim, 12, 11);
      const std::int64_t qn = 5;
      const auto q = test::normal_tokens<float>(qn, c.num_q_heads, c.head_dim, 12);
      for (int layer = 0; layer < 2; ++layer) {
        cache.append(layer, 1, test::view(k, n, c.num_kv_heads, c.head_dim), test::view(v, n, c.num_kv_heads, c.head_dim));
        ASSERT_EQ(cache.state(1, layer).num_blocks, 4);
        std::vector<float> a(static_cast<std::size_t>(qn) * c.num_q_heads * c.head_dim, NAN), b = a;
        cache.attend(layer, {1}, {qn}, test::view(q, qn, c.num_q_heads, c.head_dim), test::view(a, qn, c.num_q_heads, c.head_dim), 0.18f);
        cache.attend_reconstructed(layer, {1}, {qn}, test::view(q, qn, c.num_q_heads, c.head_dim),
                                   test::view(b, qn, c.num_q_heads, c.head_dim), 0.18f);
        // Same stored values, different association of the sums: FP32-level agreement.
        EXPECT_LE(test::max_rel_error(b, a), 1e-5);
      }
    }
  }
}

TYPED_TEST(CacheAttention, MultiQueryIsCausalByAbsolutePosition) {
  // Row j of a q_len = n call over a cache of N tokens equals a decode step over the first N − n + j + 1
  // tokens, as long as no block formed in between (the cache then holds exactly that prefix).
  using T = TypeParam;
  const CacheConfig c = small_config(4, false);
  const std::int64_t total = 200, qn = 12;
  const auto k = test::low_rank_tokens<T>(total, c.num_kv_heads, c.head_dim, 12, 20);
  const auto v = test::low_rank_tokens<T>(total, c.num_kv_heads, c.head_dim, 12, 21);
  const auto q = test::normal_tokens<T>(qn, c.num_q_heads, c.head_dim, 22);
  const std::size_t qtok = static_cast<std::size_t>(c.num_q_heads) * c.head_dim;

  SpectralCache<T> full(c);
  full.add_sequence(0);
  full.append(0, 0, test::view(k, total, c.num_kv_heads, c.head_dim), test::view(v, total, c.num_kv_heads, c.head_dim));
  std::vector<float> rows(qn * qtok, NAN);
  full.attend(0, {0}, {qn}, test::view(q, qn, c.num_q_heads, c.head_dim), test::view(rows, qn, c.num_q_heads, c.head_dim), 0.2f);
  for (std::int64_t j = 0; j < qn; ++j) {
    const std::int64_t prefix = total - qn + j + 1;
    SpectralCache<T> part(c);
    part.add_sequence(0);
    part.append(0, 0, TensorView<const T>{k.data(), prefix, c.num_kv_heads, c.head_dim},
                TensorView<const T>{v.data(), prefix, c.num_kv_heads, c.head_dim});
    ASSERT_EQ(part.state(0, 0).num_blocks, full.state(0, 0).num_blocks);
    std::vector<float> one(qtok, NAN);
    part.attend(0, 0, TensorView<const T>{q.data() + j * qtok, 1, c.num_q_heads, c.head_dim},
                TensorView<float>{one.data(), 1, c.num_q_heads, c.head_dim}, 0.2f);
    const std::vector<float> row(rows.begin() + static_cast<std::ptrdiff_t>(j * qtok),
                                 rows.begin() + static_cast<std::ptrdiff_t>((j + 1) * qtok));
    EXPECT_EQ(row, one) << "query " << j;  // identical arithmetic: bitwise equal
  }
}

TEST(CacheAttention, DenseOnlyCacheEqualsOracleWithGqa) {
  // No block has formed yet: attention is plain softmax attention with query head h on KV head h / g.
  CacheConfig c = small_config(3, false);
  SpectralCache<float> cache(c);
  cache.add_sequence(9);
  const std::int64_t n = 50, qn = 7;
  const auto k = test::normal_tokens<float>(n, c.num_kv_heads, c.head_dim, 30);
  const auto v = test::normal_tokens<float>(n, c.num_kv_heads, c.head_dim, 31);
  const auto q = test::normal_tokens<float>(qn, c.num_q_heads, c.head_dim, 32);
  cache.append(1, 9, test::view(k, n, c.num_kv_heads, c.head_dim), test::view(v, n, c.num_kv_heads, c.head_dim));
  std::vector<float> out(static_cast<std::size_t>(qn) * c.num_q_heads * c.head_dim, NAN);
  cache.attend(1, {9}, {qn}, test::view(q, qn, c.num_q_heads, c.head_dim), test::view(out, qn, c.num_q_heads, c.head_dim), 0.3f);
  for (std::int64_t j = 0; j < qn; ++j) {
    for (int h = 0; h < c.num_q_heads; ++h) {
      const int kvh = h / c.group_size();
      std::vector<float> kh, vh;
      for (std::int64_t t = 0; t < n; ++t)
        for (int d = 0; d < c.head_dim; ++d) {
          kh.push_back(k[(static_cast<std::size_t>(t) * c.num_kv_heads + kvh) * c.head_dim + d]);
          vh.push_back(v[(static_cast<std::size_t>(t) * c.num_kv_heads + kvh) * c.head_dim + d]);
        }
      const float* qj = q.data() + (static_cast<std::size_t>(j) * c.num_q_heads + h) * c.head_dim;
      const auto want = oracle(kh, vh, c.head_dim, n - qn + j, qj, 0.3f);
      const std::vector<float> got(out.begin() + static_cast<std::ptrdiff_t>((j * c.num_q_heads + h) * c.head_dim),
                                   out.begin() + static_cast<std::ptrdiff_t>((j * c.num_q_heads + h + 1) * c.head_dim));
      EXPECT_LE(test::max_rel_error(want, got), 1e-5) << "query " << j << " head " << h;
    }
  }
}

TEST(CacheAttention, LogitsCoverEveryTokenInPositionOrder) {
  // Logits over sinks, cold blocks and tail, in position order: at full rank they equal q·k·scale of the
  // original tokens up to the INT8/FP16 storage error.
  CacheConfig c = small_config(2, false);
  c.layer_ranks = {{32, 32}, {32, 32}};
  SpectralCache<float> cache(c);
  cache.add_sequence(0);
  const std::int64_t n = 170;
  const auto k = test::low_rank_tokens<float>(n, c.num_kv_heads, c.head_dim, 8, 33);
  const auto q = test::normal_tokens<float>(1, c.num_q_heads, c.head_dim, 34);
  cache.append(0, 0, test::view(k, n, c.num_kv_heads, c.head_dim), test::view(k, n, c.num_kv_heads, c.head_dim));
  ASSERT_EQ(cache.state(0, 0).num_blocks, 2);
  const auto logits = cache.logits(0, 0, test::view(q, 1, c.num_q_heads, c.head_dim), 0.5f);
  ASSERT_EQ(logits.size(), static_cast<std::size_t>(c.num_q_heads));
  for (int h = 0; h < c.num_q_heads; ++h) {
    ASSERT_EQ(logits[h].size(), static_cast<std::size_t>(n));
    std::vector<float> want;
    for (std::int64_t t = 0; t < n; ++t) {
      double acc = 0;
      for (int d = 0; d < c.head_dim; ++d)
        acc += static_cast<double>(q[static_cast<std::size_t>(h) * c.head_dim + d]) *
               k[(static_cast<std::size_t>(t) * c.num_kv_heads + h / c.group_size()) * c.head_dim + d];
      want.push_back(static_cast<float>(0.5 * acc));
    }
    // INT8 coefficients: relative error of a logit ~ 1/254 per rank column at worst; 1e-2 of the largest.
    EXPECT_LE(test::max_rel_error(want, logits[h]), 1e-2) << "head " << h;
    // Dense tiers (the 2 sinks and the tail) are exact up to FP32 rounding.
    EXPECT_NEAR(logits[h][0], want[0], 1e-5 * std::fabs(want[0]) + 1e-6);
    EXPECT_NEAR(logits[h][n - 1], want[n - 1], 1e-5 * std::fabs(want[n - 1]) + 1e-6);
  }
}

}  // namespace
}  // namespace spectralkv
