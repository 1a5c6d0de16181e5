#pragma once
// The eigen CTA's shape and its swizzled panels, the products of subspace iteration with the Gram
// (3×TF32 mma: G·Q, Qᵀ·Z and the Rayleigh–Ritz projection), and which subspace widths take subspace
// iteration at all (kFastMaxEll, takes_subspace_iteration).
// Private to kernels/compress.cu: reopens that translation unit's anonymous namespace, so the
// kernels and their helpers keep internal linkage.

#include "common.cuh"

namespace spectralkv::cuda {
namespace {

constexpr int kEigenThreads = 256;
constexpr int kEigenWarps = kEigenThreads / 32;

/// Shared-memory arrays of the eigen kernel hold "column-major" panels: row j of a [rows][D] array is
/// column j of the D×ℓ matrix. Element (j, i) lives at j·D + (i ^ ((j & 7) << 2)): the XOR swizzle
/// makes every mma fragment load/store and every per-column sweep bank-conflict free without padding
/// (padding would push the kernel past two CTAs per SM).
template <int D>
__device__ __forceinline__ int swz(int row, int col) {
  return row * D + (col ^ ((row & 7) << 2));
}

template <int D>
struct EigenShape {
  static constexpr int kMTiles = D / 16;
  static constexpr int kWarpsPerMTile = kEigenWarps / kMTiles;          // 1 (D=128) or 2 (D=64)
  static constexpr int kPerLane = D / 32;                               // column elements per lane
};

/// Z = (G + shift·I)·Q (D×ℓ) with 3×TF32 mma. Gs: [D][D] swizzled (symmetric); Q, Z: panels [ℓ][D].
/// Each warp owns 16 rows of Z and walks its n-tiles in chunks of kChunk, one pass over its rows of
/// G per chunk: a fixed trip count per chunk keeps the tile loop free of branches (a loop over a
/// runtime tile count with per-tile guards cost more than the extra pass over G). ℓ = 24, 48 and 96
/// (ranks 16, 32, 64) are whole chunks; the slots of a partial chunk recompute the warp's last tile
/// (reads stay inside Q) and are not stored.
template <int D>
__device__ void gemm_gq(const float* Gs, const float* Q, float* Z, int ell, float shift = 0.0f) {
  using S = EigenShape<D>;
  constexpr int kChunk = 3;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int m0 = (warp % S::kMTiles) * 16;
  const int slice = warp / S::kMTiles;
  const int mine = (ell / 8 - slice + S::kWarpsPerMTile - 1) / S::kWarpsPerMTile;  // n-tiles of this warp
  for (int c0 = 0; c0 < mine; c0 += kChunk) {  // uniform across the warp
    int n0[kChunk];
#pragma unroll
    for (int j = 0; j < kChunk; ++j) n0[j] = (slice + min(c0 + j, mine - 1) * S::kWarpsPerMTile) * 8;
    float acc[kChunk][4];
#pragma unroll
    for (int j = 0; j < kChunk; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
#pragma unroll 2
    for (int k0 = 0; k0 < D; k0 += 8) {
      unsigned ah[4], al[4];
      split_tf32(Gs[swz<D>(m0 + g, k0 + t)], ah[0], al[0]);
      split_tf32(Gs[swz<D>(m0 + g + 8, k0 + t)], ah[1], al[1]);
      split_tf32(Gs[swz<D>(m0 + g, k0 + t + 4)], ah[2], al[2]);
      split_tf32(Gs[swz<D>(m0 + g + 8, k0 + t + 4)], ah[3], al[3]);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) {
        unsigned bh0, bl0, bh1, bl1;
        split_tf32(Q[swz<D>(n0[j] + g, k0 + t)], bh0, bl0);
        split_tf32(Q[swz<D>(n0[j] + g, k0 + t + 4)], bh1, bl1);
        mma_tf32(acc[j], al, bh0, bh1);
        mma_tf32(acc[j], ah, bl0, bl1);
        mma_tf32(acc[j], ah, bh0, bh1);
      }
    }
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      if (c0 + j < mine) {
        const int n = n0[j];
        Z[swz<D>(n + 2 * t, m0 + g)] = acc[j][0] + shift * Q[swz<D>(n + 2 * t, m0 + g)];
        Z[swz<D>(n + 2 * t + 1, m0 + g)] = acc[j][1] + shift * Q[swz<D>(n + 2 * t + 1, m0 + g)];
        Z[swz<D>(n + 2 * t, m0 + g + 8)] = acc[j][2] + shift * Q[swz<D>(n + 2 * t, m0 + g + 8)];
        Z[swz<D>(n + 2 * t + 1, m0 + g + 8)] = acc[j][3] + shift * Q[swz<D>(n + 2 * t + 1, m0 + g + 8)];
      }
    }
  }
}

/// H = Qᵀ·Z (ℓ×ℓ, plain row-major, stride ldh) with 3×TF32 mma. Rows of the 16-row tiles past ℓ
/// produce rows of H that are discarded (each output row depends on its own row of Q only).
template <int D>
__device__ void gemm_qtz(const float* Q, const float* Z, float* H, int ell, int ldh) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int mtiles = (ell + 15) / 16, ntiles = ell / 8;
  for (int tile = warp; tile < mtiles * ntiles; tile += kEigenWarps) {
    const int m0 = (tile / ntiles) * 16, n0 = (tile % ntiles) * 8;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 4
    for (int k0 = 0; k0 < D; k0 += 8) {
      unsigned ah[4], al[4], bh0, bl0, bh1, bl1;
      split_tf32(Q[swz<D>(m0 + g, k0 + t)], ah[0], al[0]);
      split_tf32(Q[swz<D>(m0 + g + 8, k0 + t)], ah[1], al[1]);
      split_tf32(Q[swz<D>(m0 + g, k0 + t + 4)], ah[2], al[2]);
      split_tf32(Q[swz<D>(m0 + g + 8, k0 + t + 4)], ah[3], al[3]);
      split_tf32(Z[swz<D>(n0 + g, k0 + t)], bh0, bl0);
      split_tf32(Z[swz<D>(n0 + g, k0 + t + 4)], bh1, bl1);
      mma_tf32(acc, al, bh0, bh1);
      mma_tf32(acc, ah, bl0, bl1);
      mma_tf32(acc, ah, bh0, bh1);
    }
    const int r0 = m0 + g, c0 = n0 + 2 * t;
    if (r0 < ell) {
      H[r0 * ldh + c0] = acc[0];
      H[r0 * ldh + c0 + 1] = acc[1];
    }
    if (r0 + 8 < ell) {
      H[(r0 + 8) * ldh + c0] = acc[2];
      H[(r0 + 8) * ldh + c0 + 1] = acc[3];
    }
  }
}

/// Rayleigh–Ritz projection H = Qᵀ·(G·Q) (ℓ×ℓ, row stride ldh), made exactly symmetric by averaging
/// the two triangles (they differ by rounding); zero when the Gram is (`nonzero` false). H may be Gs:
/// G is read only before the first barrier. Z is scratch (a panel). Ends with a barrier.
template <int D>
__device__ void rayleigh_ritz(const float* Gs, const float* Q, float* Z, float* H, int ell, int ldh, bool nonzero) {
  if (nonzero) {
    gemm_gq<D>(Gs, Q, Z, ell);
    __syncthreads();
    gemm_qtz<D>(Q, Z, H, ell, ldh);
    __syncthreads();
    for (int e = threadIdx.x; e < ell * ell; e += kEigenThreads) {
      const int i = e / ell, k = e % ell;
      if (i < k) {
        const float v = 0.5f * (H[i * ldh + k] + H[k * ldh + i]);
        H[i * ldh + k] = v;
        H[k * ldh + i] = v;
      }
    }
  } else {
    for (int e = threadIdx.x; e < ell * ldh; e += kEigenThreads) H[e] = 0.0f;
  }
  __syncthreads();
}

/// Largest ℓ that takes subspace iteration (CholQR + one-barrier Jacobi); wider jobs take the
/// tridiagonal solve. The path works up to ℓ = 64 (its FP64 ℓ×ℓ Gram fits in one panel, the Jacobi's
/// two H buffers in the Gram's space and its two W buffers in one panel; see JacobiSlots in jacobi.cuh
/// and EigenSmem in eigen.cuh), but at ℓ = 56 and 64 its panels keep the eigen kernel to one CTA per SM, where the
/// tridiagonal solve's scratch allows two: 512 jobs of rank 36 (ℓ = 56) 0.96 → 0.69 ms, rank 40
/// (ℓ = 64) 1.11 → 0.69 ms on an H200 (docs/PERFORMANCE.md).
template <int D>
constexpr int kFastMaxEll = 48;

/// Whether a job of subspace width ℓ takes subspace iteration (else the tridiagonal solve) under
/// kSubspaceIteration: the device's routing and the host's sizing of the eigen layout both ask this.
template <int D>
__host__ __device__ constexpr bool takes_subspace_iteration(int ell) {
  return ell <= kFastMaxEll<D> && ell < D;
}

}  // namespace
}  // namespace spectralkv::cuda
