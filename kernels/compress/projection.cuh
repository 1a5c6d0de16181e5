#pragma once
// C = (X − mean)·B_hᵀ and its INT8 quantisation with per-column scales: project_kernel (C through
// global memory) and the one-pass resident form (C in shared memory), a phase of the fused kernel.
// Private to kernels/compress.cu: reopens that translation unit's anonymous namespace, so the
// kernels and their helpers keep internal linkage.

#include <cstddef>
#include <cstdint>

#include "spectralkv/cuda/compress.cuh"
#include "spectralkv/cuda/quantize.cuh"

#include "common.cuh"
#include "job_check.cuh"

namespace spectralkv::cuda {
namespace {

constexpr int kStages = 4;  // cp.async pipeline depth of project_kernel: ~48 KB in flight per CTA

/// Column maxima → quantisation scales, shared by both projection kernels. Each lane holds the running
/// max |C| of its two columns (2t, 2t + 1) of the n-tiles ng, ng + 2, ...; they are reduced over the
/// lane's row group and published by atomicMax on the float bits (all values ≥ 0, so the bits order as
/// the values), then scale = max / 127 goes to shared memory and to the job's output, its
/// quantize_reciprocal to `inv`. Every thread calls it (two barriers).
template <int kNT>
__device__ __forceinline__ void publish_scales(const float (&cmax)[kNT][2], int ng, int ntiles, int r, unsigned* amax,
                                               float* scale, float* inv, float* scale_out) {
  const int tid = threadIdx.x, lane = tid & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nn = 0; nn < kNT; ++nn) {
    const int nt = ng + 2 * nn;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float m = cmax[nn][h];
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 4));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 8));
      m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
      const int col = nt * 8 + 2 * t + h;
      if (nt < ntiles && g == 0 && col < r) atomicMax(&amax[col], __float_as_uint(m));
    }
  }
  __syncthreads();
  if (tid < r) {
    const float sc = __uint_as_float(amax[tid]) / 127.0f;
    scale[tid] = sc;
    inv[tid] = quantize_reciprocal(sc);
    scale_out[tid] = sc;
  }
  __syncthreads();
}

template <int D>
struct ProjectShape {
  static constexpr int kThreads = 256;
  static constexpr int kLd = D + 8;                 // shared row stride in 16-bit elements
  static constexpr int kMaxNTilesPerWarp = D / 16;  // r ≤ D: (D/8) n-tiles over 2 warp groups
  SPECTRALKV_HD static constexpr std::size_t bytes(int rpad) {
    return static_cast<std::size_t>(kStages) * kChunkRows * kLd * 2u  // X stages
           + static_cast<std::size_t>(rpad) * kLd * 2u  // basis
           + D * 4u                            // mean
           + static_cast<std::size_t>(rpad) * 12u;      // column max bits, scales, reciprocals
  }
};

// Pieces shared by the two projection kernels. Both use the same 8-warp tiling: warp w owns rows
// 16·(w%4).. of every 64-row chunk and the n-tiles ≡ w/4 (mod 2), so they compute the same FP32 C.

/// Stages rows [c·64, c·64 + 64) of X into stage buffer `buf` (zeros past `rows`); kLastRead: with the L2
/// policy `last` (evict_first, for X's last read; see compress_fused_kernel).
template <class T, int D, bool kLastRead = false>
__device__ __forceinline__ void project_load_chunk(T* stage, const T* x, std::int64_t ld, int rows, int c, int buf,
                                                   std::uint64_t last = 0) {
  using S = ProjectShape<D>;
  constexpr int kVecPerRow = D / 8;
  for (int v = threadIdx.x; v < kChunkRows * kVecPerRow; v += S::kThreads) {
    const int rr = v / kVecPerRow, cv = v % kVecPerRow;
    const int row = c * kChunkRows + rr;
    const bool ok = row < rows;
    T* dst = &stage[buf * kChunkRows * S::kLd + rr * S::kLd + cv * 8];
    if constexpr (kLastRead)
      cp_async16_hinted(dst, ok ? x + row * ld + cv * 8 : x, ok, last);
    else
      cp_async16(dst, ok ? x + row * ld + cv * 8 : x, ok);
  }
}

/// The FP16 basis (rows r..rpad−1 zero), the FP32 mean (zero when not centred) and the column-max
/// bits (zero) into shared memory. The basis goes by 4-byte cp.async (basis_out is 4-byte aligned) into
/// the caller's next commit group: loads through registers (eight per thread at r ≤ 32, D = 128) kept
/// one or two in flight, and the first store waited a global round trip for each.
template <int D>
__device__ __forceinline__ void project_load_operands(const CompressJob& job, int rpad, __half* Bs, float* mu,
                                                      unsigned* amax) {
  using S = ProjectShape<D>;
  const int r = job.rank;
  for (int e = threadIdx.x; e < rpad * (D / 2); e += S::kThreads) {
    const int j = e / (D / 2), c2 = e % (D / 2);
    const bool ok = j < r;
    cp_async4(&Bs[j * S::kLd + 2 * c2], ok ? job.basis_out + j * D + 2 * c2 : job.basis_out, ok);
  }
  for (int d = threadIdx.x; d < D; d += S::kThreads) mu[d] = job.mean_center ? __half2float(job.mean_out[d]) : 0.0f;
  for (int j = threadIdx.x; j < rpad; j += S::kThreads) amax[j] = 0u;
}

/// acc = (X − μ)·B_hᵀ for the warp's 16 rows of one staged chunk `s` and its n-tiles < ntiles (≤ 2·kNT). With a
/// mean or BF16 input (`split`) the A operand X − μ is formed in FP32 and split into FP16 hi + lo (two
/// mma), keeping the product exact to ~2^-22 against the FP16 basis.
template <class T, int D, int kNT>
__device__ __forceinline__ void project_chunk_mma(const T* s, const __half* Bs, const float* mu, bool split,
                                                  int ntiles, float (&acc)[kNT][4]) {
  using S = ProjectShape<D>;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int mt = warp & 3, ng = warp >> 2;
#pragma unroll
  for (int nn = 0; nn < kNT; ++nn)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nn][e] = 0.0f;
#pragma unroll 2
  for (int k0 = 0; k0 < D; k0 += 16) {
    const int mat = lane >> 3;
    unsigned a[4];
    ldmatrix_x4(a, s + (mt * 16 + (lane & 7) + ((mat & 1) << 3)) * S::kLd + k0 + ((mat >> 1) << 3));
    unsigned alo[4];
    if (split) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = k0 + 2 * t + ((e >> 1) << 3);  // a0,a1: cols k0+2t(+1); a2,a3: +8
        const float2 f = to_float2<T>(a[e]);
        const float v0 = f.x - mu[col], v1 = f.y - mu[col + 1];
        const __half2 hi = __floats2half2_rn(v0, v1);
        const float2 hf = __half22float2(hi);
        a[e] = *reinterpret_cast<const unsigned*>(&hi);
        alo[e] = pack_half2(v0 - hf.x, v1 - hf.y);
      }
    }
#pragma unroll
    for (int nn = 0; nn < kNT; ++nn) {
      const int nt = ng + 2 * nn;
      if (nt < ntiles) {
        const __half* brow = Bs + (nt * 8 + g) * S::kLd + k0 + 2 * t;
        const unsigned b0 = *reinterpret_cast<const unsigned*>(brow);
        const unsigned b1 = *reinterpret_cast<const unsigned*>(brow + 8);
        mma_16816<__half>(acc[nn], a, b0, b1);
        if (split) mma_16816<__half>(acc[nn], alo, b0, b1);
      }
    }
  }
}

/// Running max |C| of the lane's two columns per n-tile, over the rows of the chunk that exist.
template <int kNT>
__device__ __forceinline__ void project_track_max(const float (&acc)[kNT][4], bool ok0, bool ok1, int ng, int ntiles,
                                                  float (&cmax)[kNT][2]) {
#pragma unroll
  for (int nn = 0; nn < kNT; ++nn) {
    if (ng + 2 * nn >= ntiles) continue;
    if (ok0) {
      cmax[nn][0] = fmaxf(cmax[nn][0], fabsf(acc[nn][0]));
      cmax[nn][1] = fmaxf(cmax[nn][1], fabsf(acc[nn][1]));
    }
    if (ok1) {
      cmax[nn][0] = fmaxf(cmax[nn][0], fabsf(acc[nn][2]));
      cmax[nn][1] = fmaxf(cmax[nn][1], fabsf(acc[nn][3]));
    }
  }
}

/// One CTA per job, two passes over X: pass 0 keeps the per-column max of |C|; pass 1 streams X again
/// (L2 resident by then), recomputes the identical FP32 values and quantises them, so the scale is the
/// exact max of the values quantised.
template <class T, int D>
__global__ void __launch_bounds__(ProjectShape<D>::kThreads) project_kernel(const CompressJob* __restrict__ jobs,
                                                                            int rows, int max_rank) {
  using S = ProjectShape<D>;
  constexpr int kNT = S::kMaxNTilesPerWarp;
  extern __shared__ __align__(16) unsigned char psmem[];
  const CompressJob job = jobs[blockIdx.x];
  if (!job_check::all(job, D, max_rank)) return;
  const int r = job.rank;
  const int rpad = (r + 15) / 16 * 16;
  T* stage = reinterpret_cast<T*>(psmem);
  __half* Bs = reinterpret_cast<__half*>(psmem + static_cast<std::size_t>(kStages) * kChunkRows * S::kLd * 2u);
  float* mu = reinterpret_cast<float*>(Bs + rpad * S::kLd);
  unsigned* amax = reinterpret_cast<unsigned*>(mu + D);
  float* scale = reinterpret_cast<float*>(amax + rpad);
  float* inv = scale + rpad;

  const T* x = static_cast<const T*>(job.x);
  const std::int64_t ld = job.x_row_stride;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int mt = warp & 3, ng = warp >> 2;
  const int ntiles = (r + 7) / 8;
  const int chunks = (rows + kChunkRows - 1) / kChunkRows;
  const int total = 2 * chunks;  // pass 0 then pass 1 over the same chunks
  project_load_operands<D>(job, rpad, Bs, mu, amax);  // the basis joins chunk 0's group
#pragma unroll
  for (int st = 0; st < kStages - 1; ++st) {  // same pipeline as gram_kernel
    if (st < total) project_load_chunk<T, D>(stage, x, ld, rows, st % chunks, st);
    cp_async_commit();
  }

  float cmax[kNT][2];
#pragma unroll
  for (int nn = 0; nn < kNT; ++nn) cmax[nn][0] = cmax[nn][1] = 0.0f;
  const bool split = job.mean_center || !std::is_same_v<T, __half>;

  for (int it = 0; it < total; ++it) {
    const int c = it % chunks, pass = it / chunks, buf = it % kStages;
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (it + kStages - 1 < total)
      project_load_chunk<T, D>(stage, x, ld, rows, (it + kStages - 1) % chunks, (it + kStages - 1) % kStages);
    cp_async_commit();
    if (it == chunks) publish_scales(cmax, ng, ntiles, r, amax, scale, inv, job.scale_out);  // pass boundary

    float acc[kNT][4];
    project_chunk_mma<T, D, kNT>(stage + buf * kChunkRows * S::kLd, Bs, mu, split, ntiles, acc);
    const int row0 = c * kChunkRows + mt * 16 + g, row1 = row0 + 8;
    if (pass == 0) project_track_max(acc, row0 < rows, row1 < rows, ng, ntiles, cmax);
#pragma unroll
    for (int nn = 0; nn < kNT; ++nn) {
      const int nt = ng + 2 * nn;
      if (nt >= ntiles || pass == 0) continue;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = (e < 2) ? row0 : row1;
        const int col = nt * 8 + 2 * t + (e & 1);
        if (row < rows && col < r) {
          const float v = acc[nn][e];
          const int qv = quantize_coefficient(v, scale[col], inv[col]);  // the CPU rule, bit for bit
          job.coeff_out[static_cast<std::int64_t>(row) * r + col] = static_cast<std::int8_t>(qv);
          if (job.coeff_f32_out != nullptr) job.coeff_f32_out[static_cast<std::int64_t>(row) * r + col] = v;
        }
      }
    }
  }
  cp_async_wait<0>();
}

/// The single-pass projection keeps C in shared memory: 2 X stages, the basis, and C [rows_pad][rpad].
template <int D>
struct ResidentShape {
  static constexpr int kThreads = ProjectShape<D>::kThreads;
  static constexpr int kStages = 2;
  static constexpr int kLd = ProjectShape<D>::kLd;
  SPECTRALKV_HD static constexpr std::size_t bytes(int rows, int rpad) {
    const std::size_t rows_pad = static_cast<std::size_t>((rows + kChunkRows - 1) / kChunkRows) * kChunkRows;
    return static_cast<std::size_t>(kStages) * kChunkRows * kLd * 2u  // X stages
           + static_cast<std::size_t>(rpad) * kLd * 2u                // basis
           + D * 4u                                                  // mean
           + static_cast<std::size_t>(rpad) * 12u                    // column max bits, scales, reciprocals
           + rows_pad * static_cast<std::size_t>(rpad) * 4u;         // C
  }
  /// Largest footprint that still lets two CTAs share an SM (2 × 113 KB of the 227 KB).
  static constexpr std::size_t kMaxBytes = 113u * 1024u;
};

/// C = (X − mean)·B_hᵀ and INT8 quantisation in one pass over X: the FP32 coefficients stay in shared
/// memory until the column maxima are known, then are quantised and written row by row, so every
/// store is coalesced (4 bytes per thread when r % 4 == 0 and coeff_out is 4-byte aligned). Same
/// warp tiling and FP32 values as project_kernel, hence the same bytes.
/// \tparam kNT  n-tiles per warp, ≥ ceil(ceil(r/8)/2) for every job of the batch: the accumulators and
///              column maxima of only that many tiles live in registers, with no per-tile guard.
/// \param smem  ResidentShape<D>::bytes(rows, rpad) of shared memory
/// \tparam kLastRead  read X with the L2 policy evict_first (project_load_chunk)
template <class T, int D, int kNT, bool kLastRead = false>
__device__ __forceinline__ void project_resident_block(const CompressJob& job, int rows, unsigned char* smem) {
  using S = ResidentShape<D>;
  const int r = job.rank;
  const int rpad = (r + 15) / 16 * 16;
  T* stage = reinterpret_cast<T*>(smem);
  __half* Bs = reinterpret_cast<__half*>(smem + static_cast<std::size_t>(S::kStages) * kChunkRows * S::kLd * 2u);
  float* mu = reinterpret_cast<float*>(Bs + rpad * S::kLd);
  unsigned* amax = reinterpret_cast<unsigned*>(mu + D);
  float* scale = reinterpret_cast<float*>(amax + rpad);
  float* inv = scale + rpad;
  float* C = inv + rpad;  // [rows_pad][rpad]

  const T* x = static_cast<const T*>(job.x);
  const std::int64_t ld = job.x_row_stride;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int mt = warp & 3, ng = warp >> 2;
  const int ntiles = (r + 7) / 8;
  const int chunks = (rows + kChunkRows - 1) / kChunkRows;

  const std::uint64_t last = kLastRead ? l2_policy_evict_first() : 0;
  project_load_operands<D>(job, rpad, Bs, mu, amax);  // the basis joins chunk 0's group
  project_load_chunk<T, D, kLastRead>(stage, x, ld, rows, 0, 0, last);
  cp_async_commit();

  float cmax[kNT][2];
#pragma unroll
  for (int nn = 0; nn < kNT; ++nn) cmax[nn][0] = cmax[nn][1] = 0.0f;
  const bool split = job.mean_center || !std::is_same_v<T, __half>;

  for (int c = 0; c < chunks; ++c) {
    cp_async_wait<0>();
    __syncthreads();  // chunk c landed for everyone; the other buffer (chunk c − 1) is no longer read
    if (c + 1 < chunks) project_load_chunk<T, D, kLastRead>(stage, x, ld, rows, c + 1, (c + 1) & 1, last);
    cp_async_commit();
    float acc[kNT][4];
    project_chunk_mma<T, D, kNT>(stage + (c & 1) * kChunkRows * S::kLd, Bs, mu, split, ntiles, acc);
    const int row0 = c * kChunkRows + mt * 16 + g, row1 = row0 + 8;
#pragma unroll
    for (int nn = 0; nn < kNT; ++nn) {
      const int nt = ng + 2 * nn;
      if (nt >= ntiles) continue;
      const int col = nt * 8 + 2 * t;
      *reinterpret_cast<float2*>(&C[row0 * rpad + col]) = make_float2(acc[nn][0], acc[nn][1]);
      *reinterpret_cast<float2*>(&C[row1 * rpad + col]) = make_float2(acc[nn][2], acc[nn][3]);
    }
    project_track_max(acc, row0 < rows, row1 < rows, ng, ntiles, cmax);
  }
  cp_async_wait<0>();
  publish_scales(cmax, ng, ntiles, r, amax, scale, inv, job.scale_out);
  // The CPU rule, bit for bit (quantize.cuh). Consecutive threads write consecutive bytes of the
  // [rows][r] section.
  auto quant = [&](int row, int col) {
    const int qv = quantize_coefficient(C[row * rpad + col], scale[col], inv[col]);
    return static_cast<unsigned>(static_cast<std::uint8_t>(static_cast<std::int8_t>(qv)));
  };
  const int total = rows * r;
  if (r % 4 == 0 && reinterpret_cast<std::uintptr_t>(job.coeff_out) % 4 == 0) {
    const int r4 = r / 4;
    for (int e = tid; e < total / 4; e += S::kThreads) {
      const int row = e / r4, col = (e - row * r4) * 4;
      const unsigned packed = quant(row, col) | (quant(row, col + 1) << 8) | (quant(row, col + 2) << 16) |
                              (quant(row, col + 3) << 24);
      reinterpret_cast<unsigned*>(job.coeff_out)[e] = packed;
    }
  } else {
    for (int e = tid; e < total; e += S::kThreads) {
      const int row = e / r, col = e - row * r;
      job.coeff_out[e] = static_cast<std::int8_t>(quant(row, col));
    }
  }
  if (job.coeff_f32_out != nullptr)
    for (int e = tid; e < total; e += S::kThreads) {
      const int row = e / r, col = e - row * r;
      job.coeff_f32_out[e] = C[row * rpad + col];
    }
}

/// One CTA per job: project_resident_block after the cuSOLVER path's selection, when ResidentShape::bytes
/// fits (e.g. L = 512 with r ≤ 32; project_kernel otherwise). The subspace-iteration path runs it inside
/// compress_fused_kernel in that case.
template <class T, int D, int kNT>
__global__ void __launch_bounds__(ResidentShape<D>::kThreads, 2)
    project_resident_kernel(const CompressJob* __restrict__ jobs, int rows, int max_rank) {
  extern __shared__ __align__(16) unsigned char rsmem[];
  const CompressJob job = jobs[blockIdx.x];
  if (!job_check::all(job, D, max_rank)) return;
  project_resident_block<T, D, kNT>(job, rows, rsmem);
}

}  // namespace
}  // namespace spectralkv::cuda
