#pragma once
// The CUDA backend of the example's KV cache (compiled only with SPECTRALKV_LLAMA_CUDA, from
// cuda_kv_cache.cu): cuda::DeviceSpectralCache<Half> behind the KvCache interface. Host-only
// declarations, so the CPU side of the program (Eigen, OpenMP) never goes through nvcc.
//
// What moves to the GPU is the cache and its attention, nothing else: per layer and forward call the
// backend rounds the model's FP32 K, V and q rows to FP16, uploads them, runs the device cache's append
// and attend (the fused split-KV decode kernel for one query, MultiQueryAttention for a chunk), and
// downloads the FP16 output as FP32. The model's matmuls stay on the CPU.

#include <cstdint>
#include <memory>
#include <string>

#include "kv_interface.hpp"
#include "spectralkv/config.hpp"

namespace spectralkv::llama {

/// True when a CUDA device is present and usable.
bool cuda_device_present();

/// Name of the current CUDA device, for the log line.
std::string cuda_device_name();

/// Why the device cache cannot hold `config` (its kernels need head_dim 64 or 128, ranks 8, 16, 32 or
/// 64, GQA groups of at most 16), or "" when it can.
std::string cuda_cache_unsupported(const CacheConfig& config);

/// A spectral cache on the device, with the tiers and compression policy of `config` (the same as the
/// CPU SpectralCache, so tokens_until_compression() and the strict chunks agree between backends).
/// \param capacity   most tokens the sequence reaches (sizes the block pools)
/// \param max_chunk  most tokens one append or attend carries
/// \param synchronous  compress inside the append that fills a block (CompressionMode::kSynchronous).
///     Strict-mode perplexity needs it: the token whose append forms a block must attend to that block
///     compressed, as it would on the CPU and in token-by-token decoding. The asynchronous mode (an
///     engine's default) attends to a filled block densely until its compression, launched after the
///     last layer's append, has finished, so which queries see it compressed depends on timing.
std::unique_ptr<KvCache> make_cuda_spectral_cache(const CacheConfig& config, std::int64_t capacity,
                                                  std::int64_t max_chunk, bool synchronous);

/// A dense FP16 cache on the device, for the reference arm. The device cache has no dense mode, so this
/// is a DeviceSpectralCache whose sink tier holds all `capacity` tokens: nothing is ever compressed, and
/// attention runs through the same kernels over dense FP16 rows, which is exactly what a dense FP16 engine
/// holds. Against the CPU dense arm it differs only by FP16 storage of K, V, q and the output.
/// \param shape  num_layers, num_q_heads, num_kv_heads and head_dim are read; the rest is ignored
std::unique_ptr<KvCache> make_cuda_dense_cache(const CacheConfig& shape, std::int64_t capacity,
                                               std::int64_t max_chunk);

}  // namespace spectralkv::llama
