#pragma once
// One job's eigen-solve on its Gram: centring, subspace iteration with CholQR, Rayleigh–Ritz and
// Jacobi (or the tridiagonal solve for wide subspaces), the basis out; the job order (widest
// subspace first) and the eigen kernel of the separate-kernel path.
// Private to kernels/compress.cu: reopens that translation unit's anonymous namespace, so the
// kernels and their helpers keep internal linkage.

#include <algorithm>
#include <cstddef>

#include "spectralkv/cuda/compress.cuh"

#include "cholqr.cuh"
#include "common.cuh"
#include "jacobi.cuh"
#include "job_check.cuh"
#include "subspace_products.cuh"
#include "tridiagonal_eigen.cuh"

namespace spectralkv::cuda {
namespace {

/// Shared-memory layout of the eigen kernel, in floats: the Gram [D][D], two panels of `panel`
/// floats, invd (lpf), diag and order (lp each) and kMisc. lpf ≥ every ℓ of a subspace-iteration job,
/// lp ≥ that and every r of a tridiagonal one, both rounded up to 16. A panel holds, for subspace
/// iteration up to ℓ_fast, an [lpf][D] swizzled panel, the CholQR scratch (2ℓ² floats) and the fast
/// Jacobi's two W buffers (128·ℓ floats; at D = 64 more than the panel itself); for the tridiagonal
/// solve up to r_tri, its scratch spans both panels and invd (tridiag::work_floats). Sized by what the
/// batch's jobs take rather than by the widest ℓ, the layout stays within the ~113 KB that lets two
/// CTAs share an SM at D = 128 for tridiagonal jobs up to r = 93, with or without subspace iteration
/// at ℓ = 48 beside them. The Gram's space holds the fast Jacobi's H (JacobiSlots::kGramFloats).
struct EigenSmem {
  static constexpr int kMisc = 8;
  int lp = 16;
  int lpf = 0;
  int panel = 4;
  static EigenSmem make(int d, int ell_fast, int r_tri) {
    EigenSmem e;
    e.lpf = (ell_fast + 15) / 16 * 16;
    e.lp = (std::max({ell_fast, r_tri, 8}) + 15) / 16 * 16;
    const std::size_t fast = static_cast<std::size_t>(e.lpf) * d;
    const std::size_t jacobi = 128 * static_cast<std::size_t>(ell_fast);  // ≥ 2ℓ² for ℓ ≤ 64
    const std::size_t work = r_tri > 0 ? static_cast<std::size_t>(tridiag::work_floats(d, r_tri)) : 0;
    const std::size_t tri = work > static_cast<std::size_t>(e.lpf) ? (work - e.lpf + 1) / 2 : 0;
    e.panel = static_cast<int>((std::max({fast, jacobi, tri, std::size_t{4}}) + 3) / 4 * 4);
    return e;
  }
  std::size_t floats(int d) const {
    return static_cast<std::size_t>(d) * d + 2 * static_cast<std::size_t>(panel) + lpf + 2 * lp + kMisc;
  }
};

/// Order in which the eigen kernel's CTAs take the jobs: widest subspace first. CTAs start roughly in
/// blockIdx order and an ℓ = 48 job runs about twice as long as an ℓ = 24 one (measured on an H200:
/// ~675 K against ~342 K cycles), so with the jobs interleaved (the K and V of a layer) the last wave
/// is made of long jobs; longest first lets the short ones fill in behind them (longest-processing-time
/// scheduling). A counting sort by ℓ (a multiple of 8 up to D) in one CTA; the order within one ℓ is
/// whatever the atomics give, which changes no result (a job's outputs depend on its own data only).
/// Jobs that fail a check of validate_jobs (job_check::all) take the last places as −1, which the
/// per-job kernels skip, and their count goes to `rejected` (every path runs this kernel first).
template <int D>
__global__ void order_kernel(const CompressJob* __restrict__ jobs, int n, int oversample, int max_rank,
                             int* __restrict__ order, int* __restrict__ rejected) {
  constexpr int kRejected = D / 8 + 1;  // ℓ / 8 ≤ D / 8 for a rank in range; this bucket goes last
  constexpr int kBuckets = kRejected + 1;
  __shared__ int count[kBuckets];
  __shared__ int start[kBuckets];
  auto bucket = [&](int j) {
    const CompressJob& job = jobs[j];
    return job_check::all(job, D, max_rank) ? compress_subspace_width(job.rank, D, oversample) / 8 : kRejected;
  };
  for (int b = threadIdx.x; b < kBuckets; b += blockDim.x) count[b] = 0;
  __syncthreads();
  for (int j = threadIdx.x; j < n; j += blockDim.x) atomicAdd(&count[bucket(j)], 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    int s = 0;
    for (int b = kRejected - 1; b >= 0; --b) {
      start[b] = s;
      s += count[b];
    }
    start[kRejected] = s;
    *rejected = count[kRejected];
  }
  __syncthreads();
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const int b = bucket(j);
    order[atomicAdd(&start[b], 1)] = b == kRejected ? -1 : j;
  }
}

/// Bound on the last CholQR pass's estimate of κ(Z) under which the next two products with G share
/// one pass. S = ZᵀZ in FP64 loses κ(Z)² of its accuracy and the FP32 substitution leaves span errors
/// ~κ(Z)·2^-24, and the estimate (cholqr_kappa) can be 10–100× low: in a float32 model of the kernel
/// over the test spectra (ℓ = 24 and 48, eight start blocks each) the largest true κ of a G²·Q under
/// this bound was 7.7e5 (κ² = 6e11 in S, against ~1e16 where the FP64 Cholesky fails), and every
/// optimality ratio was within 1e-8 of the one-product iteration's.
constexpr float kDoubleStepKappa = 100.0f;

/// max R_jj / min R_jj of the last CholQR pass (a lower bound on κ(Z)), from its 1/R_jj; NaN when one
/// of them is not finite (S₀₀ = ∞), which compares false and keeps one product per pass. A pivot at
/// the floor gives a huge estimate; a block holding NaN factors with pivots of 1 (estimate 1), and its
/// output is NaN either way. Every warp computes it from the same values in the same order, so the CTA
/// agrees on it without a barrier.
__device__ __forceinline__ float cholqr_kappa(const float* invd, int ell) {
  const int lane = threadIdx.x & 31;
  float lo = INFINITY, hi = 0.0f;
  bool finite = true;
  for (int j = lane; j < ell; j += 32) {
    const float v = invd[j];
    finite = finite && isfinite(v);
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, o));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, o));
  }
  return __all_sync(0xffffffffu, finite) ? hi / lo : NAN;
}

/// The basis rows V[j] (plain [r][D] in shared memory, j-th largest Ritz value diag[order[j]]) → the
/// job's outputs, each row signed so that its entry of largest magnitude is positive (the reference
/// rule); one warp per row.
template <int D>
__device__ __forceinline__ void store_basis(const CompressJob& job, const float* V, const float* diag, const int* order,
                                            int r) {
  using S = EigenShape<D>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int j = warp; j < r; j += kEigenWarps) {
    float v[S::kPerLane];
    float best = -1.0f;
    int arg = D;
#pragma unroll
    for (int e = 0; e < S::kPerLane; ++e) {
      v[e] = V[j * D + lane + 32 * e];
      const float a = fabsf(v[e]);
      if (a > best) {  // e ascending: the first index wins ties within the lane
        best = a;
        arg = lane + 32 * e;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {  // argmax of |v|, smallest index on ties (as Eigen's maxCoeff)
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oa = __shfl_xor_sync(0xffffffffu, arg, o);
      if (ob > best || (ob == best && oa < arg)) {
        best = ob;
        arg = oa;
      }
    }
    const float sign = (arg < D && V[j * D + arg] < 0.0f) ? -1.0f : 1.0f;
#pragma unroll
    for (int e = 0; e < S::kPerLane; ++e) {
      const int d = lane + 32 * e;
      job.basis_out[j * D + d] = __float2half_rn(sign * v[e]);
      if (job.basis_f32_out != nullptr) job.basis_f32_out[j * D + d] = sign * v[e];
    }
    if (lane == 0 && job.eigenvalues_out != nullptr) job.eigenvalues_out[j] = diag[order[j]];
  }
}

/// One job's eigen-solve: centres G, runs `iterations` subspace-iteration steps with ℓ columns, the
/// Rayleigh–Ritz projection H = QᵀGQ, a parallel cyclic Jacobi eigen-solve of H, and writes the top-r
/// Ritz vectors V = Q·W (sorted, sign-fixed) as the basis (and the mean, for a centred job).
///
/// Subspace iteration applies where takes_subspace_iteration (every rank up to 32 at the default
/// oversampling): each step (or two, see kDoubleStepKappa) orthonormalises (G + δI)·Q by CholQR,
/// δ = 1e-6·trace(G), which keeps κ of one product ≤ ~1e6 for FP64 Cholesky (directions below δ are FP32
/// noise of the Gram) and makes rank-deficient and constant blocks need no special case; a final CholQR
/// pass re-orthonormalises; then the one-barrier Jacobi (jacobi_fast). Wider subspaces, and every job
/// when `tridiagonal` (CompressAlgorithm::kTridiagonal), take the Householder eigen-solve of G itself
/// (tridiagonal_eigen.cuh): its cost hardly depends on r, while subspace iteration's grows with ℓ.
///
/// G arrives in `smem` (swizzled [D][D], both triangles as accumulated) through the caller's
/// outstanding cp.async groups or by stores before a barrier.
/// \param colsum, shift  the job's [D] column sums and shift from gram_block (read for centred jobs)
template <int D>
__device__ __forceinline__ void eigen_block(const CompressJob& job, int rows, float* smem, const float* colsum,
                                            const float* shift, const EigenSmem& layout, const CompressOptions& opt,
                                            bool tridiagonal) {
  using S = EigenShape<D>;
  float* Gs = smem;
  float* Qa = Gs + D * D;
  float* Qb = Qa + layout.panel;
  float* invd = Qb + layout.panel;                        // 1/R_jj of the last CholQR pass
  float* diag = invd + layout.lpf;                        // Ritz values
  int* order = reinterpret_cast<int*>(diag + layout.lp);  // indices of the top-r Ritz values, descending
  float* misc = reinterpret_cast<float*>(order + layout.lp);
  int* flags = reinterpret_cast<int*>(misc + 2);

  const int r = job.rank;
  const int ell = compress_subspace_width(r, D, opt.oversample);
  const bool fast = takes_subspace_iteration<D>(ell);
  const int tid = threadIdx.x, lane = tid & 31;

  // --- 1. centring with the stored FP16 mean; G (symmetrised) -------------------------------------
  // The Gram accumulated Y = X − 1mᵀ (shift m, column sums s' of Y). With the stored mean μ_h
  // and d = μ_h − m (exact: both are FP16 values), (X − 1μ_hᵀ)ᵀ(X − 1μ_hᵀ) = YᵀY − d·s'ᵀ − s'·dᵀ + L·ddᵀ.
  float* sum = Qa;  // scratch until the start vectors are written
  float* mu = Qa + D;
  if (job.mean_center) {
    if (tid < D) {
      const float sd = colsum[tid];
      const float m = shift[tid];
      const __half mh = __float2half_rn(m + sd / static_cast<float>(rows));
      job.mean_out[tid] = mh;
      sum[tid] = sd;
      mu[tid] = __half2float(mh) - m;
    }
    __syncthreads();
  }
  cp_async_wait<0>();
  __syncthreads();
  // Symmetrise (the two triangles come from different warps' accumulation orders) over the upper
  // triangle folded so that every thread is busy: rows r and D−1−r together hold D + 1 of its elements.
  for (int e = tid; e < (D / 2) * (D + 1); e += kEigenThreads) {
    const int r = e / (D + 1), c = e % (D + 1);
    const int i = c < D - r ? r : D - 1 - r;
    const int k = c < D - r ? r + c : i + c - (D - r);
    const float a = Gs[swz<D>(i, k)], b = Gs[swz<D>(k, i)];
    float v;
    if (job.mean_center) {
      // In double so the correction adds no rounding of its own (what remains is the FP32 rounding
      // of YᵀY, relative to ‖Y‖² ≈ ‖X − μ‖² + L‖μ − m‖², see the docs).
      double w = 0.5 * (static_cast<double>(a) + static_cast<double>(b));
      w += -static_cast<double>(mu[i]) * sum[k] - static_cast<double>(sum[i]) * mu[k] +
           static_cast<double>(rows) * mu[i] * mu[k];
      v = static_cast<float>(w);
    } else {
      v = 0.5f * (a + b);  // the same value as the double expression: a + b in FP32 then an exact halving
    }
    Gs[swz<D>(i, k)] = v;
    Gs[swz<D>(k, i)] = v;
  }
  if (tid == 0) {
    misc[0] = 0.0f;
    misc[1] = 0.0f;  // max |QᵀQ − I| before the final CholQR pass (float bits, see cholqr)
  }
  __syncthreads();
  if (tridiagonal || !fast) {
    // The eigen-decomposition of G itself; the top r vectors land in Gs as [r][D], as V below. Its
    // scratch (tridiag::work_floats) spans the panels and invd, which EigenSmem::make sizes for it.
    static_assert(tridiag::kThreads == kEigenThreads, "the eigen CTA runs the tridiagonal solve");
    tridiag::top_eigenpairs<D>(
        Gs, [Gs](int i, int j) { return Gs[swz<D>(i, j)]; },
        [](int i, int j) { return hash_unit(static_cast<unsigned>(i), 4099u + static_cast<unsigned>(j)); }, Qa, diag, r);
    if (tid < r) order[tid] = tid;
    __syncthreads();
    store_basis<D>(job, Gs, diag, order, r);
    return;
  }
  if (tid < 32) {
    float tr = 0.0f;
    for (int i = lane; i < D; i += 32) tr += fmaxf(Gs[swz<D>(i, i)], 0.0f);
    tr = warp_sum(tr);
    if (lane == 0) misc[0] = tr;
  }
  // --- 2. start block Ω (unit-norm on average) ----------------------------------------------------
  const float omega_scale = sqrtf(3.0f / D);
  const int ell16 = (ell + 15) / 16 * 16;  // the mma m-tiles read rows up to here
  for (int e = tid; e < ell16 * D; e += kEigenThreads) {
    const int j = e / D, i = e % D;
    Qa[swz<D>(j, i)] = j < ell ? hash_unit(i, j) * omega_scale : 0.0f;
    Qb[swz<D>(j, i)] = 0.0f;
  }
  __syncthreads();
  const float trace = misc[0];

  // --- 3. subspace iteration: Q ← orth(G·Q) -------------------------------------------------------
  float* Qc = Qa;
  float* Zn = Qb;
  // Directions with G·q below 1e-6·trace(G) (≥ 1e-6·λ_max) are FP32 noise: CholQR adds them as the
  // shift δ, which bounds κ((G + δI)·Q) by ~1e6.
  const float ref = 1e-6f * trace;
  if (trace > 0.0f) {
    // Two products per orthonormalisation (G²·Q) where the last pass's κ estimate allows it:
    // span(G²·Q) is what two single steps give, only κ grows (to about κ²). The last product is
    // always single, so the final pass leaves Q as orthonormal as before (the check pass can skip).
    int pending = 1;  // products before the next CholQR pass
    for (int it = 0; it < opt.iterations; ++it) {
      gemm_gq<D>(Gs, Qc, Zn, ell, ref);
      __syncthreads();
      float* tmp = Qc;
      Qc = Zn;
      Zn = tmp;
      if (--pending == 0) {
        cholqr<D>(Qc, reinterpret_cast<double*>(Zn), invd, ell);  // S in the panel the product read
        const bool two = opt.iterations - 1 - it >= 3 && cholqr_kappa(invd, ell) <= kDoubleStepKappa;
        pending = two ? 2 : 1;
      }
    }
  } else {
    cholqr<D>(Qc, reinterpret_cast<double*>(Zn), invd, ell);  // zero block: orthonormalise Ω itself
  }
  // Second pass, unless the first left Q orthonormal to 1e-5 already.
  cholqr<D>(Qc, reinterpret_cast<double*>(Zn), invd, ell, reinterpret_cast<unsigned*>(misc + 1));
  // Rayleigh–Ritz: H = Qᵀ·G·Q into Gs (row stride ℓ + 1), then the one-barrier Jacobi in Gs (H) and
  // the free panel (W), which leaves the Ritz values in diag and column j of the rotations (the Ritz
  // vector of diag[j]) at W[m · 32 + w_column(j)], in two slot planes (JacobiSlots).
  rayleigh_ritz<D>(Gs, Qc, Zn, Gs, ell, ell + 1, trace > 0.0f);
  const float* W = jacobi_fast<D>(Gs, Zn, diag, flags, ell, r, opt.jacobi_sweeps, trace > 0.0f);

  // --- 4. top-r Ritz pairs, V = Q·W[:, order], sign fix, outputs ----------------------------------
  constexpr int w_stride = 32;
  auto w_column = [&](int j) { return (j & 1) * 32 * ell + (j >> 1); };
  __syncthreads();
  if (tid < ell) {
    const int rank_of = descending_rank(diag, 1, ell, tid);
    if (rank_of < r) order[rank_of] = tid;
  }
  __syncthreads();
  float* V = Gs;  // [r][D] plain; H is no longer needed
  for (int task = tid; task < D * ((r + 7) / 8); task += kEigenThreads) {
    const int d = task % D, j0 = (task / D) * 8;  // a warp shares j0: the W reads are broadcasts
    int col[8];
    float v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      col[u] = w_column(j0 + u < r ? order[j0 + u] : 0);
      v[u] = 0.0f;
    }
    for (int m = 0; m < ell; ++m) {
      const float qv = Qc[swz<D>(m, d)];
#pragma unroll
      for (int u = 0; u < 8; ++u) v[u] += qv * W[m * w_stride + col[u]];
    }
#pragma unroll
    for (int u = 0; u < 8; ++u)
      if (j0 + u < r) V[(j0 + u) * D + d] = v[u];
  }
  __syncthreads();
  store_basis<D>(job, V, diag, order, r);
}

/// One CTA per job, in job_order (widest subspace first): G by 16-byte cp.async straight into its
/// swizzled place (the XOR moves whole groups of 4 floats), all 64 KB in flight at once (element-wise
/// loads through registers kept only a few per thread in flight, and G has mostly left the L2 by the
/// time its job runs), then eigen_block.
template <int D>
__global__ void __launch_bounds__(kEigenThreads, 2) eigen_kernel(const CompressJob* __restrict__ jobs, int rows,
                                                              const float* __restrict__ gram,
                                                              const float* __restrict__ colsum,
                                                              const float* __restrict__ shift,
                                                              const int* __restrict__ job_order, EigenSmem layout,
                                                              CompressOptions opt, bool tridiagonal) {
  extern __shared__ __align__(16) float smem[];
  const std::int64_t jb = job_order[blockIdx.x];
  if (jb < 0) return;  // rejected by order_kernel
  const CompressJob job = jobs[jb];
  const float* g = gram + jb * D * D;
  for (int v = threadIdx.x; v < D * D / 4; v += kEigenThreads) {
    const int row = v / (D / 4), col = (v % (D / 4)) * 4;
    cp_async16(&smem[swz<D>(row, col)], g + 4 * v, true);
  }
  cp_async_commit();
  eigen_block<D>(job, rows, smem, colsum + jb * D, shift + jb * D, layout, opt, tridiagonal);
}

}  // namespace
}  // namespace spectralkv::cuda
