// SpectralCache policy: tiers and compression points, batching, sequence lifecycle, memory statistics
// and the error model (every bad input throws a typed error and leaves the cache unchanged).

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "spectralkv/cache.hpp"
#include "test_util.hpp"

namespace spectralkv {
namespace {

CacheConfig config(int sinks = 4) {
  CacheConfig c;
  c.num_layers = 3;
  c.num_q_heads = 8;
  c.num_kv_heads = 2;
  c.head_dim = 32;
  c.block_size = 32;
  c.hot_tokens = 8;
  c.sink_tokens = sinks;
  c.layer_ranks = {{8, 16}, {4, 8}, {16, 32}};
  return c;
}

template <class T>
class Cache : public ::testing::Test {};
using StorageTypes = ::testing::Types<float, Half, BFloat16>;
TYPED_TEST_SUITE(Cache, StorageTypes);

TYPED_TEST(Cache, TokenByTokenEqualsBulkAcrossBlockBoundaries) {
  using T = TypeParam;
  for (int sinks : {0, 5}) {
    SCOPED_TRACE(sinks);
    const CacheConfig c = config(sinks);
    const std::int64_t n = 181;  // several blocks and a partial tail
    const auto k = test::low_rank_tokens<T>(n, c.num_kv_heads, c.head_dim, 6, 40);
    const auto v = test::low_rank_tokens<T>(n, c.num_kv_heads, c.head_dim, 6, 41);
    const std::size_t tok = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
    SpectralCache<T> one(c), bulk(c), chunked(c);
    for (auto* cache : {&one, &bulk, &chunked}) cache->add_sequence(3);
    std::mt19937 gen(1);
    for (int layer = 0; layer < c.num_layers; ++layer) {
      for (std::int64_t t = 0; t < n; ++t) {
        one.append(layer, 3, TensorView<const T>{k.data() + t * tok, 1, c.num_kv_heads, c.head_dim},
                   TensorView<const T>{v.data() + t * tok, 1, c.num_kv_heads, c.head_dim});
      }
      bulk.append(layer, 3, test::view(k, n, c.num_kv_heads, c.head_dim), test::view(v, n, c.num_kv_heads, c.head_dim));
      for (std::int64_t t = 0; t < n;) {
        const std::int64_t m = std::min<std::int64_t>(n - t, std::uniform_int_distribution<std::int64_t>(0, 70)(gen));
        chunked.append(layer, 3, TensorView<const T>{k.data() + t * tok, m, c.num_kv_heads, c.head_dim},
                       TensorView<const T>{v.data() + t * tok, m, c.num_kv_heads, c.head_dim});
        t += m;
      }
      const std::int64_t expect_blocks = (n - sinks - c.hot_tokens) / c.block_size;
      EXPECT_EQ(one.state(3, layer).num_blocks, expect_blocks);
      EXPECT_EQ(one.state(3, layer).sink_len, sinks);
      EXPECT_EQ(one.state(3, layer).tail_len, n - sinks - expect_blocks * c.block_size);
    }
    // Same blocks byte for byte, same tiers: then every output is the same too.
    EXPECT_EQ(test::snapshot(one), test::snapshot(bulk));
    EXPECT_EQ(test::snapshot(one), test::snapshot(chunked));
    const auto q = test::normal_tokens<float>(1, c.num_q_heads, c.head_dim, 42);
    for (int layer = 0; layer < c.num_layers; ++layer) {
      std::vector<float> a(static_cast<std::size_t>(c.num_q_heads) * c.head_dim, NAN), b = a;
      one.attend(layer, 3, test::view(q, 1, c.num_q_heads, c.head_dim), test::view(a, 1, c.num_q_heads, c.head_dim), 0.2f);
      bulk.attend(layer, 3, test::view(q, 1, c.num_q_heads, c.head_dim), test::view(b, 1, c.num_q_heads, c.head_dim), 0.2f);
      EXPECT_EQ(a, b);
      for (float x : a) ASSERT_TRUE(std::isfinite(x));
    }
  }
}

TYPED_TEST(Cache, CompressesExactlyWhenTailReachesHotPlusBlock) {
  using T = TypeParam;
  const CacheConfig c = config(2);
  SpectralCache<T> cache(c);
  cache.add_sequence(0);
  const auto k = test::normal_tokens<T>(200, c.num_kv_heads, c.head_dim, 1);
  const std::size_t tok = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  std::int64_t prev_until = -1;
  for (std::int64_t t = 0; t < 200; ++t) {
    const std::int64_t until = cache.tokens_until_compression(0, 0);
    const auto st = cache.state(0, 0);
    const std::int64_t before = st.num_blocks;
    // Counted down by one per token from the sinks' and the tail's free room; the block that forms at 0
    // leaves a tail of hot_tokens, block_size − 1 tokens short of the next threshold.
    EXPECT_EQ(until, (c.sink_tokens - st.sink_len) + (c.hot_tokens + c.block_size - 1 - st.tail_len)) << "token " << t;
    if (prev_until > 0) {
      EXPECT_EQ(until, prev_until - 1) << "token " << t;
    } else if (prev_until == 0) {
      EXPECT_EQ(until, c.block_size - 1) << "token " << t;
    }
    prev_until = until;
    cache.append(0, 0, TensorView<const T>{k.data() + t * tok, 1, c.num_kv_heads, c.head_dim},
                 TensorView<const T>{k.data() + t * tok, 1, c.num_kv_heads, c.head_dim});
    const auto s = cache.state(0, 0);
    EXPECT_EQ(s.num_blocks - before, until == 0 ? 1 : 0) << "token " << t;
    EXPECT_LE(s.tail_len, c.hot_tokens + c.block_size - 1);
    if (s.num_blocks > 0) {
      EXPECT_GE(s.tail_len, c.hot_tokens);
    }
    EXPECT_EQ(cache.length(0, 0), t + 1);
  }
}

TYPED_TEST(Cache, RaggedBatchEqualsSequencesOneByOne) {
  using T = TypeParam;
  const CacheConfig c = config(3);
  const std::vector<SequenceId> ids{10, 20, 30};
  const std::vector<std::int64_t> lens{150, 7, 97};
  std::vector<std::vector<T>> ks, vs;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    ks.push_back(test::low_rank_tokens<T>(lens[i], c.num_kv_heads, c.head_dim, 6, 50 + static_cast<std::uint32_t>(i)));
    vs.push_back(test::low_rank_tokens<T>(lens[i], c.num_kv_heads, c.head_dim, 6, 60 + static_cast<std::uint32_t>(i)));
  }
  const std::size_t tok = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim;
  const std::size_t qtok = static_cast<std::size_t>(c.num_q_heads) * c.head_dim;
  // Batched: every step appends a different number of tokens to each sequence in one call.
  SpectralCache<T> batched(c);
  for (SequenceId id : ids) batched.add_sequence(id);
  std::vector<std::int64_t> done(ids.size(), 0);
  const std::vector<std::int64_t> step{23, 2, 13};
  for (int layer = 0; layer < c.num_layers; ++layer) {
    std::fill(done.begin(), done.end(), 0);
    while (done != lens) {
      std::vector<std::int64_t> counts;
      std::vector<T> kb, vb;
      for (std::size_t i = 0; i < ids.size(); ++i) {
        const std::int64_t m = std::min(step[i], lens[i] - done[i]);
        counts.push_back(m);
        kb.insert(kb.end(), ks[i].begin() + static_cast<std::ptrdiff_t>(done[i] * tok), ks[i].begin() + static_cast<std::ptrdiff_t>((done[i] + m) * tok));
        vb.insert(vb.end(), vs[i].begin() + static_cast<std::ptrdiff_t>(done[i] * tok), vs[i].begin() + static_cast<std::ptrdiff_t>((done[i] + m) * tok));
        done[i] += m;
      }
      const std::int64_t total = static_cast<std::int64_t>(kb.size() / tok);
      batched.append(layer, ids, counts, test::view(kb, total, c.num_kv_heads, c.head_dim), test::view(vb, total, c.num_kv_heads, c.head_dim));
    }
  }
  const std::vector<std::int64_t> q_lens{3, 1, 4};
  const auto q = test::normal_tokens<T>(8, c.num_q_heads, c.head_dim, 70);
  for (int layer = 0; layer < c.num_layers; ++layer) {
    std::vector<float> out(8 * qtok, NAN);
    batched.attend(layer, ids, q_lens, test::view(q, 8, c.num_q_heads, c.head_dim), test::view(out, 8, c.num_q_heads, c.head_dim), 0.2f);
    std::size_t row = 0;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      SpectralCache<T> alone(c);
      alone.add_sequence(ids[i]);
      alone.append(layer, ids[i], test::view(ks[i], lens[i], c.num_kv_heads, c.head_dim), test::view(vs[i], lens[i], c.num_kv_heads, c.head_dim));
      std::vector<float> want(static_cast<std::size_t>(q_lens[i]) * qtok, NAN);
      alone.attend(layer, ids[i], TensorView<const T>{q.data() + row * qtok, q_lens[i], c.num_q_heads, c.head_dim},
                   TensorView<float>{want.data(), q_lens[i], c.num_q_heads, c.head_dim}, 0.2f);
      const std::vector<float> got(out.begin() + static_cast<std::ptrdiff_t>(row * qtok),
                                   out.begin() + static_cast<std::ptrdiff_t>((row + static_cast<std::size_t>(q_lens[i])) * qtok));
      EXPECT_EQ(got, want) << "sequence " << ids[i] << " layer " << layer;
      row += static_cast<std::size_t>(q_lens[i]);
    }
  }
}

TYPED_TEST(Cache, RemovingASequenceFreesItsBlocks) {
  using T = TypeParam;
  const CacheConfig c = config(0);
  SpectralCache<T> cache(c);
  // Distinct data per sequence (and for K and V), so that blocks written over another sequence's show.
  auto tokens = [&](std::uint32_t seed) { return test::normal_tokens<T>(300, c.num_kv_heads, c.head_dim, seed); };
  auto append_all = [&](SequenceId id) {
    const auto k = tokens(80 + 2 * static_cast<std::uint32_t>(id));
    const auto v = tokens(81 + 2 * static_cast<std::uint32_t>(id));
    for (int l = 0; l < c.num_layers; ++l)
      cache.append(l, id, test::view(k, 300, c.num_kv_heads, c.head_dim), test::view(v, 300, c.num_kv_heads, c.head_dim));
  };
  for (SequenceId id : {1, 2}) {
    cache.add_sequence(id);
    append_all(id);
  }
  const std::int64_t per_seq = (300 - c.hot_tokens) / c.block_size;
  EXPECT_EQ(cache.blocks_in_use(0), 2 * per_seq);
  const auto kept = cache.state(2, 1);
  const std::vector<std::int32_t> kept_blocks(kept.blocks, kept.blocks + kept.num_blocks);
  std::vector<std::uint8_t> kept_bytes;
  for (std::int32_t b : kept_blocks) {
    const auto* p = cache.pool(1) + b * cache.layout(1).block_bytes;
    kept_bytes.insert(kept_bytes.end(), p, p + cache.layout(1).block_bytes);
  }
  cache.remove_sequence(1);
  for (int l = 0; l < c.num_layers; ++l) EXPECT_EQ(cache.blocks_in_use(l), per_seq);
  // The freed blocks are reused before the pool grows, and sequence 2 keeps all its data.
  const std::int64_t pool_before = cache.pool_blocks(0);
  cache.add_sequence(3);
  append_all(3);
  EXPECT_EQ(cache.pool_blocks(0), pool_before);
  std::vector<std::uint8_t> after;
  for (std::int32_t b : kept_blocks) {
    const auto* p = cache.pool(1) + b * cache.layout(1).block_bytes;
    after.insert(after.end(), p, p + cache.layout(1).block_bytes);
  }
  EXPECT_EQ(after, kept_bytes);
  cache.remove_sequence(2);
  cache.remove_sequence(3);
  for (int l = 0; l < c.num_layers; ++l) EXPECT_EQ(cache.blocks_in_use(l), 0);
  const MemoryStats m = cache.memory_stats();
  EXPECT_EQ(m.total_bytes(), 0);
  EXPECT_GT(m.pool_bytes, 0);
}

TEST(CacheStats, CountsEveryTierAndTheRatio) {
  CacheConfig c;
  c.num_layers = 2;
  c.num_q_heads = 32;
  c.num_kv_heads = 8;
  c.head_dim = 128;
  c.block_size = 512;
  c.hot_tokens = 64;
  c.sink_tokens = 4;
  SpectralCache<Half> cache(c);
  cache.add_sequence(0);
  const std::int64_t n = 4 + 3 * 512 + 100;
  const auto k = test::low_rank_tokens<Half>(n, 8, 128, 8, 90);
  cache.append(0, 0, test::view(k, n, 8, 128), test::view(k, n, 8, 128));
  const MemoryStats m = cache.memory_stats();
  const std::int64_t tok_bytes = 2 * 8 * 128 * 2;
  EXPECT_EQ(m.sink_tokens, 4);
  EXPECT_EQ(m.cold_tokens, 3 * 512);
  EXPECT_EQ(m.tail_tokens, 100);
  EXPECT_EQ(m.cold_blocks, 3);
  EXPECT_EQ(m.sink_bytes, 4 * tok_bytes);
  EXPECT_EQ(m.tail_bytes, 100 * tok_bytes);
  EXPECT_EQ(m.cold_bytes, 3 * cache.layout(0).block_bytes);
  EXPECT_EQ(m.dense_equivalent_bytes, n * tok_bytes);
  // K16/V32 at D = 128, L = 512: 48 B of coefficients + 24 B of bases + scales per token and head,
  // about 73 B against 512 B dense (the design's 7.1×), before the dense sink and tail.
  // Per head: bases 2·(16 + 32)·128 = 12288 B, scales 4·(16 + 32) = 192 B, coefficients 512·(16 + 32) =
  // 24576 B, each section on 16 bytes, the head on 128: 37120 B, 72.5 B per token.
  EXPECT_EQ(cache.layout(0).head_bytes, 37120);
  EXPECT_EQ(cache.layout(0).block_bytes, 8 * 37120);
  EXPECT_DOUBLE_EQ(m.compression_ratio(), static_cast<double>(n * tok_bytes) / static_cast<double>(m.total_bytes()));
  EXPECT_GT(m.compression_ratio(), 4.0);
}

// --- errors ------------------------------------------------------------------------------------------

/// Runs `f`, expects exception E whose message mentions every one of `needles`, and checks that the
/// cache is byte-for-byte what it was.
template <class E, class T>
void expect_rejected(SpectralCache<T>& cache, const std::function<void()>& f, const std::vector<std::string>& needles) {
  const auto before = test::snapshot(cache);
  try {
    f();
    ADD_FAILURE() << "no exception";
  } catch (const E& e) {
    for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what() << " lacks " << n;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
  }
  EXPECT_EQ(test::snapshot(cache), before);
}

TEST(CacheCapacity, AnAppendThatFillsThePoolExactlyIsAccepted) {
  const CacheConfig c = config(2);
  SpectralCache<Half> cache(c, CacheOptions{3});
  const int kv = c.num_kv_heads, d = c.head_dim;
  cache.add_sequence(1);
  cache.add_sequence(2);
  EXPECT_TRUE(cache.contains(2));
  EXPECT_FALSE(cache.contains(3));
  EXPECT_EQ(cache.sequences(), (std::vector<SequenceId>{1, 2}));
  // Sequence 1: 2 sinks + 2 blocks of 32 + a tail of 8..39 -> 2 blocks; sequence 2: 1 block. 3 of 3.
  const auto k = test::normal_tokens<Half>(2 + 2 * 32 + 20, kv, d, 5);
  cache.append(0, 1, test::view(k, 2 + 2 * 32 + 20, kv, d), test::view(k, 2 + 2 * 32 + 20, kv, d));
  cache.append(0, 2, test::view(k, 2 + 32 + 8, kv, d), test::view(k, 2 + 32 + 8, kv, d));
  EXPECT_EQ(cache.blocks_in_use(0), 3);
  // Another block in sequence 2 would be a fourth.
  EXPECT_THROW(cache.append(0, 2, test::view(k, 32, kv, d), test::view(k, 32, kv, d)), CapacityError);
  cache.remove_sequence(1);
  EXPECT_EQ(cache.sequences(), (std::vector<SequenceId>{2}));
  EXPECT_THROW(SpectralCache<Half>(c, CacheOptions{-1}), InvalidArgument);
}

TEST(CacheErrors, ConfigNamesTheBadField) {
  auto expect_bad = [](CacheConfig c, const std::string& field, const std::string& value) {
    try {
      SpectralCache<Half> cache(c);
      ADD_FAILURE() << "accepted " << field;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find(field + " = " + value), std::string::npos) << e.what();
    }
  };
  CacheConfig c = config();
  c.layer_ranks.clear();
  c.default_ranks = {40, 8};  // > min(block_size 32, head_dim 32)
  expect_bad(c, "default_ranks.key", "40");
  c = config();
  c.layer_ranks[1].value = 33;
  expect_bad(c, "layer_ranks[1].value", "33");
  c = config();
  c.num_q_heads = 7;
  expect_bad(c, "num_q_heads", "7");
  for (int bad : {0, -3}) {
    c = config();
    c.block_size = bad;
    expect_bad(c, "block_size", std::to_string(bad));
    c = config();
    c.head_dim = bad;
    expect_bad(c, "head_dim", std::to_string(bad));
    c = config();
    c.num_layers = bad;
    expect_bad(c, "num_layers", std::to_string(bad));
    c = config();
    c.num_kv_heads = bad;
    expect_bad(c, "num_kv_heads", std::to_string(bad));
  }
  c = config();
  c.hot_tokens = -1;
  expect_bad(c, "hot_tokens", "-1");
  c = config();
  c.sink_tokens = -2;
  expect_bad(c, "sink_tokens", "-2");
  c = config();
  c.layer_ranks.pop_back();
  expect_bad(c, "layer_ranks.size()", "2");
  c = config();
  c.layer_ranks[0].key = 0;
  expect_bad(c, "layer_ranks[0].key", "0");
  // Upper bounds: sizes derived from the config must not wrap.
  c = config();
  c.hot_tokens = std::numeric_limits<int>::max();  // "never compress" is not expressible this way
  expect_bad(c, "hot_tokens + block_size + sink_tokens", std::to_string(std::int64_t{c.hot_tokens} + c.block_size + c.sink_tokens));
  c = config();
  c.sink_tokens = std::numeric_limits<int>::max() - c.block_size;
  expect_bad(c, "hot_tokens + block_size + sink_tokens", std::to_string(std::int64_t{c.hot_tokens} + c.block_size + c.sink_tokens));
  c = config();
  c.block_size = (1 << 24) + 1;
  expect_bad(c, "block_size", std::to_string(c.block_size));
  c = config();
  c.head_dim = (1 << 16) + 1;
  expect_bad(c, "head_dim", std::to_string(c.head_dim));
  c = config();
  c.num_kv_heads = c.num_q_heads = (1 << 16) + 1;
  expect_bad(c, "num_kv_heads", std::to_string(c.num_kv_heads));
  // Each field within its bound, but a block of 2^24 tokens at rank 64 takes 2^31 bytes of coefficients
  // per section: more than the 32-bit offsets inside a block allow.
  c = config();
  c.layer_ranks.clear();
  c.block_size = 1 << 24;
  c.head_dim = 64;
  c.default_ranks = {64, 64};
  expect_bad(c, "cold block bytes", std::to_string(ColdBlockLayout::make(1 << 24, 64, 2, 64, 64, false).block_bytes));
}

TEST(CacheLayout, SectionsAreAlignedOrderedAndDisjoint) {
  for (int L : {1, 7, 64, 512}) {
    for (int D : {8, 64, 96, 128}) {
      for (int rk : {1, 3, 8, 16}) {
        for (int rv : {1, 5, 32}) {
          for (bool mean : {false, true}) {
            if (rk > std::min(L, D) || rv > std::min(L, D)) continue;
            const ColdBlockLayout l = ColdBlockLayout::make(L, D, 3, rk, rv, mean);
            SCOPED_TRACE(detail::concat("L=", L, " D=", D, " ranks ", rk, "/", rv, " mean ", mean));
            const std::int64_t start[] = {l.basis_k, l.basis_v, l.mean_k, l.mean_v, l.scale_k, l.scale_v, l.coeff_k, l.coeff_v};
            const std::int64_t size[] = {2LL * rk * D, 2LL * rv * D, mean ? 2LL * D : 0, mean ? 2LL * D : 0,
                                         4LL * rk, 4LL * rv, 1LL * L * rk, 1LL * L * rv};
            EXPECT_EQ(start[0], 0);
            std::int64_t payload = 0;
            for (int i = 0; i < 8; ++i) {
              EXPECT_EQ(start[i] % ColdBlockLayout::kSectionAlign, 0) << "section " << i;
              if (i > 0) {
                EXPECT_GE(start[i], start[i - 1] + size[i - 1]) << "section " << i << " overlaps";
              }
              payload += size[i];
            }
            EXPECT_LE(start[7] + size[7], l.head_bytes);
            EXPECT_LT(l.head_bytes - (start[7] + size[7]), ColdBlockLayout::kHeadAlign);
            EXPECT_EQ(l.head_bytes % ColdBlockLayout::kHeadAlign, 0);
            EXPECT_EQ(l.block_bytes, 3 * l.head_bytes);
            EXPECT_EQ(l.payload_bytes_per_head(), payload);
          }
        }
      }
    }
  }
}

TEST(CacheErrors, RanksOfALayerOutsideTheModelAreRejected) {
  CacheConfig c = config();
  for (int layer : {-7, c.num_layers}) {
    for (bool per_layer : {true, false}) {
      CacheConfig cc = c;
      if (!per_layer) cc.layer_ranks.clear();
      try {
        (void)cc.ranks(layer);
        ADD_FAILURE() << "accepted layer " << layer;
      } catch (const InvalidArgument& e) {
        EXPECT_NE(std::string(e.what()).find("layer = " + std::to_string(layer)), std::string::npos) << e.what();
      }
    }
  }
  EXPECT_EQ(c.ranks(1).value, c.layer_ranks[1].value);
  // An invalid config (fewer per-layer ranks than layers) is not read past its end.
  c.layer_ranks.resize(1);
  EXPECT_THROW((void)c.ranks(2), InvalidArgument);
}

TEST(CacheErrors, BadCallsThrowAndLeaveTheCacheUnchanged) {
  const CacheConfig c = config(2);
  SpectralCache<Half> cache(c, CacheOptions{6});
  const int kv = c.num_kv_heads, d = c.head_dim, qh = c.num_q_heads;
  auto k = test::normal_tokens<Half>(120, kv, d, 100);
  const auto v = test::normal_tokens<Half>(120, kv, d, 101);
  cache.add_sequence(1);
  cache.add_sequence(2);
  cache.append(0, 1, test::view(k, 60, kv, d), test::view(v, 60, kv, d));
  const auto q = test::normal_tokens<Half>(2, qh, d, 102);
  std::vector<float> out(2 * static_cast<std::size_t>(qh) * d, NAN);
  const auto kview = test::view(k, 10, kv, d);
  const auto vview = test::view(v, 10, kv, d);

  expect_rejected<SequenceError>(cache, [&] { cache.add_sequence(1); }, {"id = 1", "already"});
  expect_rejected<SequenceError>(cache, [&] { cache.append(0, 5, kview, vview); }, {"ids[0] = 5", "unknown"});
  expect_rejected<SequenceError>(cache, [&] { cache.remove_sequence(5); }, {"id = 5"});
  expect_rejected<SequenceError>(cache, [&] { (void)cache.length(5, 0); }, {"id = 5"});
  expect_rejected<SequenceError>(cache, [&] { cache.append(0, {1, 1}, {5, 5}, test::view(k, 10, kv, d), test::view(v, 10, kv, d)); },
                                 {"ids[1] = 1", "twice"});
  for (int layer : {-1, 3}) {
    const std::string needle = "layer = " + std::to_string(layer);
    expect_rejected<InvalidArgument>(cache, [&] { cache.append(layer, 1, kview, vview); }, {needle});
    expect_rejected<InvalidArgument>(cache, [&] { cache.attend(layer, 1, test::view(q, 1, qh, d), test::view(out, 1, qh, d), 1.0f); }, {needle});
    expect_rejected<InvalidArgument>(cache, [&] { (void)cache.length(1, layer); }, {needle});
  }
  expect_rejected<ShapeError>(cache, [&] { cache.append(0, 1, TensorView<const Half>{k.data(), 10, kv + 1, d}, vview); },
                              {"argument k", "[10, 3, 32]", "expected shape [10, 2, 32]"});
  expect_rejected<ShapeError>(cache, [&] { cache.append(0, 1, kview, TensorView<const Half>{v.data(), 9, kv, d}); }, {"argument v"});
  expect_rejected<ShapeError>(cache, [&] { cache.append(0, {1, 2}, {4, 5}, kview, vview); }, {"argument k", "expected shape [9, 2, 32]"});
  expect_rejected<InvalidArgument>(cache, [&] { cache.append(0, {1, 2}, {12, -2}, kview, vview); }, {"counts[1] = -2"});
  expect_rejected<InvalidArgument>(cache, [&] { cache.append(0, {1, 2}, {10}, kview, vview); }, {"counts.size() = 1"});
  // Counts whose sum wraps to a small number must not pass the shape check.
  constexpr std::int64_t kHuge = std::int64_t{1} << 62;
  expect_rejected<InvalidArgument>(cache, [&] { cache.append(0, {1, 2}, {kHuge, kHuge}, kview, vview); },
                                   {"counts[1] = " + std::to_string(kHuge), "overflows"});
  // A view whose byte count wraps is rejected before its (null) data is read.
  expect_rejected<ShapeError>(cache, [&] {
    cache.append(0, {1}, {kHuge}, TensorView<const Half>{nullptr, kHuge, kv, d}, TensorView<const Half>{nullptr, kHuge, kv, d});
  }, {"argument k", "64-bit"});
  expect_rejected<ShapeError>(cache, [&] { cache.attend(0, 1, TensorView<const Half>{q.data(), 1, qh, d - 1}, test::view(out, 1, qh, d), 1.0f); },
                              {"argument q"});
  expect_rejected<ShapeError>(cache, [&] { cache.attend(0, 1, test::view(q, 1, qh, d), TensorView<float>{out.data(), 2, qh, d}, 1.0f); },
                              {"argument out"});
  expect_rejected<InvalidArgument>(cache, [&] { cache.attend(0, 2, test::view(q, 1, qh, d), test::view(out, 1, qh, d), 1.0f); },
                                   {"ids[0] = 2", "empty sequence"});
  expect_rejected<InvalidArgument>(cache, [&] { cache.attend(1, 1, test::view(q, 1, qh, d), test::view(out, 1, qh, d), 1.0f); },
                                   {"empty sequence"});
  expect_rejected<InvalidArgument>(cache, [&] { cache.attend(0, {1}, {61}, test::view(q, 1, qh, d), test::view(out, 1, qh, d), 1.0f); },
                                   {"q_lens[0] = 61"});
  expect_rejected<InvalidArgument>(cache, [&] { cache.attend(0, 1, test::view(q, 1, qh, d), test::view(out, 1, qh, d), NAN); },
                                   {"scale = nan"});
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    const Half saved = k[3 * kv * d + d + 5];
    k[3 * kv * d + d + 5] = Half(bad);  // token 3, head 1, channel 5
    expect_rejected<NonFiniteError>(cache, [&] { cache.append(0, 1, kview, vview); }, {"argument k[3][1][5] = "});
    expect_rejected<NonFiniteError>(cache, [&] { cache.append(0, 1, vview, kview); }, {"argument v[3][1][5] = "});
    k[3 * kv * d + d + 5] = saved;
  }
  // Capacity: 6 blocks per layer. Sequence 2 wants 7 after this append; nothing of it may land,
  // not even the tokens that would have stayed dense.
  const auto big_k = test::normal_tokens<Half>(2 + 7 * 32 + 8, kv, d, 103);
  expect_rejected<CapacityError>(cache, [&] {
    cache.append(0, 2, test::view(big_k, 2 + 7 * 32 + 8, kv, d), test::view(big_k, 2 + 7 * 32 + 8, kv, d));
  }, {"max_blocks_per_layer = 6"});
  // A query with NaN or Inf is rejected too (the softmax would spread it over the output).
  {
    auto bad = q;
    bad[static_cast<std::size_t>(d) + 3] = Half(std::numeric_limits<float>::infinity());  // head 1, channel 3
    const auto& bad_q = bad;
    expect_rejected<NonFiniteError>(cache, [&] { cache.attend(0, 1, test::view(bad_q, 1, qh, d), test::view(out, 1, qh, d), 1.0f); },
                                    {"argument q[0][1][3] = "});
    expect_rejected<NonFiniteError>(cache, [&] { (void)cache.logits(0, 1, test::view(bad_q, 1, qh, d), 1.0f); },
                                    {"argument q[0][1][3] = "});
  }
  // And the cache still works after all of that.
  cache.attend(0, 1, test::view(q, 1, qh, d), test::view(out, 1, qh, d), 0.2f);
  for (std::size_t i = 0; i < static_cast<std::size_t>(qh) * d; ++i) ASSERT_TRUE(std::isfinite(out[i]));
}

}  // namespace
}  // namespace spectralkv
