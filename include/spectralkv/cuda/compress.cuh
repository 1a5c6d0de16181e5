#pragma once
// Batched truncated SVD + INT8 quantisation on the GPU: the compression path of the CUDA backend.
//
// One call compresses a whole batch of L×D blocks (every (layer, KV head, K/V) matrix whose block
// filled, across sequences) and writes each result straight into its place in the cold layout
// (ColdBlockLayout, layout.cuh). Jobs of one batch share L, D and the element type but each has its
// own rank, mean-centring flag and output pointers, so keys (r_K) and values (r_V) of every layer go
// into one launch sequence.
//
// Three algorithms share this interface:
//  - kSubspaceIteration (the fast path): G = XᵀX on tensor cores (FP16/BF16 products are exact, FP32
//    accumulation; a mean-centred job accumulates the Gram of X minus a provisional FP16 shift, the
//    mean of its first 64 rows, so large channel means cost no accuracy); `iterations` steps of block
//    subspace iteration on G with ℓ = r + p columns (3×TF32 tensor-core products, so FP32 accuracy),
//    orthonormalised by Cholesky QR with an FP64 Gram on (G + δI)·Q, δ = 1e-6·trace(G), after every
//    product, or after two where the previous pass estimates κ ≤ 100 (never the last product), plus a
//    second CholQR pass at the end when the first left an entry of QᵀQ − I above 1e-5; Rayleigh–Ritz on
//    span(Q) with a parallel Jacobi eigen-solve of the ℓ×ℓ projection (the first sweep over all pairs,
//    later ones across the top-r boundary). That holds for ℓ ≤ 48 (r ≤ 32 at the default
//    oversampling); a job with a wider subspace takes kTridiagonal's eigen-solve instead, which is
//    faster there (on an H200, 512 jobs at D = 128: 1.4× at r = 36, 1.6× at r = 40). Then C = (X − mean)·B_hᵀ
//    against the stored FP16 basis B_h and the INT8 quantisation, fused in one kernel (one pass over X
//    with C held in shared memory when L·r fits, e.g. L = 512 with r ≤ 32; two passes otherwise).
//    When the one-pass projection applies, the Gram, the eigen-solve and the projection of a job run in
//    one CTA with G kept in shared memory (two kernels per run, a workspace of a few bytes per job);
//    otherwise they are separate kernels (four per run) and the workspace holds every job's FP32 Gram.
//  - kTridiagonal: the same kernels with every job's eigen-solve done on G itself, in one CTA:
//    Householder tridiagonalisation (G in registers), Sturm-count multisection for the r largest
//    eigenvalues, inverse iteration, Gram–Schmidt, back-transform. Converged eigenvectors (like
//    kCusolver's) at a cost that hardly depends on r: slower than subspace iteration for r ≤ 32 (on an
//    H200 2.1× at r = 16, level at r = 32), faster beyond.
//  - kCusolver (oracle in the tests and fallback): FP32 Gram by cuBLAS, cusolverDnXsyevBatched for the
//    full eigen-decomposition of every Gram, the top r eigenvectors, then the same projection and
//    quantisation kernel.
//
// All follow the CPU reference rule (compress.hpp): basis rows sorted by decreasing σ², each signed so
// that its entry of largest magnitude is positive; scale_j = max_t |C[t][j]| / 127 and
// q = round-to-nearest-even(C / scale_j) (a zero column gets scale 0 and zeros), bit for bit on the
// FP32 coefficients. The cuSOLVER and tridiagonal paths return converged singular vectors (to the
// FP32 Gram's resolution; vectors of numerically equal σ are an orthonormal basis of their span). The
// fast path returns Ritz vectors after at most `jacobi_sweeps` Jacobi sweeps: together they span the near-optimal rank-r
// subspace (truncation error ≤ 1.01× the Eckart–Young optimum on every spectrum tested, outlier
// channels up to 300× the rest; beyond that the FP32 Gram limits it, see docs/PERFORMANCE.md), and
// each of them is a singular vector only where the singular values are well separated (to the
// accuracy of one full sweep: later sweeps refine the subspace, not the vectors within it). The
// coefficients are computed against the FP16 basis as stored, so dequantised reconstruction uses
// exactly the basis it was projected on.
//
// Usage (CUTLASS-like): construct with the problem (validated, throws InvalidArgument naming the field),
// query get_workspace_size(), allocate once, then run() any number of times on any stream of the device
// that was current at construction (the constructor raises the kernels' shared-memory limits there;
// one compressor per device). run() never allocates.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "spectralkv/layout.cuh"

namespace spectralkv::cuda {

/// Element type of the blocks being compressed (the dense tiers of the cache).
enum class ElementType : int { kHalf = 0, kBFloat16 = 1 };

/// Which algorithm computes the basis.
enum class CompressAlgorithm : int {
  kSubspaceIteration = 0,  ///< the fast fused kernels (default)
  kCusolver = 1,           ///< cuBLAS Gram + cusolverDnXsyevBatched: the oracle and fallback
  kTridiagonal = 2,        ///< the same kernels with a Householder eigen-solve of G for every job
};

/// One matrix to compress: an L×D block of one (layer, KV head, K or V) and where its factors go.
///
/// \param x              first element of row 0; row t starts at x + t·x_row_stride elements. Element
///                       type = CompressProblem::element. Must be 16-byte aligned, and x_row_stride a
///                       multiple of 8 elements and ≥ D (the kernels read rows with 16-byte loads).
///                       For the cache's [tokens][heads][head_dim] tensors: x = base + (t0·H + h)·D and
///                       x_row_stride = H·D.
/// \param rank           r, 1 ≤ r ≤ min(CompressProblem::max_rank, D, L).
/// \param mean_center    subtract the per-column mean (rounded to FP16, as stored) before the SVD.
/// \param basis_out      [r][D] FP16, row j = j-th right singular vector (4-byte aligned).
/// \param mean_out       [D] FP16, the stored mean; required when mean_center, ignored otherwise.
/// \param scale_out      [r] FP32 per-column scales (4-byte aligned).
/// \param coeff_out      [L][r] INT8 quantised coefficients of (X − mean)·basisᵀ.
/// \param basis_f32_out  optional [r][D] FP32 basis before rounding to FP16 (diagnostics, tests).
/// \param coeff_f32_out  optional [L][r] FP32 coefficients before quantisation (diagnostics, tests).
/// \param eigenvalues_out optional [r] FP32 Ritz values σ_j² (squared singular values), descending.
struct CompressJob {
  const void* x = nullptr;
  std::int64_t x_row_stride = 0;
  int rank = 0;
  bool mean_center = false;
  __half* basis_out = nullptr;
  __half* mean_out = nullptr;
  float* scale_out = nullptr;
  std::int8_t* coeff_out = nullptr;
  float* basis_f32_out = nullptr;
  float* coeff_f32_out = nullptr;
  float* eigenvalues_out = nullptr;
};

/// Tuning of the subspace-iteration path (ignored by kCusolver and kTridiagonal, and by the jobs whose
/// subspace is too wide for it, which take the tridiagonal eigen-solve; `oversample` decides which
/// those are). The defaults keep the truncation
/// error within 1% of the Eckart–Young optimum on the hardest spectra measured (flat, power-law
/// decay i^-0.25, iid columns with 100× outlier channels); see docs/PERFORMANCE.md.
struct CompressOptions {
  /// Extra subspace columns p (ℓ = min(D, roundup8(r + p))), at most D. 0: automatic, p = max(8, r/2).
  int oversample = 0;
  /// Subspace-iteration steps (products with G), ≥ 1.
  int iterations = 4;
  /// Upper bound on Jacobi sweeps in the Rayleigh–Ritz step (stops early once converged), ≥ 1. The
  /// first sweep rotates every pair; later ones the pairs that straddle the top-r boundary of the
  /// current diagonal (what moves the top-r subspace), filling each round with pairs within the larger
  /// side, and stop early once the straddling pairs have converged.
  int jacobi_sweeps = 2;
};

/// The shape every job of a batch shares, and the capacity the workspace is sized for.
struct CompressProblem {
  ElementType element = ElementType::kHalf;
  int rows = 512;      ///< L, tokens per block, ≥ 1
  int head_dim = 128;  ///< D: 64 or 128
  int max_jobs = 0;    ///< largest batch run() will be given, ≥ 1
  int max_rank = 0;    ///< largest job rank, 1 ≤ max_rank ≤ min(D, L)
  CompressAlgorithm algorithm = CompressAlgorithm::kSubspaceIteration;
  CompressOptions options{};
};

/// Subspace width ℓ the fast path uses for a job of rank `rank` (shared by host sizing and kernels).
SPECTRALKV_HD constexpr int compress_subspace_width(int rank, int head_dim, int oversample) {
  const int p = oversample > 0 ? oversample : (rank / 2 > 8 ? rank / 2 : 8);
  const int ell = (rank + p + 7) / 8 * 8;
  return ell < head_dim ? ell : head_dim;
}

/// A job whose outputs are the K or V sections of one head of one cold block.
/// \param layout     the layer's cold layout (its rank_k/rank_v/has_mean decide rank and centring)
/// \param head_base  pool + block_id·layout.block_bytes + head·layout.head_bytes (device memory)
/// \param value      false: the key sections; true: the value sections
/// \param x, x_row_stride  the block's rows (see CompressJob)
inline CompressJob make_cold_block_job(const ColdBlockLayout& layout, std::uint8_t* head_base, bool value,
                                       const void* x, std::int64_t x_row_stride) {
  CompressJob job;
  job.x = x;
  job.x_row_stride = x_row_stride;
  job.rank = value ? layout.rank_v : layout.rank_k;
  job.mean_center = layout.has_mean;
  job.basis_out = reinterpret_cast<__half*>(head_base + (value ? layout.basis_v : layout.basis_k));
  job.mean_out = layout.has_mean ? reinterpret_cast<__half*>(head_base + (value ? layout.mean_v : layout.mean_k))
                                 : nullptr;
  job.scale_out = reinterpret_cast<float*>(head_base + (value ? layout.scale_v : layout.scale_k));
  job.coeff_out = reinterpret_cast<std::int8_t*>(head_base + (value ? layout.coeff_v : layout.coeff_k));
  return job;
}

/// Batched compressor. Owns the cuBLAS/cuSOLVER handles of the fallback path (created in the
/// constructor, never on the hot path); not thread-safe: one run() at a time per object.
class BatchedCompressor {
 public:
  /// Throws InvalidArgument naming the first bad field of `problem` (D not 64/128, ranks out of range,
  /// non-positive sizes or options).
  static void can_implement(const CompressProblem& problem);

  /// Throws InvalidArgument naming the first bad field of `jobs[i]` (null pointers, rank, alignment,
  /// row stride). run_host_jobs() calls it; run() cannot (its jobs live on the device), and its kernels
  /// skip and count the jobs it would reject instead.
  static void validate_jobs(const CompressProblem& problem, const CompressJob* jobs, int num_jobs);

  explicit BatchedCompressor(const CompressProblem& problem);
  ~BatchedCompressor();
  BatchedCompressor(BatchedCompressor&&) noexcept;
  BatchedCompressor& operator=(BatchedCompressor&&) noexcept;
  BatchedCompressor(const BatchedCompressor&) = delete;
  BatchedCompressor& operator=(const BatchedCompressor&) = delete;

  const CompressProblem& problem() const;

  /// Device bytes run() needs for up to problem().max_jobs jobs (256-byte aligned base required): the
  /// job table and their order (under 100 bytes per job), plus D²·4 bytes per job for the Gram matrices when
  /// the one-pass projection does not apply (L·r too large for shared memory) or for kCusolver (its
  /// chunk of 256 jobs, with their FP32 copies of X).
  std::size_t get_workspace_size() const;

  /// Compresses `num_jobs` jobs whose descriptors are already in device memory (e.g. built by a kernel
  /// or uploaded once). Asynchronous on `stream`; inputs and outputs must stay valid until it completes.
  /// The descriptors should satisfy validate_jobs(), which run() cannot call on them before the
  /// launch: the kernels make its checks instead, and a job that fails one (a rank outside
  /// [1, problem().max_rank], a null or misaligned pointer, a row stride that is short or not a
  /// multiple of 8, a mean_center byte other than 0 or 1) is rejected: nothing of it is read or written
  /// and the other jobs are not affected.
  /// rejected_jobs() counts them. Pointers that pass the checks must point to memory of the sizes
  /// CompressJob gives.
  void run(const CompressJob* device_jobs, int num_jobs, void* workspace, std::size_t workspace_bytes,
           cudaStream_t stream);

  /// How many jobs the last run() with num_jobs > 0 on `workspace` rejected; undefined before the first
  /// such run. run_host_jobs() throws on a job that would be rejected, so its runs count 0. Waits for
  /// `stream`, which must be the stream of that run() or one ordered after it: a 4-byte copy and a
  /// stream synchronise, so not inside a CUDA graph capture (read the count after the graph's launch).
  int rejected_jobs(const void* workspace, cudaStream_t stream) const;

  /// Validates host-side job descriptors, copies them into the workspace (cudaMemcpyAsync on `stream`;
  /// from pageable memory the copy is staged before this returns, from pinned memory the array must
  /// stay valid until the stream reaches the copy) and runs them.
  void run_host_jobs(const CompressJob* host_jobs, int num_jobs, void* workspace, std::size_t workspace_bytes,
                     cudaStream_t stream);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace spectralkv::cuda
