// An engine's view of the CUDA cache: create it, prefill a prompt, run decode steps, read the memory
// statistics. A real engine hands the cache its post-RoPE K and V and its queries every layer and step;
// random tensors stand in for them here.
//
//   spectralkv_engine_view [prompt_tokens=20000] [decode_steps=256]

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "spectralkv/cuda/device_cache.cuh"

using namespace spectralkv;

namespace {
/// Uploads `n` random half values (a stand-in for a layer's projections).
Half* random_device_tensor(std::size_t n, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  std::vector<Half> host(n);
  for (auto& x : host) x = Half(normal(gen));
  Half* dev = nullptr;
  cuda::check(cudaMalloc(&dev, n * sizeof(Half)), "cudaMalloc");
  cuda::check(cudaMemcpy(dev, host.data(), n * sizeof(Half), cudaMemcpyHostToDevice), "cudaMemcpy");
  return dev;
}
}  // namespace

int main(int argc, char** argv) {
  if (!cuda::device_available()) {
    std::fprintf(stderr, "spectralkv_engine_view: no CUDA device present\n");
    return 1;
  }
  const std::int64_t prompt = argc > 1 ? std::atoll(argv[1]) : 20000;
  const int steps = argc > 2 ? std::atoi(argv[2]) : 256;

  // 1. The model's shape and the compression policy: one cache for all layers.
  CacheConfig config;
  config.num_layers = 4;
  config.num_q_heads = 32;
  config.num_kv_heads = 8;
  config.head_dim = 128;
  config.block_size = 512;
  config.hot_tokens = 64;
  config.sink_tokens = 4;
  config.default_ranks = {16, 32};

  // 2. Capacity up front: sequences, cold blocks per layer, the largest prefill chunk.
  cuda::DeviceCacheOptions options;
  options.max_sequences = 2;
  options.max_blocks_per_layer = 2 * ((prompt + steps) / config.block_size + 1);
  options.max_append_tokens = 4096;
  options.compression = cuda::CompressionMode::kAsync;  // compression off the decode path
  cudaStream_t stream;
  cuda::check(cudaStreamCreate(&stream), "cudaStreamCreate");
  options.stream = stream;
  cuda::DeviceSpectralCache<Half> cache(config, options);
  std::printf("device memory reserved: %.1f MB\n", cache.device_bytes() / 1e6);

  const int kv = config.num_kv_heads, qh = config.num_q_heads, d = config.head_dim;
  const std::int64_t chunk = options.max_append_tokens;
  Half* k = random_device_tensor(static_cast<std::size_t>(chunk) * kv * d, 1);
  Half* v = random_device_tensor(static_cast<std::size_t>(chunk) * kv * d, 2);
  Half* q = random_device_tensor(static_cast<std::size_t>(chunk) * qh * d, 3);
  Half* out = nullptr;
  cuda::check(cudaMalloc(&out, static_cast<std::size_t>(chunk) * qh * d * sizeof(Half)), "cudaMalloc");
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));

  // 3. Prefill: per chunk and layer, append the chunk's K/V, then attend its queries (causal).
  const SequenceId seq = 42;
  cache.add_sequence(seq);
  for (std::int64_t done = 0; done < prompt; done += chunk) {
    const std::int64_t n = std::min(chunk, prompt - done);
    for (int layer = 0; layer < config.num_layers; ++layer) {
      cache.append(layer, seq, TensorView<const Half>{k, n, kv, d}, TensorView<const Half>{v, n, kv, d}, stream);
      cache.attend(layer, seq, TensorView<const Half>{q, n, qh, d}, TensorView<Half>{out, n, qh, d}, scale, stream);
    }
  }

  // 4. Decode: one token per step and layer. Blocks that fill are compressed on the cache's own stream.
  cudaEvent_t start, stop;
  cuda::check(cudaEventCreate(&start), "cudaEventCreate");
  cuda::check(cudaEventCreate(&stop), "cudaEventCreate");
  cuda::check(cudaEventRecord(start, stream), "cudaEventRecord");
  for (int s = 0; s < steps; ++s) {
    for (int layer = 0; layer < config.num_layers; ++layer) {
      cache.append(layer, seq, TensorView<const Half>{k, 1, kv, d}, TensorView<const Half>{v, 1, kv, d}, stream);
      cache.attend(layer, seq, TensorView<const Half>{q, 1, qh, d}, TensorView<Half>{out, 1, qh, d}, scale, stream);
    }
  }
  cuda::check(cudaEventRecord(stop, stream), "cudaEventRecord");
  cuda::check(cudaEventSynchronize(stop), "cudaEventSynchronize");
  float ms = 0;
  cuda::check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");

  // 5. What the cache holds.
  const MemoryStats m = cache.memory_stats();
  std::printf("tokens: %lld per layer (%lld cold, %lld dense)\n", static_cast<long long>(cache.length(seq, 0)),
              static_cast<long long>(m.cold_tokens / config.num_layers),
              static_cast<long long>((m.sink_tokens + m.tail_tokens) / config.num_layers));
  std::printf("KV memory: %.1f MB held, %.1f MB dense FP16 equivalent (%.2fx)\n", m.total_bytes() / 1e6,
              m.dense_equivalent_bytes / 1e6, m.compression_ratio());
  std::printf("decode: %.1f us per step of %d layers\n", ms * 1e3 / steps, config.num_layers);

  cache.remove_sequence(seq);
  cuda::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  for (Half* p : {k, v, q, out}) cudaFree(p);
  return 0;
}
