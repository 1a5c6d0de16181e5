// GPU decode attention against the CPU reference.
//
// DecodeAttention: a SpectralCache<T> is built on the CPU (real SVD compression of low-rank-plus-noise
// tokens), its pool bytes, block tables and dense tiers are uploaded as they are, and the kernel's output
// is compared with SpectralCache::attend (q_len = 1, double accumulation). Every type, head_dim and
// (rank_k, rank_v) pair runs, each with its own random shape: ragged batch, lengths that are no multiple
// of the block, a sequence with no cold block, one with only cold blocks (tail as short as the policy
// allows), group sizes 1..16, two layers with swapped ranks; sinks and mean-centering on or off, each of the
// four settings on four rank pairs of every type and head_dim.
// DenseDecodeAttention is compared with dense_attend_one, DecompressThenAttend with attend().
//
// Tolerance: |gpu - ref| <= 2e-3 * max|ref| over the head's output row + half an ulp of T at |ref|.
// The kernels accumulate in FP32; their tensor-core operands are exact (INT8 coefficients, as 1152 + c,
// FP16 bases, the query) or split into FP16 high + low halves (~2^-22 relative); the softmax weights
// enter the P·V products rounded to FP16 (2^-11 relative, averaging out over tokens), as in every
// flash-attention kernel; the coefficient bias comes back out in FP32 (~2^-19 of a score). That leaves
// errors of 1e-5 to a few 1e-4 of the row's scale (the most with flat attention over zero-mean values),
// under the 2e-3 budget (SPECTRALKV_PRINT_ERRORS=1 prints each comparison's worst); the output itself is
// stored in T, whose rounding (half an ulp: 2^-11 relative for FP16, 2^-8 for BF16) comes on top.
// Outputs are poisoned with NaN bytes before each launch, so an unwritten element fails.

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "../test_util.hpp"
#include "late_writer.cuh"
#include "spectralkv/cuda/decode_attention.cuh"
#include "spectralkv/cuda/error.cuh"
#include "spectralkv/cuda/multi_query_attention.cuh"
#include "spectralkv/spectralkv.hpp"

namespace {

using namespace spectralkv;
namespace skc = spectralkv::cuda;

class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t bytes) : bytes_(bytes) {
    skc::check(cudaMalloc(&ptr_, bytes > 0 ? bytes : 16), "cudaMalloc");
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { cudaFree(ptr_); }
  void* get() const { return ptr_; }
  std::size_t bytes() const { return bytes_; }
  template <class U>
  U* as() const {
    return static_cast<U*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

template <class U>
std::unique_ptr<DeviceBuffer> upload(const U* data, std::size_t count) {
  auto b = std::make_unique<DeviceBuffer>(count * sizeof(U));
  if (count > 0) skc::check(cudaMemcpy(b->get(), data, count * sizeof(U), cudaMemcpyHostToDevice), "cudaMemcpy");
  return b;
}
template <class U>
std::unique_ptr<DeviceBuffer> upload(const std::vector<U>& v) {
  return upload(v.data(), v.size());
}
template <class U>
std::vector<U> download(const DeviceBuffer& b, std::size_t count) {
  std::vector<U> v(count);
  skc::check(cudaMemcpy(v.data(), b.get(), count * sizeof(U), cudaMemcpyDeviceToHost), "cudaMemcpy");
  return v;
}

template <class T>
skc::DataType dtype_of() {
  return std::is_same_v<T, BFloat16> ? skc::DataType::kBFloat16 : skc::DataType::kHalf;
}

/// Half an ulp of T at magnitude x: the rounding of the stored output.
template <class T>
double half_ulp(double x) {
  const int mantissa = std::is_same_v<T, BFloat16> ? 7 : 10;
  const double min_normal = std::is_same_v<T, BFloat16> ? std::ldexp(1.0, -126) : std::ldexp(1.0, -14);
  const double a = std::max(std::fabs(x), min_normal);
  return 0.5 * std::ldexp(1.0, static_cast<int>(std::floor(std::log2(a))) - mantissa);
}

/// Compares [rows][dim] outputs; returns the number of mismatches (NaN counts as one) and reports a few.
template <class T>
int compare(const std::vector<float>& ref, const std::vector<T>& got, std::int64_t rows, int dim, double rel,
            const std::string& what) {
  int bad = 0;
  double worst = 0.0;  // largest |gpu - cpu| beyond T's half ulp, over the row's scale
  for (std::int64_t r = 0; r < rows; ++r) {
    double scale = 0.0;
    for (int d = 0; d < dim; ++d) scale = std::max(scale, std::fabs(static_cast<double>(ref[r * dim + d])));
    for (int d = 0; d < dim; ++d) {
      const double want = ref[r * dim + d];
      const double have = to_float(got[r * dim + d]);
      const double tol = rel * scale + half_ulp<T>(want);
      if (scale > 0.0) worst = std::max(worst, (std::fabs(have - want) - half_ulp<T>(want)) / scale);
      if (!(std::fabs(have - want) <= tol)) {
        if (++bad <= 5)
          ADD_FAILURE() << what << ": row " << r << " dim " << d << ": gpu " << have << " vs cpu " << want
                        << " (tolerance " << tol << ")";
      }
    }
  }
  // SPECTRALKV_PRINT_ERRORS=1 prints each comparison's worst error, to see how far below the budget it is.
  if (const char* env = std::getenv("SPECTRALKV_PRINT_ERRORS"); env != nullptr && env[0] == '1')
    std::printf("[ error    ] %s: worst (|gpu - cpu| - half ulp) / row scale = %.3g\n", what.c_str(), worst);
  return bad;
}

/// One layer of a CPU cache, uploaded byte for byte, with DecodeAttentionParams pointing at it.
struct UploadedLayer {
  std::unique_ptr<DeviceBuffer> pool, table, offsets, dense, ptrs, lens;
  skc::DecodeAttentionParams params{};
  std::vector<std::int64_t> cold, sink, tail;  // per sequence, for bytes_moved
};

template <class T>
UploadedLayer upload_layer(const SpectralCache<T>& cache, int layer, const std::vector<SequenceId>& ids) {
  const CacheConfig& cfg = cache.config();
  const ColdBlockLayout& lay = cache.layout(layer);
  const int batch = static_cast<int>(ids.size());
  const std::size_t row = static_cast<std::size_t>(cfg.num_kv_heads) * cfg.head_dim;
  UploadedLayer u;
  u.pool = upload(cache.pool(layer), static_cast<std::size_t>(cache.pool_blocks(layer) * lay.block_bytes));
  std::vector<std::int32_t> table, offsets{0};
  std::vector<T> dense;
  std::vector<std::size_t> at(4 * static_cast<std::size_t>(batch));  // element offsets: sink k, sink v, tail k, tail v
  std::vector<std::int32_t> lens(2 * static_cast<std::size_t>(batch));
  for (int b = 0; b < batch; ++b) {
    const auto s = cache.state(ids[static_cast<std::size_t>(b)], layer);
    table.insert(table.end(), s.blocks, s.blocks + s.num_blocks);
    offsets.push_back(static_cast<std::int32_t>(table.size()));
    const T* parts[4] = {s.sink_k, s.sink_v, s.tail_k, s.tail_v};
    const std::int64_t n[4] = {s.sink_len, s.sink_len, s.tail_len, s.tail_len};
    for (int p = 0; p < 4; ++p) {
      at[static_cast<std::size_t>(p * batch + b)] = dense.size();
      dense.insert(dense.end(), parts[p], parts[p] + n[p] * static_cast<std::int64_t>(row));
    }
    lens[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(s.sink_len);
    lens[static_cast<std::size_t>(batch + b)] = static_cast<std::int32_t>(s.tail_len);
    u.cold.push_back(s.num_blocks);
    u.sink.push_back(s.sink_len);
    u.tail.push_back(s.tail_len);
  }
  if (table.empty()) table.push_back(0);
  u.table = upload(table);
  u.offsets = upload(offsets);
  u.dense = upload(dense);
  std::vector<const void*> ptrs(at.size());
  for (std::size_t i = 0; i < at.size(); ++i) ptrs[i] = u.dense->as<T>() + at[i];
  u.ptrs = upload(ptrs);
  u.lens = upload(lens);

  skc::DecodeAttentionParams& p = u.params;
  p.dtype = dtype_of<T>();
  p.batch = batch;
  p.num_q_heads = cfg.num_q_heads;
  p.layout = lay;
  p.pool = u.pool->as<std::uint8_t>();
  p.block_table = u.table->as<std::int32_t>();
  p.block_table_offsets = u.offsets->as<std::int32_t>();
  const void* const* pa = u.ptrs->as<const void*>();
  p.sink = {pa, pa + batch, u.lens->as<std::int32_t>()};
  p.tail = {pa + 2 * batch, pa + 3 * batch, u.lens->as<std::int32_t>() + batch};
  return u;
}

struct Combo {
  bool bf16;
  int head_dim, rank_k, rank_v;
};

std::vector<Combo> all_combos() {
  std::vector<Combo> c;
  for (bool bf16 : {false, true})
    for (int d : {64, 128})
      for (int rk : {8, 16, 32, 64})
        for (int rv : {8, 16, 32, 64}) c.push_back({bf16, d, rk, rv});
  return c;
}

std::string combo_name(const ::testing::TestParamInfo<Combo>& info) {
  const Combo& c = info.param;
  return detail::concat(c.bf16 ? "bf16" : "f16", "_d", c.head_dim, "_k", c.rank_k, "_v", c.rank_v);
}

/// Runs DecodeAttention on one uploaded layer and returns the output (poisoned first).
template <class T>
std::vector<T> run_decode(skc::DecodeAttentionParams p, const std::vector<T>& q, std::size_t out_elems) {
  auto dq = upload(q);
  DeviceBuffer out(out_elems * sizeof(T));
  skc::check(cudaMemset(out.get(), 0xFF, out.bytes()), "cudaMemset(poison)");
  p.q = dq->get();
  p.out = out.get();
  const skc::Status st = skc::DecodeAttention::can_implement(p);
  EXPECT_TRUE(st.ok) << st.message;
  DeviceBuffer ws(skc::DecodeAttention::get_workspace_size(p));
  skc::DecodeAttention::initialize_workspace(p, ws.get(), nullptr);
  skc::DecodeAttention::run(p, ws.get(), ws.bytes(), nullptr);
  skc::check(cudaDeviceSynchronize(), "DecodeAttention");
  std::vector<T> first = download<T>(out, out_elems);
  // Again with the same workspace: the split-merge counters must have been left at zero, and the result
  // must not depend on the run (no races, fixed merge order).
  skc::check(cudaMemset(out.get(), 0xFF, out.bytes()), "cudaMemset(poison)");
  skc::DecodeAttention::run(p, ws.get(), ws.bytes(), nullptr);
  skc::check(cudaDeviceSynchronize(), "DecodeAttention (second run)");
  std::vector<T> second = download<T>(out, out_elems);
  EXPECT_EQ(0, std::memcmp(first.data(), second.data(), first.size() * sizeof(T))) << "second run differs";
  return first;
}

template <class T>
void spectral_case(const Combo& c, std::uint32_t seed) {
  std::mt19937 rng(seed);
  auto pick = [&rng](std::initializer_list<int> xs) { return *(xs.begin() + rng() % xs.size()); };
  CacheConfig cfg;
  cfg.num_layers = 2;
  cfg.num_kv_heads = pick({1, 2, 3});
  cfg.num_q_heads = cfg.num_kv_heads * pick({1, 2, 3, 4, 8, 16});
  cfg.head_dim = c.head_dim;
  const int max_rank = std::max(c.rank_k, c.rank_v);
  cfg.block_size = max_rank + pick({0, 8, 24});
  cfg.hot_tokens = pick({0, 3, 16});
  // Sinks and mean-centring by the rank pair's indices (i, j in 0..3), so that every type and head_dim
  // runs each of the four settings on four of its sixteen rank pairs, and the two types differ per pair.
  const int i = __builtin_ctz(static_cast<unsigned>(c.rank_k / 8)), j = __builtin_ctz(static_cast<unsigned>(c.rank_v / 8));
  const bool sinks = (((i ^ j) & 1) != 0) != c.bf16;
  cfg.sink_tokens = sinks ? pick({1, 4}) : 0;
  cfg.mean_center = (((i >> 1) ^ j) & 1) != 0;
  cfg.layer_ranks = {{c.rank_v, c.rank_k}, {c.rank_k, c.rank_v}};  // per-layer ranks, chosen per call
  SpectralCache<T> cache(cfg);

  const int L = cfg.block_size, hot = cfg.hot_tokens, sink = cfg.sink_tokens;
  const std::vector<std::int64_t> lengths = {
      1 + static_cast<std::int64_t>(rng() % 5),           // sinks / tail only
      sink + hot + L - 1,                                   // one token short of the first cold block
      sink + hot + 2LL * L,                                 // cold blocks and the shortest tail the policy allows
      sink + hot + 3LL * L + 1 + static_cast<std::int64_t>(rng() % (L - 1 > 0 ? L - 1 : 1)),  // ragged
  };
  std::vector<SequenceId> ids;
  for (std::size_t i = 0; i < lengths.size(); ++i) {
    const SequenceId id = static_cast<SequenceId>(10 + i);
    ids.push_back(id);
    cache.add_sequence(id);
    const auto k = test::low_rank_tokens<T>(lengths[i], cfg.num_kv_heads, cfg.head_dim, 6, seed * 31 + 2 * i);
    const auto v = test::low_rank_tokens<T>(lengths[i], cfg.num_kv_heads, cfg.head_dim, 6, seed * 31 + 2 * i + 1);
    for (int layer = 0; layer < cfg.num_layers; ++layer)
      cache.append(layer, id, test::view(k, lengths[i], cfg.num_kv_heads, cfg.head_dim),
                   test::view(v, lengths[i], cfg.num_kv_heads, cfg.head_dim));
  }
  if (hot == 0) {
    ASSERT_EQ(cache.state(ids[2], 1).tail_len, 0) << "the policy leaves no tail here: only cold blocks";
  }
  ASSERT_EQ(cache.state(ids[1], 1).num_blocks, 0);

  const auto batch = static_cast<std::int64_t>(ids.size());
  const auto q = test::normal_tokens<T>(batch, cfg.num_q_heads, cfg.head_dim, seed + 77);
  const float scale = 1.0f / std::sqrt(static_cast<float>(cfg.head_dim));
  const std::size_t out_elems = static_cast<std::size_t>(batch) * cfg.num_q_heads * cfg.head_dim;
  for (int layer = 0; layer < cfg.num_layers; ++layer) {
    std::vector<float> ref(out_elems);
    cache.attend(layer, ids, std::vector<std::int64_t>(ids.size(), 1), test::view(q, batch, cfg.num_q_heads, cfg.head_dim),
                 test::view(ref, batch, cfg.num_q_heads, cfg.head_dim), scale);
    UploadedLayer u = upload_layer(cache, layer, ids);
    u.params.scale = scale;
    const std::vector<T> got = run_decode(u.params, q, out_elems);
    const std::string what = detail::concat("layer ", layer, " (H=", cfg.num_kv_heads, " g=", cfg.group_size(),
                                            " L=", L, " hot=", hot, " sink=", sink, " mean=", cfg.mean_center, ")");
    EXPECT_EQ(0, compare(ref, got, batch * cfg.num_q_heads, cfg.head_dim, 2e-3, what));
  }
}

class SpectralDecodeTest : public ::testing::TestWithParam<Combo> {
 protected:
  void SetUp() override {
    if (!skc::device_available()) GTEST_SKIP() << "no CUDA device present";
  }
};

TEST_P(SpectralDecodeTest, MatchesCpuAttend) {
  const Combo c = GetParam();
  const std::uint32_t seed = static_cast<std::uint32_t>(c.head_dim * 1000 + c.rank_k * 10 + c.rank_v + (c.bf16 ? 7 : 0));
  if (c.bf16) {
    spectral_case<BFloat16>(c, seed);
  } else {
    spectral_case<Half>(c, seed);
  }
}

INSTANTIATE_TEST_SUITE_P(AllShapes, SpectralDecodeTest, ::testing::ValuesIn(all_combos()), combo_name);

/// One layer, head_dim 128, ranks (rank_k, rank_v) for every block: the fixed shapes of the tests below.
CacheConfig config_d128(int q_heads, int kv_heads, int block_size, int hot, int sinks, int rank_k, int rank_v) {
  CacheConfig cfg;
  cfg.num_q_heads = q_heads;
  cfg.num_kv_heads = kv_heads;
  cfg.head_dim = 128;
  cfg.block_size = block_size;
  cfg.hot_tokens = hot;
  cfg.sink_tokens = sinks;
  cfg.default_ranks = {rank_k, rank_v};
  return cfg;
}

/// Adds sequences 0, 1, ... with low-rank (rank 6) K and V of the given lengths to layer 0; with
/// `zero_mean_values`, V is i.i.d. normal instead.
std::vector<SequenceId> fill_low_rank(SpectralCache<Half>& cache, const std::vector<std::int64_t>& lengths,
                                      int kv_heads, std::uint32_t seed, bool zero_mean_values = false) {
  std::vector<SequenceId> ids;
  for (std::size_t i = 0; i < lengths.size(); ++i) {
    ids.push_back(static_cast<SequenceId>(i));
    cache.add_sequence(ids.back());
    const auto s = seed + 2 * static_cast<std::uint32_t>(i);
    const auto k = test::low_rank_tokens<Half>(lengths[i], kv_heads, 128, 6, s);
    const auto v = zero_mean_values ? test::normal_tokens<Half>(lengths[i], kv_heads, 128, s + 1)
                                    : test::low_rank_tokens<Half>(lengths[i], kv_heads, 128, 6, s + 1);
    cache.append(0, ids.back(), test::view(k, lengths[i], kv_heads, 128), test::view(v, lengths[i], kv_heads, 128));
  }
  return ids;
}

/// Long sequences: each CTA processes several items of one (sequence, head) and segments cross from
/// one (sequence, head) to the next, so the multi-item pipeline and partial merges both run.
TEST(SpectralDecode, LongSequencesManyItemsPerCta) {
  if (!skc::device_available()) GTEST_SKIP() << "no CUDA device present";
  SpectralCache<Half> cache(config_d128(8, 2, 32, 8, 2, 16, 32));
  const std::vector<SequenceId> ids = fill_low_rank(cache, {3001, 1700, 2222}, 2, 500);
  const auto q = test::normal_tokens<Half>(3, 8, 128, 9);
  std::vector<float> ref(3 * 8 * 128);
  cache.attend(0, ids, {1, 1, 1}, test::view(q, 3, 8, 128), test::view(ref, 3, 8, 128), 0.0884f);
  UploadedLayer u = upload_layer(cache, 0, ids);
  u.params.scale = 0.0884f;
  const auto got = run_decode(u.params, q, ref.size());
  EXPECT_EQ(0, compare(ref, got, 3 * 8, 128, 2e-3, "long sequences"));
}

/// Nearly uniform attention (a tiny score scale) over long sequences of zero-mean values, at the benchmark's
/// block shape (512 tokens, K16/V32, groups of 4): the output is ~1/sqrt(T) of the values' scale, the regime
/// where FP32 rounding of large sums weighs most against the output's own magnitude, e.g. the cold path's
/// P·(1152 + C) before its bias 1152·Σp is taken out (a block's Σp is then ~512).
TEST(SpectralDecode, DiffuseAttentionOverLongContext) {
  if (!skc::device_available()) GTEST_SKIP() << "no CUDA device present";
  const std::vector<std::int64_t> lengths = {6000, 2900};
  for (bool mean : {false, true}) {
    CacheConfig cfg = config_d128(8, 2, 512, 64, 0, 16, 32);
    cfg.mean_center = mean;
    SpectralCache<Half> cache(cfg);
    const std::vector<SequenceId> ids = fill_low_rank(cache, lengths, 2, 1300, true);
    const auto q = test::normal_tokens<Half>(2, 8, 128, 1399);
    constexpr float kScale = 1e-3f;  // scores within ~±0.05: every weight within a few % of the others
    std::vector<float> ref(2 * 8 * 128);
    cache.attend(0, ids, {1, 1}, test::view(q, 2, 8, 128), test::view(ref, 2, 8, 128), kScale);
    UploadedLayer u = upload_layer(cache, 0, ids);
    u.params.scale = kScale;
    const auto got = run_decode(u.params, q, ref.size());
    EXPECT_EQ(0, compare(ref, got, 2 * 8, 128, 2e-3, mean ? "diffuse attention, mean-centred" : "diffuse attention"));
  }
}

/// The cold-block code is compiled twice: for groups of at most 8 query heads (rows 8..15 of the MMA tiles are
/// padding) and for larger groups. Every rank_v path (8: byte loads; 16, 32, 64: transposed ldmatrix), with
/// and without mean-centring, for groups of 6 and 16 heads, against the CPU reference.
TEST(SpectralDecode, EveryRankVForSmallAndLargeGroups) {
  if (!skc::device_available()) GTEST_SKIP() << "no CUDA device present";
  std::uint32_t seed = 900;
  for (int group : {6, 16}) {
    for (int rank_v : {8, 16, 32, 64}) {
      for (bool mean : {false, true}) {
        CacheConfig cfg = config_d128(2 * group, 2, 64, 8, 1, 16, rank_v);
        cfg.mean_center = mean;
        SpectralCache<Half> cache(cfg);
        const std::vector<SequenceId> ids = fill_low_rank(cache, {300, 77}, 2, seed);
        const auto q = test::normal_tokens<Half>(2, 2 * group, 128, seed + 7);
        std::vector<float> ref(static_cast<std::size_t>(2 * 2 * group * 128));
        cache.attend(0, ids, {1, 1}, test::view(q, 2, 2 * group, 128), test::view(ref, 2, 2 * group, 128), 0.0884f);
        UploadedLayer u = upload_layer(cache, 0, ids);
        u.params.scale = 0.0884f;
        const auto got = run_decode(u.params, q, ref.size());
        EXPECT_EQ(0, compare(ref, got, 2 * 2 * group, 128, 2e-3,
                             detail::concat("g=", group, " rank_v=", rank_v, " mean=", mean)));
        seed += 10;
      }
    }
  }
}

/// Many (sequence, head) pairs next to the number of CTAs (48 pairs: at least a quarter of the SMs of any GPU
/// with up to 192), so the split merge runs inside the attention kernel: the last CTA of a pair merges its
/// partials. One sequence is long enough that its pairs span dozens of CTAs (merged in rounds of eight), the
/// others span one to five. The tests with few pairs above and below take the merge kernel instead.
TEST(SpectralDecode, ManyPairsMergedInsideTheKernel) {
  if (!skc::device_available()) GTEST_SKIP() << "no CUDA device present";
  SpectralCache<Half> cache(config_d128(8, 4, 32, 8, 0, 16, 32));
  const std::vector<std::int64_t> lengths = {1300, 150, 170, 90, 200, 133, 64, 177, 99, 120, 143, 111};
  const int batch = static_cast<int>(lengths.size());
  const std::vector<SequenceId> ids = fill_low_rank(cache, lengths, 4, 2100);
  const auto q = test::normal_tokens<Half>(batch, 8, 128, 2177);
  std::vector<float> ref(static_cast<std::size_t>(batch) * 8 * 128);
  cache.attend(0, ids, std::vector<std::int64_t>(ids.size(), 1), test::view(q, batch, 8, 128),
               test::view(ref, batch, 8, 128), 0.0884f);
  UploadedLayer u = upload_layer(cache, 0, ids);
  u.params.scale = 0.0884f;
  const auto got = run_decode(u.params, q, ref.size());
  EXPECT_EQ(0, compare(ref, got, batch * 8, 128, 2e-3, "many pairs, merged inside the kernel"));
}

/// Sequences enough that the (sequence, head) pairs reach a quarter of the SMs, whatever the GPU: with at most
/// two CTAs per SM the plan then merges the split partials inside the attention kernel (decode_host.cuh).
int sequences_for_many_pairs(int kv_heads) {
  int device = 0, sms = 0;
  skc::check(cudaGetDevice(&device), "cudaGetDevice");
  skc::check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  return (sms / 4 + kv_heads) / kv_heads;
}

/// Sequences of the given lengths (low-rank K and V) in one layer of `cfg`, attended on the GPU and compared
/// with the CPU reference.
template <class T>
void low_rank_case(const CacheConfig& cfg, const std::vector<std::int64_t>& lengths, std::uint32_t seed,
                   const std::string& what) {
  SpectralCache<T> cache(cfg);
  const int heads = cfg.num_kv_heads, dim = cfg.head_dim;
  std::vector<SequenceId> ids;
  for (std::size_t i = 0; i < lengths.size(); ++i) {
    ids.push_back(static_cast<SequenceId>(i));
    cache.add_sequence(ids.back());
    const auto k = test::low_rank_tokens<T>(lengths[i], heads, dim, 6, seed + 2 * static_cast<std::uint32_t>(i));
    const auto v = test::low_rank_tokens<T>(lengths[i], heads, dim, 6, seed + 2 * static_cast<std::uint32_t>(i) + 1);
    cache.append(0, ids.back(), test::view(k, lengths[i], heads, dim), test::view(v, lengths[i], heads, dim));
  }
  const auto batch = static_cast<std::int64_t>(ids.size());
  const auto q = test::normal_tokens<T>(batch, cfg.num_q_heads, dim, seed + 999);
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  std::vector<float> ref(static_cast<std::size_t>(batch) * cfg.num_q_heads * dim);
  cache.attend(0, ids, std::vector<std::int64_t>(ids.size(), 1), test::view(q, batch, cfg.num_q_heads, dim),
               test::view(ref, batch, cfg.num_q_heads, dim), scale);
  UploadedLayer u = upload_layer(cache, 0, ids);
  u.params.scale = scale;
  const auto got = run_decode(u.params, q, ref.size());
  EXPECT_EQ(0, compare(ref, got, batch * cfg.num_q_heads, dim, 2e-3, what));
}

/// The merge inside the attention kernel in the shapes the test above does not take there, and under both cuts
/// of the work list (sharing_ctas in the kernel: equal shares over the whole grid, or over pairs·⌊grid/pairs⌋
/// CTAs, which with equal item counts gives every (sequence, head) the same number of CTAs):
/// - BF16 at head_dim 64 with groups of 16 (the cold-block code for groups above 8), sinks and mean-centring,
///   one sequence much longer than the others: the whole grid, more items than CTAs;
/// - FP16 at head_dim 128, groups of 4, three sets of lengths (the cuts named are those of a 132-SM GPU; the
///   lengths keep the item counts in the same relation to the CTAs on other GPUs): one sequence with 18 items
///   and the others with 2, fewer items than CTAs in all (the whole grid, each item its own CTA); every
///   sequence with 2 items (CTAs per pair, fewer items than CTAs); every sequence with 9 items (CTAs per pair,
///   one or two items per CTA); and with four times as many sequences of 2 items, more pairs than half the
///   CTAs (one CTA per pair, nothing to merge).
TEST(SpectralDecode, ManyPairsMergedInsideTheKernelEveryPath) {
  if (!skc::device_available()) GTEST_SKIP() << "no CUDA device present";
  {
    CacheConfig cfg = config_d128(32, 2, 64, 8, 4, 16, 32);
    cfg.head_dim = 64;
    cfg.mean_center = true;
    const int n = sequences_for_many_pairs(cfg.num_kv_heads);
    std::vector<std::int64_t> lengths(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) lengths[static_cast<std::size_t>(i)] = i == 1 ? 9000 : 70 + 37 * (i % 7);
    low_rank_case<BFloat16>(cfg, lengths, 3100, "bf16, head_dim 64, groups of 16, one long sequence");
  }
  const CacheConfig cfg = config_d128(16, 4, 128, 16, 0, 16, 32);
  // Items per pair: (length - 16) / 128 cold blocks, then the tail's 64-token chunks (the tail keeps 16 to 143
  // tokens): 1 + 1, 7 + 2 and 15 + 3.
  const std::int64_t two_items = 145, nine_items = 1012, eighteen_items = 2050;
  std::uint32_t seed = 3300;
  for (int pattern = 0; pattern < 4; ++pattern) {
    const int n = (pattern == 3 ? 4 : 1) * sequences_for_many_pairs(cfg.num_kv_heads);
    std::vector<std::int64_t> lengths(static_cast<std::size_t>(n));
    for (int i = 0; i < n; ++i) {
      const std::int64_t jitter = 3 * (i % 5);  // ragged lengths, same item counts
      lengths[static_cast<std::size_t>(i)] =
          (pattern == 2 ? nine_items : pattern == 0 && i == 2 ? eighteen_items : two_items) + jitter;
    }
    const char* what[4] = {"f16, head_dim 128, one sequence of 18 items, the rest of 2",
                           "f16, head_dim 128, 2 items per pair", "f16, head_dim 128, 9 items per pair",
                           "f16, head_dim 128, 2 items per pair, one CTA per pair"};
    low_rank_case<Half>(cfg, lengths, seed, what[pattern]);
    seed += 100;
  }
}

/// Few pairs (the merge kernel) whose count does not divide the grid: 5 pairs on a 264-CTA grid (132 SMs) share
/// 260 CTAs, 52 per pair, and the merge kernel must find the partials of that cut, not of the whole grid's. With
/// 20 items per pair each item has its own CTA; with 100, each CTA holds one or two.
TEST(SpectralDecode, FewPairsNotDividingTheGrid) {
  if (!skc::device_available()) GTEST_SKIP() << "no CUDA device present";
  const CacheConfig cfg = config_d128(4, 1, 32, 8, 0, 8, 16);
  // (length - 8) / 32 cold blocks and one tail chunk (the tail keeps 8 to 39 tokens): 19 + 1 and 99 + 1 items.
  for (const std::int64_t base : {628, 3188}) {
    std::vector<std::int64_t> lengths(5);
    for (int i = 0; i < 5; ++i) lengths[static_cast<std::size_t>(i)] = base + i;
    low_rank_case<Half>(cfg, lengths, static_cast<std::uint32_t>(base),
                        base == 628 ? "5 pairs of 20 items" : "5 pairs of 100 items");
  }
}

/// One sequence and one KV head with more items than the grid has CTAs: the (sequence, head) is split over
/// every CTA, and the merge kernel combines hundreds of partials.
TEST(SpectralDecode, OneSequenceSpansEveryCta) {
  if (!skc::device_available()) GTEST_SKIP() << "no CUDA device present";
  SpectralCache<Half> cache(config_d128(4, 1, 16, 8, 0, 8, 16));
  const std::int64_t length = 16 * 700 + 37;  // 700 cold blocks: more items than any grid of this kernel
  const SequenceId id = 3;
  cache.add_sequence(id);
  const auto k = test::low_rank_tokens<Half>(length, 1, 128, 6, 700);
  const auto v = test::low_rank_tokens<Half>(length, 1, 128, 6, 701);
  cache.append(0, id, test::view(k, length, 1, 128), test::view(v, length, 1, 128));
  const auto q = test::normal_tokens<Half>(1, 4, 128, 17);
  std::vector<float> ref(4 * 128);
  cache.attend(0, {id}, {1}, test::view(q, 1, 4, 128), test::view(ref, 1, 4, 128), 0.0884f);
  UploadedLayer u = upload_layer(cache, 0, {id});
  u.params.scale = 0.0884f;
  const auto got = run_decode(u.params, q, ref.size());
  EXPECT_EQ(0, compare(ref, got, 4, 128, 2e-3, "one sequence over every CTA"));
}

// ---- Dense kernel ----------------------------------------------------------------------------------------

const char* head_major_name(skc::KvLayout layout) { return layout == skc::KvLayout::kHeadMajor ? " head-major" : ""; }

template <class T>
void dense_case(int head_dim, int group, skc::KvLayout layout, std::uint32_t seed) {
  const int batch = 6, heads = 2, q_heads = heads * group;
  const std::int64_t max_len = 700;
  const std::vector<std::int32_t> lens = {1, 63, 64, 65, 700, 0};  // 0: empty sequence, output is zero
  const auto k = test::normal_tokens<T>(batch * max_len, heads, head_dim, seed);
  const auto v = test::normal_tokens<T>(batch * max_len, heads, head_dim, seed + 1);
  const auto q = test::normal_tokens<T>(batch, q_heads, head_dim, seed + 2);
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  const std::size_t row = static_cast<std::size_t>(heads) * head_dim;
  std::vector<float> ref(static_cast<std::size_t>(batch) * q_heads * head_dim, 0.0f), qf(static_cast<std::size_t>(head_dim));
  for (int b = 0; b < batch; ++b) {
    if (lens[static_cast<std::size_t>(b)] == 0) continue;
    for (int h = 0; h < q_heads; ++h) {
      for (int d = 0; d < head_dim; ++d) qf[static_cast<std::size_t>(d)] = to_float(q[(static_cast<std::size_t>(b) * q_heads + h) * head_dim + d]);
      // The same arrays read in either order: token-major rows are num_kv_heads * head_dim apart, head-major
      // rows head_dim apart inside a contiguous run of max_len tokens per (sequence, head).
      const bool head_major = layout == skc::KvLayout::kHeadMajor;
      const std::size_t kvh = static_cast<std::size_t>(h / group);
      const std::size_t base = head_major ? (static_cast<std::size_t>(b) * heads + kvh) * max_len * head_dim
                                          : static_cast<std::size_t>(b) * max_len * row + kvh * head_dim;
      const std::int64_t stride = head_major ? head_dim : static_cast<std::int64_t>(row);
      dense_attend_one(k.data() + base, v.data() + base, stride, lens[static_cast<std::size_t>(b)] - 1,
                       qf.data(), head_dim, scale, ref.data() + (static_cast<std::size_t>(b) * q_heads + h) * head_dim);
    }
  }
  auto dk = upload(k), dv = upload(v), dq = upload(q), dl = upload(lens);
  DeviceBuffer out(ref.size() * sizeof(T));
  skc::check(cudaMemset(out.get(), 0xFF, out.bytes()), "cudaMemset(poison)");
  skc::DenseDecodeParams p;
  p.dtype = dtype_of<T>();
  p.batch = batch;
  p.num_q_heads = q_heads;
  p.num_kv_heads = heads;
  p.head_dim = head_dim;
  p.scale = scale;
  p.q = dq->get();
  p.out = out.get();
  p.k = dk->get();
  p.v = dv->get();
  p.layout = layout;
  p.max_len = max_len;
  p.seq_lens = dl->as<std::int32_t>();
  const skc::Status st = skc::DenseDecodeAttention::can_implement(p);
  ASSERT_TRUE(st.ok) << st.message;
  DeviceBuffer ws(skc::DenseDecodeAttention::get_workspace_size(p));
  skc::DenseDecodeAttention::initialize_workspace(p, ws.get(), nullptr);
  skc::DenseDecodeAttention::run(p, ws.get(), ws.bytes(), nullptr);
  skc::check(cudaDeviceSynchronize(), "DenseDecodeAttention");
  const auto got = download<T>(out, ref.size());
  EXPECT_EQ(0, compare(ref, got, static_cast<std::int64_t>(batch) * q_heads, head_dim, 2e-3,
                       detail::concat("dense d", head_dim, " g", group, head_major_name(layout))));
}

TEST(DenseDecode, MatchesCpuDense) {
  if (!skc::device_available()) GTEST_SKIP() << "no CUDA device present";
  std::uint32_t seed = 1;
  for (skc::KvLayout layout : {skc::KvLayout::kTokenMajor, skc::KvLayout::kHeadMajor}) {
    for (int d : {64, 128}) {
      for (int g : {1, 4, 16}) {
        dense_case<Half>(d, g, layout, seed++);
        dense_case<BFloat16>(d, g, layout, seed++);
      }
    }
  }
}

// ---- Decompress then attend --------------------------------------------------------------------------------

TEST(DecompressThenAttend, MatchesCpuAttend) {
  if (!skc::device_available()) GTEST_SKIP() << "no CUDA device present";
  for (bool mean : {false, true}) {
    CacheConfig cfg = config_d128(8, 2, 48, 8, 3, 16, 32);
    cfg.mean_center = mean;
    SpectralCache<Half> cache(cfg);
    const std::vector<SequenceId> ids = fill_low_rank(cache, {5, 300, 170}, 2, 900);
    const auto q = test::normal_tokens<Half>(3, 8, 128, 13);
    std::vector<float> ref(3 * 8 * 128);
    cache.attend(0, ids, {1, 1, 1}, test::view(q, 3, 8, 128), test::view(ref, 3, 8, 128), 0.0884f);
    UploadedLayer u = upload_layer(cache, 0, ids);
    u.params.scale = 0.0884f;
    auto dq = upload(q);
    DeviceBuffer out(ref.size() * 2);
    skc::check(cudaMemset(out.get(), 0xFF, out.bytes()), "cudaMemset(poison)");
    u.params.q = dq->get();
    u.params.out = out.get();
    skc::DecompressParams p{u.params, 0};
    for (auto n : u.cold) p.max_cold_blocks = std::max(p.max_cold_blocks, n);
    skc::DecompressThenAttend op;
    DeviceBuffer ws(skc::DecompressThenAttend::get_workspace_size(p));
    skc::DecompressThenAttend::initialize_workspace(p, ws.get(), nullptr);
    op.run(p, ws.get(), ws.bytes(), nullptr);
    skc::check(cudaDeviceSynchronize(), "DecompressThenAttend");
    const auto got = download<Half>(out, ref.size());
    // The rebuilt K and V and the dequantised coefficients are stored in FP16 (2^-11 relative each), and
    // logits of size ~5 turn that into ~3e-3 relative changes of the weights: 1e-2 bounds it.
    EXPECT_EQ(0, compare(ref, got, 3 * 8, 128, 1e-2, detail::concat("decompress mean=", mean)));
    if (!mean) {
      // The rebuild is FP16 only, and its sizes must stay within the workspace's arithmetic.
      skc::DecompressParams bad = p;
      bad.attention.dtype = skc::DataType::kBFloat16;
      const skc::Status st = skc::DecompressThenAttend::can_implement(bad);
      EXPECT_FALSE(st.ok);
      EXPECT_NE(st.message.find("argument attention.dtype = "), std::string::npos) << st.message;
      bad = p;
      bad.max_cold_blocks = std::int64_t{1} << 40;
      EXPECT_NE(skc::DecompressThenAttend::can_implement(bad).message.find("argument max_cold_blocks = "), std::string::npos);
      EXPECT_THROW((void)skc::DecompressThenAttend::get_workspace_size(bad), InvalidArgument);
    }
  }
}

// Batch 0 is a valid call that launches nothing; a sequence with no sink tier passes null lengths (the tier
// is absent, not empty) and must give the same output as zero lengths; an empty sequence gets zeros.
TEST(SpectralDecode, EmptyBatchAndAbsentTier) {
  if (!skc::device_available()) GTEST_SKIP() << "no CUDA device present";
  CacheConfig cfg = config_d128(8, 2, 48, 8, 0, 16, 32);
  SpectralCache<Half> cache(cfg);
  const std::vector<SequenceId> ids = fill_low_rank(cache, {5, 300, 170}, 2, 910);
  const auto q = test::normal_tokens<Half>(3, 8, 128, 14);
  UploadedLayer u = upload_layer(cache, 0, ids);
  u.params.scale = 0.0884f;
  const std::vector<Half> with_lengths = run_decode(u.params, q, q.size());
  skc::DecodeAttentionParams absent = u.params;
  absent.sink = skc::DenseTier{};
  const std::vector<Half> without = run_decode(absent, q, q.size());
  EXPECT_EQ(0, std::memcmp(with_lengths.data(), without.data(), with_lengths.size() * sizeof(Half)));
  std::vector<float> ref(q.size());
  cache.attend(0, ids, {1, 1, 1}, test::view(q, 3, 8, 128), test::view(ref, 3, 8, 128), 0.0884f);
  EXPECT_EQ(0, compare(ref, without, 3 * 8, 128, 2e-3, "absent sink tier"));

  // A sequence with no token in any tier: its rows are zeros, the others are unchanged in substance.
  cache.add_sequence(3);
  const std::vector<SequenceId> ids4 = {ids[0], ids[1], 3, ids[2]};
  UploadedLayer u4 = upload_layer(cache, 0, ids4);
  u4.params.scale = 0.0884f;
  const auto q4 = test::normal_tokens<Half>(4, 8, 128, 14);
  const std::vector<Half> got4 = run_decode(u4.params, q4, q4.size());
  for (std::size_t i = 2 * 8 * 128; i < 3 * 8 * 128; ++i) ASSERT_EQ(got4[i].bits, 0u) << "element " << i;
  std::vector<float> ref4(q4.size(), 0.0f);
  const std::vector<SequenceId> nonempty = {ids[0], ids[1], ids[2]};
  std::vector<Half> q3_rows;
  for (int row : {0, 1, 3}) q3_rows.insert(q3_rows.end(), q4.begin() + row * 8 * 128, q4.begin() + (row + 1) * 8 * 128);
  const std::vector<Half>& q3 = q3_rows;
  std::vector<float> ref3(q3.size());
  cache.attend(0, nonempty, {1, 1, 1}, test::view(q3, 3, 8, 128), test::view(ref3, 3, 8, 128), 0.0884f);
  std::copy(ref3.begin(), ref3.begin() + 2 * 8 * 128, ref4.begin());
  std::copy(ref3.begin() + 2 * 8 * 128, ref3.end(), ref4.begin() + 3 * 8 * 128);
  EXPECT_EQ(0, compare(ref4, got4, 4 * 8, 128, 2e-3, "with an empty sequence"));

  skc::DecodeAttentionParams none = u.params;
  none.batch = 0;
  ASSERT_TRUE(skc::DecodeAttention::can_implement(none).ok) << skc::DecodeAttention::can_implement(none).message;
  const std::size_t ws = skc::DecodeAttention::get_workspace_size(none);
  EXPECT_EQ(ws, 0u);
  skc::DecodeAttention::run(none, nullptr, 0, nullptr);
  skc::check(cudaDeviceSynchronize(), "DecodeAttention (batch 0)");
}

/// The attention grids are launched as programmatic dependents of the work before them on the stream: they
/// must read nothing (queries, lengths; the merge kernel reads the lengths too) before that work is done.
/// The query and the lengths hold other values until a kernel that triggers its dependents at once writes
/// them 2 ms later; read early, the zero lengths would drop the sinks and tails and the query would differ.
TEST(SpectralDecode, WaitsForTheKernelThatWritesItsInputs) {
  if (!skc::device_available()) GTEST_SKIP() << "no CUDA device present";
  CacheConfig cfg = config_d128(8, 2, 48, 8, 4, 16, 32);
  SpectralCache<Half> cache(cfg);
  const std::vector<SequenceId> ids = fill_low_rank(cache, {5, 300, 2000}, 2, 920);  // few pairs: the merge kernel runs
  const auto q = test::normal_tokens<Half>(3, 8, 128, 15);
  std::vector<float> ref(q.size());
  cache.attend(0, ids, {1, 1, 1}, test::view(q, 3, 8, 128), test::view(ref, 3, 8, 128), 0.0884f);

  UploadedLayer u = upload_layer(cache, 0, ids);
  u.params.scale = 0.0884f;
  // Once in order first: the kernels' module is then loaded, so the call below launches within the 2 ms.
  EXPECT_EQ(0, compare(ref, run_decode(u.params, q, q.size()), 3 * 8, 128, 2e-3, "inputs written before the call"));
  const std::vector<std::int32_t> lens = download<std::int32_t>(*u.lens, 6);
  ASSERT_GT(lens[5], 0);
  const auto q_src = upload(q);
  const auto lens_src = upload(lens);
  const auto dq = upload(test::normal_tokens<Half>(3, 8, 128, 16));  // another query until the writer runs
  cudaStream_t stream;
  skc::check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  skc::check(cudaMemsetAsync(u.lens->get(), 0, u.lens->bytes(), stream), "cudaMemset(lengths)");
  DeviceBuffer out(q.size() * sizeof(Half));
  skc::check(cudaMemsetAsync(out.get(), 0xFF, out.bytes(), stream), "cudaMemset(poison)");
  u.params.q = dq->get();
  u.params.out = out.get();
  DeviceBuffer ws(skc::DecodeAttention::get_workspace_size(u.params));
  skc::DecodeAttention::initialize_workspace(u.params, ws.get(), stream);
  test::late_writer<<<1, 256, 0, stream>>>(
      test::LateCopy{dq->as<std::uint32_t>(), q_src->as<std::uint32_t>(), static_cast<int>(q.size() / 2)},
      test::LateCopy{u.lens->as<std::uint32_t>(), lens_src->as<std::uint32_t>(), 6}, 2000000);
  skc::check(cudaGetLastError(), "late_writer");
  skc::DecodeAttention::run(u.params, ws.get(), ws.bytes(), stream);
  skc::check(cudaStreamSynchronize(stream), "DecodeAttention after late_writer");
  skc::check(cudaStreamDestroy(stream), "cudaStreamDestroy");
  EXPECT_EQ(0, compare(ref, download<Half>(out, q.size()), 3 * 8, 128, 2e-3, "inputs written by the kernel before"));
}

// ---- Argument checks -----------------------------------------------------------------------------------

/// Expects `bad` to fail can_implement and run with a message naming `argument <name> = `. run gets whatever
/// else it needs (a large enough workspace), so what throws is its own argument check.
template <class Op, class P, class Run>
void expect_named(const P& bad, const std::string& name, Run run) {
  const std::string needle = "argument " + name + " = ";
  const skc::Status st = Op::can_implement(bad);
  EXPECT_FALSE(st.ok) << name;
  EXPECT_NE(st.message.find(needle), std::string::npos) << st.message;
  try {
    run(bad);
    ADD_FAILURE() << "run accepted " << name;
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

// MultiQueryAttention (the unfused kernel for q_len > 1) against SpectralCache::attend with the same q_lens
// (causal by absolute position) on the uploaded cache. Every step is FP32 (scores, exponentials by __expf,
// accumulation over ≤ 1.5K tokens): budget 1e-5 of the row's scale, as for FP32 accumulation (measured on an
// H200: at most 9.2e-7), plus half an ulp of T for the stored output.
struct MqaShape {
  int head_dim, rank_k, rank_v, kv_heads, group, sinks;
  bool mean;
};

template <class T>
void multi_query_case(const MqaShape& m, std::uint32_t seed) {
  CacheConfig cfg;
  cfg.num_layers = 1;
  cfg.num_kv_heads = m.kv_heads;
  cfg.num_q_heads = m.kv_heads * m.group;
  cfg.head_dim = m.head_dim;
  cfg.block_size = 64;
  cfg.hot_tokens = 8;
  cfg.sink_tokens = m.sinks;
  cfg.mean_center = m.mean;
  cfg.default_ranks = {m.rank_k, m.rank_v};
  SpectralCache<T> cache(cfg);
  // Lengths: sinks and tail only; one block; several blocks and a ragged tail. q_lens reach into the sinks
  // (the first), across block boundaries and back into cold blocks (the last two).
  const std::vector<std::int64_t> lengths = {5, m.sinks + 8 + 64 + 3, m.sinks + 8 + 5 * 64 + 37};
  const std::vector<std::int64_t> q_lens = {5, 40, 150};
  std::vector<SequenceId> ids;
  for (std::size_t i = 0; i < lengths.size(); ++i) {
    const SequenceId id = static_cast<SequenceId>(i + 1);
    ids.push_back(id);
    cache.add_sequence(id);
    const auto k = test::low_rank_tokens<T>(lengths[i], cfg.num_kv_heads, cfg.head_dim, 6, seed + 2 * static_cast<std::uint32_t>(i));
    const auto v = test::low_rank_tokens<T>(lengths[i], cfg.num_kv_heads, cfg.head_dim, 6, seed + 2 * static_cast<std::uint32_t>(i) + 1);
    cache.append(0, id, test::view(k, lengths[i], cfg.num_kv_heads, cfg.head_dim), test::view(v, lengths[i], cfg.num_kv_heads, cfg.head_dim));
  }
  ASSERT_GT(cache.state(ids[2], 0).num_blocks, 3);
  std::int64_t rows = 0;
  std::vector<std::int32_t> q_offsets{0}, row_sequence;
  for (std::size_t i = 0; i < ids.size(); ++i) {
    rows += q_lens[i];
    q_offsets.push_back(static_cast<std::int32_t>(rows));
    for (std::int64_t r = 0; r < q_lens[i]; ++r) row_sequence.push_back(static_cast<std::int32_t>(i));
  }
  const auto q = test::normal_tokens<T>(rows, cfg.num_q_heads, cfg.head_dim, seed + 99);
  const float scale = 1.0f / std::sqrt(static_cast<float>(cfg.head_dim));
  const std::size_t out_elems = static_cast<std::size_t>(rows) * cfg.num_q_heads * cfg.head_dim;
  std::vector<float> ref(out_elems);
  cache.attend(0, ids, q_lens, test::view(q, rows, cfg.num_q_heads, cfg.head_dim), test::view(ref, rows, cfg.num_q_heads, cfg.head_dim), scale);

  UploadedLayer u = upload_layer(cache, 0, ids);
  auto dq = upload(q);
  auto doff = upload(q_offsets);
  auto drow = upload(row_sequence);
  DeviceBuffer out(out_elems * sizeof(T));
  skc::check(cudaMemset(out.get(), 0xFF, out.bytes()), "cudaMemset(poison)");
  skc::MultiQueryParams p;
  p.dtype = dtype_of<T>();
  p.batch = static_cast<int>(ids.size());
  p.num_q_heads = cfg.num_q_heads;
  p.total_rows = static_cast<int>(rows);
  p.layout = u.params.layout;
  p.scale = scale;
  p.q = dq->get();
  p.out = out.get();
  p.q_offsets = doff->as<std::int32_t>();
  p.row_sequence = drow->as<std::int32_t>();
  p.pool = u.params.pool;
  p.block_table = u.params.block_table;
  p.block_table_offsets = u.params.block_table_offsets;
  p.sink = u.params.sink;
  p.tail = u.params.tail;
  const skc::Status st = skc::MultiQueryAttention::can_implement(p);
  ASSERT_TRUE(st.ok) << st.message;
  skc::MultiQueryAttention::run(p, nullptr);
  skc::check(cudaDeviceSynchronize(), "MultiQueryAttention");
  const std::vector<T> got = download<T>(out, out_elems);
  const std::string what = detail::concat("d=", m.head_dim, " ranks ", m.rank_k, "/", m.rank_v, " H=", m.kv_heads,
                                          " g=", m.group, " sinks=", m.sinks, " mean=", m.mean);
  EXPECT_EQ(0, compare(ref, got, rows * cfg.num_q_heads, cfg.head_dim, 1e-5, what));
}

TEST(MultiQueryAttention, MatchesCpuAttend) {
  if (!skc::device_available()) GTEST_SKIP() << "no CUDA device present";
  // The kernel's limits (head_dim 128, rank 64, group 16) and shapes the fused decode kernel does not take
  // (head_dim 96, ranks 24 and 40).
  const MqaShape shapes[] = {{128, 64, 64, 2, 16, 4, true}, {64, 8, 32, 3, 3, 0, false}, {96, 24, 40, 1, 8, 2, true},
                             {128, 16, 32, 2, 4, 16, false}};
  std::uint32_t seed = 500;
  for (const MqaShape& m : shapes) {
    multi_query_case<Half>(m, seed++);
    multi_query_case<BFloat16>(m, seed++);
  }
}

TEST(MultiQueryAttention, NamesTheBadArgument) {
  skc::MultiQueryParams p;
  p.batch = 1;
  p.num_q_heads = 8;
  p.total_rows = 1;
  p.layout = ColdBlockLayout::make(64, 128, 2, 16, 32, false);
  p.scale = 0.1f;
  alignas(16) int dummy[4];
  p.q = p.out = dummy;
  p.q_offsets = p.row_sequence = dummy;
  EXPECT_TRUE(skc::MultiQueryAttention::can_implement(p).ok) << skc::MultiQueryAttention::can_implement(p).message;
  auto expect_bad = [](const skc::MultiQueryParams& bad, const std::string& name) {
    expect_named<skc::MultiQueryAttention>(bad, name,
                                           [](const skc::MultiQueryParams& q) { skc::MultiQueryAttention::run(q, nullptr); });
  };
  auto bad = p;
  bad.dtype = static_cast<skc::DataType>(9);
  expect_bad(bad, "dtype");
  bad = p;
  bad.layout.coeff_k += 16;
  expect_bad(bad, "layout");
  bad = p;
  bad.layout = ColdBlockLayout::make(64, 128, 2, 16, 72, false);
  expect_bad(bad, "layout.rank_v");
  bad = p;
  bad.q = reinterpret_cast<const char*>(dummy) + 1;
  expect_bad(bad, "q");
  bad = p;
  bad.num_q_heads = 2 * 17;
  expect_bad(bad, "num_q_heads");
  bad = p;
  std::int32_t offsets[2] = {0, 0};
  bad.block_table_offsets = offsets;
  bad.block_table = offsets;
  bad.pool = reinterpret_cast<const std::uint8_t*>(dummy) + 4;
  expect_bad(bad, "pool");
}

TEST(DecodeAttentionArguments, NamesTheBadArgument) {
  if (!skc::device_available()) GTEST_SKIP() << "no CUDA device present";
  skc::DecodeAttentionParams p;
  p.batch = 1;
  p.num_q_heads = 8;
  p.layout = ColdBlockLayout::make(64, 128, 2, 16, 32, false);
  p.scale = 0.1f;
  int dummy[4];
  p.q = dummy;
  p.out = dummy;
  EXPECT_TRUE(skc::DecodeAttention::can_implement(p).ok);

  // run() gets a workspace large enough for the valid shape, so what it throws comes from its argument check.
  const std::size_t need = skc::DecodeAttention::get_workspace_size(p);
  DeviceBuffer ws(need);
  auto expect_bad = [&ws](const skc::DecodeAttentionParams& bad, const std::string& name) {
    expect_named<skc::DecodeAttention>(bad, name, [&ws](const skc::DecodeAttentionParams& q) {
      skc::DecodeAttention::run(q, ws.get(), ws.bytes(), nullptr);
    });
  };
  auto bad = p;
  bad.dtype = static_cast<skc::DataType>(9);
  expect_bad(bad, "dtype");
  bad = p;
  // 2^25 tokens at rank 64: 2^31 bytes of value coefficients per head, beyond the kernel's 32-bit offsets.
  bad.layout = ColdBlockLayout::make(1 << 25, 128, 2, 64, 64, false);
  expect_bad(bad, "layout.block_size");
  bad = p;
  bad.layout = ColdBlockLayout::make(64, 128, 2, 12, 32, false);
  expect_bad(bad, "layout.rank_k");
  bad = p;
  bad.layout = ColdBlockLayout::make(64, 96, 2, 16, 32, false);
  expect_bad(bad, "layout.head_dim");
  bad = p;
  bad.num_q_heads = 2 * 17;
  expect_bad(bad, "num_q_heads");
  bad = p;
  bad.num_q_heads = 7;
  expect_bad(bad, "num_q_heads");
  bad = p;
  bad.layout.coeff_v += 16;
  expect_bad(bad, "layout");
  bad = p;
  bad.scale = NAN;
  expect_bad(bad, "scale");
  bad = p;
  bad.q = nullptr;
  expect_bad(bad, "q");
  bad = p;
  int32_t offsets[2] = {0, 0};
  bad.block_table_offsets = offsets;
  expect_bad(bad, "pool");
  bad = p;
  bad.tail.lengths = offsets;
  expect_bad(bad, "tail.k");
  // A workspace smaller than get_workspace_size() is refused before anything is launched.
  EXPECT_GT(need, 0u);
  try {
    skc::DecodeAttention::run(p, ws.get(), need - 1, nullptr);
    ADD_FAILURE() << "run accepted a short workspace";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("argument workspace_bytes = "), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(DenseDecodeArguments, NamesTheBadArgument) {
  if (!skc::device_available()) GTEST_SKIP() << "no CUDA device present";
  skc::DenseDecodeParams p;
  p.batch = 1;
  p.num_q_heads = 8;
  p.num_kv_heads = 2;
  p.head_dim = 128;
  p.scale = 0.1f;
  alignas(16) int dummy[8];
  p.q = dummy;
  p.out = dummy;
  p.k = dummy;
  p.v = dummy;
  p.max_len = 1;
  p.seq_lens = dummy;
  p.layout = skc::KvLayout::kHeadMajor;
  EXPECT_TRUE(skc::DenseDecodeAttention::can_implement(p).ok);

  DeviceBuffer ws(skc::DenseDecodeAttention::get_workspace_size(p));
  auto expect_bad = [&ws](const skc::DenseDecodeParams& bad, const std::string& name) {
    expect_named<skc::DenseDecodeAttention>(bad, name, [&ws](const skc::DenseDecodeParams& q) {
      skc::DenseDecodeAttention::run(q, ws.get(), ws.bytes(), nullptr);
    });
  };
  auto bad = p;
  bad.dtype = static_cast<skc::DataType>(9);
  expect_bad(bad, "dtype");
  bad = p;
  bad.max_len = std::int64_t{1} << 60;  // the strides of [max_len][2][128] per sequence would wrap
  expect_bad(bad, "max_len");
  bad = p;
  bad.layout = static_cast<skc::KvLayout>(7);
  expect_bad(bad, "layout");
  bad = p;
  bad.max_len = -1;
  expect_bad(bad, "max_len");
  bad = p;
  bad.head_dim = 96;
  expect_bad(bad, "head_dim");
  bad = p;
  bad.k = reinterpret_cast<const char*>(dummy) + 4;
  expect_bad(bad, "k");
}
