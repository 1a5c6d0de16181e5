#pragma once
// The one-barrier parallel Jacobi eigen-solve of the Rayleigh–Ritz matrix, in slot storage: a full
// sweep, then sweeps across the top-r boundary.
// Private to kernels/compress.cu: reopens that translation unit's anonymous namespace, so the
// kernels and their helpers keep internal linkage.

#include "subspace_products.cuh"

namespace spectralkv::cuda {
namespace {

/// The MUFU approximations alone (rel. error ≤ 2^-22; denormals flushed): the library functions add
/// a refinement step and denormal scaling that a Jacobi rotation does not need.
__device__ __forceinline__ float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float rsqrt_approx(float x) {
  float y;
  asm("rsqrt.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

/// Jacobi rotation (c, s) that annihilates H_pq (the classical formulas), with the hardware's
/// approximate reciprocal and reciprocal square root: the rotations are the critical path of a
/// Jacobi round. An approximate t = tan θ only leaves a slightly smaller H_pq behind; c = 1/√(1 + t²)
/// and s = t·c keep c² + s² = 1 to FP32 precision whatever t is, which is what keeps W orthogonal.
/// The thresholds compare squares (|H_pq| > 1e-7·√|H_pp·H_qq| as H_pq² > 1e-14·|H_pp·H_qq|): no square
/// root on the path. H_pq² > 0 implies |H_pq| ≥ ~1e-19, so 2·H_pq is a normal number and its
/// reciprocal finite. Every warp computes the round's rotations itself; one inlined instruction
/// sequence on the same inputs gives every warp bit-identical values, and the products are written
/// so that no FMA contraction can differ between them.
__device__ __forceinline__ void jacobi_rotation(float app, float aqq, float apq, float& c, float& sn, bool& big) {
  c = 1.0f;
  sn = 0.0f;
  const float apq2 = __fmul_rn(apq, apq);
  const float diag = fabsf(__fmul_rn(app, aqq));
  if (apq2 > __fmul_rn(1e-14f, diag)) {
    const float theta = __fmul_rn(__fsub_rn(aqq, app), rcp_approx(__fmul_rn(2.0f, apq)));
    const float at = fabsf(theta);
    const float u = __fmaf_rn(at, at, 1.0f);
    // t = 1 / (|θ| + √(1 + θ²)); for |θ| > 1e15, θ² would overflow and t = 1/(2|θ|) to FP32 precision.
    float tt = at > 1e15f ? __fmul_rn(0.5f, rcp_approx(at)) : rcp_approx(__fadd_rn(at, __fmul_rn(u, rsqrt_approx(u))));
    if (theta < 0.0f) tt = -tt;
    c = rsqrt_approx(__fmaf_rn(tt, tt, 1.0f));
    sn = __fmul_rn(tt, c);
    if (apq2 > __fmul_rn(1e-12f, diag)) big = true;
  }
}

/// Rows of W one thread rotates per round: ℓ ≤ 64 rows over the CTA's warps, one lane per pair in each.
constexpr int kJacobiRowsPerThread = 64 / (kEigenThreads / 32);
static_assert(kFastMaxEll<128> <= 64 && kFastMaxEll<64> <= 64, "jacobi_fast's W slots assume l <= 64");

/// Position of entry i when the n values d[0], d[stride], ... are sorted by decreasing value, ties by
/// index; NaN sorts as −∞, so the positions are a permutation of 0..n−1 whatever the values.
__device__ __forceinline__ int descending_rank(const float* d, int stride, int n, int i) {
  auto key = [](float x) { return x == x ? x : -INFINITY; };
  const float v = key(d[i * stride]);
  int rank = 0;
  for (int m = 0; m < n; ++m) {
    const float u = key(d[m * stride]);
    rank += (u > v) || (u == v && m < i);
  }
  return rank;
}

/// The fast Jacobi's storage, in slots: a round always rotates the pairs of slots (2k, 2k + 1), and
/// between rounds every entry moves to the slots of the next round's pairs (a fixed permutation for a
/// whole sweep), so a pair's 2×2 block has a fixed place, no thread looks up a pair table, and each
/// thread's addresses are the same in every round of a sweep.
/// H is kept as its upper triangle of 2×2 tiles (a ≤ b over the ℓ/2 pairs, numbered row by row) in four
/// planes, one per tile entry (top–top, top–bottom, bottom–top, bottom–bottom), so that threads holding
/// consecutive tiles touch consecutive words; a diagonal tile uses its top–bottom entry for both
/// off-diagonal entries. W (row x: original index, column: slot) is kept in two planes, the top and the
/// bottom slots of the pairs, [ℓ][32] each, so that lane k of a warp owns pair k's columns in every row.
/// H's planes are sized for the largest ℓ at D (the Gram's space has room), so that they are immediates.
template <int D>
struct JacobiSlots {
  static constexpr int kMaxPairs = kFastMaxEll<D> / 2;
  static constexpr int kHPlane = kMaxPairs * (kMaxPairs + 1) / 2;  ///< floats per plane of H
  static constexpr int kHBuffer = 4 * kHPlane;
  /// Floats of the Gram's space used: the row-major input [ℓ][ℓ + 1] first, then two H buffers and
  /// two [ℓ] arrays of scratch.
  static constexpr int kGramFloats = 2 * kHBuffer + 2 * kFastMaxEll<D>;
  static_assert(2 * kHBuffer >= kFastMaxEll<D> * (kFastMaxEll<D> + 1), "the row-major input must fit as well");
  static_assert(kGramFloats <= D * D, "the fast Jacobi's H must fit in the Gram's space");
  static_assert(kHPlane <= 3 * kEigenThreads, "a thread holds at most three tiles");
  static_assert(kHBuffer <= 0x10000, "next offsets are kept in 16 bits");
  static_assert(kEigenWarps == 8, "W's rows (ℓ, a multiple of 8) are dealt evenly over the warps");

  int np;      ///< pairs, ℓ/2
  int wplane;  ///< floats per plane of W, 32·ℓ
  __device__ int tile(int a, int b) const { return a * np - a * (a - 1) / 2 + (b - a); }
  /// Offset in an H buffer of the entry (slot i, slot j), by symmetry from its canonical tile.
  __device__ int h_offset(int i, int j) const {
    if ((i >> 1) > (j >> 1)) {
      const int t = i;
      i = j;
      j = t;
    }
    const int a = i >> 1, b = j >> 1;
    const int plane = a < b ? 2 * (i & 1) + (j & 1) : (i == j ? 3 * (i & 1) : 1);
    return plane * kHPlane + tile(a, b);
  }
  /// Offset in a W buffer of row x, slot j.
  __device__ int w_offset(int x, int j) const { return (j & 1) * wplane + x * 32 + (j >> 1); }
};

/// Slot of the next round for the entry in slot j, in a sweep over all pairs: the round-robin (circle)
/// schedule on ℓ indices, whose round s pairs (s, ℓ−1) and (s + k, s − k) mod (ℓ − 1). The tops of
/// pairs k ≥ 1 move to pair k − 1, the bottoms of pairs 1..np−2 to pair k + 1; the top of pair 0 becomes
/// the bottom of pair 1, the bottom of pair np − 1 the top of pair np − 1, and the bottom of pair 0 (index
/// ℓ − 1) stays.
__device__ __forceinline__ int jacobi_next_all(int j, int np) {
  const int k = j >> 1;
  if ((j & 1) == 0) return k == 0 ? 3 : 2 * (k - 1);
  if (k == 0) return 1;
  return k == np - 1 ? 2 * (np - 1) : 2 * (k + 1) + 1;
}

/// Slot of position m of the larger side in a boundary sweep: the bottoms of the ns straddling pairs,
/// then both slots of the remaining pairs.
__device__ __forceinline__ int jacobi_large_slot(int m, int ns) { return m < ns ? 2 * m + 1 : ns + m; }

/// Slot of the next round for the entry in slot j, in a boundary sweep: the smaller side stays in the
/// tops of the first ns pairs and the larger side (nl indices) moves one place down its slots, so round
/// t pairs small[k] with large[(k + t) mod nl].
__device__ __forceinline__ int jacobi_next_boundary(int j, int ns, int nl) {
  const int k = j >> 1;
  if ((j & 1) == 0 && k < ns) return j;
  const int m = (j & 1) && k < ns ? k : j - ns;
  return jacobi_large_slot(m == 0 ? nl - 1 : m - 1, ns);
}

__device__ __forceinline__ void swap_buffers(float*& hc, float*& hn, float*& wc, float*& wn) {
  float* t = hc;
  hc = hn;
  hn = t;
  t = wc;
  wc = wn;
  wn = t;
}

/// Parallel cyclic Jacobi on the ℓ×ℓ matrix H (ℓ ≤ kFastMaxEll<D>), rotations accumulated in W, one
/// barrier per round, in the slot storage of JacobiSlots: H and W are double-buffered (a round reads one
/// buffer and writes the other, each entry rotated and moved to its next slot at once), and every warp
/// computes the round's rotations from the diagonal tiles itself (lane k: pair k) and shuffles them to
/// the lanes that rotate H. Thread work is fixed for the whole solve: ≤ 3 tiles of H (rotated once: H
/// stays exactly symmetric), and W's two columns of pair `lane` in the rows x ≡ warp (mod 8); where each
/// of them goes next is worked out once per sweep.
///
/// The first sweep is the round-robin over all pairs (ℓ − 1 rounds). Only the span of the top-r Ritz
/// vectors matters to the caller, and a rotation between two indices on the same side of the top-r
/// boundary leaves that span unchanged, so every later sweep splits the indices by the current diagonal
/// (the r largest against the rest) and rotates the pairs that straddle it: max(r, ℓ − r) rounds
/// instead of ℓ − 1 (32 against 47 at r = 32, ℓ = 48). Each round pairs every index of the smaller side
/// with a distinct one of the larger side; the larger side's idle indices rotate among themselves
/// (harmless, and it keeps every pair slot busy), and only the straddling rotations count for the early
/// stop. Between sweeps one pass without rotations moves every entry to its slot for the split.
///
/// A call, not inlined: with its own register allocation it does not spill (ptxas, CUDA 13). Inlined,
/// its per-thread offsets made eigen_kernel<128> spill 36 bytes and the fused kernel 80 (with an earlier
/// form of the rest), and both ran 1–4% slower on an H200.
/// \param H      [ℓ][ℓ + 1] the symmetric input, row-major, in JacobiSlots<D>::kGramFloats floats that
///               the solve then uses for its two H buffers and scratch
/// \param W      128·ℓ floats: the two W buffers
/// \param diag   [ℓ] output: the final diagonal (the Ritz values), by slot
/// \param flags  2 ints of scratch
/// \param r      the rank, 1 ≤ r < ℓ
/// \return the W buffer holding the result: its column j (JacobiSlots::w_offset) goes with diag[j]
template <int D>
__device__ __noinline__ float* jacobi_fast(float* H, float* W, float* diag, int* flags, int ell, int r, int sweeps,
                                           bool active) {
  using JS = JacobiSlots<D>;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int np = ell / 2;
  const int tiles = np * (np + 1) / 2;
  const JS js{np, 32 * ell};
  // Round s reads (Hc, Wc) and writes (Hn, Wn); the pointers swap after each round.
  float* Hc = H;
  float* Hn = H + JS::kHBuffer;
  float* Wc = W;
  float* Wn = W + 2 * js.wplane;
  float* dsc = H + 2 * JS::kHBuffer;              // [ℓ] diagonal between sweeps
  int* next = reinterpret_cast<int*>(dsc + ell);  // [ℓ] where each slot's entries go: the sweep's permutation
  // Tile u of this thread is number kEigenThreads − 1 − tid + u·kEigenThreads in the row-by-row order:
  // a warp's tiles are consecutive, and so are (mostly) the places their entries move to.
  int blk[3] = {0, 0, 0};
  unsigned dst[3][2];  // the next offsets of a tile's four entries, two 16-bit halves each (< kHBuffer)
  int nmine = 0;
#pragma unroll
  for (int u = 0; u < 3; ++u) {
    const int idx = kEigenThreads - 1 - tid + u * kEigenThreads;
    if (idx < tiles) {
      int a = 0, rest = idx;
      while (rest >= np - a) {
        rest -= np - a;
        ++a;
      }
      blk[u] = a | ((a + rest) << 8);
      nmine = u + 1;
    }
  }
  const int max_blocks = (tiles + kEigenThreads - 1) / kEigenThreads;  // CTA-uniform
  const int wrows = ell / kEigenWarps;                                  // W rows per warp
  int wdst[2];
  // The circle schedule's round 0 pairs (k, ℓ − 1 − k): slot 2k holds index k, slot 2k + 1 index ℓ−1−k.
  // A zero matrix is not rotated and keeps the natural order, so its basis is Q's first r columns.
  auto index0 = [&](int j) { return active ? ((j & 1) ? ell - 1 - (j >> 1) : j >> 1) : j; };
  float h0[3][4];
#pragma unroll
  for (int u = 0; u < 3; ++u) {
    if (u >= nmine) break;
    const int a = blk[u] & 0xFF, b = blk[u] >> 8;
#pragma unroll
    for (int e = 0; e < 4; ++e) h0[u][e] = H[index0(2 * a + (e >> 1)) * (ell + 1) + index0(2 * b + (e & 1))];
  }
  for (int e = tid; e < ell * ell; e += kEigenThreads) {
    const int x = e / ell, j = e % ell;
    Wc[js.w_offset(x, j)] = x == index0(j) ? 1.0f : 0.0f;
  }
  if (tid == 0) flags[0] = 0;
  __syncthreads();  // every entry of the row-major H read
#pragma unroll
  for (int u = 0; u < 3; ++u) {
    if (u >= nmine) break;
    const int t = kEigenThreads - 1 - tid + u * kEigenThreads;
#pragma unroll
    for (int e = 0; e < 4; ++e) Hc[e * JS::kHPlane + t] = h0[u][e];
  }
  // Where this thread's entries go after a round, from the table next[slot] (complete and visible).
  auto plan = [&]() {
#pragma unroll
    for (int u = 0; u < 3; ++u) {
      if (u >= max_blocks) break;  // uniform
      const int a = blk[u] & 0xFF, b = blk[u] >> 8;
      const int pb = next[2 * b], qb = next[2 * b + 1];
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int i = next[2 * a + e];
        dst[u][e] = static_cast<unsigned>(js.h_offset(i, pb)) | static_cast<unsigned>(js.h_offset(i, qb)) << 16;
      }
    }
    wdst[0] = lane < np ? js.w_offset(0, next[2 * lane]) : 0;
    wdst[1] = lane < np ? js.w_offset(0, next[2 * lane + 1]) : 0;
  };
  if (tid < ell) next[tid] = jacobi_next_all(tid, np);  // past both H buffers (the row-major H is read)
  __syncthreads();
  plan();
  if (active) {
    const int diag_tile = lane < np ? js.tile(lane, lane) : 0;
    int rounds = ell - 1;
    int counted = np;  // pairs whose rotations decide convergence: all, then the straddling ones (first)
    for (int sweep = 0; sweep < sweeps; ++sweep) {
      for (int s = 0; s < rounds; ++s) {
        // Every warp computes the round's np ≤ 32 rotations, lane k the one of pair k, and hands them
        // around by shuffles: no barrier between computing and applying them.
        float c = 1.0f, sn = 0.0f;
        if (lane < np) {
          bool big = false;
          jacobi_rotation(Hc[diag_tile], Hc[3 * JS::kHPlane + diag_tile], Hc[JS::kHPlane + diag_tile], c, sn, big);
          if (big && lane < counted) flags[sweep & 1] = 1;
        }
#pragma unroll
        for (int u = 0; u < 3; ++u) {
          if (u >= max_blocks) break;  // uniform
          const int bl = u < nmine ? blk[u] : 0;
          const int a = bl & 0xFF, b = bl >> 8;
          const float ca = __shfl_sync(0xffffffffu, c, a), sa = __shfl_sync(0xffffffffu, sn, a);
          const float cb = __shfl_sync(0xffffffffu, c, b), sb = __shfl_sync(0xffffffffu, sn, b);
          if (u >= nmine) continue;
          const float* h = Hc + (kEigenThreads - 1 - tid + u * kEigenThreads);
          const float hpp = h[0], hpq = h[JS::kHPlane], hqq = h[3 * JS::kHPlane];
          const float hqp = a == b ? hpq : h[2 * JS::kHPlane];
          const float tpp = ca * hpp - sa * hqp, tpq = ca * hpq - sa * hqq;  // Jᵀ·H on the rows
          const float tqp = sa * hpp + ca * hqp, tqq = sa * hpq + ca * hqq;
          Hn[dst[u][0] & 0xFFFF] = cb * tpp - sb * tpq;  // ·J on the columns
          Hn[dst[u][1] >> 16] = sb * tqp + cb * tqq;
          const float npq = sb * tpp + cb * tpq, nqp = cb * tqp - sb * tqq;
          if (a == b) {
            Hn[dst[u][0] >> 16] = 0.5f * (npq + nqp);  // a diagonal tile: keep H exactly symmetric
          } else {
            Hn[dst[u][0] >> 16] = npq;
            Hn[dst[u][1] & 0xFFFF] = nqp;
          }
        }
        if (lane < np) {
          // All loads first: the compiler cannot tell Wc from Wn, and would otherwise wait for each
          // row's stores before the next row's loads.
          const float* w = Wc + warp * 32 + lane;
          const float* wq_row = w + js.wplane;
          float wp[kJacobiRowsPerThread], wq[kJacobiRowsPerThread];
#pragma unroll
          for (int i = 0; i < kJacobiRowsPerThread; ++i) {
            if (i >= wrows) break;  // uniform
            wp[i] = w[i * kEigenThreads];
            wq[i] = wq_row[i * kEigenThreads];
          }
#pragma unroll
          for (int i = 0; i < kJacobiRowsPerThread; ++i) {
            if (i >= wrows) break;  // uniform
            Wn[wdst[0] + warp * 32 + i * kEigenThreads] = c * wp[i] - sn * wq[i];
            Wn[wdst[1] + warp * 32 + i * kEigenThreads] = sn * wp[i] + c * wq[i];
          }
        }
        __syncthreads();
        // Every thread has read the other flag (end of the previous sweep) before this barrier.
        if (s == 0 && tid == 0) flags[(sweep + 1) & 1] = 0;
        swap_buffers(Hc, Hn, Wc, Wn);
      }
      if (flags[sweep & 1] == 0) break;  // uniform: read after the round's barrier
      if (sweep + 1 == sweeps) break;
      // Next sweep: the pairs straddling the top-r boundary of the current diagonal. Ranked by
      // decreasing diagonal, the smaller side goes to the tops of the first ns pairs and the larger side
      // to its slots in order (jacobi_large_slot), which is round 0 of the boundary schedule.
      const int ns = min(r, ell - r), nl = ell - ns;
      if (tid < ell) dsc[tid] = Hc[js.h_offset(tid, tid)];
      __syncthreads();
      if (tid < ell) {
        const int rank = descending_rank(dsc, 1, ell, tid);
        const bool top = rank < r;
        const bool small = r <= ell - r ? top : !top;
        next[tid] = small ? 2 * (top ? rank : rank - r) : jacobi_large_slot(top ? rank : rank - r, ns);
      }
      __syncthreads();
      plan();
#pragma unroll
      for (int u = 0; u < 3; ++u) {
        if (u >= nmine) break;
        const float* h = Hc + (kEigenThreads - 1 - tid + u * kEigenThreads);
        const bool diagonal = (blk[u] & 0xFF) == (blk[u] >> 8);
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (!diagonal || e != 2) Hn[(dst[u][e >> 1] >> (16 * (e & 1))) & 0xFFFF] = h[e * JS::kHPlane];
      }
      if (lane < np) {
        for (int i = 0; i < wrows; ++i) {
          const int x = warp + kEigenWarps * i;
          Wn[wdst[0] + x * 32] = Wc[js.w_offset(x, 2 * lane)];
          Wn[wdst[1] + x * 32] = Wc[js.w_offset(x, 2 * lane + 1)];
        }
      }
      __syncthreads();  // every thread has its offsets from the split's table
      if (tid < ell) next[tid] = jacobi_next_boundary(tid, ns, nl);
      __syncthreads();
      plan();
      swap_buffers(Hc, Hn, Wc, Wn);
      rounds = nl;
      counted = ns;
    }
  }
  if (tid < ell) diag[tid] = Hc[js.h_offset(tid, tid)];
  return Wc;
}

}  // namespace
}  // namespace spectralkv::cuda
