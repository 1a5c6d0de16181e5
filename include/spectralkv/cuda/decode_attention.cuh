#pragma once
// Decode attention on the GPU: one query token per sequence attends to every token its cache holds.
//
// Three operators share one kernel design and one calling convention (CUTLASS style):
//
//   DecodeAttention       fused attention over the compressed layout: cold blocks are read as INT8
//                         coefficients and FP16 bases (ColdBlockLayout, spectralkv/layout.cuh) and never
//                         expanded; the dense sink and tail tokens join the same softmax.
//   DenseDecodeAttention  the same kernel over plain dense K/V ([batch][max_len][num_kv_heads][head_dim], or
//                         head-major [batch][num_kv_heads][max_len][head_dim]): the baseline every speed
//                         figure is compared with.
//   DecompressThenAttend  rebuilds K and V of the cold blocks with cuBLAS GEMMs into a dense buffer, then
//                         runs the dense kernel: what attention over a compressed cache costs without
//                         compressed-space attention.
//
// Each operator offers
//   Status can_implement(params)                 every argument check (reads device attributes, launches nothing);
//   std::size_t get_workspace_size(params)       bytes of scratch the call needs (query once, allocate once);
//   void initialize_workspace(params, ws, stream) zeroes the split-merge counters; needed once after the
//                                                 workspace is allocated (every run leaves them zero again);
//   void run(params, ws, ws_bytes, stream)       enqueues the work on `stream`; it allocates nothing,
//                                                 synchronises nothing, and throws InvalidArgument (naming
//                                                 the argument) when can_implement fails and CudaError when a
//                                                 launch fails.
//
// run() launches its grids as programmatic dependents (PDL) of the work before them on the stream: nothing is
// read before that work has finished (the attention grid waits on the device first, and the merge grid is
// launched only after that wait), so the launch overlaps the end of the kernel before it, and a kernel
// before it that calls `griddepcontrol.launch_dependents` early lets the attention grid be resident by the
// time it finishes.
//
// Scores are `scale · q·k` (pass 1/sqrt(head_dim) for the usual attention): the query is NOT pre-scaled.
// All arithmetic is FP32 except the tensor-core products, whose operands are exact (INT8 coefficients,
// entered as the FP16 values 1152 + c with the bias taken back out in FP32 once per block, and FP16 bases)
// or split into a high and a low FP16 half where rounding would matter. Range: the operand of
// the projection onto B_V holds, per rank r, sum_t p_t * c_{t,r} over one warp's 128 tokens of a block
// (c_{t,r} the value coefficient, p_t <= 1) in FP16, so it overflows only when that sum exceeds 65504,
// i.e. when value vectors (mean-centred, if enabled) have norms of several hundred and the attention is
// flat over them.
//
// Work decomposition (split-KV): the work of a sequence and KV head is a list of items (one cold block, or up
// to 64 dense tokens), all (sequence, head) lists are laid end to end, and every CTA of a grid that fills the
// GPU takes an equal share of the whole list, so batch 1 at long context keeps every SM busy (or, when that
// does not put more items on the busiest CTA, a multiple of the (sequence, head) count of those CTAs do, so
// that with equal lengths no CTA holds parts of two; the kernel decides from the lengths). A (sequence,
// head) whose items span several CTAs gets one partial (max, sum, output) from each, merged by log-sum-exp:
// with many (sequence, head) pairs by the last of those CTAs to finish, inside the attention kernel; with few
// pairs next to the CTAs (more than 8 CTAs per pair on average, e.g. batch 1) by a second, small kernel that
// run() enqueues after the first as its programmatic dependent (it starts as the attention kernel's CTAs exit
// and merges every pair in parallel).

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>

#include "spectralkv/layout.cuh"

namespace spectralkv::cuda {

/// Element type of queries, outputs and dense tiers.
enum class DataType { kHalf, kBFloat16 };

/// Result of can_implement: `ok`, or the reason the call cannot run (names the argument and its value).
struct Status {
  bool ok = true;
  std::string message;
  explicit operator bool() const { return ok; }
  static Status success() { return {}; }
  static Status failure(std::string why) { return {false, std::move(why)}; }
};

/// One dense tier (sinks, or the recent tail) of every sequence of a batch.
///
/// Sequence b's tokens are `lengths[b]` rows of `[num_kv_heads][head_dim]` elements of the batch's
/// DataType, the row of token t starting at element `t * num_kv_heads * head_dim` of `k[b]` (and `v[b]`).
/// All three arrays live in device memory and have `batch` entries. A tier with `lengths == nullptr` is empty
/// for every sequence; a sequence with length 0 may have null pointers. Rows must be 16-byte aligned, i.e. the
/// pointers are 16-byte aligned (head_dim is a multiple of 8).
struct DenseTier {
  const void* const* k = nullptr;
  const void* const* v = nullptr;
  const std::int32_t* lengths = nullptr;
};

/// Arguments of DecodeAttention. Every pointer is a device pointer.
struct DecodeAttentionParams {
  DataType dtype = DataType::kHalf;  ///< type of q, out and the dense tiers
  int batch = 0;                     ///< number of sequences (1 query token each)
  int num_q_heads = 0;               ///< query heads; a multiple of layout.num_kv_heads, group size <= 16
  /// Shape of the cold blocks of this layer: head_dim (64 or 128), num_kv_heads, block_size, rank_k and
  /// rank_v (each 8, 16, 32 or 64) and has_mean. Ranks are chosen per call, so each layer may differ.
  ColdBlockLayout layout{};
  float scale = 0.0f;  ///< scores are scale * q.k

  const void* q = nullptr;  ///< [batch][num_q_heads][head_dim]
  void* out = nullptr;      ///< [batch][num_q_heads][head_dim], written completely

  /// Block pool of the layer: block id i occupies layout.block_bytes bytes at pool + i * block_bytes.
  /// 16-byte aligned.
  const std::uint8_t* pool = nullptr;
  /// Block tables in CSR form: sequence b owns the cold blocks
  /// block_table[block_table_offsets[b] .. block_table_offsets[b + 1]), oldest first.
  /// block_table_offsets has batch + 1 entries; it may be null when no sequence has a cold block.
  const std::int32_t* block_table = nullptr;
  const std::int32_t* block_table_offsets = nullptr;

  DenseTier sink;  ///< the oldest tokens of each sequence, kept dense (may be empty)
  DenseTier tail;  ///< the newest tokens of each sequence, kept dense
  // A sequence with no token in any tier gets a zero output.
};

/// Fused decode attention over the compressed cache (see the file comment).
class DecodeAttention {
 public:
  static Status can_implement(const DecodeAttentionParams& params);
  static std::size_t get_workspace_size(const DecodeAttentionParams& params);
  static void initialize_workspace(const DecodeAttentionParams& params, void* workspace, cudaStream_t stream);
  static void run(const DecodeAttentionParams& params, void* workspace, std::size_t workspace_bytes,
                  cudaStream_t stream);

  /// Bytes the kernel must read from device memory for this call (cold blocks as stored, including bases,
  /// scales and alignment padding of the sections it copies; dense rows; queries) plus the output it writes.
  /// Needs the per-sequence lengths on the host: `cold_blocks[b]`, `sink_len[b]`, `tail_len[b]`.
  static std::int64_t bytes_moved(const DecodeAttentionParams& params, const std::int64_t* cold_blocks,
                                  const std::int64_t* sink_len, const std::int64_t* tail_len);
};

/// Order of the dense K and V arrays of DenseDecodeAttention.
enum class KvLayout {
  kTokenMajor,  ///< [batch][max_len][num_kv_heads][head_dim]: one row per token (the cache's dense tiers)
  kHeadMajor,   ///< [batch][num_kv_heads][max_len][head_dim]: one contiguous run per (sequence, head), as the
                ///< K and V of torch.nn.functional.scaled_dot_product_attention
};

/// Arguments of DenseDecodeAttention: plain dense K/V, as an inference engine without compression holds it.
struct DenseDecodeParams {
  DataType dtype = DataType::kHalf;
  int batch = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;  ///< 64 or 128
  float scale = 0.0f;
  const void* q = nullptr;  ///< [batch][num_q_heads][head_dim]
  void* out = nullptr;      ///< [batch][num_q_heads][head_dim]
  /// Token t of sequence b and KV head h at element ((b * max_len + t) * num_kv_heads + h) * head_dim
  /// (kTokenMajor) or ((b * num_kv_heads + h) * max_len + t) * head_dim (kHeadMajor). 16-byte aligned.
  const void* k = nullptr;
  const void* v = nullptr;
  KvLayout layout = KvLayout::kTokenMajor;
  std::int64_t max_len = 0;                ///< token capacity per sequence (the strides above)
  const std::int32_t* seq_lens = nullptr;  ///< [batch], each in [0, max_len]; length 0 gives a zero output
};

/// Split-KV dense decode attention, the kernel of DecodeAttention without cold blocks.
class DenseDecodeAttention {
 public:
  static Status can_implement(const DenseDecodeParams& params);
  static std::size_t get_workspace_size(const DenseDecodeParams& params);
  static void initialize_workspace(const DenseDecodeParams& params, void* workspace, cudaStream_t stream);
  static void run(const DenseDecodeParams& params, void* workspace, std::size_t workspace_bytes,
                  cudaStream_t stream);
};

/// Arguments of DecompressThenAttend: the DecodeAttention arguments (dtype must be kHalf) plus host-side
/// sizes for the reconstruction buffer.
struct DecompressParams {
  DecodeAttentionParams attention;
  /// Upper bound on the cold blocks of any sequence (sizes the reconstruction buffer).
  std::int64_t max_cold_blocks = 0;
};

/// The "before" path: dequantise the coefficients, rebuild K and V of every cold block with batched cuBLAS
/// GEMMs (FP16 in, FP32 accumulate) into [batch][max_cold_blocks * block_size][num_kv_heads][head_dim], then
/// run the dense kernel over sinks, rebuilt tokens and tail. Holds a cuBLAS handle, hence an object.
class DecompressThenAttend {
 public:
  DecompressThenAttend();
  ~DecompressThenAttend();
  DecompressThenAttend(const DecompressThenAttend&) = delete;
  DecompressThenAttend& operator=(const DecompressThenAttend&) = delete;

  static Status can_implement(const DecompressParams& params);
  static std::size_t get_workspace_size(const DecompressParams& params);
  static void initialize_workspace(const DecompressParams& params, void* workspace, cudaStream_t stream);
  void run(const DecompressParams& params, void* workspace, std::size_t workspace_bytes, cudaStream_t stream);

 private:
  void* handle_ = nullptr;  // cublasHandle_t
};

}  // namespace spectralkv::cuda
