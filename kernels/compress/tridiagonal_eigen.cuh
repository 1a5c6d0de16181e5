#pragma once
// The top-r eigenpairs of one D×D symmetric matrix (a job's FP32 Gram) in one CTA of 256 threads:
// Householder tridiagonalisation with the matrix in registers, Sturm-count multisection for the r
// largest eigenvalues, inverse iteration on the tridiagonal matrix, modified Gram–Schmidt over the r
// vectors, and the back-transform through the reflectors.
//
// Why by hand: cuSOLVER's batched eigen-solvers take a whole launch (and global memory) per batch and
// compute all D eigenpairs; here one job's eigen-solve is a phase of the fused compression kernel, with
// G already in shared memory, and only the top r pairs are needed. Every phase is a short chain of
// barriers on register-resident data, so the cost barely depends on r (unlike subspace iteration,
// whose products, orthonormalisations and Jacobi sweeps grow with ℓ = r + p).
//
// Accuracy: Householder reduction is backward stable, so the eigenvalues are those of G + E with
// ‖E‖ ≈ ε₃₂·‖G‖, the resolution the FP32 Gram has anyway; bisection brackets each eigenvalue to about
// 2⁻²¹ of the Gershgorin width; two inverse-iteration solves from a pseudo-random start give each
// vector to the accuracy the gap to its neighbours allows, and Gram–Schmidt in order of decreasing
// eigenvalue turns vectors of (nearly) equal eigenvalues into an orthonormal basis of their span.

#include <cuda_runtime.h>

#include <type_traits>

namespace spectralkv::cuda::tridiag {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

/// MUFU reciprocal: a Sturm count tolerates its ~1-ulp error (the count of a matrix within a few ulps
/// of T), and it keeps each step of the count's chain to three dependent instructions.
__device__ __forceinline__ float rcp_approx(float x) {
  float y;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

/// fn(std::integral_constant<int, I>) for I = F … N − 1.
template <int F, int N, class Fn>
__device__ __forceinline__ void static_for(Fn&& fn) {
  if constexpr (F < N) {
    fn(std::integral_constant<int, F>{});
    static_for<F + 1, N>(fn);
  }
}

/// The kWarps partial sums at p (16-byte aligned), in a fixed order.
__device__ __forceinline__ float sum8(const float* p) {
  static_assert(kWarps == 8, "two float4 loads");
  const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
  return ((a.x + a.y) + (a.z + a.w)) + ((b.x + b.y) + (b.z + b.w));
}

/// Thread (tr, tc) = (tid / 16, tid % 16) holds A[tr + 16·a][tc + 16·b], a, b < D/16: a 2-D cyclic
/// layout, so the trailing matrix of every step stays spread over all threads and whole 16-row or
/// 16-column blocks drop out as the reduction moves on.
template <int D>
struct Shape {
  static constexpr int kNB = D / 16;                 // register blocks per dimension
  static constexpr int kPublishMask = 16 / kNB - 1;  // lanes whose low tc bits are zero publish p
  static constexpr int kRowsPerLane = D / 8;         // vector phases: 8 lanes per vector (see vrow)
  static constexpr int kMaxSlots = D / 32;           // vectors per 8-lane group (r ≤ D)
};

/// Scratch floats top_eigenpairs needs for r ≤ D eigenpairs: the r vectors (stride D + 1) and, beside
/// them, the inverse iteration's hand-over slots (3·64) or Gram–Schmidt's published vector (2·D); the
/// Sturm counts of the first round (512) before them.
__host__ __device__ constexpr int work_floats(int d, int r) {
  const int beside = 3 * (kThreads / 4) > 2 * d ? 3 * (kThreads / 4) : 2 * d;
  return (d + 1) * r + beside > 512 ? (d + 1) * r + beside : 512;
}

/// Shared memory the caller provides.
/// \param u      [D][D] floats: G on entry (read through `g_at`); then row k < D−2 holds reflector k
///               (u_i for i > k, zero for i ≤ k; H_k = I − c_k·u·uᵀ with c_k = −1/(e_k·u_{k+1}), or
///               H_k = I when u_{k+1} = 0), row D−2 the off-diagonal e and row D−1 the diagonal d of T;
///               on return, rows 0..r−1 hold the eigenvectors (row j = the j-th largest), plain [r][D]
/// \param work   ≥ work_floats(D, r) floats (the solves' vectors; scratch before them)
/// \param lam    [r] floats: on return the eigenvalues, descending
/// \param g_at   (i, j) → G[i][j], read once at the start
/// \param start  (i, j) → entry i of the j-th start vector of inverse iteration (pseudo-random, nonzero)
template <int D, class GAt, class Start>
__device__ __noinline__ void top_eigenpairs(float* u, GAt g_at, Start start, float* work, float* lam, int r) {
  using S = Shape<D>;
  constexpr int NB = S::kNB;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tr = tid >> 4, tc = tid & 15;
  float* dg = u + (D - 1) * D;  // diagonal of T
  float* eg = u + (D - 2) * D;  // off-diagonal: eg[i] = T[i+1][i]

  // --- 1. tridiagonalisation: A_{k+1} = H_k·A_k·H_k, k = 0 … D−3 --------------------------------
  float a[NB][NB];
#pragma unroll
  for (int i = 0; i < NB; ++i)
#pragma unroll
    for (int j = 0; j < NB; ++j) a[i][j] = g_at(tr + 16 * i, tc + 16 * j);
  __syncthreads();  // G is read: its shared memory now takes the reflectors

  float* pbuf = work;           // [2][D] p = c·A·u, by step parity
  float* part = work + 2 * D;   // [2][kWarps] ‖x‖² partials, then [2][kWarps] uᵀp partials
  float prev_u1 = 0.0f;         // u_{k+1} of the previous reflector, stored one step late
  // One step per reflection. `first` is the first 16-row (and 16-column) block with a row > k: the
  // blocks before it are done. It is a compile-time constant per segment of 16 steps (the loop below),
  // so those blocks cost no instruction at all.
  auto step = [&](int k, auto first_block) {
    constexpr int first = decltype(first_block)::value;
    const int par = k & 1;
    const int kb = k >> 4;
    float* uk = u + k * D;
    // (A) the owners of column k publish it as row k of the reflectors, and ‖A[k+2:, k]‖² partials.
    float nrm = 0.0f;
    if (tc == (k & 15)) {
#pragma unroll
      for (int jb = 0; jb < NB; ++jb) {
        if (jb == kb) {
#pragma unroll
          for (int ib = 0; ib < NB; ++ib) {
            const int i = tr + 16 * ib;
            const float v = a[ib][jb];
            uk[i] = i > k ? v : 0.0f;
            if (i == k) dg[k] = v;
            if (i > k + 1) nrm = fmaf(v, v, nrm);
          }
        }
      }
    }
    nrm += __shfl_xor_sync(0xffffffffu, nrm, 16);
    if (lane == (k & 15)) part[par * 2 * kWarps + warp] = nrm;
    __syncthreads();
    // (B) the reflector (every thread computes it), then p = c·A·u over the trailing rows.
    if (k > 0 && tid == 0) u[(k - 1) * D + k] = prev_u1;  // row k−1 is read by nobody in this step
    const float xn2 = sum8(part + par * 2 * kWarps);
    const float alpha = uk[k + 1];
    float beta = alpha, c = 0.0f, u1 = 0.0f;  // no reflection when the column is already reduced
    if (xn2 > 0.0f) {
      beta = -copysignf(sqrtf(fmaf(alpha, alpha, xn2)), alpha);
      u1 = alpha - beta;
      c = -rcp_approx(beta * u1);  // the back-transform forms the same value from e_k and u_{k+1}
    }
    if (tid == 0) eg[k] = beta;
    prev_u1 = u1;
    float uc[NB];
#pragma unroll
    for (int jb = 0; jb < NB; ++jb) {
      const int j = tc + 16 * jb;
      uc[jb] = j == k + 1 ? u1 : uk[j];  // uk holds zeros up to k, and α (not yet u_{k+1}) at k + 1
    }
    float s[NB];
#pragma unroll
    for (int ib = 0; ib < NB; ++ib) {
      s[ib] = 0.0f;
      if (ib >= first) {
#pragma unroll
        for (int jb = 0; jb < NB; ++jb)
          if (jb >= first) s[ib] = fmaf(a[ib][jb], uc[jb], s[ib]);
      }
    }
    // Reduce-scatter the NB row sums over the 16 lanes of this row group.
    int ib_own = 0;
    {
      int n = NB;
#pragma unroll
      for (int off = 8; off >= 1; off >>= 1) {
        if (n > 1) {
          const int half = n / 2;
          const bool hi = (tc & off) != 0;
#pragma unroll
          for (int q = 0; q < half; ++q) {
            const float send = hi ? s[q] : s[q + half];
            const float keep = hi ? s[q + half] : s[q];
            s[q] = keep + __shfl_xor_sync(0xffffffffu, send, off);
          }
          ib_own += hi ? half : 0;
          n = half;
        } else {
          s[0] += __shfl_xor_sync(0xffffffffu, s[0], off);
        }
      }
    }
    float up = 0.0f;
    if ((tc & S::kPublishMask) == 0) {
      const int i = tr + 16 * ib_own;
      const float p = i > k ? c * s[0] : 0.0f;
      pbuf[par * D + i] = p;
      const float ui = i == k + 1 ? u1 : uk[i];
      up = ui * p;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) up += __shfl_xor_sync(0xffffffffu, up, o);
    if (lane == 0) part[(par * 2 + 1) * kWarps + warp] = up;
    __syncthreads();
    // (C) A ← A − u·wᵀ − w·uᵀ with w = p − (c/2)(uᵀp)·u, on the trailing blocks.
    const float utp = sum8(part + (par * 2 + 1) * kWarps);
    const float kk = 0.5f * c * utp;
    float wc[NB];
#pragma unroll
    for (int jb = 0; jb < NB; ++jb) wc[jb] = jb >= first ? pbuf[par * D + tc + 16 * jb] - kk * uc[jb] : 0.0f;
#pragma unroll
    for (int ib = 0; ib < NB; ++ib) {
      if (ib >= first) {
        const int i = tr + 16 * ib;
        const float ui = i == k + 1 ? u1 : uk[i];
        const float wi = pbuf[par * D + i] - kk * ui;
#pragma unroll
        for (int jb = 0; jb < NB; ++jb)
          if (jb >= first) a[ib][jb] = fmaf(-ui, wc[jb], fmaf(-wi, uc[jb], a[ib][jb]));
      }
    }
  };
  static_for<0, NB>([&](auto f) {
    constexpr int kf = decltype(f)::value;  // the steps whose k + 1 lies in block kf
    for (int k = kf == 0 ? 0 : 16 * kf - 1; k < (16 * kf + 15 < D - 2 ? 16 * kf + 15 : D - 2); ++k) step(k, f);
  });
  // The last 2×2 block; its owners write it after their own final update.
#pragma unroll
  for (int ib = 0; ib < NB; ++ib)
#pragma unroll
    for (int jb = 0; jb < NB; ++jb) {
      const int i = tr + 16 * ib, j = tc + 16 * jb;
      if (i == j && i >= D - 2) dg[i] = a[ib][jb];
      if (i == D - 1 && j == D - 2) eg[D - 2] = a[ib][jb];
    }
  if (tid == 0) u[(D - 3) * D + D - 2] = prev_u1;
  __syncthreads();

  // --- 2. the r largest eigenvalues of T by Sturm-count multisection ------------------------------
  float glo = 3.0e38f, ghi = -3.0e38f;
#pragma unroll
  for (int e = 0; e < D / 32; ++e) {
    const int i = lane + 32 * e;
    const float rad = (i > 0 ? fabsf(eg[i - 1]) : 0.0f) + (i < D - 1 ? fabsf(eg[i]) : 0.0f);
    glo = fminf(glo, dg[i] - rad);
    ghi = fmaxf(ghi, dg[i] + rad);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    glo = fminf(glo, __shfl_xor_sync(0xffffffffu, glo, o));
    ghi = fmaxf(ghi, __shfl_xor_sync(0xffffffffu, ghi, o));
  }
  const float tnorm = fmaxf(fabsf(glo), fabsf(ghi));
  const float pivmin = fmaxf(tnorm * 1e-30f, 1e-35f);
  // Number of eigenvalues below sigma0 and below sigma1 (two chains interleaved).
  auto count2 = [&](float sigma0, float sigma1, int& n0, int& n1) {
    float q0 = dg[0] - sigma0, q1 = dg[0] - sigma1;
    q0 = fabsf(q0) < pivmin ? -pivmin : q0;
    q1 = fabsf(q1) < pivmin ? -pivmin : q1;
    n0 = q0 < 0.0f;
    n1 = q1 < 0.0f;
#pragma unroll 8
    for (int i = 1; i < D; ++i) {
      const float di = dg[i], e2 = eg[i - 1] * eg[i - 1];
      q0 = (di - sigma0) - e2 * rcp_approx(q0);
      q1 = (di - sigma1) - e2 * rcp_approx(q1);
      q0 = fabsf(q0) < pivmin ? -pivmin : q0;
      q1 = fabsf(q1) < pivmin ? -pivmin : q1;
      n0 += q0 < 0.0f;
      n1 += q1 < 0.0f;
    }
  };
  int* cnt = reinterpret_cast<int*>(work);  // [512] counts of the first round
  const float width = ghi - glo;
  {
    const float s0 = glo + width * static_cast<float>(2 * tid + 1) / 513.0f;
    const float s1 = glo + width * static_cast<float>(2 * tid + 2) / 513.0f;
    int n0, n1;
    count2(s0, s1, n0, n1);
    cnt[2 * tid] = n0;
    cnt[2 * tid + 1] = n1;
  }
  __syncthreads();
  // Groups of G lanes (a power of two, 2 ≤ G ≤ 32) refine one eigenvalue each.
  const int gsize = r <= 8 ? 32 : r <= 16 ? 16 : r <= 32 ? 8 : r <= 64 ? 4 : 2;
  const int g = tid / gsize, gl = tid % gsize;
  const int target = D - 1 - g;  // ascending index of the group's eigenvalue
  float lo = glo, hi = ghi;
  if (g < r) {
    int a0 = 0, a1 = 512;  // first point with count > target
    while (a0 < a1) {
      const int mid = (a0 + a1) >> 1;
      if (cnt[mid] > target) a1 = mid;
      else a0 = mid + 1;
    }
    if (a0 > 0) lo = glo + width * static_cast<float>(a0) / 513.0f;
    if (a0 < 512) hi = glo + width * static_cast<float>(a0 + 1) / 513.0f;
  }
  // 2·G interior points per round: log2(2G + 1) bits; about 12 bits more than the first round's 9.
  const int rounds = gsize >= 32 ? 2 : gsize >= 8 ? 3 : gsize >= 4 ? 4 : 6;
  const unsigned gmask = gsize == 32 ? 0xffffffffu : ((1u << gsize) - 1u) << (lane & ~(gsize - 1));
  for (int round = 0; round < rounds; ++round) {
    const float step = (hi - lo) / static_cast<float>(2 * gsize + 1);
    const float s0 = lo + step * static_cast<float>(2 * gl + 1);
    const float s1 = lo + step * static_cast<float>(2 * gl + 2);
    int n0, n1;
    count2(s0, s1, n0, n1);
    const bool f0 = n0 > target, f1 = n1 > target;
    const unsigned any = __ballot_sync(0xffffffffu, f0 || f1) & gmask;
    const unsigned any0 = __ballot_sync(0xffffffffu, f0) & gmask;
    if (any != 0u) {
      const int first_lane = __ffs(any) - 1;
      const int q = 2 * (first_lane & (gsize - 1)) + (((any0 >> first_lane) & 1u) ? 0 : 1);  // first point above
      hi = lo + step * static_cast<float>(q + 1);
      if (q > 0) lo = lo + step * static_cast<float>(q);
    } else {
      lo = lo + step * static_cast<float>(2 * gsize);
    }
  }
  if (g < r && gl == 0) lam[g] = 0.5f * (lo + hi);
  __syncthreads();

  // --- 3. inverse iteration on T, four threads per eigenvalue -----------------------------------
  // Thread (seg, jv) = (tid / 64, tid % 64 + 64·round) keeps the reciprocal pivots of rows
  // seg·D/4 … seg·D/4 + D/4 − 1 of T − λ_jv·I = L·U in registers; each pass along i is one chain, which
  // goes through the four quarters in turn (or back), handed over through `hand` at a barrier. Pivots
  // in shared memory would double the scratch (D·r floats more), and the eigen kernel would no longer
  // fit two CTAs per SM from r = 48 at D = 128; two threads per eigenvalue (D/2 pivots each) spilled.
  // r > 64 takes a second round.
  constexpr int kSegs = 4, kSolvers = kThreads / kSegs, kRows = D / kSegs, kC = 8;
  static_assert(kRows % kC == 0, "whole chunks per quarter");
  // Vector jv at yv[jv·(D + 1) + i]: a thread's rows at constant offsets from one address (with [D][r]
  // the compiler kept an address per row live across the passes), the odd stride keeping the 32
  // vectors a warp works on in distinct banks.
  constexpr int kLdv = D + 1;
  float* yv = work;               // [r][D + 1] the vectors
  float* hand = work + r * kLdv;  // [3][kSolvers] the chain's value at a quarter's end, max |x|, the scale
  const int seg = tid / kSolvers;
  const int i_first = seg * kRows;
  const float tolp = fmaxf(6e-8f * tnorm, 1e-30f);
  for (int j0 = 0; j0 < r; j0 += kSolvers) {
    const int js = tid % kSolvers, jv = j0 + js;
    const bool solver = jv < r;
    float* yj = yv + jv * kLdv + i_first;  // this thread's rows
    const float sigma = solver ? lam[jv] : 0.0f;
    float pv[kRows];     // 1/q_i of this thread's rows
    float pprev = 0.0f;  // 1/q of the row before this quarter (0 for the first)
    // Each pass is a chain of dependent steps along i; the rows go in chunks of kC whose loads are all
    // issued before the chunk's chain and its stores after it (the compiler cannot move a load above a
    // store to the same array, so row by row every step would wait for a shared-memory round trip).
    for (int h = 0; h < kSegs; ++h) {  // factorisation: q_i = (d_i − σ) − e_{i−1}²/q_{i−1}
      if (solver && seg == h) {
        pprev = h == 0 ? 0.0f : hand[js];
        float rprev = pprev;
#pragma unroll
        for (int i0 = 0; i0 < kRows; i0 += kC) {
          float dd[kC], e2[kC];
#pragma unroll
          for (int c = 0; c < kC; ++c) {
            const int i = i_first + i0 + c;
            dd[c] = dg[i] - sigma;
            e2[c] = i > 0 ? eg[i - 1] * eg[i - 1] : 0.0f;
          }
#pragma unroll
          for (int c = 0; c < kC; ++c) {
            float q = dd[c] - e2[c] * rprev;
            if (fabsf(q) < tolp) q = q < 0.0f ? -tolp : tolp;
            rprev = rcp_approx(q);
            pv[i0 + c] = rprev;
          }
        }
        hand[js] = rprev;
      }
      __syncthreads();
    }
    float scale = 1.0f;
    for (int it = 0; it < 2; ++it) {
      // Forward: y = L⁻¹·b (b the start vector, then the previous solution scaled to max |x| = 1).
      for (int h = 0; h < kSegs; ++h) {
        if (solver && seg == h) {
          float y = h == 0 ? 0.0f : hand[js];
#pragma unroll
          for (int i0 = 0; i0 < kRows; i0 += kC) {
            float bb[kC], mm[kC];
#pragma unroll
            for (int c = 0; c < kC; ++c) {
              const int i = i_first + i0 + c;
              bb[c] = it == 0 ? start(i, jv) : yj[i0 + c] * scale;
              const float pm = i0 + c > 0 ? pv[i0 + c - 1] : pprev;
              mm[c] = i > 0 ? eg[i - 1] * pm : 0.0f;
            }
#pragma unroll
            for (int c = 0; c < kC; ++c) {
              y = bb[c] - mm[c] * y;
              bb[c] = y;
            }
#pragma unroll
            for (int c = 0; c < kC; ++c) yj[i0 + c] = bb[c];
          }
          hand[js] = y;
        }
        __syncthreads();
      }
      // Backward: x = U⁻¹·y, with U = diag(q) + superdiagonal e.
      for (int h = kSegs - 1; h >= 0; --h) {
        if (solver && seg == h) {
          float x = h == kSegs - 1 ? 0.0f : hand[js];
          float xmax = h == kSegs - 1 ? 0.0f : hand[kSolvers + js];
#pragma unroll
          for (int i0 = kRows - kC; i0 >= 0; i0 -= kC) {
            float yy[kC], ee[kC];
#pragma unroll
            for (int c = 0; c < kC; ++c) {
              const int i = i_first + i0 + c;
              yy[c] = yj[i0 + c];
              ee[c] = i < D - 1 ? eg[i] : 0.0f;
            }
#pragma unroll
            for (int c = kC - 1; c >= 0; --c) {
              x = (yy[c] - ee[c] * x) * pv[i0 + c];
              yy[c] = x;
              xmax = fmaxf(xmax, fabsf(x));
            }
#pragma unroll
            for (int c = 0; c < kC; ++c) yj[i0 + c] = yy[c];
          }
          if (h > 0) {
            hand[js] = x;
            hand[kSolvers + js] = xmax;
          } else {
            hand[2 * kSolvers + js] = xmax > 0.0f && xmax < 3.0e38f ? 1.0f / xmax : 1.0f;
          }
        }
        __syncthreads();
      }
      if (solver) scale = hand[2 * kSolvers + js];
    }
    // Scaled to max |x| = 1, so that the squared norms below cannot overflow (a zero T gives x ~ 1/tolp).
    if (solver) {
#pragma unroll
      for (int i0 = 0; i0 < kRows; i0 += kC) {
        float xx[kC];
#pragma unroll
        for (int c = 0; c < kC; ++c) xx[c] = yj[i0 + c] * scale;
#pragma unroll
        for (int c = 0; c < kC; ++c) yj[i0 + c] = xx[c];
      }
    }
    __syncthreads();  // `hand` is reused by the next round
  }

  // --- 4. modified Gram–Schmidt over the r vectors, largest eigenvalue first ----------------------
  // 8 lanes per vector; vector j in group j mod 32, slot j / 32. Lane l holds the 4-row chunks
  // l, l + 8, l + 16, …: its m-th value is row vrow(m). Chunks dealt round-robin keep each 16-byte load
  // of a row conflict-free (8 lanes read 128 contiguous bytes); 16 rows per lane in one block made
  // every load of the back-transform a 4-way bank conflict.
  constexpr int R8 = S::kRowsPerLane;
  const int grp = tid >> 3, gl8 = tid & 7;
  auto vrow = [gl8](int m) { return 4 * (gl8 + 8 * (m >> 2)) + (m & 3); };
  const int nslots = (r + 31) / 32;
  float v[S::kMaxSlots][R8];
#pragma unroll
  for (int sl = 0; sl < S::kMaxSlots; ++sl) {
    const int j = grp + 32 * sl;
#pragma unroll
    for (int m = 0; m < R8; ++m) v[sl][m] = (sl < nslots && j < r) ? yv[j * kLdv + vrow(m)] : 0.0f;
  }
  // Sum over this lane's group of 8. Called by the whole warp with the full mask except where one group
  // alone calls it (a mask per group made the back-transform ~10% slower on an H200).
  auto group_sum = [](float x, unsigned mask = 0xffffffffu) {
    x += __shfl_xor_sync(mask, x, 1);
    x += __shfl_xor_sync(mask, x, 2);
    x += __shfl_xor_sync(mask, x, 4);
    return x;
  };
  float* qbuf = work + r * kLdv;  // [2][D] the published vector, by parity (over `hand`)
  for (int j = 0; j < r; ++j) {
    const int owner = j & 31, oslot = j >> 5;
    if (grp == owner) {
#pragma unroll
      for (int sl = 0; sl < S::kMaxSlots; ++sl) {
        if (sl == oslot) {
          float n2 = 0.0f;
#pragma unroll
          for (int m = 0; m < R8; ++m) n2 = fmaf(v[sl][m], v[sl][m], n2);
          n2 = group_sum(n2, 0xffu << (lane & 24));  // this group alone
          const float inv = n2 > 0.0f ? rsqrtf(n2) : 0.0f;
#pragma unroll
          for (int m = 0; m < R8; ++m) {
            v[sl][m] *= inv;
            qbuf[(j & 1) * D + vrow(m)] = v[sl][m];
          }
        }
      }
    }
    __syncthreads();
    float qv[R8];
#pragma unroll
    for (int m = 0; m < R8; ++m) qv[m] = qbuf[(j & 1) * D + vrow(m)];
#pragma unroll
    for (int sl = 0; sl < S::kMaxSlots; ++sl) {
      const int jj = grp + 32 * sl;
      if (sl < nslots) {  // uniform; every lane joins the shuffles, later vectors keep the result
        float dot = 0.0f;
#pragma unroll
        for (int m = 0; m < R8; ++m) dot = fmaf(qv[m], v[sl][m], dot);
        dot = group_sum(dot);
        if (jj > j && jj < r) {
#pragma unroll
          for (int m = 0; m < R8; ++m) v[sl][m] = fmaf(-dot, qv[m], v[sl][m]);
        }
      }
    }
  }

  // --- 5. back-transform: v ← H_0·H_1·…·H_{D−3}·v ---------------------------------------------------
  for (int k = D - 3; k >= 0; --k) {
    const float* uk = u + k * D;
    float uu[R8];
#pragma unroll
    for (int m = 0; m < R8; m += 4) {
      const float4 t = *reinterpret_cast<const float4*>(uk + vrow(m));
      uu[m] = t.x;
      uu[m + 1] = t.y;
      uu[m + 2] = t.z;
      uu[m + 3] = t.w;
    }
    const float u1 = u[k * D + k + 1], ek = eg[k];
    const float ck = u1 != 0.0f ? -rcp_approx(ek * u1) : 0.0f;
#pragma unroll
    for (int sl = 0; sl < S::kMaxSlots; ++sl) {
      if (sl < nslots) {
        float d0 = 0.0f, d1 = 0.0f;
#pragma unroll
        for (int m = 0; m < R8; m += 2) {
          d0 = fmaf(uu[m], v[sl][m], d0);
          d1 = fmaf(uu[m + 1], v[sl][m + 1], d1);
        }
        const float sc = ck * group_sum(d0 + d1);
#pragma unroll
        for (int m = 0; m < R8; ++m) v[sl][m] = fmaf(-sc, uu[m], v[sl][m]);
      }
    }
  }
  __syncthreads();  // every reflector is read: rows 0..r−1 of u take the eigenvectors
#pragma unroll
  for (int sl = 0; sl < S::kMaxSlots; ++sl) {
    const int j = grp + 32 * sl;
    if (sl < nslots && j < r) {
#pragma unroll
      for (int m = 0; m < R8; ++m) u[j * D + vrow(m)] = v[sl][m];
    }
  }
  __syncthreads();
}

}  // namespace spectralkv::cuda::tridiag
