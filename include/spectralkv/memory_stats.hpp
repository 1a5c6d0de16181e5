#pragma once
// Sequence ids and memory statistics: shared by the CPU and CUDA caches.

#include <cstdint>

namespace spectralkv {

/// Identifies a sequence of a batch; chosen by the caller.
using SequenceId = std::int64_t;

/// Memory held by the cache, summed over sequences and layers. Token counts are token·layer counts.
struct MemoryStats {
  std::int64_t sink_tokens = 0, cold_tokens = 0, tail_tokens = 0;
  std::int64_t sink_bytes = 0;  ///< dense K and V of the sink tier
  std::int64_t cold_bytes = 0;  ///< cold blocks in use: bases, means, scales, coefficients, padding
  std::int64_t tail_bytes = 0;  ///< dense K and V of the tail
  std::int64_t cold_blocks = 0;         ///< blocks in use (all layers)
  std::int64_t pool_bytes = 0;          ///< bytes the pools have allocated, in use or free
  std::int64_t dense_equivalent_bytes = 0;  ///< the same tokens stored as dense K and V of type T

  std::int64_t total_bytes() const { return sink_bytes + cold_bytes + tail_bytes; }
  double compression_ratio() const {
    return total_bytes() > 0 ? static_cast<double>(dense_equivalent_bytes) / static_cast<double>(total_bytes()) : 1.0;
  }
};

}  // namespace spectralkv
