#pragma once
// The KV cache as the model sees it: one sequence, all layers, post-RoPE keys and values in (FP32, as
// the model computes them), attention outputs out. The model (model.hpp) and the perplexity driver
// (perplexity.hpp) only ever talk to this interface; the CPU caches live in kv_cache.hpp and the CUDA
// ones in cuda_kv_cache.cu. Host-only and free of Eigen, so CUDA sources can include it too.
//
// Shapes follow spectralkv::TensorView: k, v are [tokens][num_kv_heads][head_dim], q and out are
// [tokens][num_q_heads][head_dim]; query head h reads KV head h / (num_q_heads / num_kv_heads).

#include <cstdint>

#include "spectralkv/tensor.hpp"

namespace spectralkv::llama {

/// Bytes a cache holds, counted as an engine would store it: dense tiers in FP16 (2 bytes per K or V
/// element), cold blocks as their slab bytes (FP16 bases, FP32 scales, INT8 coefficients, padding).
struct KvBytes {
  std::int64_t tokens = 0;          ///< token·layer count
  std::int64_t cold_tokens = 0;     ///< of which in compressed blocks
  std::int64_t stored = 0;          ///< bytes held
  std::int64_t dense_fp16 = 0;      ///< the same tokens as a dense FP16 cache
  double ratio() const { return stored > 0 ? static_cast<double>(dense_fp16) / static_cast<double>(stored) : 1.0; }
};

class KvCache {
 public:
  virtual ~KvCache() = default;
  /// Drops every token: the next append starts a new sequence at position 0.
  virtual void clear() = 0;
  virtual std::int64_t length(int layer) const = 0;
  /// Appends the newest tokens' keys and values of one layer.
  virtual void append(int layer, TensorView<const float> k, TensorView<const float> v) = 0;
  /// Causal attention of the newest q.tokens tokens (appended already): query i of n sees positions
  /// <= length − n + i. Not const: an implementation may record fidelity statistics.
  virtual void attend(int layer, TensorView<const float> q, TensorView<float> out, float scale) = 0;
  /// Tokens that can be appended before the cache re-encodes older ones (0: the next append does).
  virtual std::int64_t tokens_until_compression(int layer) const = 0;
  virtual KvBytes bytes() const = 0;
};

}  // namespace spectralkv::llama
