#pragma once
// Cache configuration: model shape, tier sizes and the per-layer rank schedule, with validation that
// names every bad field.

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "spectralkv/error.hpp"
#include "spectralkv/layout.cuh"

namespace spectralkv {

/// Truncation ranks of one layer: keys and values are compressed independently.
struct LayerRanks {
  int key = 16;    ///< r_K: rank of the key basis
  int value = 32;  ///< r_V: rank of the value basis
};

/// Everything that fixes the cache's shapes. One config describes all layers of a model (or of one
/// tensor-parallel shard: `num_q_heads` / `num_kv_heads` are the heads this cache holds).
struct CacheConfig {
  int num_layers = 1;
  int num_q_heads = 32;   ///< query heads; a multiple of num_kv_heads (GQA group = q / kv)
  int num_kv_heads = 8;
  int head_dim = 128;     ///< D
  int block_size = 512;   ///< L: tokens per compressed (cold) block
  int hot_tokens = 64;    ///< newest tokens that always stay dense
  /// First tokens of a sequence kept dense forever (attention sinks). 16 by measurement on a real model:
  /// without sinks perplexity rises by 22% at ranks 16/32, with 4 by 3.8%, with 16 by 3.3% (docs/QUALITY.md).
  int sink_tokens = 16;
  bool mean_center = false;  ///< subtract the per-block, per-channel mean before the SVD; store it
  /// Ranks per layer. Empty: `default_ranks` for every layer. Otherwise exactly num_layers entries.
  std::vector<LayerRanks> layer_ranks;
  LayerRanks default_ranks{};

  int group_size() const { return num_q_heads / num_kv_heads; }
  /// \throws InvalidArgument unless layer is in [0, num_layers)
  LayerRanks ranks(int layer) const {
    // Called per layer and call: the messages are built only when a check fails.
    if (layer < 0 || layer >= num_layers)
      detail::fail("CacheConfig::ranks", "layer", layer,
                   detail::concat("must be in [0, num_layers = ", num_layers, ")"));
    if (layer_ranks.empty()) return default_ranks;
    if (static_cast<std::size_t>(layer) >= layer_ranks.size()) {
      detail::fail("CacheConfig::ranks", "layer", layer,
                   detail::concat("layer_ranks has ", layer_ranks.size(), " entries (the config is not valid)"));
    }
    return layer_ranks[static_cast<std::size_t>(layer)];
  }
  /// Tail length at which the oldest block_size tail tokens are compressed.
  int compress_threshold() const { return hot_tokens + block_size; }

  /// Throws InvalidArgument naming the first bad field.
  void validate() const {
    constexpr const char* kWhat = "CacheConfig";
    using detail::require;
    // The upper bounds are far above any model's and keep every size derived from them within 64 bits.
    constexpr int kMaxHeads = 1 << 16, kMaxHeadDim = 1 << 16, kMaxBlock = 1 << 24;
    require(num_layers > 0, kWhat, "num_layers", num_layers, "must be positive");
    require(num_kv_heads > 0 && num_kv_heads <= kMaxHeads, kWhat, "num_kv_heads", num_kv_heads,
            detail::concat("must be in [1, ", kMaxHeads, "]"));
    require(num_q_heads > 0 && num_q_heads <= kMaxHeads, kWhat, "num_q_heads", num_q_heads,
            detail::concat("must be in [1, ", kMaxHeads, "]"));
    require(num_q_heads % num_kv_heads == 0, kWhat, "num_q_heads", num_q_heads,
            detail::concat("must be a multiple of num_kv_heads = ", num_kv_heads));
    require(head_dim > 0 && head_dim <= kMaxHeadDim, kWhat, "head_dim", head_dim,
            detail::concat("must be in [1, ", kMaxHeadDim, "]"));
    require(block_size > 0 && block_size <= kMaxBlock, kWhat, "block_size", block_size,
            detail::concat("must be in [1, ", kMaxBlock, "]"));
    require(hot_tokens >= 0, kWhat, "hot_tokens", hot_tokens, "must be non-negative");
    require(sink_tokens >= 0, kWhat, "sink_tokens", sink_tokens, "must be non-negative");
    // Token counts derived from these (the compression threshold, tokens until the next block) are ints.
    constexpr std::int64_t kIntMax = std::numeric_limits<int>::max();
    const std::int64_t dense_most = std::int64_t{hot_tokens} + block_size + sink_tokens;
    require(dense_most <= kIntMax, kWhat, "hot_tokens + block_size + sink_tokens", dense_most,
            detail::concat("must not exceed ", kIntMax, " (hot_tokens = ", hot_tokens, ", block_size = ", block_size,
                           ", sink_tokens = ", sink_tokens, ")"));
    require(layer_ranks.empty() || layer_ranks.size() == static_cast<std::size_t>(num_layers), kWhat,
            "layer_ranks.size()", layer_ranks.size(),
            detail::concat("must be 0 or num_layers = ", num_layers));
    const int max_rank = std::min(block_size, head_dim);
    auto check = [&](const LayerRanks& r, int layer) {
      const std::string where = layer < 0 ? std::string("default_ranks")
                                          : detail::concat("layer_ranks[", layer, "]");
      require(r.key > 0 && r.key <= max_rank, kWhat, (where + ".key").c_str(), r.key,
              detail::concat("must be in [1, min(block_size, head_dim) = ", max_rank, "]"));
      require(r.value > 0 && r.value <= max_rank, kWhat, (where + ".value").c_str(), r.value,
              detail::concat("must be in [1, min(block_size, head_dim) = ", max_rank, "]"));
    };
    if (layer_ranks.empty()) check(default_ranks, -1);
    for (std::size_t l = 0; l < layer_ranks.size(); ++l) check(layer_ranks[l], static_cast<int>(l));
    // Byte offsets inside a block are 32-bit in the kernels.
    for (int l = 0; l < (layer_ranks.empty() ? 1 : num_layers); ++l) {
      const LayerRanks r = layer_ranks.empty() ? default_ranks : layer_ranks[static_cast<std::size_t>(l)];
      const std::int64_t bytes =
          ColdBlockLayout::make(block_size, head_dim, num_kv_heads, r.key, r.value, mean_center).block_bytes;
      require(bytes <= kIntMax, kWhat, "cold block bytes", bytes,
              detail::concat("must not exceed ", kIntMax, ": layer ", l, " with block_size ", block_size, ", head_dim ",
                             head_dim, ", num_kv_heads ", num_kv_heads, ", ranks ", r.key, "/", r.value));
    }
  }
};

}  // namespace spectralkv
