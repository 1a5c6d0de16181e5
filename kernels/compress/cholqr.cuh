#pragma once
// Cholesky QR of a subspace-iteration panel: S = ZᵀZ on the FP64 tensor cores, S = RᵀR in FP64
// blocked by 8, Z ← Z·R⁻¹ beside the factorisation.
// Private to kernels/compress.cu: reopens that translation unit's anonymous namespace, so the
// kernels and their helpers keep internal linkage.

#include "common.cuh"
#include "subspace_products.cuh"

namespace spectralkv::cuda {
namespace {

/// 1/√x for a positive normal finite x: the instruction sequence of the library's rsqrt(double) (the
/// hardware's approximation, then one correction step y + y·e·(1/2 + 3e/8), e = 1 − x·y², which
/// leaves it correctly rounded or nearly so) without its branch to a slow path for zero, subnormal,
/// negative and non-finite x. That branch is a scheduling barrier in the middle of the Cholesky's
/// pivot chain. The pivots it takes are guarded: above 1e-30·S₀₀ (S₀₀ > 0, a squared column norm of
/// FP32 values, finite in FP64), or 1.0 when S holds NaN (a block with a NaN or an infinity), so always
/// positive normal numbers. Bit for bit the library's result on positive normal doubles (2.7·10⁸
/// checked on an H200).
__device__ __forceinline__ double rsqrt_positive(double x) {
  double y;
  asm("rsqrt.approx.ftz.f64 %0, %1;\n" : "=d"(y) : "d"(x));
  const double e = __fma_rn(-__dmul_rn(y, y), x, 1.0);
  return __fma_rn(__fma_rn(e, 0.375, 0.5), __dmul_rn(y, e), y);
}

/// Factors the 8×8 diagonal block S_JJ = R_JJᵀ·R_JJ of a blocked Cholesky (J = j0..j0+7), called by
/// all of one warp. Every lane loads the block's upper triangle (broadcast loads) and factors all of it
/// in registers, so the pivot chain has no shuffle on it; then lane k < 8 picks column k out by
/// selects (a register array indexed by the lane would go to local memory) and stores it. The same
/// FP64 operations in the same order as a one-column-per-lane factorisation with shuffles, hence the
/// same R, and the pivot chain shorter: the batch 2–3% faster on an H200 (docs/PERFORMANCE.md).
/// Storing each row of R as soon as it is final (left-looking, no __syncwarp) put the stores on the
/// chain and measured slower. Inlined: as a call (its ~80 live doubles in registers of their own) it made
/// the fused kernel spill 68 bytes around it and ran ~0.5% slower (ptxas, CUDA 13).
/// \param S      [ℓ][ℓ] FP64, row-major: reads the block's upper triangle; writes R_jk (j < k) there and
///               1/R_jj in the diagonal slots
/// \param Rf     the same memory as floats: writes R_jk (j < k) in FP32 at Rf[2kℓ + j], inside row k's
///               lower slots, for the substitution
/// \param invd   [ℓ] floats: writes 1/R_jj at j0..j0+7
/// \param ell    ℓ, a multiple of 8; j0 a multiple of 8 below ℓ
/// \param pivot_floor  pivots at or below it are replaced by it (or by 1.0 when it is not positive:
///               S holds NaN); see rsqrt_positive
__device__ __forceinline__ void factor_diagonal_block(double* S, float* Rf, float* invd, int ell, int j0,
                                                      double pivot_floor) {
  const int lane = threadIdx.x & 31, k = lane & 7;  // lanes 8..31 factor too but do not store
  double a[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int c = i; c < 8; ++c) a[i][c] = S[(j0 + i) * ell + j0 + c];
  }
  // One reciprocal square root instead of a square root and a division (both long in FP64).
  auto pivot_rsqrt = [&](double d) {
    return rsqrt_positive(d > pivot_floor ? d : (pivot_floor > 0.0 ? pivot_floor : 1.0));
  };
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    a[j][j] = pivot_rsqrt(a[j][j]);  // 1/R_jj
#pragma unroll
    for (int c = j + 1; c < 8; ++c) a[j][c] *= a[j][j];  // R_jc
#pragma unroll
    for (int i = j + 1; i < 8; ++i) {
#pragma unroll
      for (int c = i; c < 8; ++c) a[i][c] -= a[j][i] * a[j][c];
    }
  }
  // Column k: col[i] = a[i][k] for i ≤ k (1/R_kk at i = k), by selects on k.
  double col[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    col[i] = a[i][7];
#pragma unroll
    for (int c = 6; c >= i; --c) col[i] = k == c ? a[i][c] : col[i];
  }
  // Every lane has read the block before lanes 0..7 overwrite it.
  __syncwarp();
  if (lane < 8) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      if (i <= k) S[(j0 + i) * ell + j0 + k] = col[i];
      if (i < k) Rf[2 * (j0 + k) * ell + j0 + i] = static_cast<float>(col[i]);
      if (i == k) invd[j0 + k] = static_cast<float>(col[i]);
    }
  }
}

/// Orthonormalises the ℓ columns of panel Z in place by Cholesky QR: S = ZᵀZ on the FP64 tensor
/// cores (FP32 products are exact in FP64, so S is accurate to ~1e-16 relative), S = RᵀR in FP64
/// (blocked by 8: ℓ/8 one-warp diagonal factorisations, the rest spread over the CTA), then
/// Z ← Z·R⁻¹ by forward substitution (each thread one of the D rows, FP32). S loses
/// κ(Z)² of its accuracy, which FP64 affords up to κ(Z) ≈ 1e7; the caller keeps κ(Z) ≤ ~1e6 by
/// shifting G by 1e-6·trace(G), and below ~1e6 in practice where two products share a pass
/// (kDoubleStepKappa). The FP32 substitution leaves an orthogonality error ~κ(Z)·2^-24, so a
/// second pass ("CholQR2") makes the final basis orthonormal to FP32 precision, or stops after S when
/// every entry of QᵀQ − I is already below 1e-5 (see `orth`). 3ℓ/8 barriers per pass, against ℓ for
/// modified Gram–Schmidt.
/// \param Z     panel [ℓ][D] (swizzled), complete and visible to every thread on entry
/// \param S     scratch, 2ℓ² floats (16-byte aligned), must not overlap Z: S in FP64, upper triangle
///              overwritten by R, lower triangle holding R in FP32 for the substitution
/// \param invd  out, ℓ floats: 1 / R_jj (the caller's κ estimate, cholqr_kappa, reads them)
/// \param orth  nullptr, or a shared word holding 0 (as float bits) on entry: then the pass returns with
///              Z unchanged, after S, when every |S − I| entry is below 1e-5 — the second pass of a basis
///              the first one already left orthonormal (κ(Z) ≲ 100) has nothing to correct
template <int D>
__device__ void cholqr(float* Z, double* S, float* invd, int ell, unsigned* orth = nullptr) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int nb = ell / 8;
  // --- S = ZᵀZ, upper 8×8 tiles ----------------------------------------------------------------
  for (int tile = warp; tile < nb * (nb + 1) / 2; tile += kEigenWarps) {
    int mi = 0, rest = tile;
    while (rest >= nb - mi) {
      rest -= nb - mi;
      ++mi;
    }
    const int m0 = mi * 8, n0 = (mi + rest) * 8;
    double acc[4][2];
#pragma unroll
    for (int u = 0; u < 4; ++u) acc[u][0] = acc[u][1] = 0.0;
#pragma unroll 2
    for (int k0 = 0; k0 < D; k0 += 16) {
#pragma unroll
      for (int u = 0; u < 4; ++u) {  // 4 independent accumulators: the mma latency overlaps
        const int k = k0 + 4 * u + t;
        mma_f64(acc[u], static_cast<double>(Z[swz<D>(m0 + g, k)]), static_cast<double>(Z[swz<D>(n0 + g, k)]));
      }
    }
    const double s0 = (acc[0][0] + acc[1][0]) + (acc[2][0] + acc[3][0]);
    const double s1 = (acc[0][1] + acc[1][1]) + (acc[2][1] + acc[3][1]);
    S[(m0 + g) * ell + n0 + 2 * t] = s0;
    S[(m0 + g) * ell + n0 + 2 * t + 1] = s1;
    if (orth != nullptr) {
      const int row = m0 + g, col = n0 + 2 * t;
      float dev = fmaxf(static_cast<float>(fabs(s0 - (row == col ? 1.0 : 0.0))),
                        static_cast<float>(fabs(s1 - (row == col + 1 ? 1.0 : 0.0))));
      if (!(dev == dev)) dev = 1.0f;  // NaN: not orthonormal
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) dev = fmaxf(dev, __shfl_xor_sync(0xffffffffu, dev, o));
      if (lane == 0) atomicMax(orth, __float_as_uint(dev));  // non-negative floats order as their bits
    }
  }
  __syncthreads();
  if (orth != nullptr && __uint_as_float(*orth) < 1e-5f) return;  // uniform
  // --- S = RᵀR (upper R in place, FP64), blocked by 8, right-looking; Z ← Z·R⁻¹ -----------------
  // Per 8-column block J: (1) warp 0 factors the diagonal block in registers (factor_diagonal_block);
  // (2) one thread per later column c solves R_JJᵀ·x = S_J,c for its piece of the block row of R;
  // (3) all threads subtract R_J,kᵀ·R_J,l from the trailing upper triangle. The serial part is ℓ/8
  // small factorisations: with an earlier, shuffle-based form of (1) warp 0 was busy ~19 K cycles of a
  // ~41 K-cycle pass at ℓ = 48 on an H200 (two CTAs per SM; see docs/PERFORMANCE.md), where a one-warp
  // left-looking factorisation took ~45 K alone with 7 of the 8 warps idle. Updating the next diagonal
  // block first and factoring it while the other warps update the rest (two barriers per block instead
  // of three) measured slower: the update lengthens warp 0's chain, which is the critical path.
  // The diagonal slot of R keeps 1/R_jj (FP64) for the solves; R_jk (j < k) is also stored in FP32 in
  // the unused lower triangle, row k's values contiguous (Rf[2kℓ + j], inside row k's lower slots), so
  // the substitution reads four of them per 16-byte broadcast load.
  //
  // Z ← Z·R⁻¹ goes 8 columns at a time, row i of Z by one thread (D of the CTA's threads, not warp 0):
  // columns J need R's columns J only, which are final once block J is factored, so the substitution
  // of block J − 1 runs while warp 0 factors block J (during which the other warps used to wait).
  // Splitting a row's columns over two lanes (shuffling each finished column to the other) measured
  // slower: the in-block chain gains a shuffle per column.
  float* Rf = reinterpret_cast<float*>(S);  // R_mk (m < k) as FP32 at Rf[2kℓ + m]: 16-byte aligned per 4
  static_assert(kEigenThreads - D >= 32, "the substituting threads must not include warp 0");
  const int zrow = tid - (kEigenThreads - D);  // the row of Z this thread substitutes, if ≥ 0
  auto substitute = [&](int jb) {  // columns jb..jb+7 of row zrow; columns < jb are done
    float acc[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) acc[u] = Z[swz<D>(jb + u, zrow)];
    // Four finished columns at a time: their R entries come as one broadcast float4 per column of the
    // block (each acc[u] still subtracts in ascending m, the order of the single-column loop).
    for (int m = 0; m < jb; m += 4) {
      float qm[4];
#pragma unroll
      for (int v = 0; v < 4; ++v) qm[v] = Z[swz<D>(m + v, zrow)];
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        const float4 rv = *reinterpret_cast<const float4*>(&Rf[2 * (jb + u) * ell + m]);
        acc[u] -= rv.x * qm[0];
        acc[u] -= rv.y * qm[1];
        acc[u] -= rv.z * qm[2];
        acc[u] -= rv.w * qm[3];
      }
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
#pragma unroll
      for (int v = 0; v < u; ++v) acc[u] -= Rf[2 * (jb + u) * ell + jb + v] * acc[v];
      acc[u] *= invd[jb + u];
      Z[swz<D>(jb + u, zrow)] = acc[u];
    }
  };
  {
    double pivot_floor = 0.0;
    if (warp == 0) pivot_floor = 1e-30 * S[0];  // only reached for non-finite or degenerate input
    for (int j0 = 0; j0 < ell; j0 += 8) {
      if (warp == 0) {
        factor_diagonal_block(S, Rf, invd, ell, j0, pivot_floor);
      } else if (zrow >= 0 && j0 > 0) {
        substitute(j0 - 8);
      }
      __syncthreads();
      const int next = j0 + 8;
      if (next >= ell) break;
      for (int c = next + tid; c < ell; c += kEigenThreads) {
        double x[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          double v = S[(j0 + i) * ell + c];
#pragma unroll
          for (int m = 0; m < i; ++m) v -= S[(j0 + m) * ell + j0 + i] * x[m];
          x[i] = v * S[(j0 + i) * ell + j0 + i];
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          S[(j0 + i) * ell + c] = x[i];
          Rf[2 * c * ell + j0 + i] = static_cast<float>(x[i]);
        }
      }
      __syncthreads();
      // The trailing upper triangle folded as in the symmetrisation of G (rows i and rest − 1 − i hold
      // rest + 1 of its entries together; rest is a multiple of 8), so no lane idles on a lower entry.
      const int rest = ell - next;
      for (int e = tid; e < (rest / 2) * (rest + 1); e += kEigenThreads) {
        const int fr = e / (rest + 1), fc = e % (rest + 1);
        const int row = fc < rest - fr ? fr : rest - 1 - fr;
        const int kk = next + row, l = next + row + (fc < rest - fr ? fc : fc - (rest - fr));
        double acc = S[kk * ell + l];
#pragma unroll
        for (int i = 0; i < 8; ++i) acc -= S[(j0 + i) * ell + kk] * S[(j0 + i) * ell + l];
        S[kk * ell + l] = acc;
      }
      __syncthreads();
    }
  }
  if (zrow >= 0) substitute(ell - 8);
  __syncthreads();
}

}  // namespace
}  // namespace spectralkv::cuda
