// Batched truncated SVD + INT8 quantisation (see include/spectralkv/cuda/compress.cuh for the
// interface and the algorithm overview). Kernels of the fast path:
//   order_kernel    the order in which the jobs are taken (widest subspace first), and the count of the
//                   jobs that fail validate_jobs's checks (job_check), which every kernel skips; it runs
//                   first on every path
//   gram_kernel     G = (X − m)ᵀ(X − m) (+ column sums), tensor cores, FP32 accumulation → workspace
//                   (m = 0, or for centred jobs a provisional per-column shift, see below)
//   eigen_kernel    centring, subspace iteration (CholQR), Rayleigh–Ritz + Jacobi, basis → basis_out, mean_out
//   project_kernel  C = (X − mean)·B_hᵀ, per-column max, INT8 quantisation         → scale_out, coeff_out
//                   (project_resident_kernel: the same in one pass over X when C fits in shared memory,
//                   after the cuSOLVER path)
//   compress_fused_kernel  Gram, eigen-solve and one-pass projection in one CTA per job, G kept in shared
//                   memory: used whenever C fits in shared memory (order_kernel + this kernel per run)
// The cuSOLVER path replaces the Gram and eigen kernels by gather + cuBLAS SGEMM + cusolverDnXsyevBatched
// + select (after order_kernel, for the count).

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
#include "tridiagonal_eigen.cuh"

namespace spectralkv::cuda {
namespace {

// ------------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+: cp.async, ldmatrix, mma.sync)
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

/// 16-byte global→shared copy; `valid == false` writes zeros (rows past the end of a block).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(bytes));
}
/// 4-byte global→shared copy (L1-allocating: cp.async.cg takes 16 bytes only); `valid == false` writes zeros.
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  const int bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(bytes));
}
/// As cp_async16, with an L2 eviction priority (a createpolicy value) attached to the read.
__device__ __forceinline__ void cp_async16_hinted(void* smem, const void* gmem, bool valid, std::uint64_t policy) {
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(bytes), "l"(policy));
}
/// L2 policies for data read twice by one CTA a few hundred microseconds apart: the first read keeps its
/// lines (evict_last), the second lets them go first (evict_first).
__device__ __forceinline__ std::uint64_t l2_policy_evict_last() {
  std::uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ std::uint64_t l2_policy_evict_first() {
  std::uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

/// D += A·B for a 16×8×16 tile, FP32 accumulation. A/B fragments hold pairs of 16-bit values.
template <class T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

/// D += A·B for a 16×8×8 TF32 tile.
__device__ __forceinline__ void mma_tf32(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/// D += A·B for an 8×8×4 FP64 tile. Fragments: A (8×4, row) a = A[lane/4][lane%4]; B (4×8, col)
/// b = B[lane%4][lane/4]; D (8×8) d[i] = D[lane/4][2·(lane%4) + i].
__device__ __forceinline__ void mma_f64(double (&d)[2], double a, double b) {
  asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0,%1}, {%2}, {%3}, {%0,%1};\n"
               : "+d"(d[0]), "+d"(d[1])
               : "d"(a), "d"(b));
}

/// x = hi + lo with hi, lo TF32: the 3×TF32 products hi·hi + hi·lo + lo·hi carry ~FP32 accuracy,
/// which the Gram's dynamic range (100× outlier channels → 10⁴ between eigenvalues) needs.
/// hi is x rounded to nearest (ties away, as cvt.rna) by adding half a TF32 ulp to the bits and
/// masking; lo = x − hi is exact in FP32 and is truncated to TF32 (|lo| ≤ 2^-11·|x|, so hi + lo is
/// within 2^-21 of x). Four ALU instructions per split: ptxas lowers each cvt.rna.tf32 to an add, a mask
/// and an Inf/NaN guard (compare, select) that finite Gram and basis values never need, and the splits
/// of the B operand are most of the instructions of the Gram products.
__device__ __forceinline__ void split_tf32(float x, unsigned& hi, unsigned& lo) {
  constexpr unsigned kMask = 0xFFFFE000u;  // sign, exponent and the 10 stored mantissa bits of TF32
  const unsigned h = (__float_as_uint(x) + 0x1000u) & kMask;
  hi = h;
  lo = __float_as_uint(x - __uint_as_float(h)) & kMask;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

/// Deterministic pseudo-random value in [-1, 1) of (i, j): start vectors and completion of
/// degenerate columns. Same for every job, so results do not depend on batch composition.
__device__ __forceinline__ float hash_unit(unsigned i, unsigned j) {
  unsigned h = i * 0x9E3779B1u ^ (j + 0x7F4A7C15u) * 0x85EBCA77u;
  h ^= h >> 15;
  h *= 0x2C1B3C6Du;
  h ^= h >> 12;
  h *= 0x297A2D39u;
  h ^= h >> 15;
  return static_cast<float>(h >> 8) * (2.0f / 16777216.0f) - 1.0f;
}

template <class T>
__device__ __forceinline__ float2 to_float2(unsigned packed) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half22float2(*reinterpret_cast<const __half2*>(&packed));
  } else {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&packed));
  }
}
template <class T>
__device__ __forceinline__ float to_float1(T v) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(v);
  } else {
    return __bfloat162float(v);
  }
}

__device__ __forceinline__ unsigned pack_half2(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const unsigned*>(&h);
}

// ------------------------------------------------------------------------------------------------
// Kernel 1: Gram matrix G = XᵀX and column sums
// ------------------------------------------------------------------------------------------------

constexpr int kChunkRows = 64;  // rows of X staged per pipeline step
constexpr int kStages = 4;      // cp.async pipeline depth of the projection: ~48 KB in flight per CTA
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

/// The field checks of BatchedCompressor::validate_jobs, shared with the kernels: run() cannot check
/// descriptors that live on the device, so order_kernel counts the jobs that fail one and every per-job
/// kernel skips them (job_check::all) before touching their inputs or outputs. Each guards what the
/// kernels rely on: X's 16-byte row loads (x, x_row_stride), the shared-memory layouts, projection
/// tiles and order buckets sized for max_rank = CompressProblem::max_rank ≤ min(D, L) (rank), and the
/// outputs' stores (non-null, aligned for the widest store to each).
namespace job_check {
__host__ __device__ inline bool aligned(const void* p, std::uintptr_t a) {
  return reinterpret_cast<std::uintptr_t>(p) % a == 0;
}
__host__ __device__ inline bool x(const CompressJob& j) { return j.x != nullptr && aligned(j.x, 16); }
__host__ __device__ inline bool x_row_stride(const CompressJob& j, int d) {
  return j.x_row_stride >= d && j.x_row_stride % 8 == 0;
}
__host__ __device__ inline bool rank(const CompressJob& j, int max_rank) { return j.rank >= 1 && j.rank <= max_rank; }
__host__ __device__ inline bool basis_out(const CompressJob& j) { return j.basis_out != nullptr && aligned(j.basis_out, 4); }
__host__ __device__ inline bool scale_out(const CompressJob& j) { return j.scale_out != nullptr && aligned(j.scale_out, 4); }
__host__ __device__ inline bool coeff_out(const CompressJob& j) { return j.coeff_out != nullptr; }
/// The flag's byte is 0 or 1: a descriptor written by a kernel or copied as bytes could hold another
/// value, which a bool may not (the kernels' tests of it could then disagree).
__host__ __device__ inline bool mean_center(const CompressJob& j) {
  return *reinterpret_cast<const unsigned char*>(&j.mean_center) <= 1;
}
__host__ __device__ inline bool mean_out(const CompressJob& j) {
  return !j.mean_center || (j.mean_out != nullptr && aligned(j.mean_out, 2));
}
__host__ __device__ inline bool optional_outs(const CompressJob& j) {
  return aligned(j.basis_f32_out, 4) && aligned(j.coeff_f32_out, 4) && aligned(j.eigenvalues_out, 4);
}
__host__ __device__ inline bool all(const CompressJob& j, int d, int max_rank) {
  return x(j) && x_row_stride(j, d) && rank(j, max_rank) && basis_out(j) && scale_out(j) && coeff_out(j) &&
         mean_center(j) && mean_out(j) && optional_outs(j);
}
/// all() on a descriptor in global memory, as a call: inlined into gram_kernel<…, 128>, its loads of
/// every field made the kernel spill 68 bytes instead of 8 (ptxas, CUDA 13).
__device__ __noinline__ bool valid_at(const CompressJob* job, int d, int max_rank) { return all(*job, d, max_rank); }
}  // namespace job_check

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

// ------------------------------------------------------------------------------------------------
// Kernel 2: eigen-solve on the Gram (subspace iteration + Rayleigh–Ritz)
// ------------------------------------------------------------------------------------------------

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
/// two H buffers in the Gram's space and its two W buffers in one panel; see JacobiSlots and
/// EigenSmem), but at ℓ = 56 and 64 its panels keep the eigen kernel to one CTA per SM, where the
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

// ------------------------------------------------------------------------------------------------
// Kernel 3: C = (X − mean)·B_hᵀ and INT8 quantisation, fused
// ------------------------------------------------------------------------------------------------

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
