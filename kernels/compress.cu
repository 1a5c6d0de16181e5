// Batched truncated SVD + INT8 quantisation (see include/spectralkv/cuda/compress.cuh for the
// interface and the algorithm overview). Kernels of the fast path:
//   order_kernel    the order in which the jobs are taken (widest subspace first), and the count of the
//                   jobs that fail validate_jobs's checks (job_check), which every kernel skips; it runs
//                   first on every path
//   gram_kernel     G = (X − m)ᵀ(X − m) (+ column sums), tensor cores, FP32 accumulation → workspace
//                   (m = 0, or for centred jobs a provisional per-column shift, see gram.cuh)
//   eigen_kernel    centring, subspace iteration (CholQR), Rayleigh–Ritz + Jacobi, basis → basis_out, mean_out
//   project_kernel  C = (X − mean)·B_hᵀ, per-column max, INT8 quantisation         → scale_out, coeff_out
//                   (project_resident_kernel: the same in one pass over X when C fits in shared memory,
//                   after the cuSOLVER path)
//   compress_fused_kernel  Gram, eigen-solve and one-pass projection in one CTA per job, G kept in shared
//                   memory: used whenever C fits in shared memory (order_kernel + this kernel per run)
// The cuSOLVER path replaces the Gram and eigen kernels by gather + cuBLAS SGEMM + cusolverDnXsyevBatched
// + select (after order_kernel, for the count).
//
// The device code is in compress/, one idea per header: common.cuh (PTX wrappers, shared helpers),
// job_check.cuh (descriptor checks), gram.cuh, subspace_products.cuh (the eigen CTA's panels and the
// products with G), cholqr.cuh, jacobi.cuh, tridiagonal_eigen.cuh, eigen.cuh (one job's eigen-solve,
// order_kernel, eigen_kernel) and projection.cuh. This file holds the fused kernel, the cuSOLVER
// path's kernels, the dispatch and BatchedCompressor.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cublas_v2.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "spectralkv/cuda/compress.cuh"
#include "spectralkv/cuda/error.cuh"
#include "spectralkv/cuda/quantize.cuh"
#include "spectralkv/error.hpp"

#include "compress/common.cuh"
#include "compress/eigen.cuh"
#include "compress/gram.cuh"
#include "compress/job_check.cuh"
#include "compress/projection.cuh"
#include "compress/subspace_products.cuh"

namespace spectralkv::cuda {
namespace {

// ------------------------------------------------------------------------------------------------
// The three steps fused: one CTA per job
// ------------------------------------------------------------------------------------------------

/// Shared memory of the fused kernel's Gram phase: its X stages, then its scratch (part [3][D], the
/// column sums and the shift, [D] each). The eigen phase reads the last two, so they lie past the
/// stages and past Gs and the eigen layout's first 2·D floats of scratch (Qa), which G and the
/// centring overwrite.
template <int D>
struct FusedSmem {
  static constexpr std::size_t kScratchOffset = GramShape<D>::kSmemBytes;
  static constexpr std::size_t kGramBytes = kScratchOffset + 5u * D * sizeof(float);
  static_assert(kScratchOffset >= (static_cast<std::size_t>(D) * D + 2 * D) * sizeof(float),
                "the column sums and shift must outlive G's stores and the centring's scratch");
};

/// The fused kernel's Gram and projection phases, as calls. Inlined beside the eigen-solve (which needs
/// all 128 registers) they made the whole kernel spill ~100 bytes; as calls each phase gets its own
/// allocation, and the eigen-solve around them spills 20 bytes at D = 128 and 8 at D = 64 (ptxas,
/// CUDA 13; a non-inlined CholQR removes those spills but measured ~1% slower on an H200).
template <class T, int D>
__device__ __noinline__ void fused_gram(const CompressJob& job, int rows, float* smem) {
  auto* bytes = reinterpret_cast<unsigned char*>(smem);
  float* scratch = reinterpret_cast<float*>(bytes + FusedSmem<D>::kScratchOffset);
  gram_block<T, D, kEigenThreads, true>(job, rows, bytes, scratch, scratch + 3 * D, scratch + 4 * D,
                                        [&](int row, int col, float v0, float v1) {
                                          // col is even: the pair stays adjacent under the swizzle
                                          *reinterpret_cast<float2*>(&smem[swz<D>(row, col)]) =
                                              make_float2(v0, v1);
                                        });
}
template <class T, int D, int kNT>
__device__ __noinline__ void fused_project(const CompressJob& job, int rows, unsigned char* smem) {
  project_resident_block<T, D, kNT, true>(job, rows, smem);
}

/// Gram, eigen-solve and one-pass projection of one job in one CTA, in job_order (widest subspace
/// first), each phase reusing the whole shared memory. The separate kernels write G to global memory
/// (32 MiB at 512 jobs of D = 128) and read it back, 6% of the eigen kernel's time; here G stays in
/// shared memory, the workspace shrinks to the job table and the order, and two launches go. The
/// projection reads the basis and mean this CTA has just stored, as project_resident_kernel does. Same
/// arithmetic as the separate kernels, hence the same bytes. Used when the projection is resident
/// (ResidentShape::bytes fits, e.g. L = 512 with r ≤ 32).
/// X is read twice, by the Gram and by the projection ~100–270 µs later (an H200 job's time): the Gram
/// reads it with the L2 policy evict_last and the projection with evict_first, so the 128 KB of each
/// running job (34 MB for the 264 CTAs of an H200) tend to stay in the L2 between the two reads, while
/// X's lines go first once read the second time. Nsight Compute on an H200 (N jobs of 512×128, half
/// rank 16, half 32): DRAM reads of the kernel 88.7 → 73.5 MB at N = 512 and 942 → 674 MB at N = 4096;
/// the kernel's time moves by about 0.5% (docs/PERFORMANCE.md).
/// \param jobs, job_order  not __restrict__, so that each phase loads the descriptor again after the
///                         previous one's stores instead of keeping it in registers across the calls
template <class T, int D, int kNT>
__global__ void __launch_bounds__(kEigenThreads, 2)
    compress_fused_kernel(const CompressJob* jobs, int rows, const int* job_order, EigenSmem layout,
                          CompressOptions opt, bool tridiagonal) {
  static_assert(ResidentShape<D>::kThreads == kEigenThreads, "the projection runs on the eigen CTA");
  extern __shared__ __align__(16) float smem[];
  float* scratch = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(smem) + FusedSmem<D>::kScratchOffset);
  if (job_order[blockIdx.x] < 0) return;  // rejected by order_kernel
  fused_gram<T, D>(jobs[job_order[blockIdx.x]], rows, smem);
  {
    const CompressJob job = jobs[job_order[blockIdx.x]];
    eigen_block<D>(job, rows, smem, scratch + 3 * D, scratch + 4 * D, layout, opt, tridiagonal);
  }
  __syncthreads();  // the basis and mean are stored; every read of the eigen layout is done
  fused_project<T, D, kNT>(jobs[job_order[blockIdx.x]], rows, reinterpret_cast<unsigned char*>(smem));
}

// ------------------------------------------------------------------------------------------------
// cuSOLVER path: gather, top-r selection
// ------------------------------------------------------------------------------------------------

/// X (minus the FP16 mean, when centred) → FP32 packed [job][L][D], and the stored mean.
template <class T>
__global__ void gather_kernel(const CompressJob* __restrict__ jobs, int first, int rows, int dim, int max_rank,
                              float* __restrict__ out) {
  extern __shared__ float gmu[];
  const CompressJob job = jobs[first + blockIdx.x];
  float* o = out + static_cast<std::int64_t>(blockIdx.x) * rows * dim;
  if (!job_check::all(job, dim, max_rank)) {
    // Zeros, so that cuBLAS and cuSOLVER read defined values in the rejected job's slot of the chunk.
    for (int e = threadIdx.x; e < rows * dim; e += blockDim.x) o[e] = 0.0f;
    return;
  }
  const T* x = static_cast<const T*>(job.x);
  for (int d = threadIdx.x; d < dim; d += blockDim.x) {
    float m = 0.0f;
    if (job.mean_center) {
      double s = 0.0;
      for (int t = 0; t < rows; ++t) s += to_float1(x[t * job.x_row_stride + d]);
      const __half mh = __float2half_rn(static_cast<float>(s / rows));
      job.mean_out[d] = mh;
      m = __half2float(mh);
    }
    gmu[d] = m;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < rows * dim; e += blockDim.x) {
    const int t = e / dim, d = e % dim;
    o[e] = to_float1(x[t * job.x_row_stride + d]) - gmu[d];
  }
}

/// Top-r eigenvectors (columns D−1, D−2, … of cuSOLVER's ascending output) → basis rows, sign fixed.
__global__ void select_kernel(const CompressJob* __restrict__ jobs, int first, int dim, int max_rank,
                              const float* __restrict__ vecs, const float* __restrict__ vals) {
  const CompressJob job = jobs[first + blockIdx.x];
  if (!job_check::all(job, dim, max_rank)) return;
  const float* a = vecs + static_cast<std::int64_t>(blockIdx.x) * dim * dim;
  const float* w = vals + static_cast<std::int64_t>(blockIdx.x) * dim;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int j = warp; j < job.rank; j += nwarps) {
    const float* v = a + static_cast<std::int64_t>(dim - 1 - j) * dim;
    float best = -1.0f;
    int arg = dim;
    for (int d = lane; d < dim; d += 32) {
      if (fabsf(v[d]) > best) {
        best = fabsf(v[d]);
        arg = d;
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oa = __shfl_xor_sync(0xffffffffu, arg, o);
      if (ob > best || (ob == best && oa < arg)) {
        best = ob;
        arg = oa;
      }
    }
    const float sign = (arg < dim && v[arg] < 0.0f) ? -1.0f : 1.0f;
    for (int d = lane; d < dim; d += 32) {
      job.basis_out[j * dim + d] = __float2half_rn(sign * v[d]);
      if (job.basis_f32_out != nullptr) job.basis_f32_out[j * dim + d] = sign * v[d];
    }
    if (lane == 0 && job.eigenvalues_out != nullptr) job.eigenvalues_out[j] = w[dim - 1 - j];
  }
}

// ------------------------------------------------------------------------------------------------
// Host side: dispatch and workspace
// ------------------------------------------------------------------------------------------------

template <class T>
struct TypeTag {
  using type = T;
};

/// Runtime head_dim → compile-time D. Unsupported values are rejected by can_implement first; the
/// default branch still throws rather than silently doing nothing.
template <class F>
void dispatch_dim(int head_dim, F&& f) {
  switch (head_dim) {
    case 64:
      f(std::integral_constant<int, 64>{});
      return;
    case 128:
      f(std::integral_constant<int, 128>{});
      return;
    default:
      detail::fail("BatchedCompressor", "head_dim", head_dim, "must be 64 or 128");
  }
}

/// The one-pass projection's n-tiles per warp (2, 4 or 8, at most D/16; chosen by the constructor) →
/// compile-time kNT.
template <int D, class F>
void dispatch_tiles(int tiles, F&& f) {
  switch (tiles) {
    case 2:
      f(std::integral_constant<int, 2>{});
      return;
    case 4:
      f(std::integral_constant<int, 4>{});
      return;
    case 8:
      if constexpr (D / 16 >= 8) {
        f(std::integral_constant<int, 8>{});
        return;
      }
      break;
    default:
      break;
  }
  detail::fail("BatchedCompressor", "project_tiles", tiles, detail::concat("must be 2, 4 or 8 and <= ", D / 16));
}

template <class F>
void dispatch_element(ElementType e, F&& f) {
  switch (e) {
    case ElementType::kHalf:
      f(TypeTag<__half>{});
      return;
    case ElementType::kBFloat16:
      f(TypeTag<__nv_bfloat16>{});
      return;
    default:
      detail::fail("BatchedCompressor", "element", static_cast<int>(e), "must be kHalf or kBFloat16");
  }
}

constexpr std::size_t kAlign = 256;
constexpr std::size_t align_up(std::size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
constexpr int kCusolverChunk = 256;           // jobs per cuSOLVER call: bounds the FP32 copies of X
constexpr std::size_t kCublasWorkspace = 4u << 20;

/// Lets `kernel` use `bytes` of dynamic shared memory, with the largest shared-memory carveout: two
/// CTAs of ~113 KB per SM (eigen, fused, one-pass projection) need ~226 KB of the 228 KB.
template <class Kernel>
void allow_shared_memory(Kernel kernel, std::size_t bytes, const char* what) {
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)), what);
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared),
        what);
}

}  // namespace

// ------------------------------------------------------------------------------------------------

struct BatchedCompressor::Impl {
  CompressProblem problem;
  EigenSmem eigen;  // the eigen kernel's shared-memory layout
  std::size_t eigen_smem = 0, project_smem = 0;
  bool resident = false;  // project_resident_kernel instead of project_kernel
  bool fused = false;     // compress_fused_kernel (subspace iteration with a resident projection)
  std::size_t fused_smem = 0;
  int project_tiles = 2;  // its kNT: n-tiles per warp for the batch's largest rank
  // Fast path workspace offsets.
  std::size_t off_jobs = 0, off_gram = 0, off_sum = 0, off_shift = 0, off_order = 0, off_rejected = 0, total = 0;
  // cuSOLVER path.
  int chunk = 0;
  std::size_t off_x32 = 0, off_vals = 0, off_info = 0, off_syev = 0, off_cublas = 0, syev_bytes = 0;
  std::vector<unsigned char> syev_host;
  cublasHandle_t cublas = nullptr;
  cusolverDnHandle_t cusolver = nullptr;
  cusolverDnParams_t params = nullptr;

  ~Impl() {
    if (params != nullptr) cusolverDnDestroyParams(params);
    if (cusolver != nullptr) cusolverDnDestroy(cusolver);
    if (cublas != nullptr) cublasDestroy(cublas);
  }
};

void BatchedCompressor::can_implement(const CompressProblem& p) {
  constexpr const char* kWhat = "BatchedCompressor";
  using detail::require;
  require(p.element == ElementType::kHalf || p.element == ElementType::kBFloat16, kWhat, "problem.element",
          static_cast<int>(p.element), "must be kHalf or kBFloat16");
  require(p.head_dim == 64 || p.head_dim == 128, kWhat, "problem.head_dim", p.head_dim, "must be 64 or 128");
  require(p.rows >= 1, kWhat, "problem.rows", p.rows, "must be positive");
  require(p.max_jobs >= 1, kWhat, "problem.max_jobs", p.max_jobs, "must be positive");
  const int max_rank = std::min(p.head_dim, p.rows);
  require(p.max_rank >= 1 && p.max_rank <= max_rank, kWhat, "problem.max_rank", p.max_rank,
          detail::concat("must be in [1, min(head_dim, rows) = ", max_rank, "]"));
  require(p.algorithm == CompressAlgorithm::kSubspaceIteration || p.algorithm == CompressAlgorithm::kCusolver ||
              p.algorithm == CompressAlgorithm::kTridiagonal,
          kWhat, "problem.algorithm", static_cast<int>(p.algorithm),
          "must be kSubspaceIteration, kCusolver or kTridiagonal");
  require(p.options.oversample >= 0 && p.options.oversample <= p.head_dim, kWhat, "problem.options.oversample",
          p.options.oversample, detail::concat("must be in [0, head_dim = ", p.head_dim, "] (0: automatic)"));
  require(p.options.iterations >= 1 && p.options.iterations <= 64, kWhat, "problem.options.iterations",
          p.options.iterations, "must be in [1, 64]");
  require(p.options.jacobi_sweeps >= 1 && p.options.jacobi_sweeps <= 64, kWhat, "problem.options.jacobi_sweeps",
          p.options.jacobi_sweeps, "must be in [1, 64]");
}

void BatchedCompressor::validate_jobs(const CompressProblem& p, const CompressJob* jobs, int num_jobs) {
  constexpr const char* kWhat = "BatchedCompressor::run";
  using detail::require;
  if (num_jobs < 0 || num_jobs > p.max_jobs)
    detail::fail(kWhat, "num_jobs", num_jobs, detail::concat("must be in [0, max_jobs = ", p.max_jobs, "]"));
  require(num_jobs == 0 || jobs != nullptr, kWhat, "jobs", "nullptr", "must point to num_jobs descriptors");
  const int max_rank = std::min({p.max_rank, p.head_dim, p.rows});
  for (int i = 0; i < num_jobs; ++i) {
    const CompressJob& j = jobs[i];
    // A batch has thousands of jobs: a check's message ("jobs[i].field") is built only when it fails.
    auto fail_field = [&](const char* name, const auto& value, const auto& why) {
      detail::fail(kWhat, detail::concat("jobs[", i, "].", name).c_str(), value, why);
    };
    if (!job_check::x(j)) fail_field("x", j.x, "must be non-null and 16-byte aligned");
    if (!job_check::x_row_stride(j, p.head_dim)) {
      fail_field("x_row_stride", j.x_row_stride,
                 detail::concat("must be a multiple of 8 and >= head_dim = ", p.head_dim));
    }
    if (!job_check::rank(j, max_rank))
      fail_field("rank", j.rank, detail::concat("must be in [1, min(max_rank, head_dim, rows) = ", max_rank, "]"));
    if (!job_check::basis_out(j))
      fail_field("basis_out", static_cast<const void*>(j.basis_out), "must be non-null and 4-byte aligned");
    if (!job_check::scale_out(j))
      fail_field("scale_out", static_cast<const void*>(j.scale_out), "must be non-null and 4-byte aligned");
    if (!job_check::coeff_out(j)) fail_field("coeff_out", "nullptr", "must be non-null");
    if (!job_check::mean_center(j)) {
      fail_field("mean_center", static_cast<int>(*reinterpret_cast<const unsigned char*>(&j.mean_center)),
                 "must be a bool: 0 or 1");
    }
    if (!job_check::mean_out(j)) {
      fail_field("mean_out", static_cast<const void*>(j.mean_out),
                 "must be non-null and 2-byte aligned when mean_center is set");
    }
    if (!job_check::optional_outs(j))
      fail_field("*_f32_out", "misaligned", "optional FP32 outputs must be 4-byte aligned");
  }
}

BatchedCompressor::BatchedCompressor(const CompressProblem& problem) : impl_(std::make_unique<Impl>()) {
  can_implement(problem);
  Impl& m = *impl_;
  m.problem = problem;
  const int d = problem.head_dim;
  dispatch_dim(d, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    // Widest ℓ that takes subspace iteration and widest r that takes the tridiagonal solve (as
    // eigen_block routes them); 0 where no rank does.
    int ell_fast = 0, r_tri = 0;
    for (int r = 1; r <= problem.max_rank; ++r) {
      const int e = compress_subspace_width(r, d, problem.options.oversample);
      if (problem.algorithm == CompressAlgorithm::kSubspaceIteration && takes_subspace_iteration<D>(e))
        ell_fast = std::max(ell_fast, e);
      else
        r_tri = r;
    }
    m.eigen = EigenSmem::make(d, ell_fast, r_tri);
  });
  m.eigen_smem = m.eigen.floats(d) * sizeof(float);
  const int rpad_max = (problem.max_rank + 15) / 16 * 16;
  dispatch_dim(d, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    const std::size_t resident_bytes = ResidentShape<D>::bytes(problem.rows, rpad_max);
    m.resident = resident_bytes <= ResidentShape<D>::kMaxBytes;
    m.project_tiles = std::min(D / 16, rpad_max <= 32 ? 2 : rpad_max <= 64 ? 4 : 8);
    m.project_smem = m.resident ? resident_bytes : ProjectShape<D>::bytes(rpad_max);
    m.fused = problem.algorithm != CompressAlgorithm::kCusolver && m.resident;
    m.fused_smem = std::max({m.eigen_smem, FusedSmem<D>::kGramBytes, m.project_smem});
  });

  m.off_jobs = 0;
  const std::size_t jobs_bytes = align_up(sizeof(CompressJob) * problem.max_jobs);
  const std::size_t n = static_cast<std::size_t>(problem.max_jobs);
  // Every path starts with order_kernel: the order and the count of rejected jobs follow the job table.
  m.off_rejected = jobs_bytes;
  m.off_order = m.off_rejected + align_up(sizeof(int));
  const std::size_t head_bytes = m.off_order + align_up(n * sizeof(int));
  if (m.fused) {
    m.total = head_bytes;
  } else if (problem.algorithm != CompressAlgorithm::kCusolver) {
    m.off_gram = head_bytes;
    m.off_sum = m.off_gram + align_up(n * d * d * sizeof(float));
    m.off_shift = m.off_sum + align_up(n * d * sizeof(float));
    m.total = m.off_shift + align_up(n * d * sizeof(float));
  } else {
    m.chunk = std::min(problem.max_jobs, kCusolverChunk);
    const std::size_t c = static_cast<std::size_t>(m.chunk);
    m.off_x32 = head_bytes;
    m.off_gram = m.off_x32 + align_up(c * problem.rows * d * sizeof(float));
    m.off_vals = m.off_gram + align_up(c * d * d * sizeof(float));
    m.off_info = m.off_vals + align_up(c * d * sizeof(float));
    m.off_cublas = m.off_info + align_up(c * sizeof(int));
    m.off_syev = m.off_cublas + kCublasWorkspace;
    check(cublasCreate(&m.cublas), "cublasCreate");
    check(cublasSetMathMode(m.cublas, CUBLAS_PEDANTIC_MATH), "cublasSetMathMode");  // true FP32, no TF32
    check(cusolverDnCreate(&m.cusolver), "cusolverDnCreate");
    check(cusolverDnCreateParams(&m.params), "cusolverDnCreateParams");
    std::size_t dev_bytes = 0, host_bytes = 0;
    check(cusolverDnXsyevBatched_bufferSize(m.cusolver, m.params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, d,
                                            CUDA_R_32F, nullptr, d, CUDA_R_32F, nullptr, CUDA_R_32F, &dev_bytes,
                                            &host_bytes, m.chunk),
          "cusolverDnXsyevBatched_bufferSize");
    m.syev_bytes = dev_bytes;
    m.syev_host.resize(std::max<std::size_t>(host_bytes, 1));
    m.total = m.off_syev + align_up(std::max<std::size_t>(dev_bytes, 1));
  }
  // The shared-memory limits of the kernels run() launches for this problem.
  dispatch_element(problem.element, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_dim(d, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      if (m.fused) {
        dispatch_tiles<D>(m.project_tiles, [&](auto tiles) {
          allow_shared_memory(compress_fused_kernel<T, D, decltype(tiles)::value>, m.fused_smem,
                              "cudaFuncSetAttribute(compress_fused_kernel)");
        });
        return;
      }
      if (problem.algorithm != CompressAlgorithm::kCusolver) {
        allow_shared_memory(gram_kernel<T, D>, GramShape<D>::kSmemBytes, "cudaFuncSetAttribute(gram_kernel)");
        allow_shared_memory(eigen_kernel<D>, m.eigen_smem, "cudaFuncSetAttribute(eigen_kernel)");
      }
      if (m.resident) {
        dispatch_tiles<D>(m.project_tiles, [&](auto tiles) {
          allow_shared_memory(project_resident_kernel<T, D, decltype(tiles)::value>, m.project_smem,
                              "cudaFuncSetAttribute(project_resident_kernel)");
        });
      } else {
        allow_shared_memory(project_kernel<T, D>, m.project_smem, "cudaFuncSetAttribute(project_kernel)");
      }
    });
  });
}

BatchedCompressor::~BatchedCompressor() = default;
BatchedCompressor::BatchedCompressor(BatchedCompressor&&) noexcept = default;
BatchedCompressor& BatchedCompressor::operator=(BatchedCompressor&&) noexcept = default;

const CompressProblem& BatchedCompressor::problem() const { return impl_->problem; }

int BatchedCompressor::rejected_jobs(const void* workspace, cudaStream_t stream) const {
  detail::require(workspace != nullptr, "BatchedCompressor::rejected_jobs", "workspace", "nullptr",
                  "must be the workspace of a run()");
  int count = 0;
  check(cudaMemcpyAsync(&count, static_cast<const unsigned char*>(workspace) + impl_->off_rejected, sizeof(int),
                        cudaMemcpyDeviceToHost, stream),
        "cudaMemcpyAsync(rejected jobs)");
  check(cudaStreamSynchronize(stream), "cudaStreamSynchronize(rejected jobs)");
  return count;
}
std::size_t BatchedCompressor::get_workspace_size() const { return impl_->total; }

void BatchedCompressor::run_host_jobs(const CompressJob* host_jobs, int num_jobs, void* workspace,
                                      std::size_t workspace_bytes, cudaStream_t stream) {
  validate_jobs(impl_->problem, host_jobs, num_jobs);
  if (workspace == nullptr || workspace_bytes < impl_->total) {
    detail::fail("BatchedCompressor::run", "workspace_bytes", workspace_bytes,
                 detail::concat("must be >= get_workspace_size() = ", impl_->total, " with a non-null workspace"));
  }
  if (num_jobs == 0) return;
  auto* jobs_dev = reinterpret_cast<CompressJob*>(static_cast<unsigned char*>(workspace) + impl_->off_jobs);
  check(cudaMemcpyAsync(jobs_dev, host_jobs, sizeof(CompressJob) * num_jobs, cudaMemcpyHostToDevice, stream),
        "cudaMemcpyAsync(jobs)");
  run(jobs_dev, num_jobs, workspace, workspace_bytes, stream);
}

void BatchedCompressor::run(const CompressJob* device_jobs, int num_jobs, void* workspace,
                            std::size_t workspace_bytes, cudaStream_t stream) {
  Impl& m = *impl_;
  const CompressProblem& p = m.problem;
  constexpr const char* kWhat = "BatchedCompressor::run";
  // Per call: the messages are built only when a check fails.
  if (num_jobs < 0 || num_jobs > p.max_jobs)
    detail::fail(kWhat, "num_jobs", num_jobs, detail::concat("must be in [0, max_jobs = ", p.max_jobs, "]"));
  if (workspace == nullptr || workspace_bytes < m.total) {
    detail::fail(kWhat, "workspace_bytes", workspace_bytes,
                 detail::concat("must be >= get_workspace_size() = ", m.total, " with a non-null workspace"));
  }
  detail::require(reinterpret_cast<std::uintptr_t>(workspace) % kAlign == 0, kWhat, "workspace", workspace,
                  "must be 256-byte aligned");
  if (num_jobs == 0) return;
  detail::require(device_jobs != nullptr, kWhat, "device_jobs", "nullptr", "must point to num_jobs descriptors");
  auto* ws = static_cast<unsigned char*>(workspace);
  auto* gram = reinterpret_cast<float*>(ws + m.off_gram);
  auto* job_order = reinterpret_cast<int*>(ws + m.off_order);
  const bool tridiagonal = p.algorithm == CompressAlgorithm::kTridiagonal;

  dispatch_element(p.element, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_dim(p.head_dim, [&](auto dim) {
      constexpr int D = decltype(dim)::value;
      order_kernel<D><<<1, 1024, 0, stream>>>(device_jobs, num_jobs, p.options.oversample, p.max_rank, job_order,
                                              reinterpret_cast<int*>(ws + m.off_rejected));
      check_launch("order_kernel");
      if (m.fused) {
        dispatch_tiles<D>(m.project_tiles, [&](auto tiles) {
          compress_fused_kernel<T, D, decltype(tiles)::value><<<num_jobs, kEigenThreads, m.fused_smem, stream>>>(
              device_jobs, p.rows, job_order, m.eigen, p.options, tridiagonal);
        });
        check_launch("compress_fused_kernel");
        return;
      }
      if (p.algorithm != CompressAlgorithm::kCusolver) {
        auto* sums = reinterpret_cast<float*>(ws + m.off_sum);
        auto* shifts = reinterpret_cast<float*>(ws + m.off_shift);
        gram_kernel<T, D><<<num_jobs, GramShape<D>::kThreads, GramShape<D>::kSmemBytes, stream>>>(
            device_jobs, p.rows, gram, sums, shifts, p.max_rank);
        check_launch("gram_kernel");
        eigen_kernel<D><<<num_jobs, kEigenThreads, m.eigen_smem, stream>>>(device_jobs, p.rows, gram, sums, shifts,
                                                                           job_order, m.eigen, p.options,
                                                                           tridiagonal);
        check_launch("eigen_kernel");
      } else {
        auto* x32 = reinterpret_cast<float*>(ws + m.off_x32);
        auto* vals = reinterpret_cast<float*>(ws + m.off_vals);
        auto* info = reinterpret_cast<int*>(ws + m.off_info);
        check(cublasSetStream(m.cublas, stream), "cublasSetStream");
        check(cublasSetWorkspace(m.cublas, ws + m.off_cublas, kCublasWorkspace), "cublasSetWorkspace");
        check(cusolverDnSetStream(m.cusolver, stream), "cusolverDnSetStream");
        const float one = 1.0f, zero = 0.0f;
        const long long x_stride = static_cast<long long>(p.rows) * D;
        for (int first = 0; first < num_jobs; first += m.chunk) {
          const int count = std::min(m.chunk, num_jobs - first);
          gather_kernel<T><<<count, 256, D * sizeof(float), stream>>>(device_jobs, first, p.rows, D, p.max_rank, x32);
          check_launch("gather_kernel");
          // Row-major [L][D] is column-major D×L with ld = D: G = Xc·Xcᵀ.
          check(cublasSgemmStridedBatched(m.cublas, CUBLAS_OP_N, CUBLAS_OP_T, D, D, p.rows, &one, x32, D, x_stride,
                                          x32, D, x_stride, &zero, gram, D, static_cast<long long>(D) * D, count),
                "cublasSgemmStridedBatched(Gram)");
          check(cusolverDnXsyevBatched(m.cusolver, m.params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, D,
                                       CUDA_R_32F, gram, D, CUDA_R_32F, vals, CUDA_R_32F, ws + m.off_syev,
                                       m.syev_bytes, m.syev_host.data(), m.syev_host.size(), info, count),
                "cusolverDnXsyevBatched");
          select_kernel<<<count, 256, 0, stream>>>(device_jobs, first, D, p.max_rank, gram, vals);
          check_launch("select_kernel");
        }
      }
      if (m.resident) {
        dispatch_tiles<D>(m.project_tiles, [&](auto tiles) {
          project_resident_kernel<T, D, decltype(tiles)::value>
              <<<num_jobs, ResidentShape<D>::kThreads, m.project_smem, stream>>>(device_jobs, p.rows, p.max_rank);
        });
        check_launch("project_resident_kernel");
      } else {
        project_kernel<T, D><<<num_jobs, ProjectShape<D>::kThreads, m.project_smem, stream>>>(device_jobs, p.rows,
                                                                                               p.max_rank);
        check_launch("project_kernel");
      }
    });
  });
}

}  // namespace spectralkv::cuda
