// DeviceSpectralCache against the CPU SpectralCache: one random scenario (joins and removals, prefill
// chunks and decode steps, ragged lengths) driven through both backends, outputs compared at every step;
// pool back to empty at the end; no device memory leaked; capacity errors leave every sequence intact.
//
// At every step:
//  - exact: the CPU attention (attention.hpp, double accumulation) over the GPU cache's own state,
//    downloaded (sink rows, dense rows, retired blocks' bytes). |gpu − ref| ≤ 2e-3·max|ref row| (decode
//    steps; 1e-5 for multi-query steps, whose kernel is FP32 throughout) + half an ulp of T: the kernels
//    accumulate in FP32 and round the output to T. This checks the kernels on identical stored values.
//  - the CPU SpectralCache fed the same tokens: the same lengths and block counts, sink and dense rows
//    bit-identical to each other and to the tokens appended, every cold block's reconstruction about as
//    close to its tokens as the CPU's; and the outputs as accurate as the CPU cache's against uncompressed
//    attention over every token (see run_scenario for the bounds). The two backends compress each block
//    independently, so their outputs differ by the INT8 rounding of two near-identical factorizations.

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <atomic>
#include <limits>
#include <string>
#include <map>
#include <memory>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "../test_util.hpp"
#include "late_writer.cuh"
#include "spectralkv/attention.hpp"
#include "spectralkv/cache.hpp"
#include "spectralkv/compress.hpp"
#include "spectralkv/cuda/device_cache.cuh"
#include "spectralkv/cuda/error.cuh"

namespace {

using namespace spectralkv;
namespace skc = spectralkv::cuda;

#define SKIP_WITHOUT_GPU() \
  if (!skc::device_available()) GTEST_SKIP() << "no CUDA device present"

template <class U>
struct DeviceArray {
  U* ptr = nullptr;
  explicit DeviceArray(std::size_t n) { skc::check(cudaMalloc(&ptr, std::max<std::size_t>(n, 1) * sizeof(U)), "cudaMalloc"); }
  ~DeviceArray() { cudaFree(ptr); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
};

/// Expects f to throw E with `needle` in its message.
template <class E, class F>
void expect_message(F f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "nothing thrown; expected " << needle;
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

CacheConfig scenario_config(int sinks, bool centre) {
  CacheConfig c;
  c.num_layers = 2;
  c.num_q_heads = 8;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.block_size = 64;
  c.hot_tokens = 16;
  c.sink_tokens = sinks;
  c.mean_center = centre;
  c.layer_ranks = {{16, 32}, {8, 16}};
  return c;
}

/// Steps of the random scenarios; SPECTRALKV_SCENARIO_STEPS scales them down for runs under
/// compute-sanitizer, which are two orders of magnitude slower.
int scenario_steps(int full) {
  const char* env = std::getenv("SPECTRALKV_SCENARIO_STEPS");
  return env ? std::max(1, std::min(full, std::atoi(env))) : full;
}

/// Options of a small cache that compresses each block as it fills.
skc::DeviceCacheOptions synchronous_options(int max_sequences, int max_blocks_per_layer, std::int64_t max_append_tokens) {
  skc::DeviceCacheOptions opt;
  opt.max_sequences = max_sequences;
  opt.max_blocks_per_layer = max_blocks_per_layer;
  opt.max_append_tokens = max_append_tokens;
  opt.compression = skc::CompressionMode::kSynchronous;
  return opt;
}

float half_ulp(float x, bool bf16) { return std::ldexp(std::fabs(x), bf16 ? -8 : -11); }

/// Runs task(i) for i in [0, n) on every core: the CPU references dominate the scenarios' run time.
template <class F>
void parallel_for(std::size_t n, F task) {
  const std::size_t workers = std::max<std::size_t>(1, std::min<std::size_t>(n, std::thread::hardware_concurrency()));
  std::atomic<std::size_t> next{0};
  std::vector<std::thread> pool;
  for (std::size_t w = 0; w < workers; ++w) {
    pool.emplace_back([&] {
      for (std::size_t i = next++; i < n; i = next++) task(i);
    });
  }
  for (auto& t : pool) t.join();
}

/// One sequence's rows of an attend call.
struct SequenceRows {
  SequenceId id;
  std::int64_t q_len;
  std::size_t first_row;  // token row of the call
};

/// CPU attention (double accumulation) of query row (sequence `sr`, token j, head h) over one stored
/// state: sinks and dense rows of T, cold blocks as stored bytes (`block(b)` → slab of block b).
template <class T, class BlockBytes>
void attend_stored(const CacheConfig& c, const ColdBlockLayout& lay, const T* sink_k, const T* sink_v, std::int64_t sink_len,
                   std::int64_t num_blocks, BlockBytes block, const T* dense_k, const T* dense_v, std::int64_t dense_len,
                   std::int64_t max_position, int kv_head, const float* q, float* out) {
  const int d = c.head_dim, kv = c.num_kv_heads;
  const std::vector<DenseRun<T>> before{{sink_k + kv_head * d, sink_v + kv_head * d, kv * d, sink_len, 0}};
  std::vector<CompressedRun<StoredFactorView, StoredFactorView>> blocks;
  for (std::int64_t b = 0; b < num_blocks; ++b) {
    const std::uint8_t* head = block(b) + kv_head * lay.head_bytes;
    blocks.push_back({StoredFactorView(lay, Part::kKey, head), StoredFactorView(lay, Part::kValue, head),
                      sink_len + b * c.block_size});
  }
  const std::vector<DenseRun<T>> after{
      {dense_k + kv_head * d, dense_v + kv_head * d, kv * d, dense_len, sink_len + num_blocks * c.block_size}};
  attend_one(before, blocks, after, q, d, 0.125f, max_position, out);
}

/// Relative Frobenius errors of cold-block reconstructions, worst block.
struct StateStats {
  double gpu_error = 0;  // max over blocks of ‖X̂_gpu − X‖ / ‖X‖
  double cpu_error = 0;  // the same for the CPU cache
};

/// The GPU cache's stored state of (id, layer) against the CPU cache's and against the tokens `x_k`,
/// `x_v` ([len][num_kv_heads][head_dim]) appended: the same block count, sink and dense rows
/// bit-identical to the tokens (both backends only copy them), and every cold block's reconstruction
/// (mean + C·B) compared with the tokens it was built from.
template <class T>
void compare_state(const SpectralCache<T>& cpu, const typename skc::DeviceSpectralCache<T>::HostLayerState& g, SequenceId id,
                   int layer, const std::vector<T>& x_k, const std::vector<T>& x_v, StateStats* stats) {
  const CacheConfig& c = cpu.config();
  const ColdBlockLayout& lay = cpu.layout(layer);
  const int d = c.head_dim, kv = c.num_kv_heads;
  const std::size_t row = static_cast<std::size_t>(kv) * d;
  const auto s = cpu.state(id, layer);
  ASSERT_EQ(static_cast<std::int64_t>(g.blocks.size()), s.num_blocks);
  for (const auto* rows : {&g.sink_k, &g.sink_v})
    ASSERT_EQ(static_cast<std::int64_t>(rows->size()), s.sink_len * static_cast<std::int64_t>(row));
  for (const auto* rows : {&g.dense_k, &g.dense_v})
    ASSERT_EQ(static_cast<std::int64_t>(rows->size()), s.tail_len * static_cast<std::int64_t>(row));
  const std::int64_t first_tail = s.sink_len + s.num_blocks * c.block_size;
  ASSERT_EQ(static_cast<std::int64_t>(x_k.size()), (first_tail + s.tail_len) * static_cast<std::int64_t>(row));
  const auto same_rows = [&](const std::vector<T>& got, const T* want, const std::vector<T>& x, std::int64_t first) {
    for (std::size_t e = 0; e < got.size(); ++e) {
      ASSERT_EQ(got[e].bits, want[e].bits) << "sequence " << id << " layer " << layer << " element " << e;
      ASSERT_EQ(got[e].bits, x[static_cast<std::size_t>(first) * row + e].bits) << "sequence " << id << " element " << e;
    }
  };
  same_rows(g.sink_k, s.sink_k, x_k, 0);
  same_rows(g.sink_v, s.sink_v, x_v, 0);
  same_rows(g.dense_k, s.tail_k, x_k, first_tail);
  same_rows(g.dense_v, s.tail_v, x_v, first_tail);
  for (std::int64_t b = 0; b < s.num_blocks; ++b) {
    const std::uint8_t* gb = g.block_bytes.data() + static_cast<std::size_t>(b) * lay.block_bytes;
    const std::uint8_t* cb = cpu.pool(layer) + static_cast<std::size_t>(s.blocks[b]) * lay.block_bytes;
    for (int h = 0; h < kv; ++h) {
      for (Part part : {Part::kKey, Part::kValue}) {
        const std::vector<T>& x = part == Part::kKey ? x_k : x_v;
        const auto rg = reconstruct(StoredFactorView(lay, part, gb + h * lay.head_bytes));
        const auto rc = reconstruct(StoredFactorView(lay, part, cb + h * lay.head_bytes));
        double eg = 0, ec = 0, xx = 0;
        for (int t = 0; t < c.block_size; ++t) {
          for (int e = 0; e < d; ++e) {
            const double want = to_float(x[static_cast<std::size_t>(s.sink_len + b * c.block_size + t) * row + h * d + e]);
            const std::size_t i = static_cast<std::size_t>(t) * d + e;
            eg += (rg[i] - want) * (rg[i] - want);
            ec += (rc[i] - want) * (rc[i] - want);
            xx += want * want;
          }
        }
        // Per block: the GPU's factorization is within 1.01 of optimal before INT8 and the CPU's is the
        // FP64 optimum, so the GPU block may be 10% worse, plus 2e-3 of ‖X‖ for blocks that are low-rank
        // up to the FP16 storage and noise floor (~6e-4 of ‖X‖ here), whose weakest directions no FP32
        // Gram resolves. A block of another head, part or position misses by O(‖X‖).
        EXPECT_LE(std::sqrt(eg / xx), 1.1 * std::sqrt(ec / xx) + 2e-3)
            << "sequence " << id << " layer " << layer << " block " << b << " head " << h
            << (part == Part::kKey ? " keys" : " values");
        stats->gpu_error = std::max(stats->gpu_error, std::sqrt(eg / xx));
        stats->cpu_error = std::max(stats->cpu_error, std::sqrt(ec / xx));
      }
    }
  }
}

/// Norm-wise (relative Frobenius over a step's rows) figures of one checked step.
struct StepErrors {
  double gpu_vs_cpu = 0;    // ‖o_gpu − o_cpu‖ / ‖o_cpu‖
  double gpu_vs_dense = 0;  // ‖o_gpu − o_dense‖ / ‖o_dense‖, o_dense: attention over every token, uncompressed
  double cpu_vs_dense = 0;
};

/// Drives `steps` random steps through both caches. Every step checks the GPU against its own state;
/// the comparison with the CPU cache runs every step in synchronous mode, every 7th (after a flush) in
/// async mode.
template <class T>
void run_scenario(const CacheConfig& c, skc::CompressionMode mode, skc::CompressAlgorithm algorithm, int steps,
                  std::uint32_t seed, int* compared, std::int64_t* max_pending) {
  skc::DeviceCacheOptions opt;
  opt.max_sequences = 4;
  opt.max_blocks_per_layer = 256;
  opt.max_append_tokens = 160;
  opt.compression = mode;
  opt.algorithm = algorithm;
  SpectralCache<T> cpu(c);
  skc::DeviceSpectralCache<T> gpu(c, opt);
  cudaStream_t stream;
  skc::check(cudaStreamCreate(&stream), "cudaStreamCreate");
  const int kv = c.num_kv_heads, d = c.head_dim, qh = c.num_q_heads, group = c.group_size();
  const std::size_t tok = static_cast<std::size_t>(kv) * d, qtok = static_cast<std::size_t>(qh) * d;
  DeviceArray<T> dk(4 * 160 * tok), dv(4 * 160 * tok), dq(4 * 160 * qtok), dout(4 * 160 * qtok);
  std::mt19937 gen(seed);
  SequenceId next_id = 100;
  std::vector<SequenceId> live;
  std::map<SequenceId, std::vector<T>> hist_k, hist_v;  // every token appended (the same for every layer)
  StateStats state;
  StepErrors worst;  // the checked step with the largest gpu_vs_cpu
  double sum_gpu_cpu = 0, sum_cpu_dense = 0, sum_cpu = 0;  // squared norms over every compared step
  const bool bf16 = std::is_same_v<T, BFloat16>;
  for (int step = 0; step < steps; ++step) {
    // Joins and removals.
    if (live.size() < 4 && (live.empty() || gen() % 10 == 0)) {
      cpu.add_sequence(next_id);
      gpu.add_sequence(next_id);
      live.push_back(next_id++);
    }
    if (!live.empty() && gen() % 20 == 0) {  // short lives keep the CPU reference fast
      const std::size_t i = gen() % live.size();
      cpu.remove_sequence(live[i]);
      gpu.remove_sequence(live[i]);
      hist_k.erase(live[i]);
      hist_v.erase(live[i]);
      live.erase(live.begin() + static_cast<std::ptrdiff_t>(i));
    }
    // A ragged batch: each live sequence gets a prefill chunk (1..160) or one decode token.
    std::vector<SequenceId> ids;
    std::vector<std::int64_t> counts;
    for (SequenceId id : live) {
      if (gen() % 5 == 0) continue;
      ids.push_back(id);
      counts.push_back(gen() % 10 == 0 ? 1 + static_cast<std::int64_t>(gen() % 160) : 1);
    }
    if (ids.empty()) continue;
    std::int64_t total = 0;
    std::vector<SequenceRows> seqs;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      seqs.push_back({ids[i], counts[i], static_cast<std::size_t>(total)});
      total += counts[i];
    }
    const auto k = test::low_rank_tokens<T>(total, kv, d, 8, seed * 7919u + static_cast<std::uint32_t>(step), 1e-3f);
    const auto v = test::low_rank_tokens<T>(total, kv, d, 8, seed * 104729u + static_cast<std::uint32_t>(step), 1e-3f);
    for (const SequenceRows& sr : seqs) {
      const auto first = static_cast<std::ptrdiff_t>(sr.first_row * tok), n = static_cast<std::ptrdiff_t>(sr.q_len) * static_cast<std::ptrdiff_t>(tok);
      hist_k[sr.id].insert(hist_k[sr.id].end(), k.begin() + first, k.begin() + first + n);
      hist_v[sr.id].insert(hist_v[sr.id].end(), v.begin() + first, v.begin() + first + n);
    }
    // Queries: the newest q_len tokens of each sequence; decode steps have 1, prefill chunks all of theirs.
    const std::vector<std::int64_t>& q_lens = counts;
    const auto q = test::normal_tokens<T>(total, qh, d, seed + static_cast<std::uint32_t>(step) * 31u);
    skc::check(cudaMemcpy(dk.ptr, k.data(), k.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy");
    skc::check(cudaMemcpy(dv.ptr, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy");
    skc::check(cudaMemcpy(dq.ptr, q.data(), q.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy");
    const bool check_now = mode == skc::CompressionMode::kSynchronous || step % 7 == 0;
    for (int layer = 0; layer < c.num_layers; ++layer) {
      cpu.append(layer, ids, counts, test::view(k, total, kv, d), test::view(v, total, kv, d));
      gpu.append(layer, ids, counts, TensorView<const T>{dk.ptr, total, kv, d}, TensorView<const T>{dv.ptr, total, kv, d},
                 stream);
      *max_pending = std::max(*max_pending, gpu.pending_blocks(layer));
      if (check_now && mode == skc::CompressionMode::kAsync) gpu.flush(stream);
      for (std::size_t i = 0; i < ids.size(); ++i) {
        ASSERT_EQ(gpu.length(ids[i], layer), cpu.length(ids[i], layer));
        ASSERT_EQ(gpu.tokens_until_compression(ids[i], layer), cpu.tokens_until_compression(ids[i], layer));
      }
      skc::check(cudaMemsetAsync(dout.ptr, 0xFF, static_cast<std::size_t>(total) * qtok * sizeof(T), stream), "cudaMemset");
      gpu.attend(layer, ids, q_lens, TensorView<const T>{dq.ptr, total, qh, d}, TensorView<T>{dout.ptr, total, qh, d},
                 0.125f, stream);
      std::vector<T> got(static_cast<std::size_t>(total) * qtok);
      skc::check(cudaMemcpyAsync(got.data(), dout.ptr, got.size() * sizeof(T), cudaMemcpyDeviceToHost, stream), "cudaMemcpy");
      std::vector<typename skc::DeviceSpectralCache<T>::HostLayerState> device_state;
      for (const SequenceRows& sr : seqs) device_state.push_back(gpu.download(sr.id, layer, stream));
      skc::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");

      // The references, one task per (sequence, query token): attention over the GPU's downloaded state
      // ("exact"), and when the step is compared, the CPU cache's state and every token uncompressed.
      const ColdBlockLayout& lay = gpu.layout(layer);
      const std::size_t rows = static_cast<std::size_t>(total) * qh;
      std::vector<float> exact(rows * d, NAN), want(rows * d, NAN), dense(rows * d, NAN);
      std::vector<std::pair<std::size_t, std::int64_t>> tokens;  // (sequence index, query token j)
      for (std::size_t i = 0; i < seqs.size(); ++i)
        for (std::int64_t j = 0; j < seqs[i].q_len; ++j) tokens.emplace_back(i, j);
      parallel_for(tokens.size(), [&](std::size_t task) {
        const auto [i, j] = tokens[task];
        const SequenceRows& sr = seqs[i];
        const auto& g = device_state[i];
        const std::int64_t sink_len = static_cast<std::int64_t>(g.sink_k.size() / tok);
        const std::int64_t dense_len = static_cast<std::int64_t>(g.dense_k.size() / tok);
        const std::int64_t num_blocks = static_cast<std::int64_t>(g.blocks.size());
        const std::int64_t len = sink_len + num_blocks * c.block_size + dense_len;
        const std::int64_t max_position = len - sr.q_len + j;
        const auto s = cpu.state(sr.id, layer);
        const auto& hk = hist_k.at(sr.id);
        const auto& hv = hist_v.at(sr.id);
        std::vector<float> qf(static_cast<std::size_t>(d));
        for (int h = 0; h < qh; ++h) {
          const std::size_t r = (sr.first_row + static_cast<std::size_t>(j)) * qh + h;
          for (int e = 0; e < d; ++e) qf[static_cast<std::size_t>(e)] = to_float(q[r * d + e]);
          attend_stored(c, lay, g.sink_k.data(), g.sink_v.data(), sink_len, num_blocks,
                        [&](std::int64_t b) { return g.block_bytes.data() + b * lay.block_bytes; }, g.dense_k.data(),
                        g.dense_v.data(), dense_len, max_position, h / group, qf.data(), exact.data() + r * d);
          if (!check_now) continue;
          attend_stored(c, lay, s.sink_k, s.sink_v, s.sink_len, s.num_blocks,
                        [&](std::int64_t b) { return cpu.pool(layer) + static_cast<std::int64_t>(s.blocks[b]) * lay.block_bytes; },
                        s.tail_k, s.tail_v, s.tail_len, max_position, h / group, qf.data(), want.data() + r * d);
          const std::vector<DenseRun<T>> all{{hk.data() + (h / group) * d, hv.data() + (h / group) * d, kv * d, len, 0}};
          attend_one(all, std::vector<CompressedRun<StoredFactorView, StoredFactorView>>{}, std::vector<DenseRun<T>>{},
                     qf.data(), d, 0.125f, max_position, dense.data() + r * d);
        }
      });

      // The decode kernel's budget (2e-3, see test_decode_attention.cu) when every q_len is 1; the unfused
      // multi-query kernel is FP32 throughout (1e-5, as in MultiQueryAttention.MatchesCpuAttend).
      const bool multi_query = std::any_of(q_lens.begin(), q_lens.end(), [](std::int64_t n) { return n > 1; });
      const float budget = multi_query ? 1e-5f : 2e-3f;
      for (std::size_t r = 0; r < rows; ++r) {
        float exact_scale = 0;
        for (int e = 0; e < d; ++e) exact_scale = std::max(exact_scale, std::fabs(exact[r * d + e]));
        for (int e = 0; e < d; ++e) {
          const float g = to_float(got[r * d + e]);
          ASSERT_TRUE(std::isfinite(g)) << "step " << step << " layer " << layer << " row " << r;
          ASSERT_LE(std::fabs(g - exact[r * d + e]), budget * exact_scale + half_ulp(exact[r * d + e], bf16))
              << "device state, step " << step << " layer " << layer << " row " << r << " element " << e;
        }
      }
      if (!check_now) continue;
      ++*compared;
      for (std::size_t i = 0; i < seqs.size(); ++i) {
        compare_state(cpu, device_state[i], seqs[i].id, layer, hist_k.at(seqs[i].id), hist_v.at(seqs[i].id), &state);
        if (::testing::Test::HasFatalFailure()) return;
      }
      // The CPU cache's own attend() is the same function (attend_one over its state); check it once
      // per step on the first sequence so the comparison goes through the public API.
      {
        const SequenceRows& sr = seqs.front();
        std::vector<float> api(static_cast<std::size_t>(sr.q_len) * qtok, NAN);
        cpu.attend(layer, sr.id, TensorView<const T>{q.data() + sr.first_row * qtok, sr.q_len, qh, d},
                   TensorView<float>{api.data(), sr.q_len, qh, d}, 0.125f);
        for (std::size_t e = 0; e < api.size(); ++e) ASSERT_EQ(api[e], want[sr.first_row * qtok + e]) << "element " << e;
      }
      double gc = 0, cc = 0, gd = 0, cd = 0, dd = 0;
      for (std::size_t e = 0; e < rows * d; ++e) {
        const double g = to_float(got[e]), w = want[e], t = dense[e];
        gc += (g - w) * (g - w);
        cc += w * w;
        gd += (g - t) * (g - t);
        cd += (w - t) * (w - t);
        dd += t * t;
      }
      const StepErrors now{std::sqrt(gc / cc), std::sqrt(gd / dd), std::sqrt(cd / dd)};
      // The two caches compress independently (GPU: FP32 Gram eigensolver, CPU: FP64), so INT8
      // coefficients near a rounding half-step land on different integers, and in this scenario's
      // peaked softmax (logits ~10) one step of a dominant key moves a logit by ~0.02: the caches do not
      // store the same blocks, and their outputs differ by up to ~1e-2 on some steps. What must hold is
      // that the GPU cache is as accurate as the CPU cache. Against uncompressed attention its error is
      // within 10% of the CPU cache's (the compression's optimality ratio is ≤ 1.01 before INT8), and the
      // two differ by less than that compression error, plus, in both, the output's rounding to T (half
      // an ulp, relative) and the kernels' tolerance on identical state (2e-3, as above). A wrong block,
      // position or tier gives errors of the order of the output itself. (The second bound is half of
      // what the triangle inequality allows; measured steps stay under a quarter of it.)
      const double rounding = 2e-3 + std::ldexp(1.0, bf16 ? -8 : -11);
      EXPECT_LE(now.gpu_vs_dense, 1.1 * now.cpu_vs_dense + rounding) << "step " << step << " layer " << layer;
      EXPECT_LE(now.gpu_vs_cpu, now.cpu_vs_dense + rounding) << "step " << step << " layer " << layer;
      sum_gpu_cpu += gc;
      sum_cpu_dense += cd;
      sum_cpu += cc;
      if (now.gpu_vs_cpu > worst.gpu_vs_cpu) worst = now;
    }
  }
  // (Each step draws its tokens from its own rank-8 subspace, so a block of decode tokens is far from
  // low-rank: the worst blocks lose ~2/3 of their norm, in both backends alike; printed below.)
  // Over the whole scenario the caches' disagreement is well below their compression error. Measured on
  // the H200: 0.2–0.3% of it with the cuSOLVER path and half-precision outputs; up to a quarter of it
  // on single steps of the fast path; bfloat16 outputs add their own rounding (2^-8) to the difference.
  // One bound for every algorithm and type: a systematic deviation (a wrong position, tier or block)
  // is of the order of the output and exceeds it. The per-step rounding allowance applies here too: a
  // short run that compresses no block has no compression error to compare against.
  const double rounding = 2e-3 + std::ldexp(1.0, bf16 ? -8 : -11);
  EXPECT_LE(std::sqrt(sum_gpu_cpu), 0.5 * std::sqrt(sum_cpu_dense) + rounding * std::sqrt(sum_cpu));
  std::printf("[ scenario ] steps %d, compared %d; worst block error gpu %.3e cpu %.3e; worst step: gpu-cpu %.3e, "
              "gpu-dense %.3e, cpu-dense %.3e; whole run: |gpu-cpu| / |cpu-dense| %.3f\n",
              steps, *compared, state.gpu_error, state.cpu_error, worst.gpu_vs_cpu, worst.gpu_vs_dense, worst.cpu_vs_dense,
              sum_cpu_dense > 0 ? std::sqrt(sum_gpu_cpu / sum_cpu_dense) : 0.0);
  for (SequenceId id : live) {
    cpu.remove_sequence(id);
    gpu.remove_sequence(id);
  }
  for (int layer = 0; layer < c.num_layers; ++layer) EXPECT_EQ(gpu.blocks_in_use(layer), 0);
  EXPECT_EQ(gpu.memory_stats().total_bytes(), 0);
  skc::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  cudaStreamDestroy(stream);
}

template <class T>
class DeviceCache : public ::testing::Test {};
using Types = ::testing::Types<Half, BFloat16>;
TYPED_TEST_SUITE(DeviceCache, Types);

TYPED_TEST(DeviceCache, SynchronousMatchesCpuAtEveryStep) {
  SKIP_WITHOUT_GPU();
  for (int sinks : {0, 4}) {
    for (bool centre : {false, true}) {
      SCOPED_TRACE(::testing::Message() << "sinks " << sinks << " centre " << centre);
      int compared = 0;
      std::int64_t pending = 0;
      const int steps = scenario_steps(150);
      run_scenario<TypeParam>(scenario_config(sinks, centre), skc::CompressionMode::kSynchronous,
                              skc::CompressAlgorithm::kCusolver, steps,
                              static_cast<std::uint32_t>(17 + sinks + centre), &compared, &pending);
      EXPECT_GE(compared, steps);  // two layers per step, a few steps have no batch
      EXPECT_EQ(pending, 0);  // synchronous mode never leaves a block pending
    }
  }
}

TYPED_TEST(DeviceCache, AsyncDefersCompressionAndMatchesAfterFlush) {
  SKIP_WITHOUT_GPU();
  int compared = 0;
  std::int64_t pending = 0;
  const int steps = scenario_steps(600);
  run_scenario<TypeParam>(scenario_config(4, false), skc::CompressionMode::kAsync, skc::CompressAlgorithm::kCusolver,
                          steps, 5, &compared, &pending);
  EXPECT_GT(compared, steps / 10);
  // Blocks were attended densely while their compression was in flight (needs enough steps to fill one).
  if (steps >= 200) {
    EXPECT_GT(pending, 0);
  } else {
    std::printf("[ info ] %d steps (SPECTRALKV_SCENARIO_STEPS): too few to fill a block while another is in "
                "flight, so the deferred-compression check did not run\n", steps);
  }
}

TYPED_TEST(DeviceCache, FastCompressionAgreesWithinQuantisationNoise) {
  SKIP_WITHOUT_GPU();
  int compared = 0;
  std::int64_t pending = 0;
  const int steps = scenario_steps(400);
  run_scenario<TypeParam>(scenario_config(4, true), skc::CompressionMode::kAsync,
                          skc::CompressAlgorithm::kSubspaceIteration, steps, 9, &compared, &pending);
  EXPECT_GT(compared, steps / 10);
}

TEST(DeviceCacheMemory, NoLeakAndCapacityErrorsChangeNothing) {
  SKIP_WITHOUT_GPU();
  skc::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  cudaMemPool_t pool;
  skc::check(cudaDeviceGetDefaultMemPool(&pool, 0), "cudaDeviceGetDefaultMemPool");
  // The whole life of a cache, run twice: the first pass also loads the kernels' modules (lazily loaded
  // modules take device memory on first launch, which is not a leak), the second is measured.
  auto life = [&] {
    const CacheConfig c = scenario_config(2, false);
    skc::DeviceSpectralCache<Half> gpu(c, synchronous_options(2, 3, 256));
    EXPECT_GT(gpu.device_bytes(), 0);
    const int kv = c.num_kv_heads, d = c.head_dim, qh = c.num_q_heads;
    const auto k = test::low_rank_tokens<Half>(256, kv, d, 8, 3, 1e-3f);
    DeviceArray<Half> dk(k.size()), dq(static_cast<std::size_t>(qh) * d), out(static_cast<std::size_t>(qh) * d);
    skc::check(cudaMemcpy(dk.ptr, k.data(), k.size() * sizeof(Half), cudaMemcpyHostToDevice), "cudaMemcpy");
    skc::check(cudaMemcpy(dq.ptr, k.data(), static_cast<std::size_t>(qh) * d * sizeof(Half), cudaMemcpyHostToDevice), "cudaMemcpy");
    gpu.add_sequence(1);
    gpu.add_sequence(2);
    const TensorView<const Half> k150{dk.ptr, 150, kv, d};
    gpu.append(0, 1, k150, k150, nullptr);  // (150 − 2 − 16) / 64 = 2 blocks of 3
    auto output = [&] {
      std::vector<Half> h(static_cast<std::size_t>(qh) * d);
      skc::check(cudaMemset(out.ptr, 0xFF, h.size() * sizeof(Half)), "cudaMemset");  // NaN unless written
      gpu.attend(0, 1, TensorView<const Half>{dq.ptr, 1, qh, d}, TensorView<Half>{out.ptr, 1, qh, d}, 0.125f, nullptr);
      skc::check(cudaMemcpy(h.data(), out.ptr, h.size() * sizeof(Half), cudaMemcpyDeviceToHost), "cudaMemcpy");
      std::vector<std::uint16_t> bits;
      for (Half x : h) bits.push_back(x.bits);
      return bits;
    };
    const auto before = output();
    for (std::uint16_t b : before) ASSERT_NE(b & 0x7C00u, 0x7C00u) << "non-finite output";
    const auto len2 = gpu.length(2, 0);
    try {
      gpu.append(0, 2, k150, k150, nullptr);  // needs 2 more blocks, 1 is free
      ADD_FAILURE() << "no CapacityError";
    } catch (const CapacityError& e) {
      EXPECT_NE(std::string(e.what()).find("max_blocks_per_layer = 3"), std::string::npos) << e.what();
    }
    EXPECT_EQ(gpu.length(2, 0), len2);
    EXPECT_EQ(gpu.blocks_in_use(0), 2);
    EXPECT_EQ(output(), before);  // sequence 1 kept all of its data
    EXPECT_THROW(gpu.add_sequence(3), CapacityError);  // both slots taken
    EXPECT_THROW(gpu.append(0, 1, TensorView<const Half>{dk.ptr, 10, kv + 1, d}, k150, nullptr), ShapeError);
    EXPECT_THROW(gpu.append(2, 1, k150, k150, nullptr), InvalidArgument);
    EXPECT_THROW(gpu.attend(0, 2, TensorView<const Half>{dq.ptr, 1, qh, d}, TensorView<Half>{out.ptr, 1, qh, d}, 0.1f, nullptr),
                 InvalidArgument);  // empty sequence
    // Misaligned device data is rejected before any token is counted or any row copied.
    const std::int64_t len1 = gpu.length(1, 0);
    const TensorView<const Half> k10{dk.ptr, 10, kv, d};
    expect_message<InvalidArgument>([&] { gpu.append(0, 1, TensorView<const Half>{dk.ptr + 4, 10, kv, d}, k10, nullptr); },
                                    "argument k = ");
    expect_message<InvalidArgument>([&] {
      gpu.append(0, 1, k10, TensorView<const Half>{dk.ptr + 4, 10, kv, d}, nullptr);
    }, "argument v = ");
    expect_message<InvalidArgument>([&] {
      gpu.attend(0, 1, TensorView<const Half>{dq.ptr + 1, 1, qh, d}, TensorView<Half>{out.ptr, 1, qh, d}, 0.1f, nullptr);
    }, "argument q = ");
    EXPECT_EQ(gpu.length(1, 0), len1);
    EXPECT_EQ(output(), before);
    gpu.remove_sequence(1);
    EXPECT_EQ(gpu.blocks_in_use(0), 0);
    skc::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  };
  life();
  skc::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  skc::check(cudaMemPoolTrimTo(pool, 0), "cudaMemPoolTrimTo");
  std::size_t free_before = 0, total = 0;
  skc::check(cudaMemGetInfo(&free_before, &total), "cudaMemGetInfo");
  life();
  skc::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  skc::check(cudaMemPoolTrimTo(pool, 0), "cudaMemPoolTrimTo");
  std::size_t free_after = 0;
  skc::check(cudaMemGetInfo(&free_after, &total), "cudaMemGetInfo");
  EXPECT_EQ(free_after, free_before);
}

// The allocator hook, the sequence queries, unknown ids, and compressions split over several launches
// (max_compress_jobs = 3 against the default, for the same appends: the attention outputs must be the same
// bits, since each job's compression does not depend on the batch it runs in).
TEST(DeviceCacheApi, AllocatorQueriesAndSplitCompressionLaunches) {
  SKIP_WITHOUT_GPU();
  struct Counts {
    int live = 0, calls = 0;
    std::size_t bytes = 0;
  };
  auto counts = std::make_shared<Counts>();
  skc::Allocator counting;
  counting.allocate = [counts](std::size_t bytes, cudaStream_t) {
    void* p = nullptr;
    skc::check(cudaMalloc(&p, bytes), "cudaMalloc");
    ++counts->live;
    ++counts->calls;
    counts->bytes += bytes;
    return p;
  };
  counting.deallocate = [counts](void* p, cudaStream_t) {
    cudaFree(p);
    --counts->live;
  };
  const CacheConfig c = scenario_config(2, false);
  const int kv = c.num_kv_heads, d = c.head_dim, qh = c.num_q_heads;
  const std::vector<SequenceId> ids = {4, 9, 6};
  const std::vector<std::int64_t> counts_per = {200, 131, 170};  // 2, 1 and 2 blocks in each layer
  const std::int64_t total = 200 + 131 + 170;
  const auto k = test::low_rank_tokens<Half>(total, kv, d, 8, 21, 1e-3f);
  const auto v = test::low_rank_tokens<Half>(total, kv, d, 8, 22, 1e-3f);
  const auto q = test::normal_tokens<Half>(3, qh, d, 23);
  DeviceArray<Half> dk(k.size()), dv(v.size()), dq(q.size()), dout(q.size());
  skc::check(cudaMemcpy(dk.ptr, k.data(), k.size() * sizeof(Half), cudaMemcpyHostToDevice), "cudaMemcpy");
  skc::check(cudaMemcpy(dv.ptr, v.data(), v.size() * sizeof(Half), cudaMemcpyHostToDevice), "cudaMemcpy");
  skc::check(cudaMemcpy(dq.ptr, q.data(), q.size() * sizeof(Half), cudaMemcpyHostToDevice), "cudaMemcpy");
  auto outputs = [&](int max_jobs, skc::Allocator alloc) {
    skc::DeviceCacheOptions opt = synchronous_options(4, 8, 256);
    opt.max_compress_jobs = max_jobs;
    opt.allocator = std::move(alloc);
    skc::DeviceSpectralCache<Half> gpu(c, opt);
    for (SequenceId id : ids) gpu.add_sequence(id);
    EXPECT_TRUE(gpu.contains(9));
    EXPECT_FALSE(gpu.contains(5));
    std::vector<SequenceId> listed = gpu.sequences();
    std::sort(listed.begin(), listed.end());
    EXPECT_EQ(listed, (std::vector<SequenceId>{4, 6, 9}));
    for (int layer = 0; layer < c.num_layers; ++layer)
      gpu.append(layer, ids, counts_per, TensorView<const Half>{dk.ptr, total, kv, d}, TensorView<const Half>{dv.ptr, total, kv, d}, nullptr);
    EXPECT_EQ(gpu.blocks_in_use(0), 5);
    EXPECT_EQ(gpu.pending_blocks(0), 0);
    expect_message<SequenceError>([&] { gpu.remove_sequence(5); }, "id = 5");
    expect_message<SequenceError>([&] { (void)gpu.download(5, 0, nullptr); }, "id = 5");
    expect_message<SequenceError>([&] { (void)gpu.length(5, 1); }, "id = 5");
    expect_message<InvalidArgument>([&] {
      gpu.append(0, {4}, {257}, TensorView<const Half>{dk.ptr, 257, kv, d}, TensorView<const Half>{dv.ptr, 257, kv, d}, nullptr);
    }, "counts[0] = 257");
    gpu.attend(0, {}, {}, TensorView<const Half>{dq.ptr, 0, qh, d}, TensorView<Half>{dout.ptr, 0, qh, d}, 0.125f, nullptr);
    std::vector<std::uint16_t> bits;
    for (int layer = 0; layer < c.num_layers; ++layer) {
      skc::check(cudaMemset(dout.ptr, 0xFF, q.size() * sizeof(Half)), "cudaMemset");
      gpu.attend(layer, ids, {1, 1, 1}, TensorView<const Half>{dq.ptr, 3, qh, d}, TensorView<Half>{dout.ptr, 3, qh, d}, 0.125f, nullptr);
      std::vector<Half> h(q.size());
      skc::check(cudaMemcpy(h.data(), dout.ptr, h.size() * sizeof(Half), cudaMemcpyDeviceToHost), "cudaMemcpy");
      for (Half x : h) {
        EXPECT_NE(x.bits & 0x7C00u, 0x7C00u) << "non-finite output";
        bits.push_back(x.bits);
      }
    }
    return std::make_pair(bits, gpu.device_bytes());
  };
  const auto split = outputs(3, counting);
  EXPECT_EQ(counts->live, 0) << "allocations not returned to the hook";
  EXPECT_GT(counts->calls, 0);
  EXPECT_EQ(static_cast<std::int64_t>(counts->bytes), split.second);
  const auto whole = outputs(1024, skc::Allocator::stream_ordered());
  EXPECT_EQ(split.first, whole.first);
}

// An attend launches its kernels as programmatic dependents: the copy of its tables from the pinned ring starts
// at once, the attention kernels after it wait for it. Nothing may read the query before the work enqueued
// before the attend has completed. Here a kernel that lets its dependents launch at once writes the query 2 ms
// late (until then the buffer holds another query); the outputs must be the bits of the same attend made in
// order, for a decode call (q_lens 1, the fused kernel) and a multi-query call. The copy kernel waits for its
// predecessor before it completes, since PTX promises a wait only for the prerequisite grids; on the H200 the
// attention kernel's wait was seen to cover the kernel before the copy as well (this test passes without the
// copy's wait, and fails without the attention kernel's).
TEST(DeviceCacheOrdering, AttendWaitsForTheKernelThatWritesItsQuery) {
  SKIP_WITHOUT_GPU();
  const CacheConfig c = scenario_config(2, false);
  const int kv = c.num_kv_heads, d = c.head_dim, qh = c.num_q_heads;
  skc::DeviceSpectralCache<Half> gpu(c, synchronous_options(2, 8, 256));
  const std::vector<SequenceId> ids = {3, 8};
  const std::vector<std::int64_t> counts_per = {230, 150};  // 3 and 2 cold blocks, ragged tails
  const std::int64_t total = 230 + 150;
  const auto k = test::low_rank_tokens<Half>(total, kv, d, 8, 31, 1e-3f);
  const auto v = test::low_rank_tokens<Half>(total, kv, d, 8, 32, 1e-3f);
  DeviceArray<Half> dk(k.size()), dv(v.size());
  skc::check(cudaMemcpy(dk.ptr, k.data(), k.size() * sizeof(Half), cudaMemcpyHostToDevice), "cudaMemcpy");
  skc::check(cudaMemcpy(dv.ptr, v.data(), v.size() * sizeof(Half), cudaMemcpyHostToDevice), "cudaMemcpy");
  for (SequenceId id : ids) gpu.add_sequence(id);
  gpu.append(0, ids, counts_per, TensorView<const Half>{dk.ptr, total, kv, d}, TensorView<const Half>{dv.ptr, total, kv, d}, nullptr);
  ASSERT_GT(gpu.blocks_in_use(0), 0);

  for (const std::vector<std::int64_t>& q_lens : {std::vector<std::int64_t>{1, 1}, std::vector<std::int64_t>{5, 3}}) {
    const std::int64_t rows = q_lens[0] + q_lens[1];
    SCOPED_TRACE(::testing::Message() << "q_lens " << q_lens[0] << ", " << q_lens[1]);
    const std::size_t n = static_cast<std::size_t>(rows) * qh * d;
    const auto q = test::normal_tokens<Half>(rows, qh, d, 33);
    const auto other = test::normal_tokens<Half>(rows, qh, d, 34);
    DeviceArray<Half> dq(n), q_src(n), dout(n);
    skc::check(cudaMemcpy(q_src.ptr, q.data(), n * sizeof(Half), cudaMemcpyHostToDevice), "cudaMemcpy");
    skc::check(cudaMemcpy(dq.ptr, q.data(), n * sizeof(Half), cudaMemcpyHostToDevice), "cudaMemcpy");
    // In order (this also loads the kernels' modules, so the call below launches within the writer's 2 ms).
    skc::check(cudaMemset(dout.ptr, 0xFF, n * sizeof(Half)), "cudaMemset");
    gpu.attend(0, ids, q_lens, TensorView<const Half>{dq.ptr, rows, qh, d}, TensorView<Half>{dout.ptr, rows, qh, d}, 0.125f, nullptr);
    std::vector<Half> in_order(n), late(n);
    skc::check(cudaMemcpy(in_order.data(), dout.ptr, n * sizeof(Half), cudaMemcpyDeviceToHost), "cudaMemcpy");
    for (Half x : in_order) ASSERT_NE(x.bits & 0x7C00u, 0x7C00u) << "non-finite output";

    cudaStream_t stream;
    skc::check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    skc::check(cudaMemcpyAsync(dq.ptr, other.data(), n * sizeof(Half), cudaMemcpyHostToDevice, stream), "cudaMemcpy");
    skc::check(cudaMemsetAsync(dout.ptr, 0xFF, n * sizeof(Half), stream), "cudaMemset");
    test::late_writer<<<1, 256, 0, stream>>>(
        test::LateCopy{reinterpret_cast<std::uint32_t*>(dq.ptr), reinterpret_cast<const std::uint32_t*>(q_src.ptr),
                       static_cast<int>(n / 2)},
        test::LateCopy{}, 2000000);
    skc::check(cudaGetLastError(), "late_writer");
    gpu.attend(0, ids, q_lens, TensorView<const Half>{dq.ptr, rows, qh, d}, TensorView<Half>{dout.ptr, rows, qh, d}, 0.125f, stream);
    skc::check(cudaStreamSynchronize(stream), "attend after late_writer");
    skc::check(cudaStreamDestroy(stream), "cudaStreamDestroy");
    skc::check(cudaMemcpy(late.data(), dout.ptr, n * sizeof(Half), cudaMemcpyDeviceToHost), "cudaMemcpy");
    std::size_t differ = 0;
    for (std::size_t i = 0; i < n; ++i) differ += in_order[i].bits != late[i].bits;
    EXPECT_EQ(differ, 0u) << "of " << n << " outputs differ from the attend made in order";
  }
}

// Option checks run before the constructor touches the device, so they run without one too.
TEST(DeviceCacheErrors, OptionsWhoseSizesWrapAreRejected) {
  const CacheConfig c = scenario_config(2, false);
  skc::DeviceCacheOptions opt;
  opt.max_sequences = 2;
  opt.max_blocks_per_layer = 3;
  for (std::int64_t bad : {std::int64_t{0}, std::int64_t{1} << 30, std::numeric_limits<std::int64_t>::max()}) {
    opt.max_append_tokens = bad;
    expect_message<InvalidArgument>([&] { skc::DeviceSpectralCache<Half> gpu(c, opt); },
                                    "options.max_append_tokens = " + std::to_string(bad));
  }
}

// Unknown or repeated ids, counts and q_lens out of range or of the wrong length, attention on an empty
// sequence and layers out of range: each gets its typed error naming the argument and value, and the cache
// is as it was (lengths, blocks in use, the bits of an attention).
TEST(DeviceCacheErrors, BadIdsCountsAndLayersChangeNothing) {
  SKIP_WITHOUT_GPU();
  const CacheConfig c = scenario_config(2, false);  // two layers
  const int kv = c.num_kv_heads, d = c.head_dim, qh = c.num_q_heads;
  skc::DeviceSpectralCache<Half> gpu(c, synchronous_options(3, 8, 256));
  const auto k = test::low_rank_tokens<Half>(200, kv, d, 8, 41, 1e-3f);
  const auto q = test::normal_tokens<Half>(2, qh, d, 42);
  DeviceArray<Half> dk(k.size()), dq(q.size()), dout(q.size());
  skc::check(cudaMemcpy(dk.ptr, k.data(), k.size() * sizeof(Half), cudaMemcpyHostToDevice), "cudaMemcpy");
  skc::check(cudaMemcpy(dq.ptr, q.data(), q.size() * sizeof(Half), cudaMemcpyHostToDevice), "cudaMemcpy");
  for (SequenceId id : {1, 2, 3}) gpu.add_sequence(id);  // 3 stays empty
  const TensorView<const Half> k200{dk.ptr, 200, kv, d}, k10{dk.ptr, 10, kv, d};
  gpu.append(0, {1, 2}, {150, 50}, k200, k200, nullptr);
  const TensorView<const Half> q1{dq.ptr, 1, qh, d}, q2{dq.ptr, 2, qh, d};
  const TensorView<Half> o1{dout.ptr, 1, qh, d}, o2{dout.ptr, 2, qh, d};
  auto state = [&] {
    std::vector<std::int64_t> st;
    for (SequenceId id : {1, 2, 3})
      for (int layer : {0, 1}) st.push_back(gpu.length(id, layer));
    st.push_back(gpu.blocks_in_use(0));
    skc::check(cudaMemset(dout.ptr, 0xFF, q.size() * sizeof(Half)), "cudaMemset");
    gpu.attend(0, {1, 2}, {1, 1}, q2, o2, 0.125f, nullptr);
    std::vector<Half> h(q.size());
    skc::check(cudaMemcpy(h.data(), dout.ptr, h.size() * sizeof(Half), cudaMemcpyDeviceToHost), "cudaMemcpy");
    for (Half x : h) st.push_back(x.bits);
    return st;
  };
  const std::vector<std::int64_t> before = state();
  ASSERT_GT(before[6], 0);  // a cold block in layer 0

  expect_message<SequenceError>([&] { gpu.append(0, {1, 9}, {5, 5}, k10, k10, nullptr); }, "ids[1] = 9 (unknown sequence)");
  expect_message<SequenceError>([&] { gpu.append(0, {1, 1}, {5, 5}, k10, k10, nullptr); },
                                "ids[1] = 1 (sequence listed twice)");
  expect_message<SequenceError>([&] { gpu.attend(0, {2, 9}, {1, 1}, q2, o2, 0.125f, nullptr); },
                                "ids[1] = 9 (unknown sequence)");
  expect_message<SequenceError>([&] { gpu.attend(0, {2, 2}, {1, 1}, q2, o2, 0.125f, nullptr); },
                                "ids[1] = 2 (sequence listed twice)");
  expect_message<InvalidArgument>([&] { gpu.append(0, {1, 2}, {12, -2}, k10, k10, nullptr); }, "counts[1] = -2");
  expect_message<InvalidArgument>([&] { gpu.append(0, {1}, {5, 5}, k10, k10, nullptr); }, "counts.size() = 2");
  expect_message<InvalidArgument>([&] { gpu.attend(0, {1, 2}, {1}, q1, o1, 0.125f, nullptr); }, "q_lens.size() = 1");
  expect_message<InvalidArgument>([&] { gpu.attend(0, {1, 2}, {1, 0}, q1, o1, 0.125f, nullptr); }, "q_lens[1] = 0");
  expect_message<InvalidArgument>([&] { gpu.attend(0, {1, 3}, {1, 1}, q2, o2, 0.125f, nullptr); },
                                  "ids[1] = 3 (attention on an empty sequence");
  for (int layer : {-1, 2}) {
    const std::string needle = "layer = " + std::to_string(layer) + " (must be in [0, num_layers = 2))";
    expect_message<InvalidArgument>([&] { gpu.append(layer, {1}, {5}, k10, k10, nullptr); }, needle);
    expect_message<InvalidArgument>([&] { gpu.attend(layer, {1}, {1}, q1, o1, 0.125f, nullptr); }, needle);
    expect_message<InvalidArgument>([&] { (void)gpu.length(1, layer); }, needle);
  }
  EXPECT_EQ(state(), before);
}

TEST(DeviceCacheErrors, AttendOfMoreRowsThanAnAppendIsRejected) {
  SKIP_WITHOUT_GPU();
  const CacheConfig c = scenario_config(2, false);
  skc::DeviceSpectralCache<Half> gpu(c, synchronous_options(1, 2, 16));
  const int kv = c.num_kv_heads, d = c.head_dim, qh = c.num_q_heads;
  const auto k = test::normal_tokens<Half>(16, kv, d, 7);
  DeviceArray<Half> dk(k.size()), dq(20 * static_cast<std::size_t>(qh) * d), out(20 * static_cast<std::size_t>(qh) * d);
  skc::check(cudaMemcpy(dk.ptr, k.data(), k.size() * sizeof(Half), cudaMemcpyHostToDevice), "cudaMemcpy");
  gpu.add_sequence(1);
  for (int i = 0; i < 3; ++i) gpu.append(0, 1, TensorView<const Half>{dk.ptr, 16, kv, d}, TensorView<const Half>{dk.ptr, 16, kv, d}, nullptr);
  ASSERT_EQ(gpu.length(1, 0), 48);
  expect_message<InvalidArgument>([&] {
    gpu.attend(0, {1}, {20}, TensorView<const Half>{dq.ptr, 20, qh, d}, TensorView<Half>{out.ptr, 20, qh, d}, 0.1f, nullptr);
  }, "q_lens[0] = 20");
  skc::check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

}  // namespace
