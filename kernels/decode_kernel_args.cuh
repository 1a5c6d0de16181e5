#pragma once
// Arguments and launcher declaration of the decode-attention kernel (kernels/decode_attention_kernel.cuh).
// Private to the kernel library. The host code includes only this header, so it never instantiates the
// kernel; the decode_spectral_*.cu and decode_dense.cu files hold the explicit instantiations.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace spectralkv::cuda::kernel {

/// Warps per CTA and CTAs per SM of every instantiation. A cold block has a fixed cost per warp (q·B_Kᵀ,
/// the projection onto B_V, the loop) next to its per-token work, so a block gets 4 warps (128 tokens
/// each of a 512-token block), and two CTAs per SM let one CTA's stage barriers overlap the other's
/// work. The plan falls back to one CTA per SM when two stages do not fit in half an SM's shared memory
/// (large ranks). The dense-only instantiation has the same shape: measured on an H200 (B=8, T=64K),
/// 2 × 4 warps with 3-stage rings read 1.45× faster than one CTA of 8 warps with a 6-stage ring (which
/// had no eligible warp in 68% of cycles), and 3 × 4 warps with 2-stage rings 1.32× faster.
constexpr int kWarpsPerCta = 4;
constexpr int kCtasPerSm = 2;
constexpr int kChunk = 64;         ///< dense tokens per item
constexpr int kNumTiers = 3;       ///< dense tiers: sinks, (rebuilt tokens,) tail
constexpr int kMaxGroup = 16;      ///< query heads per KV head: the 16 rows of an MMA tile
constexpr int kMaxStages = 6;
constexpr int kMaxBatch = 1024;    ///< sequences per launch (their lengths are staged in shared memory)
constexpr int kKStepsPerGroup = 4; ///< 16-token steps a warp scores before one softmax update

/// One dense tier as the kernel reads it: per-sequence pointers, or one strided array.
struct TierArgs {
  const void* const* k_ptrs = nullptr;  ///< [batch] device pointers, or null for the strided form
  const void* const* v_ptrs = nullptr;
  const char* k_base = nullptr;         ///< strided form: sequence b at k_base + b * seq_stride_bytes
  const char* v_base = nullptr;
  long long seq_stride_bytes = 0;
  long long token_stride_bytes = 0;     ///< from token t to t + 1 of one head
  long long head_stride_bytes = 0;      ///< from head h to h + 1 of one token
  const int* lengths = nullptr;         ///< [batch]; null: the tier is empty
};

struct KernelArgs {
  const void* q = nullptr;
  void* out = nullptr;
  float score_scale = 0.0f;  ///< scale * log2(e): scores live in the log2 domain
  int batch = 0, num_kv_heads = 0, group = 0;
  // Cold blocks.
  const unsigned char* pool = nullptr;
  const int* block_table = nullptr;
  const int* block_offsets = nullptr;
  long long block_bytes = 0, head_bytes = 0;
  int block_size = 0, has_mean = 0;
  long long off_basis_k = 0, off_basis_v = 0, off_mean_k = 0, off_mean_v = 0, off_region = 0;
  int region_bytes = 0;   ///< bytes copied from off_region (= scale_k): scales and coefficients
  int reg_scale_v = 0, reg_coeff_k = 0, reg_coeff_v = 0;  ///< offsets inside that region
  TierArgs tiers[kNumTiers];
  // Shared memory plan (byte offsets into dynamic shared memory).
  int stages = 0, stage_bytes = 0;
  int smem_seq = 0, smem_prefix = 0, smem_qf = 0, smem_qt = 0, smem_work = 0, smem_misc = 0,
      smem_bar = 0, smem_stage = 0;
  // Workspace.
  float* partial_o = nullptr;    ///< [slots][group][head_dim]
  float2* partial_ml = nullptr;  ///< [slots][group]: (max, sum)
  unsigned int* counters = nullptr;  ///< [batch * num_kv_heads]
  /// Split merge of a pair whose items span several CTAs: 1, the last of those CTAs merges the partials
  /// (counters); 0, decode_merge_kernel, enqueued after the attention kernel, merges them.
  int merge_in_kernel = 1;
};

struct SeqInfo {
  int block_begin;
  int ncold;
  int len[kNumTiers];
};

/// Enqueues decode_attention_kernel<T, D, RK, RV> (RK = RV = 0: dense tiers only). T is __half or
/// __nv_bfloat16. Throws CudaError when the launch fails.
template <class T, int D, int RK, int RV>
void launch_decode(const KernelArgs& args, int grid, int smem_bytes, cudaStream_t stream);

}  // namespace spectralkv::cuda::kernel
