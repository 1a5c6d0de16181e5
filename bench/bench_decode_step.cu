// A full decode step of one layer through the device-resident cache, as an engine runs it: append one
// token per sequence (the scatter into the staging rows, compression of the blocks that fill, batched
// and asynchronous) and attend. Against the dense path: the same appends into a plain
// [batch][max_len][kv_heads][head_dim] FP16 cache and the dense split-KV kernel.
//
// GQA 32/8, head_dim 128, K16/V32, block 512, hot 64, FP16. The caches are first filled to T tokens per
// sequence through the same append path (prefill chunks of 4096), then 512 decode steps are timed with
// CUDA events around the whole loop, so every sequence crosses exactly one compression point and its
// cost is amortised as in steady decoding. Host-side work (validation, metadata) is inside the timing.
// Counters: us_per_step, tokens_per_s (batch / step time), kv_bytes_per_token (cache bytes held per
// token per layer, all tiers counted), attend_us_per_step (the same loop with the attention call alone),
// and dense_us_per_step and speedup. host_us_per_step and dense_host_us_per_step: what the host spends to
// enqueue one step when no call waits for the GPU (steps enqueued behind a kernel that holds the stream): an
// engine with many layers pays it per layer, and a step whose host time exceeds its GPU time is host-bound.

#include <benchmark/benchmark.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "spectralkv/cuda/decode_attention.cuh"
#include "spectralkv/cuda/device_cache.cuh"
#include "spectralkv/cuda/error.cuh"

namespace {

using namespace spectralkv;
namespace skc = spectralkv::cuda;
using skc::check;

constexpr int kQHeads = 32, kKvHeads = 8, kDim = 128, kBlock = 512, kHot = 64;
constexpr int kSteps = 512;
// Host-time rounds: each enqueues kHostSteps steps behind a kernel holding the stream. Three steps use six
// regions of the device cache's metadata ring (eight), so no call waits for the GPU to release one.
constexpr int kHostSteps = 3, kHostRounds = 16;
constexpr std::int64_t kChunk = 4096;

/// Deterministic values in [-1, 1) from a hash of the index (no zeros, no structure the kernels could exploit).
__global__ void fill_random(__half* p, std::size_t n, std::uint32_t seed) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    std::uint32_t h = static_cast<std::uint32_t>(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = __float2half_rn(static_cast<float>(h & 0xffff) / 32768.0f - 1.0f);
  }
}

__global__ void add_one(std::int32_t* lens, int n) {
  if (threadIdx.x < n) ++lens[threadIdx.x];
}

/// Holds the stream for `cycles` SM clock cycles.
__global__ void hold_stream(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

template <class U>
U* device_alloc(std::size_t n) {
  U* p = nullptr;
  check(cudaMalloc(&p, n * sizeof(U)), "cudaMalloc");
  return p;
}

CacheConfig layer_config() {
  CacheConfig c;
  c.num_layers = 1;
  c.num_q_heads = kQHeads;
  c.num_kv_heads = kKvHeads;
  c.head_dim = kDim;
  c.block_size = kBlock;
  c.hot_tokens = kHot;
  c.sink_tokens = 0;
  c.default_ranks = {16, 32};
  return c;
}

/// Mean step time of one loop of kSteps steps; Google Benchmark's repetitions give the median of loops.
double time_steps(cudaStream_t stream, const std::function<void()>& step) {
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  check(cudaEventRecord(start, stream), "cudaEventRecord");
  for (int s = 0; s < kSteps; ++s) step();
  check(cudaEventRecord(stop, stream), "cudaEventRecord");
  check(cudaEventSynchronize(stop), "cudaEventSynchronize");
  float ms = 0;
  check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms * 1e3 / kSteps;
}

/// Median over kHostRounds of the host's time per step to enqueue kHostSteps steps behind a hold of the
/// stream (4M cycles: 2 ms at 1980 MHz, much longer than enqueueing three steps takes).
double host_us_per_step(cudaStream_t stream, const std::function<void()>& step) {
  std::vector<double> per_step;
  for (int r = 0; r < kHostRounds; ++r) {
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    hold_stream<<<1, 1, 0, stream>>>(4000000);
    check(cudaGetLastError(), "hold_stream");
    const auto start = std::chrono::steady_clock::now();
    for (int s = 0; s < kHostSteps; ++s) step();
    const std::chrono::duration<double, std::micro> host = std::chrono::steady_clock::now() - start;
    per_step.push_back(host.count() / kHostSteps);
  }
  check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  std::sort(per_step.begin(), per_step.end());
  return per_step[per_step.size() / 2];
}

void BM_DecodeStep(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0));
  const std::int64_t tokens = state.range(1);
  // Room for every append of the 3 iterations (timed loops and host rounds).
  const std::int64_t max_len = tokens + 8 * kSteps;
  const std::size_t row = static_cast<std::size_t>(kKvHeads) * kDim, qrow = static_cast<std::size_t>(kQHeads) * kDim;
  cudaStream_t stream;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");

  // Inputs: a prefill chunk and per-step new tokens / queries (rotated over 8 sets).
  __half* prefill = device_alloc<__half>(static_cast<std::size_t>(kChunk) * row);
  __half* step_kv = device_alloc<__half>(8 * batch * row);
  __half* q = device_alloc<__half>(8 * batch * qrow);
  __half* out = device_alloc<__half>(batch * qrow);
  fill_random<<<256, 256, 0, stream>>>(prefill, static_cast<std::size_t>(kChunk) * row, 1);
  fill_random<<<256, 256, 0, stream>>>(step_kv, 8 * batch * row, 2);
  fill_random<<<256, 256, 0, stream>>>(q, 8 * batch * qrow, 3);

  // Spectral: the device cache, prefilled through append.
  skc::DeviceCacheOptions opt;
  opt.max_sequences = batch;
  opt.max_blocks_per_layer = batch * (max_len / kBlock + 2);
  opt.max_append_tokens = kChunk;
  opt.max_compress_jobs = 4096;
  opt.stream = stream;
  auto owned = std::make_unique<skc::DeviceSpectralCache<Half>>(layer_config(), opt);
  auto& cache = *owned;
  std::vector<SequenceId> ids;
  for (int b = 0; b < batch; ++b) {
    ids.push_back(b);
    cache.add_sequence(b);
    for (std::int64_t t = 0; t < tokens; t += kChunk) {
      const std::int64_t n = std::min(kChunk, tokens - t);
      const TensorView<const Half> kv{reinterpret_cast<const Half*>(prefill), n, kKvHeads, kDim};
      cache.append(0, b, kv, kv, stream);
    }
  }
  cache.flush(stream);
  const std::vector<std::int64_t> ones(static_cast<std::size_t>(batch), 1);

  // Dense: plain cache of the same tokens.
  __half* dense_k = device_alloc<__half>(static_cast<std::size_t>(batch) * max_len * row);
  __half* dense_v = device_alloc<__half>(static_cast<std::size_t>(batch) * max_len * row);
  fill_random<<<1024, 256, 0, stream>>>(dense_k, static_cast<std::size_t>(batch) * max_len * row, 4);
  fill_random<<<1024, 256, 0, stream>>>(dense_v, static_cast<std::size_t>(batch) * max_len * row, 5);
  std::int32_t* lens = device_alloc<std::int32_t>(batch);
  std::vector<std::int32_t> host_lens(static_cast<std::size_t>(batch), static_cast<std::int32_t>(tokens));
  check(cudaMemcpyAsync(lens, host_lens.data(), batch * sizeof(std::int32_t), cudaMemcpyHostToDevice, stream), "cudaMemcpy");
  skc::DenseDecodeParams dp;
  dp.dtype = skc::DataType::kHalf;
  dp.batch = batch;
  dp.num_q_heads = kQHeads;
  dp.num_kv_heads = kKvHeads;
  dp.head_dim = kDim;
  dp.scale = 0.088f;
  dp.out = out;
  dp.k = dense_k;
  dp.v = dense_v;
  dp.max_len = max_len;
  dp.seq_lens = lens;
  dp.q = q;
  const std::size_t ws_bytes = skc::DenseDecodeAttention::get_workspace_size(dp);
  void* ws = device_alloc<std::uint8_t>(ws_bytes + 256);
  skc::DenseDecodeAttention::initialize_workspace(dp, ws, stream);
  check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");

  int phase = 0;
  std::int64_t dense_len = tokens;
  double spectral_us = 0, attend_us = 0, dense_us = 0, host_us = 0, dense_host_us = 0;
  const auto attend = [&](int r) {
    cache.attend(0, ids, ones,
                 TensorView<const Half>{reinterpret_cast<const Half*>(q) + r * batch * qrow, batch, kQHeads, kDim},
                 TensorView<Half>{reinterpret_cast<Half*>(out), batch, kQHeads, kDim}, 0.088f, stream);
  };
  const auto spectral_step = [&] {
    const int r = phase++ % 8;
    const TensorView<const Half> kv{reinterpret_cast<const Half*>(step_kv) + r * batch * row, batch, kKvHeads, kDim};
    cache.append(0, ids, ones, kv, kv, stream);
    attend(r);
  };
  const auto dense_step = [&] {
    const int r = phase++ % 8;
    const std::size_t pitch = static_cast<std::size_t>(max_len) * row * sizeof(__half);
    for (__half* base : {dense_k, dense_v}) {
      check(cudaMemcpy2DAsync(base + dense_len * row, pitch, step_kv + r * batch * row, row * sizeof(__half),
                              row * sizeof(__half), batch, cudaMemcpyDeviceToDevice, stream), "cudaMemcpy2DAsync");
    }
    add_one<<<1, 1024, 0, stream>>>(lens, batch);
    ++dense_len;
    dp.q = q + r * batch * qrow;
    skc::DenseDecodeAttention::run(dp, ws, ws_bytes + 256, stream);
  };
  for (auto _ : state) {
    spectral_us = time_steps(stream, spectral_step);
    // The attention call alone (no append), to separate its cost from the append's and the compression's.
    attend_us = time_steps(stream, [&] { attend(phase++ % 8); });
    dense_us = time_steps(stream, dense_step);
    host_us = host_us_per_step(stream, spectral_step);
    dense_host_us = host_us_per_step(stream, dense_step);
    state.SetIterationTime(spectral_us * 1e-6);
  }
  const MemoryStats m = cache.memory_stats();
  const double tokens_held = static_cast<double>(m.sink_tokens + m.cold_tokens + m.tail_tokens);
  state.counters["us_per_step"] = spectral_us;
  state.counters["attend_us_per_step"] = attend_us;
  state.counters["dense_us_per_step"] = dense_us;
  state.counters["host_us_per_step"] = host_us;
  state.counters["dense_host_us_per_step"] = dense_host_us;
  state.counters["speedup"] = dense_us / spectral_us;
  state.counters["tokens_per_s"] = batch / (spectral_us * 1e-6);
  state.counters["dense_tokens_per_s"] = batch / (dense_us * 1e-6);
  state.counters["kv_bytes_per_token"] = static_cast<double>(m.total_bytes()) / tokens_held;
  state.counters["dense_kv_bytes_per_token"] = 2.0 * row * sizeof(__half);

  check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  owned.reset();  // frees on `stream`, so before the stream goes
  for (void* p : {static_cast<void*>(prefill), static_cast<void*>(step_kv), static_cast<void*>(q), static_cast<void*>(out),
                  static_cast<void*>(dense_k), static_cast<void*>(dense_v), static_cast<void*>(lens), ws})
    cudaFree(p);
  cudaStreamDestroy(stream);
}

BENCHMARK(BM_DecodeStep)
    ->ArgNames({"B", "T"})
    ->Args({1, 4096})
    ->Args({1, 131072})
    ->Args({8, 32768})
    ->Args({32, 16384})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond)
    ->Iterations(3)
    ->Repetitions(3)
    ->ReportAggregatesOnly(true);

}  // namespace

BENCHMARK_MAIN();
