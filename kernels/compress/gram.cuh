#pragma once
// G = XᵀX (or the Gram of X minus a per-column shift, with the column sums) of one job on the tensor
// cores, X streamed through shared memory: a phase of the fused kernel, and gram_kernel for the
// separate-kernel path.
// Private to kernels/compress.cu: reopens that translation unit's anonymous namespace, so the
// kernels and their helpers keep internal linkage.

#include <cstddef>
#include <cstdint>

#include "spectralkv/cuda/compress.cuh"

#include "common.cuh"
#include "job_check.cuh"

namespace spectralkv::cuda {
namespace {

// The Gram kernel keeps 3 stages and spends the fourth buffer on the low FP16 halves of a centred
// chunk, so its shared memory (and occupancy) is what 4 stages had; 2 → 4 stages measured no change.
constexpr int kGramStages = 3;

template <int D>
struct GramShape {
  static constexpr int kWarps = D / 16;  // warp tile 32×(D/2): (D/32) × 2 warps
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kLd = D + 8;      // +16 bytes per row: the 8 rows of an ldmatrix hit 8 distinct bank groups
  static constexpr int kNTiles = D / 16;  // n-tiles of 8 per warp
  static constexpr std::size_t kSmemBytes = static_cast<std::size_t>(kGramStages + 1) * kChunkRows * kLd * 2;
};

/// The Gram of one job. X streams through shared memory in 64-row chunks (cp.async pipeline); each
/// warp owns a 32×(D/2) tile of G. Both mma operands come from Xᵀ via ldmatrix.trans. Products of
/// 16-bit inputs are exact in FP32, so G is XᵀX up to FP32 accumulation.
///
/// Mean-centred jobs accumulate the Gram of Y = X − 1mᵀ instead, where m (per column) is the mean of
/// the first chunk rounded to FP16: the eigen kernel's centring correction then involves μ − m ≈ σ
/// instead of μ, so the FP32 rounding of the Gram stays relative to ‖X − μ‖² rather than to
/// ‖X − μ‖² + L‖μ‖² (channel means of tens of σ are common in keys). Y is formed in FP32 (exact: a
/// difference of two 16-bit values) and split into FP16 hi + lo; YᵀY ≈ hiᵀhi + hiᵀlo + loᵀhi carries
/// ~2^-22 relative accuracy per product. Y must fit the FP16 range, as for the projection.
///
/// Called by all kCta threads of the CTA; the first GramShape<D>::kThreads do the arithmetic, the rest
/// (the fused kernel at D = 64) help with the copies and take the barriers.
/// \param smem    GramShape<D>::kSmemBytes of shared memory (the stages)
/// \param part    shared scratch, 3·D floats
/// \param colsum_out, shift_out  [D] each (global or shared): the column sums of Y and the shift m,
///                written only for mean-centred jobs
/// \param store   store(row, col, G[row][col], G[row][col + 1]) for even col, called once per pair after
///                a barrier that ends every read of `smem` (so G may overwrite the stages)
/// \tparam kKeepInL2  read X with the L2 policy evict_last, for a projection by the same CTA later
template <class T, int D, int kCta, bool kKeepInL2 = false, class Store>
__device__ __forceinline__ void gram_block(const CompressJob& job, int rows, unsigned char* smem, float* part,
                                           float* colsum_out, float* shift_out, Store&& store) {
  using S = GramShape<D>;
  static_assert(kCta >= S::kThreads && kCta % 32 == 0, "the CTA must hold the Gram's warps");
  T* stage = reinterpret_cast<T*>(smem);  // [kGramStages][kChunkRows][kLd]
  __half* lo_buf = reinterpret_cast<__half*>(smem + static_cast<std::size_t>(kGramStages) * kChunkRows * S::kLd * 2);
  float* sum_part = part;       // [2][D]
  float* shift_s = part + 2 * D;  // [D]

  const T* x = static_cast<const T*>(job.x);
  const std::int64_t ld = job.x_row_stride;
  const bool center = job.mean_center;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const bool worker = kCta == S::kThreads || tid < S::kThreads;  // uniform per warp
  const int wm = warp >> 1, wn = warp & 1;
  const int chunks = (rows + kChunkRows - 1) / kChunkRows;

  const std::uint64_t keep = kKeepInL2 ? l2_policy_evict_last() : 0;
  auto load_chunk = [&](int c, int buf) {
    constexpr int kVecPerRow = D / 8;
    for (int v = tid; v < kChunkRows * kVecPerRow; v += kCta) {
      const int r = v / kVecPerRow, cv = v % kVecPerRow;
      const int t = c * kChunkRows + r;
      const bool ok = t < rows;
      const T* src = ok ? x + t * ld + cv * 8 : x;
      if constexpr (kKeepInL2)
        cp_async16_hinted(&stage[(buf * kChunkRows + r) * S::kLd + cv * 8], src, ok, keep);
      else
        cp_async16(&stage[(buf * kChunkRows + r) * S::kLd + cv * 8], src, ok);
    }
  };

  float acc[2][S::kNTiles][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < S::kNTiles; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.0f;
  float csum = 0.0f;

  // Multi-stage pipeline: one commit group per chunk (empty past the end), so wait_group<kGramStages−2>
  // at iteration c means chunk c has landed. The stage refilled at iteration c was last read at c−1,
  // which every thread finished before this iteration's barrier.
#pragma unroll
  for (int st = 0; st < kGramStages - 1; ++st) {
    if (st < chunks) load_chunk(st, st);
    cp_async_commit();
  }
  const int col = tid % D, half = tid / D;  // S::kThreads == 2·D: 2 threads per column, 32 rows each
  for (int c = 0; c < chunks; ++c) {
    cp_async_wait<kGramStages - 2>();
    __syncthreads();
    if (c + kGramStages - 1 < chunks) load_chunk(c + kGramStages - 1, (c + kGramStages - 1) % kGramStages);
    cp_async_commit();
    T* s = stage + (c % kGramStages) * kChunkRows * S::kLd;
    if (!center) {
      if (!worker) continue;
#pragma unroll
      for (int ks = 0; ks < kChunkRows / 16; ++ks) {
        const int k0 = ks * 16;
        const int mat = lane >> 3;
        unsigned a[2][4];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          const int m0 = wm * 32 + mi * 16;
          ldmatrix_x4_trans(a[mi], s + (k0 + (lane & 7) + ((mat >> 1) << 3)) * S::kLd + m0 + ((mat & 1) << 3));
        }
#pragma unroll
        for (int np = 0; np < S::kNTiles / 2; ++np) {
          const int n0 = wn * (D / 2) + np * 16;
          unsigned b[4];
          ldmatrix_x4_trans(b, s + (k0 + (lane & 7) + ((mat & 1) << 3)) * S::kLd + n0 + ((mat >> 1) << 3));
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) {
            mma_16816<T>(acc[mi][2 * np], a[mi], b[0], b[1]);
            mma_16816<T>(acc[mi][2 * np + 1], a[mi], b[2], b[3]);
          }
        }
      }
      continue;
    }
    // --- mean-centred job: shift, split into FP16 hi (in place) + lo, three products --------------
    const int valid = min(kChunkRows, rows - c * kChunkRows);
    if (c == 0) {  // the shift: FP16-rounded mean of the first chunk (zero-filled rows add nothing)
      if (worker) {
        float p = 0.0f;
#pragma unroll 8
        for (int r = 0; r < kChunkRows / 2; ++r) p += to_float1(s[(half * (kChunkRows / 2) + r) * S::kLd + col]);
        sum_part[half * D + col] = p;
      }
      __syncthreads();
      if (tid < D) shift_s[tid] = __half2float(__float2half_rn((sum_part[tid] + sum_part[D + tid]) / valid));
      __syncthreads();
    }
    if (worker) {
      const float m = shift_s[col];
#pragma unroll 8
      for (int r = 0; r < kChunkRows / 2; ++r) {
        const int rr = half * (kChunkRows / 2) + r;
        if (rr < valid) csum += to_float1(s[rr * S::kLd + col]) - m;
      }
    }
    __syncthreads();  // the column sums read the raw chunk, which the split below overwrites
    __half* hi = reinterpret_cast<__half*>(s);
    for (int e = tid; e < kChunkRows * (D / 2); e += kCta) {
      const int rr = e / (D / 2), c2 = 2 * (e % (D / 2));
      float v0 = 0.0f, v1 = 0.0f;  // rows past the end stay zero
      if (rr < valid) {
        const float2 f = to_float2<T>(*reinterpret_cast<const unsigned*>(s + rr * S::kLd + c2));
        v0 = f.x - shift_s[c2];
        v1 = f.y - shift_s[c2 + 1];
      }
      const __half2 h = __floats2half2_rn(v0, v1);
      const float2 hf = __half22float2(h);
      *reinterpret_cast<__half2*>(hi + rr * S::kLd + c2) = h;
      *reinterpret_cast<__half2*>(lo_buf + rr * S::kLd + c2) = __floats2half2_rn(v0 - hf.x, v1 - hf.y);
    }
    __syncthreads();
    if (!worker) continue;
#pragma unroll 1
    for (int ks = 0; ks < kChunkRows / 16; ++ks) {
      const int k0 = ks * 16;
      const int mat = lane >> 3;
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {  // one m-tile at a time: B fragments are re-read, registers stay ≤ 128
        const int m0 = wm * 32 + mi * 16;
        const int aoff = (k0 + (lane & 7) + ((mat >> 1) << 3)) * S::kLd + m0 + ((mat & 1) << 3);
        unsigned ah[4], al[4];
        ldmatrix_x4_trans(ah, hi + aoff);
        ldmatrix_x4_trans(al, lo_buf + aoff);
#pragma unroll
        for (int np = 0; np < S::kNTiles / 2; ++np) {
          const int n0 = wn * (D / 2) + np * 16;
          const int off = (k0 + (lane & 7) + ((mat & 1) << 3)) * S::kLd + n0 + ((mat >> 1) << 3);
          unsigned bh[4], bl[4];
          ldmatrix_x4_trans(bh, hi + off);
          ldmatrix_x4_trans(bl, lo_buf + off);
          mma_16816<__half>(acc[mi][2 * np], al, bh[0], bh[1]);
          mma_16816<__half>(acc[mi][2 * np], ah, bl[0], bl[1]);
          mma_16816<__half>(acc[mi][2 * np], ah, bh[0], bh[1]);
          mma_16816<__half>(acc[mi][2 * np + 1], al, bh[2], bh[3]);
          mma_16816<__half>(acc[mi][2 * np + 1], ah, bl[2], bl[3]);
          mma_16816<__half>(acc[mi][2 * np + 1], ah, bh[2], bh[3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // every read of the stages is done: G may overwrite them

  if (worker) {
    const int gr = lane >> 2, gc = 2 * (lane & 3);
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int ni = 0; ni < S::kNTiles; ++ni) {
        const int row = wm * 32 + mi * 16 + gr;
        const int col = wn * (D / 2) + ni * 8 + gc;
        store(row, col, acc[mi][ni][0], acc[mi][ni][1]);
        store(row + 8, col, acc[mi][ni][2], acc[mi][ni][3]);
      }
  }
  if (center) {
    if (worker) sum_part[half * D + col] = csum;  // sum_part was last read before two barriers
    __syncthreads();
    if (tid < D) {
      colsum_out[tid] = sum_part[tid] + sum_part[D + tid];
      shift_out[tid] = shift_s[tid];
    }
  }
}

/// One CTA per job: gram_block into the workspace (when the projection cannot be fused, see
/// compress_fused_kernel).
/// \param gram    [jobs][D][D] FP32 output (row-major)
/// \param colsum  [jobs][D] FP32 column sums of Y (written only for mean-centred jobs)
/// \param shift   [jobs][D] FP32 shift m (written only for mean-centred jobs)
template <class T, int D>
__global__ void __launch_bounds__(GramShape<D>::kThreads, 2) gram_kernel(const CompressJob* __restrict__ jobs, int rows,
                                                                      float* __restrict__ gram,
                                                                      float* __restrict__ colsum,
                                                                      float* __restrict__ shift, int max_rank) {
  extern __shared__ __align__(16) unsigned char gsmem[];
  __shared__ float part[3 * D];
  const std::int64_t jb = blockIdx.x;
  if (!job_check::valid_at(jobs + jb, D, max_rank)) return;
  const CompressJob job = jobs[jb];
  float* g = gram + jb * D * D;
  gram_block<T, D, GramShape<D>::kThreads>(job, rows, gsmem, part, colsum + jb * D, shift + jb * D,
                                           [&](int row, int col, float v0, float v1) {
                                             *reinterpret_cast<float2*>(&g[row * D + col]) = make_float2(v0, v1);
                                           });
}

}  // namespace
}  // namespace spectralkv::cuda
