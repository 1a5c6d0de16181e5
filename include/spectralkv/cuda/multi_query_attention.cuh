#pragma once
// Multi-query attention over the compressed cache (q_len > 1: chunked prefill, speculative decoding),
// causal by absolute position. A straightforward, unfused kernel: correct on every shape the cache
// holds, but not tuned (one CTA per query row and KV head, scores staged through shared memory). Decode
// steps (q_len = 1) use the fused split-KV DecodeAttention instead; a tensor-core prefill kernel is
// separate work.

#include <cuda_runtime.h>

#include <cstdint>

#include "spectralkv/cuda/decode_attention.cuh"
#include "spectralkv/layout.cuh"

namespace spectralkv::cuda {

/// Arguments of MultiQueryAttention. Every pointer is a device pointer.
///
/// Sequence b of the batch has rows q_offsets[b] .. q_offsets[b + 1] of q and out: its newest
/// n_b = q_offsets[b + 1] − q_offsets[b] tokens, oldest first. Its length is
/// len_b = sink.lengths[b] + (block_table_offsets[b + 1] − block_table_offsets[b])·block_size + tail.lengths[b],
/// and query row j attends to positions ≤ len_b − n_b + j. Position order: sinks, cold blocks, tail.
struct MultiQueryParams {
  DataType dtype = DataType::kHalf;
  int batch = 0;
  int num_q_heads = 0;  ///< a multiple of layout.num_kv_heads, group size ≤ 16
  int total_rows = 0;   ///< q_offsets[batch]
  ColdBlockLayout layout{};  ///< head_dim ≤ 128 and a multiple of 8; any ranks ≤ 64
  float scale = 0.0f;        ///< scores are scale · q·k

  const void* q = nullptr;  ///< [total_rows][num_q_heads][head_dim]
  void* out = nullptr;      ///< [total_rows][num_q_heads][head_dim]
  const std::int32_t* q_offsets = nullptr;  ///< [batch + 1]
  const std::int32_t* row_sequence = nullptr;  ///< [total_rows]: the b of each row

  const std::uint8_t* pool = nullptr;
  const std::int32_t* block_table = nullptr;
  const std::int32_t* block_table_offsets = nullptr;  ///< [batch + 1]; null: no cold blocks
  DenseTier sink;
  DenseTier tail;
};

class MultiQueryAttention {
 public:
  static Status can_implement(const MultiQueryParams& params);
  /// Enqueues the kernel on `stream`; needs no workspace and allocates nothing.
  static void run(const MultiQueryParams& params, cudaStream_t stream);
};

}  // namespace spectralkv::cuda
