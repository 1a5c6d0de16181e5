#pragma once
// The decode-attention kernel template shared by DecodeAttention (cold blocks + dense tiers),
// DenseDecodeAttention (RK = RV = 0) and DecompressThenAttend. Private to the kernel library: the
// instantiation files (decode_spectral_*.cu, decode_dense.cu) include it, the public API is
// spectralkv/cuda/decode_attention.cuh.
//
// CTA shape (decode_kernel_args.cuh): 4 warps per CTA and two CTAs per SM (one where the stages of large
// ranks do not fit twice). The grid has that many CTAs per SM and
// every CTA takes a contiguous share of the flattened item list (sequence-major, then KV head, then item):
// equal shares over all CTAs, or over a multiple of the (sequence, head) pairs (sharing_ctas). Items are:
//   - a cold block: all sections of one KV head of one block: the bases by 16-byte cp.async into padded
//     rows (8 consecutive rows hit distinct banks), the scales and coefficients (~2/3 of the bytes,
//     contiguous) by one bulk copy of the copy engine completing on the stage's mbarrier;
//   - a dense chunk: up to 64 consecutive tokens of one dense tier, K rows then V rows, unpadded with their
//     16-byte pieces swizzled (DecodeTraits::kRowD), by 16-byte cp.async (rows past the tier's end
//     zero-filled); the tier's token and head strides give token-major or head-major dense arrays.
// Each thread owns one 16-byte column of every (threads / (head_dim/8))-th row, so a row copy costs one
// address add. Measured on an H200: one bulk copy per 256-byte row starves the copy engine, and 16-byte
// copies with general index arithmetic cost ~57 instructions each; this split avoids both.
// Stages form a ring S deep (2..6 by shared memory), so S-1 items are in flight while one is computed.
//
// Every warp keeps a private online-softmax state (m, l, o over all of head_dim) that cold blocks and
// dense chunks both feed; the warps' states merge once, when a (sequence, head) segment ends, so within
// an item warps never wait for each other.
//
// Cold block (GQA group of g <= 16 query heads packed as the 16 rows of the MMA tiles, so every INT8
// coefficient is loaded and converted once per group); each warp takes every 4th 16-token step:
//   W = q·B_Kᵀ            m16n8k16 over head_dim, q as FP16 (power-of-two normalised), B_K from smem;
//   W *= scale_k · scale  FP32, then split W = W_hi + W_lo (two FP16 halves, ~22 significant bits);
//   s = W·C_Kᵀ (+ q·mean_k) m16n8k16 with C_K as FP16 1152 + c, exact (one byte permute per pair); the
//                         bias 1152·ΣW and q·mean_k go into the running max, not into every score;
//   p = exp2(s - m)       FP32 online softmax per warp over its tokens;
//   PC += p·C_V           m16n8k16 with P in FP16 and C_V as 1152 + c; Σp (the bias's weight and the
//                         softmax denominator) by one more MMA against ones;
//   o = α·o + (β·(PC - 1152·Σp)·diag(scale_v))·B_V (+ β·l·mean_v): the PC accumulator, rescaled and split
//                         hi/lo, is the A operand of the projection, which accumulates into the warp's o.
// For g <= 8, rows 8..15 of the tiles are padding and carry the lo halves (of W, and of the projection
// operand): one MMA instead of two.
// Dense chunk: each warp scores its 16-token tiles (m16n8k16 in T) and accumulates P·V (m16n8k16).
// A segment that is the whole (sequence, head) writes the output; otherwise it writes a partial (m, l, o)
// and the last CTA of that (sequence, head) to finish, found by an atomic counter, merges all of them, or,
// when the plan says so (few pairs, see decode_host.cuh), decode_merge_kernel does, after this kernel.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "decode_kernel_args.cuh"
#include "programmatic_launch.cuh"
#include "spectralkv/cuda/error.cuh"

namespace spectralkv::cuda::kernel {

// ---------------------------------------------------------------------------------------------------
// PTX wrappers.

__device__ __forceinline__ std::uint32_t smem_u32(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// Stage barriers: one mbarrier per stage, one arrival (warp 0's lane 0, with the expected byte count) per
// use; the bulk copies complete the transaction bytes.
__device__ __forceinline__ void mbar_init(std::uint32_t bar, std::uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void fence_mbar_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive_expect_tx(std::uint32_t bar, std::uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(std::uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(std::uint32_t bar, std::uint32_t parity) {
  std::uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}
__device__ __forceinline__ void mbar_wait(std::uint32_t bar, std::uint32_t parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}
/// Bulk copy global -> shared by the copy engine (16-byte aligned addresses, size a multiple of 16); one
/// instruction per contiguous run instead of one 16-byte copy per thread.
__device__ __forceinline__ void bulk_load(std::uint32_t dst, const void* src, std::uint32_t bytes, std::uint32_t bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}
/// 16-byte copy global -> shared. src-size 0 zero-fills the destination: rows past a tier's end must read
/// as 0, not stale bytes (a stale NaN times p = 0 would still be NaN).
__device__ __forceinline__ void cp_async_16(std::uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait(int newest_pending) {
  // Two stages (the common plan: two CTAs per SM) as a plain branch, not through a jump table.
  if (newest_pending == 0) {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    return;
  }
  switch (newest_pending) {
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    case 3: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 4;\n" ::: "memory"); break;
  }
}
/// Orders ordinary shared-memory accesses (made visible by a barrier) before later bulk copies into the
/// same memory.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

/// 2^x with the hardware approximation (relative error ~2^-22); exp2(-inf) = 0.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ void ldsm_x4(std::uint32_t addr, std::uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(std::uint32_t addr, std::uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x2_t(std::uint32_t addr, std::uint32_t& r0, std::uint32_t& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldsm_x1_t(std::uint32_t addr, std::uint32_t& r0) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r0) : "r"(addr) : "memory");
}

// D(16x8, f32) += A(16x16) * B(16x8). A regs: (row g, k 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..);
// B regs: (k 2t..2t+1, col g), (k 2t+8.., col g); C: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1),
// with g = lane / 4 and t = lane % 4.
template <class T>
__device__ __forceinline__ void mma16816(float (&c)[4], std::uint32_t a0, std::uint32_t a1, std::uint32_t a2,
                                         std::uint32_t a3, std::uint32_t b0, std::uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}
// D(16x8) += A(16x8) * B(8x8) in FP16 (the rank-8 steps of the cold path). A regs: (g, 2t..2t+1),
// (g+8, 2t..); B reg: (k 2t..2t+1, col g).
__device__ __forceinline__ void mma1688_f16(float (&c)[4], std::uint32_t a0, std::uint32_t a1, std::uint32_t b0) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(b0));
}

template <class T>
__device__ __forceinline__ std::uint32_t pack2(float lo, float hi) {
  std::uint32_t u;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    std::memcpy(&u, &v, 4);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    std::memcpy(&u, &v, 4);
  }
  return u;
}
template <class T>
__device__ __forceinline__ float2 unpack2(std::uint32_t u) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v;
    std::memcpy(&v, &u, 4);
    return __bfloat1622float2(v);
  } else {
    __half2 v;
    std::memcpy(&v, &u, 4);
    return __half22float2(v);
  }
}
/// x = hi + lo with both halves FP16: the pair carries ~22 significant bits into an FP16 MMA.
__device__ __forceinline__ void split_half2(float x0, float x1, std::uint32_t& hi, std::uint32_t& lo) {
  hi = pack2<__half>(x0, x1);
  const float2 h = unpack2<__half>(hi);
  lo = pack2<__half>(x0 - h.x, x1 - h.y);
}

/// INT8 coefficients enter the MMAs biased by kCoeffBias: with the sign bit flipped a byte b is the
/// mantissa u = b + 128 of the half 1024 + u = kCoeffBias + b (exact: halves hold every integer up to
/// 2048). One byte permute per pair of values; the bias comes back out once per row and block, as
/// kCoeffBias times a sum of the other operand (see the cold path), instead of one subtraction per pair.
constexpr float kCoeffBias = 1152.0f;
/// Four signed bytes -> half2(1152 + b0, 1152 + b1), half2(1152 + b2, 1152 + b3), exactly.
__device__ __forceinline__ void i8x4_to_half2_biased(std::uint32_t w, std::uint32_t& lo, std::uint32_t& hi) {
  const std::uint32_t u = w ^ 0x80808080u;
  lo = __byte_perm(u, 0x64646464u, 0x4140);
  hi = __byte_perm(u, 0x64646464u, 0x4342);
}
/// half2(1152 + byte i of a, 1152 + byte i of b), exactly (i is a compile-time constant after unrolling).
__device__ __forceinline__ std::uint32_t i8pair_to_half2_biased(std::uint32_t a, std::uint32_t b, int i) {
  const std::uint32_t sel = static_cast<std::uint32_t>(i | (i << 4) | ((4 + i) << 8) | ((4 + i) << 12));
  return (__byte_perm(a, b, sel) & 0x00FF00FFu) ^ 0x64806480u;
}
/// Sum of the two halves of a half2, in FP32 (one rounding at most, none unless their exponents are far apart).
__device__ __forceinline__ float half2_sum(std::uint32_t u) {
  const float2 f = unpack2<__half>(u);
  return f.x + f.y;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
/// Reference point for exp2 when the running max is still -inf (nothing seen yet): any finite value works
/// since every term is then exp2(-inf) = 0, and it avoids inf - inf.
__device__ __forceinline__ float finite_or_zero(float m) { return m == -INFINITY ? 0.0f : m; }

/// Folds K split partials into a running log-sum-exp state (max m, sum l, unnormalised output acc of N
/// elements): partial k holds its max ml[k].x, its sum ml[k].y and its output o[k] already divided by that
/// sum, so it weighs ml[k].y · 2^(ml[k].x - m). A missing partial is (-inf, 0) with weight 0.
template <int K, int N>
__device__ __forceinline__ void fold_partials(float& m, float& l, float (&acc)[N], const float2 (&ml)[K],
                                              const float (&o)[K][N]) {
  float mx = m;
#pragma unroll
  for (int k = 0; k < K; ++k) mx = fmaxf(mx, ml[k].x);
  const float mref = finite_or_zero(mx);
  const float f = fast_exp2(m - mref);
  l *= f;
#pragma unroll
  for (int e = 0; e < N; ++e) acc[e] *= f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const float w = ml[k].y * fast_exp2(ml[k].x - mref);
    l += w;
#pragma unroll
    for (int e = 0; e < N; ++e) acc[e] += w * o[k][e];
  }
  m = mx;
}

/// Loads RK/4 (or RV/8) bytes, 1..16, as up to four words (zero-extended when narrower than a word).
template <int kBytes>
__device__ __forceinline__ void load_bytes(const unsigned char* p, std::uint32_t (&w)[(kBytes + 3) / 4]) {
  if constexpr (kBytes == 1) {
    w[0] = *p;
  } else if constexpr (kBytes == 2) {
    w[0] = *reinterpret_cast<const unsigned short*>(p);
  } else if constexpr (kBytes == 4) {
    w[0] = *reinterpret_cast<const std::uint32_t*>(p);
  } else if constexpr (kBytes == 8) {
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    w[0] = v.x;
    w[1] = v.y;
  } else {
    static_assert(kBytes == 16, "coefficient rows are 1, 2, 4, 8 or 16 bytes per lane");
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  }
}

// ---------------------------------------------------------------------------------------------------
// Work list shared by the attention kernel and the merge kernel.

/// Items of sequence b: its cold blocks (when the kernel reads them) and the 64-token chunks of its dense
/// tiers; an empty sequence still owns one (null) item, whose CTA writes zeros.
__device__ __forceinline__ int sequence_items(const KernelArgs& a, int b, bool cold, SeqInfo& si) {
  si.block_begin = 0;
  si.ncold = 0;
  if (cold && a.block_offsets != nullptr) {
    si.block_begin = a.block_offsets[b];
    si.ncold = a.block_offsets[b + 1] - si.block_begin;
  }
  int n = si.ncold;
#pragma unroll
  for (int t = 0; t < kNumTiers; ++t) {
    si.len[t] = a.tiers[t].lengths != nullptr ? a.tiers[t].lengths[b] : 0;
    n += (si.len[t] + kChunk - 1) / kChunk;
  }
  return n > 0 ? n : 1;
}

/// ⌊num / den⌋ for num >= 0 and den > 0. A 64-bit division is a called subroutine, tens of dependent
/// instructions; the work split takes several at a CTA's start and end, on the critical path of short
/// launches, and its operands fit 32 bits unless the item list is millions long.
__device__ __forceinline__ long long div_floor(long long num, long long den) {
  if (num <= 0xffffffffLL && den <= 0xffffffffLL)
    return static_cast<long long>(static_cast<unsigned>(num) / static_cast<unsigned>(den));
  return num / den;
}

/// The CTAs that hold the items [start, start + n) of one (sequence, head) pair, when `total` items are cut
/// into G equal contiguous shares (CTA c takes [c·total/G, (c+1)·total/G)). Segment s of the pair is the
/// s-th such CTA; it writes its partial (m, l, o) to workspace slot slot(s) = CTA + pair, distinct per
/// (CTA, pair) and below G + pairs.
struct SegmentMap {
  long long total, G, start, pair, first, nseg;
  bool every_cta_busy;
  __device__ __forceinline__ SegmentMap(long long total_, long long G_, long long start_, long long n, long long pair_)
      : total(total_), G(G_), start(start_), pair(pair_) {
    first = cta_of(start);
    // With at least one item per CTA the CTAs holding this list are contiguous; with fewer items than
    // CTAs each item has its own CTA and the CTAs in between hold nothing.
    every_cta_busy = total >= G;
    nseg = every_cta_busy ? cta_of(start + n - 1) - first + 1 : n;
  }
  __device__ __forceinline__ long long cta_of(long long x) const { return div_floor((x + 1) * G - 1, total); }
  __device__ __forceinline__ long long slot(long long s) const {
    // Sparse case (fewer items than CTAs): every value is below G, so 32-bit division suffices.
    const long long c = every_cta_busy ? first + s
                                       : static_cast<long long>((static_cast<int>(start + s) + 1) * static_cast<int>(G) - 1) /
                                             static_cast<int>(total);
    return c + pair;
  }
};

/// The CTAs of a grid of `grid` that share the item list: all of them, or pairs·⌊grid / pairs⌋ of them. With
/// equal item counts per pair the second cuts every pair into the same number of shares, so no CTA ends one
/// pair and starts the next (a segment end inside its range: warp states merged, a partial written, the next
/// query loaded), and with one CTA per pair nothing is merged. It is taken when its busiest CTA holds no
/// more items than with the whole grid (one more with one CTA per pair, which writes no partial), whatever the
/// lengths. Measured on an H200 (GQA 32/8, head_dim 128, K16/V32, uniform lengths, against the whole grid
/// always): spectral B=8, T=4K 26.1 → 23.5 µs, B=32, T=4K 47.9 → 43.1, B=32, T=16K 107.6 → 101.9; dense
/// B=8, T=4K 46.4 → 42.3. Forced where it puts more items on the busiest CTA (B=8, T=64K: 34 against 33), it
/// was 1.5-3% slower, hence the rule.
__device__ __forceinline__ unsigned sharing_ctas(long long total, unsigned grid, unsigned pairs, int max_items) {
  if (pairs == 0 || pairs > grid) return grid;
  const int s = static_cast<int>(grid / pairs);
  // ⌈max_items / s⌉ - [s = 1] <= ⌈total / grid⌉, without a 64-bit division.
  const long long k = (max_items + s - 1) / s - (s == 1 ? 1 : 0);
  return k <= 0 || total > (k - 1) * grid ? pairs * s : grid;
}

// ---------------------------------------------------------------------------------------------------

template <class T, int D, int RK, int RV>
struct DecodeTraits {
  static_assert(D == 64 || D == 128, "head_dim 64 or 128");
  static_assert(RK == 0 || RK == 8 || RK == 16 || RK == 32 || RK == 64, "rank_k 8, 16, 32 or 64");
  static_assert(RV == 0 || RV == 8 || RV == 16 || RV == 32 || RV == 64, "rank_v 8, 16, 32 or 64");
  static constexpr bool kCold = RK > 0;
  static constexpr int kWarps = kWarpsPerCta;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kCtasPerSm = kernel::kCtasPerSm;
  static constexpr int kRow = 2 * D + 16;    ///< padded smem row of a basis: 8 consecutive rows hit distinct banks
  /// Dense-chunk row in smem: unpadded, its 16-byte pieces swizzled (piece c of row r at c ^ (r mod 8)), so
  /// 8 consecutive rows still hit distinct banks and a 64-token chunk takes 32 KB (not 34 KB): three stages
  /// then fit in half an SM's shared memory, which keeps a third chunk in flight per CTA.
  static constexpr int kRowD = 2 * D;
  static constexpr int kKd = D / 16;         ///< MMA k-steps over head_dim
  static constexpr int kDTiles = D / 8;      ///< MMA n-tiles over head_dim
  static constexpr int kSlice = kDTiles / kWarps;  ///< output n-tiles each warp writes at a segment's end
  static constexpr int kKT = kCold ? RK / 8 : 1;   ///< n-tiles of W
  static constexpr int kVT = kCold ? RV / 8 : 1;   ///< n-tiles of PC
  static constexpr int kRKs = RK >= 16 ? RK / 16 : 1;  ///< k-steps of the score MMA (RK 8: one m16n8k8)
  static constexpr int kRVs = RV >= 16 ? RV / 16 : 1;  ///< k-steps of the projection MMA
  static constexpr int kKBytes = kCold ? RK / 4 : 4;   ///< C_K bytes a lane loads per token row
  static constexpr int kVBytes = kCold ? RV / 8 : 4;   ///< C_V bytes a lane loads per token row
  static constexpr int kBaseRows = RK + RV + 2;        ///< B_K, B_V, mean_k, mean_v
  static_assert(kSlice >= 1, "each warp owns at least one n-tile of the output");

  /// Basis row of B_K stored in smem slot 8*nt + n: the MMA producing W reads n-tile nt from 8 contiguous
  /// slots (conflict-free), and its accumulator lands where the score MMA's A operand needs it:
  /// lane (g, t) ends up holding W[g][RK/4*t + 4*ks + 0..3] for score k-step ks, which is exactly the byte
  /// range of C_K row it loads with one RK/4-byte access.
  __host__ __device__ static constexpr int sigma(int nt, int n) {
    return RK == 8 ? n : (RK / 4) * (n >> 1) + 4 * (nt >> 1) + 2 * (nt & 1) + (n & 1);
  }
  /// Rank held by column n of PC's n-tile i. For RV >= 16 the C_V fragments come from transposed
  /// ldmatrix, which gives n-tile i the ranks 16(i/2) + 2n + i%2; RV = 8 has one n-tile, column n = rank n.
  __host__ __device__ static constexpr int pc_rank(int i, int n) {
    return RV == 8 ? n : 16 * (i >> 1) + 2 * n + (i & 1);
  }
  /// Smem slot of B_V row j (relative to the B_V section). PC·B_V's A operand is PC's accumulator as is:
  /// k-slot k = 8h + n of projection k-step kp is column n of n-tile 2kp + h, rank 16kp + 2n + h, so
  /// storing rank 16q + j' (j' < 16) at slot 16q + 8(j' mod 2) + j'/2 makes each k-step read the 16
  /// consecutive slots 16kp..16kp+15 (8 consecutive padded rows hit distinct banks).
  /// vslot(j + i·P) = vslot(j) + vslot(i·P) for j < P and P = 8 or 16 (the loader relies on it).
  __host__ __device__ static constexpr int vslot(int j) {
    return (!kCold || RV == 8) ? j : (j & ~15) + 8 * (j & 1) + ((j & 15) >> 1);
  }
};

template <class T, int D, int RK, int RV>
__global__ void __launch_bounds__(DecodeTraits<T, D, RK, RV>::kThreads, DecodeTraits<T, D, RK, RV>::kCtasPerSm)
    decode_attention_kernel(const __grid_constant__ KernelArgs a) {
  using Tr = DecodeTraits<T, D, RK, RV>;
  constexpr int kWarps = Tr::kWarps;
  constexpr int kThreads = Tr::kThreads;
  constexpr int kRow = Tr::kRow;
  constexpr int kRowD = Tr::kRowD;
  constexpr int kKd = Tr::kKd;
  constexpr int kDTiles = Tr::kDTiles;
  constexpr int kSlice = Tr::kSlice;
  constexpr bool kCold = Tr::kCold;

  extern __shared__ __align__(128) unsigned char smem[];
  SeqInfo* seqs = reinterpret_cast<SeqInfo*>(smem + a.smem_seq);
  int* prefix = reinterpret_cast<int*>(smem + a.smem_prefix);
  uint4* qf = reinterpret_cast<uint4*>(smem + a.smem_qf);  // FP16 q fragments (normalised), cold path
  uint4* qt = reinterpret_cast<uint4*>(smem + a.smem_qt);  // T q fragments, dense path
  float* work = reinterpret_cast<float*>(smem + a.smem_work);
  float* misc = reinterpret_cast<float*>(smem + a.smem_misc);
  unsigned char* stage0 = smem + a.smem_stage;
  const std::uint32_t bar0 = smem_u32(smem + a.smem_bar);  // stage s's barrier at bar0 + 8 s

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int gid = lane >> 2;
  const int tig = lane & 3;
  const int B = a.batch;
  const int H = a.num_kv_heads;
  const int g = a.group;
  const int S = a.stages;
  const bool hi_rows = g > 8;  // rows 8..15 of the MMA tiles hold query heads (else they are padding)

  if (tid == 0) {
    for (int st = 0; st < S; ++st) mbar_init(bar0 + 8 * st, 1);
    fence_mbar_init();  // visible to the copy engine before any bulk copy completes on them
  }
  // This grid is launched as a programmatic dependent of whatever precedes it on the stream, so its CTAs may
  // be resident before that work has finished: nothing in global memory is touched before this wait, which
  // returns once the preceding grid has completed and its writes are visible (at once, when there is none).
  grid_dependency_wait();
  // The merge kernel (enqueued after this one as a programmatic dependent) may be scheduled from now on. It
  // reads the lengths before its own wait (the partials after it): it relies on its launch coming after every
  // CTA here has passed the wait above, when the work that wrote them has completed and its writes, flushed
  // at its completion, are visible to the whole device (PTX promises the wait's visibility to this grid only).
  // Its CTAs fit only where CTAs of this grid have exited.
  launch_dependents();

  // ---- Items per sequence, and their prefix sums (sequence-major order). --------------------------
  for (int b = tid; b < B; b += kThreads) {
    SeqInfo si;
    prefix[b + 1] = sequence_items(a, b, kCold, si);
    seqs[b] = si;
  }
  __syncthreads();
  if (warp == 0) {
    const int per = (B + 31) / 32;
    const int lo = lane * per;
    const int hi = min(B, lo + per);
    int sum = 0;
    for (int i = lo; i < hi; ++i) sum += prefix[i + 1];
    int incl = sum;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, incl, o);
      if (lane >= o) incl += v;
    }
    int run = incl - sum;
    int most = 0;
    for (int i = lo; i < hi; ++i) {
      most = max(most, prefix[i + 1]);
      run += prefix[i + 1];
      prefix[i + 1] = run;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) most = max(most, __shfl_xor_sync(0xffffffffu, most, o));
    if (lane == 0) {
      prefix[0] = 0;
      reinterpret_cast<int*>(misc)[kWarps + 1] = most;  // after the warps' maxima and the merge flag
    }
  }
  __syncthreads();

  const long long total = static_cast<long long>(H) * prefix[B];
  const long long G =
      sharing_ctas(total, gridDim.x, B * H, reinterpret_cast<const int*>(misc)[kWarps + 1]);
  const long long x0 = div_floor(static_cast<long long>(blockIdx.x) * total, G);
  const long long x1 = blockIdx.x < G ? div_floor(static_cast<long long>(blockIdx.x + 1) * total, G) : x0;
  if (x0 >= x1) return;

  // Cursor over the flattened item list: sequence b, head h, index `local` of n items of (b, h). The
  // sequence's cold-block count and first block-table entry ride along in registers: they are read for
  // every item, and from shared memory they were a dependent load at the head of each item's chain.
  struct Cursor {
    int b, h, local, n, ncold, block_begin;
  };
  auto load_seq = [&](Cursor& c) {
    c.n = prefix[c.b + 1] - prefix[c.b];
    c.ncold = seqs[c.b].ncold;
    c.block_begin = seqs[c.b].block_begin;
  };
  auto locate = [&](long long x) {
    int lo = 0, hi = B - 1;
    while (lo < hi) {  // largest b with H * prefix[b] <= x
      const int mid = (lo + hi + 1) >> 1;
      if (static_cast<long long>(H) * prefix[mid] <= x) lo = mid; else hi = mid - 1;
    }
    Cursor c;
    c.b = lo;
    load_seq(c);
    const int rel = static_cast<int>(x - static_cast<long long>(H) * prefix[lo]);  // < H·n, a sequence's items
    c.h = rel / c.n;
    c.local = rel - c.h * c.n;
    return c;
  };
  auto advance = [&](Cursor& c) {
    if (++c.local == c.n) {
      c.local = 0;
      if (++c.h == H) {
        c.h = 0;
        ++c.b;
        if (c.b < B) load_seq(c);
      }
    }
  };
  // Item kind: 0 cold block (idx = block index), 1 dense chunk (tier, idx = chunk), 2 null item.
  struct Item {
    int kind, tier, idx;
  };
  auto decode = [&](const Cursor& c) {
    Item it{2, 0, 0};
    if (c.local < c.ncold) {
      it.kind = 0;
      it.idx = c.local;
      return it;
    }
    const SeqInfo& si = seqs[c.b];
    int r = c.local - c.ncold;
#pragma unroll
    for (int t = 0; t < kNumTiers; ++t) {
      const int chunks = (si.len[t] + kChunk - 1) / kChunk;
      if (it.kind == 2) {
        if (r < chunks) {
          it.kind = 1;
          it.tier = t;
          it.idx = r;
        } else {
          r -= chunks;
        }
      }
    }
    return it;
  };
  auto tier_base = [&](int t, int b, bool value) -> const char* {
    const TierArgs& ta = a.tiers[t];
    if (ta.k_ptrs != nullptr) return static_cast<const char*>(value ? ta.v_ptrs[b] : ta.k_ptrs[b]);
    return (value ? ta.v_base : ta.k_base) + static_cast<long long>(b) * ta.seq_stride_bytes;
  };

  // ---- Loader: copies of one item into a stage, S-1 items ahead of the compute. --------------------
  // Rows (bases, dense tokens) go by 16-byte cp.async from every thread: each thread owns one 16-byte column
  // of every kRowsPerPass-th row, so a copy costs one address add. The scales-and-coefficients region of a
  // cold block (most of its bytes, contiguous) goes by one bulk copy that completes on the stage barrier.
  constexpr int kCpr = D / 8;                     // 16-byte chunks per row
  constexpr int kRowsPerPass = kThreads / kCpr;   // rows one pass of the CTA covers
  static_assert(kChunk % kRowsPerPass == 0, "a dense chunk is whole passes of the CTA");
  const int my_ch = tid % kCpr;
  const int my_row = tid / kCpr;
  Cursor lc = locate(x0);
  long long lx = x0;  // next item to load
  int ls = 0;         // its stage
  int l_block = 0;    // its block id when cold, fetched one issue ahead
  // Base pointers of the loader sequence's tiers. Scalars, not an array indexed by the tier, so they stay
  // in registers.
  const char *l_k0 = nullptr, *l_k1 = nullptr, *l_k2 = nullptr;
  const char *l_v0 = nullptr, *l_v1 = nullptr, *l_v2 = nullptr;
  auto load_seq_pointers = [&](int b) {
    const SeqInfo& si = seqs[b];
    l_k0 = si.len[0] > 0 ? tier_base(0, b, false) : nullptr;
    l_v0 = si.len[0] > 0 ? tier_base(0, b, true) : nullptr;
    l_k1 = si.len[1] > 0 ? tier_base(1, b, false) : nullptr;
    l_v1 = si.len[1] > 0 ? tier_base(1, b, true) : nullptr;
    l_k2 = si.len[2] > 0 ? tier_base(2, b, false) : nullptr;
    l_v2 = si.len[2] > 0 ? tier_base(2, b, true) : nullptr;
  };
  auto prefetch_block = [&]() {
    if (kCold && lx < x1 && lc.local < lc.ncold) l_block = __ldg(a.block_table + lc.block_begin + lc.local);
  };
  load_seq_pointers(lc.b);
  prefetch_block();

  // Called by every thread, for lx < x1. Thread 0 arrives once per use of the stage barrier (with the
  // region's bytes for a cold block).
  auto issue = [&]() {
    const std::uint32_t sdst = smem_u32(stage0) + static_cast<std::uint32_t>(ls * a.stage_bytes);
    const std::uint32_t bar = bar0 + 8 * ls;
    constexpr int kRowBytes = 2 * D;
    const Item it = decode(lc);
    if (kCold && it.kind == 0) {
      const unsigned char* src = a.pool + static_cast<long long>(l_block) * a.block_bytes +
                                 static_cast<long long>(lc.h) * a.head_bytes;
      if (tid == 0) {
        fence_proxy_async();
        mbar_arrive_expect_tx(bar, a.region_bytes);
        bulk_load(sdst + Tr::kBaseRows * kRow, src + a.off_region, a.region_bytes, bar);
      }
      // Row my_row + i·kRowsPerPass of each basis. kRowsPerPass (8 or 16) is a multiple of 8, so the slots
      // are this thread's first slot plus a compile-time step (vslot(my_row + i·P) = vslot(my_row) +
      // vslot(i·P) for my_row < P), and a copy costs no index arithmetic: loops bounded at run time that
      // evaluated sigma and vslot per row cost ~120 instructions per warp and block.
      if constexpr (kCold) {
        const unsigned char* bk = src + a.off_basis_k + Tr::sigma(my_row >> 3, my_row & 7) * kRowBytes + my_ch * 16;
        const std::uint32_t dk = sdst + my_row * kRow + my_ch * 16;
#pragma unroll
        for (int i = 0; i < (RK + kRowsPerPass - 1) / kRowsPerPass; ++i) {
          // sigma(nt + d, n) = sigma(nt, n) + 2d for RK >= 16; RK = 8 has one n-tile.
          if (RK % kRowsPerPass == 0 || my_row < RK)
            cp_async_16(dk + i * kRowsPerPass * kRow, bk + 2 * i * (kRowsPerPass / 8) * kRowBytes, true);
        }
        const unsigned char* bv = src + a.off_basis_v + my_row * kRowBytes + my_ch * 16;
        const std::uint32_t dv = sdst + (RK + Tr::vslot(my_row)) * kRow + my_ch * 16;
#pragma unroll
        for (int i = 0; i < (RV + kRowsPerPass - 1) / kRowsPerPass; ++i) {
          if (RV % kRowsPerPass == 0 || my_row < RV)
            cp_async_16(dv + Tr::vslot(i * kRowsPerPass) * kRow, bv + i * kRowsPerPass * kRowBytes, true);
        }
        if (a.has_mean && my_row < 2)
          cp_async_16(sdst + (RK + RV + my_row) * kRow + my_ch * 16,
                      src + (my_row == 0 ? a.off_mean_k : a.off_mean_v) + my_ch * 16, true);
      }
    } else if (it.kind == 1) {
      const int len = seqs[lc.b].len[it.tier];
      const int tok0 = it.idx * kChunk;
      const int nv = len - tok0;  // valid rows of this chunk (may exceed kChunk)
      const TierArgs& ta = a.tiers[it.tier];
      const long long col = lc.h * ta.head_stride_bytes + my_ch * 16 + (tok0 + my_row) * ta.token_stride_bytes;
      const char* kp = (it.tier == 0 ? l_k0 : (it.tier == 1 ? l_k1 : l_k2)) + col;
      const char* vp = (it.tier == 0 ? l_v0 : (it.tier == 1 ? l_v1 : l_v2)) + col;
      const long long step = kRowsPerPass * ta.token_stride_bytes;
      // Rows my_row + i·kRowsPerPass all have this thread's row mod 8, hence one swizzled piece.
      const std::uint32_t dk = sdst + my_row * kRowD + ((my_ch ^ (my_row & 7)) << 4);
      if (nv >= kChunk) {  // a whole chunk: two pointer increments per pair of copies
#pragma unroll
        for (int i = 0; i < kChunk / kRowsPerPass; ++i, kp += step, vp += step) {
          cp_async_16(dk + i * kRowsPerPass * kRowD, kp, true);
          cp_async_16(dk + (kChunk + i * kRowsPerPass) * kRowD, vp, true);
        }
      } else {
#pragma unroll
        for (int i = 0; i < kChunk / kRowsPerPass; ++i, kp += step, vp += step) {
          const bool valid = my_row + i * kRowsPerPass < nv;
          cp_async_16(dk + i * kRowsPerPass * kRowD, valid ? kp : static_cast<const char*>(a.q), valid);
          cp_async_16(dk + (kChunk + i * kRowsPerPass) * kRowD, valid ? vp : static_cast<const char*>(a.q), valid);
        }
      }
      if (tid == 0) mbar_arrive(bar);
    } else if (tid == 0) {
      mbar_arrive(bar);  // null item: nothing to copy, the phase completes at once
    }
    const int old_b = lc.b;
    advance(lc);
    ++lx;
    if (++ls == S) ls = 0;
    if (lx < x1 && lc.b != old_b) load_seq_pointers(lc.b);
    prefetch_block();
  };

  // ---- State. ----------------------------------------------------------------------------------------
  // Warp-private state over all of head_dim (rows gid and gid + 8 of the group), fed by cold blocks and
  // dense chunks alike; the warps' states merge when a (sequence, head) segment ends. For groups of at most
  // 8 heads, rows 8..15 hold no head: the cold blocks' projections (and BF16 P·V) accumulate the low halves
  // of their operand there (row gid + 8 carries head gid's correction), one MMA per tile instead of two,
  // and the row is added to row gid when the segment ends. Such rows are rescaled with their head.
  float o_d[kDTiles][4];
  float m_d[2], l_d[2];
  float qscale = 0.0f;  // score_scale * 2^e: undoes the normalisation of the FP16 query
  auto reset_state = [&]() {
#pragma unroll
    for (int i = 0; i < kDTiles; ++i) o_d[i][0] = o_d[i][1] = o_d[i][2] = o_d[i][3] = 0.0f;
    m_d[0] = m_d[1] = -INFINITY;
    l_d[0] = l_d[1] = 0.0f;
  };
  // o *= α per row (rows gid and gid + 8). The running max rarely moves after the first items: the
  // multiplies are skipped when no lane of the warp needs them.
  auto rescale_state = [&](const float (&al)[2]) {
    if (__any_sync(0xffffffffu, al[0] != 1.0f || al[1] != 1.0f)) {
#pragma unroll
      for (int n = 0; n < kDTiles; ++n) {
        o_d[n][0] *= al[0];
        o_d[n][1] *= al[0];
        o_d[n][2] *= al[1];
        o_d[n][3] *= al[1];
      }
    }
  };

  // Query fragments of (b, h): A operands of m16n8k16, entry [kd][lane] = rows gid/gid+8, columns
  // 16kd + 2tig (+1) and +8 (+9). Rows >= g are zero.
  constexpr int kQPasses = (32 * kKd + kThreads - 1) / kThreads;  // fragment entries per thread
  // The query's global loads are separate from the rest so that the first segment's can be issued before the
  // prologue's copies, which wait for the first block-table entry: the two round trips then overlap.
  using QRaw = std::uint32_t[kQPasses][4];
  auto load_q = [&](int b, int h, QRaw& raw) {
#pragma unroll
    for (int ip = 0; ip < kQPasses; ++ip) {
      const int idx = tid + kThreads * ip;
      raw[ip][0] = raw[ip][1] = raw[ip][2] = raw[ip][3] = 0u;
      if (idx < 32 * kKd) {
        const int kd = idx / 32, ln = idx % 32;
        const int r0 = ln >> 2, c0 = 16 * kd + 2 * (ln & 3);
        const std::uint32_t* qp = static_cast<const std::uint32_t*>(a.q);
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int r = r0 + 8 * (k & 1);
          const int col = c0 + 8 * (k >> 1);
          if (r < g) raw[ip][k] = __ldg(qp + (((static_cast<long long>(b) * H + h) * g + r) * D + col) / 2);
        }
      }
    }
  };
  auto begin_segment = [&](const QRaw& raw) {
    float v[kQPasses][8];
    float mx = 0.0f;
#pragma unroll
    for (int ip = 0; ip < kQPasses; ++ip) {
      const int idx = tid + kThreads * ip;
      if (idx < 32 * kKd) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const float2 f = unpack2<T>(raw[ip][k]);
          v[ip][2 * k] = f.x;
          v[ip][2 * k + 1] = f.y;
          mx = fmaxf(mx, fmaxf(fabsf(f.x), fabsf(f.y)));
        }
      }
    }
    if constexpr (kCold) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      if (lane == 0) misc[warp] = mx;
      __syncthreads();
      mx = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, misc[w]);
      // Power-of-two normalisation: exact, and keeps a BF16 query inside FP16's range.
      const int e = mx > 0.0f ? ilogbf(mx) : 0;
      qscale = ldexpf(a.score_scale, e);
#pragma unroll
      for (int ip = 0; ip < kQPasses; ++ip) {
        const int idx = tid + kThreads * ip;
        if (idx < 32 * kKd) {
          uint4 f;
          f.x = pack2<__half>(ldexpf(v[ip][0], -e), ldexpf(v[ip][1], -e));
          f.y = pack2<__half>(ldexpf(v[ip][2], -e), ldexpf(v[ip][3], -e));
          f.z = pack2<__half>(ldexpf(v[ip][4], -e), ldexpf(v[ip][5], -e));
          f.w = pack2<__half>(ldexpf(v[ip][6], -e), ldexpf(v[ip][7], -e));
          qf[idx] = f;
        }
      }
    }
#pragma unroll
    for (int ip = 0; ip < kQPasses; ++ip) {
      const int idx = tid + kThreads * ip;
      if (idx < 32 * kKd) qt[idx] = make_uint4(raw[ip][0], raw[ip][1], raw[ip][2], raw[ip][3]);
    }
    reset_state();
    __syncthreads();
  };

  // ---- Dense chunk: this warp's 16-token tiles, warp-private online softmax. -----------------------
  // Scores of a tile are two m16n8k16 n-tiles (tokens 0-7 and 8-15); their 16 weights per row are the
  // A operand of one m16n8k16 per head_dim n-tile for P·V, so a tile costs one softmax update and
  // kDTiles MMAs for 16 tokens.
  auto dense_item = [&](const unsigned char* st, int nvalid) {
    const std::uint32_t sk = smem_u32(st);
    const std::uint32_t sv = sk + kChunk * kRowD;
    // Swizzled pieces (kRowD): every row address below is 8-aligned plus lane % 8, so piece c lies at
    // c ^ (lane % 8); c's lane-dependent low bits and compile-time high bits are disjoint.
    const int xk = (lane >> 3) ^ (lane & 7);
    const int xv = (lane >> 4) ^ (lane & 7);
#pragma unroll 1
    for (int tw = warp; tw < kChunk / 16; tw += kWarps) {
      float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
      for (int kd2 = 0; kd2 < kKd / 2; ++kd2) {
        const uint4 q0 = qt[(2 * kd2) * 32 + lane];
        const uint4 q1 = qt[(2 * kd2 + 1) * 32 + lane];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          std::uint32_t r[4];
          ldsm_x4(sk + (16 * tw + 8 * h + (lane & 7)) * kRowD + ((4 * kd2) ^ xk) * 16, r);
          mma16816<T>(s[h], q0.x, q0.y, q0.z, q0.w, r[0], r[1]);
          mma16816<T>(s[h], q1.x, q1.y, q1.z, q1.w, r[2], r[3]);
        }
      }
      // Lane (gid, tig) holds tokens 16tw + 8h + 2tig (+1) of rows gid (s[h][0..1]) and gid + 8 (s[h][2..3]).
      const int tok = 16 * tw + 2 * tig;
      const bool v00 = tok < nvalid, v01 = tok + 1 < nvalid, v10 = tok + 8 < nvalid, v11 = tok + 9 < nvalid;
      float p[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}}, al[2] = {1.0f, 1.0f};
#pragma unroll
      for (int row = 0; row < 2; ++row) {
        if (row == 1 && !hi_rows) break;
        const float x0 = v00 ? s[0][2 * row] * a.score_scale : -INFINITY;
        const float x1 = v01 ? s[0][2 * row + 1] * a.score_scale : -INFINITY;
        const float x2 = v10 ? s[1][2 * row] * a.score_scale : -INFINITY;
        const float x3 = v11 ? s[1][2 * row + 1] * a.score_scale : -INFINITY;
        const float mx = quad_max(fmaxf(fmaxf(x0, x1), fmaxf(x2, x3)));
        const float mn = fmaxf(m_d[row], mx);
        const float mu = finite_or_zero(mn);
        al[row] = fast_exp2(m_d[row] - mu);
        p[0][2 * row] = fast_exp2(x0 - mu);
        p[0][2 * row + 1] = fast_exp2(x1 - mu);
        p[1][2 * row] = fast_exp2(x2 - mu);
        p[1][2 * row + 1] = fast_exp2(x3 - mu);
        l_d[row] = l_d[row] * al[row] + ((p[0][2 * row] + p[0][2 * row + 1]) + (p[1][2 * row] + p[1][2 * row + 1]));
        m_d[row] = mn;
      }
      if (!hi_rows) al[1] = al[0];  // row gid + 8 holds head gid's projection remainders
      // A operand of P·V: (row gid, tokens 2tig..), (gid + 8, 2tig..), (gid, 2tig + 8..), (gid + 8, 2tig + 8..).
      std::uint32_t pa[4] = {pack2<T>(p[0][0], p[0][1]), pack2<T>(p[0][2], p[0][3]), pack2<T>(p[1][0], p[1][1]),
                             pack2<T>(p[1][2], p[1][3])};
      std::uint32_t pl[4] = {0u, 0u, 0u, 0u};
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        // BF16 keeps 8 bits of p; the remainder as a second BF16 operand brings P to ~16 bits. For groups of
        // at most 8 heads the remainder of row gid takes the padding row gid + 8 (see the state): one MMA.
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float2 h = unpack2<T>(pa[i]);
          pl[i] = pack2<T>(p[i >> 1][2 * (i & 1)] - h.x, p[i >> 1][2 * (i & 1) + 1] - h.y);
        }
        if (!hi_rows) {
          pa[1] = pl[0];
          pa[3] = pl[2];
        }
      }
      rescale_state(al);
      // B operands: one x4 transposed load gives tokens 0-7 and 8-15 of two head_dim n-tiles.
#pragma unroll
      for (int n2 = 0; n2 < kDTiles / 2; ++n2) {
        std::uint32_t r[4];
        ldsm_x4_t(sv + (16 * tw + (lane & 7) + 8 * ((lane >> 3) & 1)) * kRowD + ((2 * n2) ^ xv) * 16, r);
        mma16816<T>(o_d[2 * n2], pa[0], pa[1], pa[2], pa[3], r[0], r[1]);
        mma16816<T>(o_d[2 * n2 + 1], pa[0], pa[1], pa[2], pa[3], r[2], r[3]);
        if (std::is_same_v<T, __nv_bfloat16> && hi_rows) {
          mma16816<T>(o_d[2 * n2], pl[0], pl[1], pl[2], pl[3], r[0], r[1]);
          mma16816<T>(o_d[2 * n2 + 1], pl[0], pl[1], pl[2], pl[3], r[2], r[3]);
        }
      }
    }
  };

  // ---- Cold block: dual-spectral attention for the whole group, into this warp's private state. ----
  // hi_tag: true when the group has more than 8 query heads, so rows 8..15 of the MMA tiles are heads;
  // otherwise they are padding, and the softmax and projection work of those rows is compiled out.
  auto cold_item = [&](const unsigned char* st, auto hi_tag) {
    if constexpr (kCold) {
      constexpr bool kHi = decltype(hi_tag)::value;
      constexpr int kRows = kHi ? 2 : 1;  // accumulator rows (gid, gid + 8) that may hold query heads
      constexpr int kKT = Tr::kKT, kVT = Tr::kVT, kRKs = Tr::kRKs, kRVs = Tr::kRVs;
      const std::uint32_t sb = smem_u32(st);
      const unsigned char* reg = st + Tr::kBaseRows * kRow;
      const float* scale_k = reinterpret_cast<const float*>(reg);
      const float* scale_v = reinterpret_cast<const float*>(reg + a.reg_scale_v);
      const unsigned char* ck = reg + a.reg_coeff_k;
      const unsigned char* cv = reg + a.reg_coeff_v;
      const bool has_mean = a.has_mean != 0;
      if (warp * 16 >= a.block_size) return;  // no 16-token step of this block is this warp's

      // (A) W = q·B_Kᵀ (and q·mean_k), accumulators in the layout the score MMA takes as A.
      float wk[kKT][4];
      float wm[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int nt = 0; nt < kKT; ++nt) wk[nt][0] = wk[nt][1] = wk[nt][2] = wk[nt][3] = 0.0f;
#pragma unroll
      for (int kd2 = 0; kd2 < kKd / 2; ++kd2) {
        const uint4 q0 = qf[(2 * kd2) * 32 + lane];
        const uint4 q1 = qf[(2 * kd2 + 1) * 32 + lane];
        const int col = (4 * kd2 + (lane >> 3)) * 16;
#pragma unroll
        for (int nt = 0; nt < kKT; ++nt) {
          std::uint32_t r[4];
          ldsm_x4(sb + (8 * nt + (lane & 7)) * kRow + col, r);
          mma16816<__half>(wk[nt], q0.x, q0.y, q0.z, q0.w, r[0], r[1]);
          mma16816<__half>(wk[nt], q1.x, q1.y, q1.z, q1.w, r[2], r[3]);
        }
        if (has_mean) {
          std::uint32_t r[4];
          ldsm_x4(sb + (RK + RV) * kRow + col, r);  // every row address is the mean row
          mma16816<__half>(wm, q0.x, q0.y, q0.z, q0.w, r[0], r[1]);
          mma16816<__half>(wm, q1.x, q1.y, q1.z, q1.w, r[2], r[3]);
        }
      }
      // Without kHi the lo halves take the padding rows 8..15: one MMA gives a score's high part in row gid
      // and its low part in row gid + 8, and the two are added.
      std::uint32_t wa_hi[kRKs][4];
      [[maybe_unused]] std::uint32_t wa_lo[kRKs][4];
#pragma unroll
      for (int nt = 0; nt < kKT; ++nt) {
        const float s0 = scale_k[Tr::sigma(nt, 2 * tig)] * qscale;
        const float s1 = scale_k[Tr::sigma(nt, 2 * tig + 1)] * qscale;
        const int ks = RK == 8 ? 0 : nt >> 1;
        const int e = RK == 8 ? 0 : nt & 1;
        if constexpr (kHi) {
          split_half2(wk[nt][0] * s0, wk[nt][1] * s1, wa_hi[ks][2 * e], wa_lo[ks][2 * e]);
          split_half2(wk[nt][2] * s0, wk[nt][3] * s1, wa_hi[ks][2 * e + 1], wa_lo[ks][2 * e + 1]);
        } else {
          split_half2(wk[nt][0] * s0, wk[nt][1] * s1, wa_hi[ks][2 * e], wa_hi[ks][2 * e + 1]);
        }
      }
      // The score MMAs see the coefficients as kCoeffBias + c, so a row's raw scores exceed its scores by
      // kCoeffBias·ΣW over the FP16 W values that row's MMAs use (hi and lo). That sum, and q·mean_k, go into
      // the running max instead of into every score. FP32 keeps ~2^-24 of the biased values, about 2^-19 of
      // a typical score (the bias is ~30× a score for coefficients spread over the INT8 range), an error
      // far below the FP16 rounding of the output.
      float wsum[2] = {0.0f, 0.0f};
#pragma unroll
      for (int ks = 0; ks < kRKs; ++ks) {
#pragma unroll
        for (int e = 0; e < (RK == 8 ? 1 : 2); ++e) {
          if constexpr (kHi) {
            wsum[0] += half2_sum(wa_hi[ks][2 * e]) + half2_sum(wa_lo[ks][2 * e]);
            wsum[1] += half2_sum(wa_hi[ks][2 * e + 1]) + half2_sum(wa_lo[ks][2 * e + 1]);
          } else {
            wsum[0] += half2_sum(wa_hi[ks][2 * e]) + half2_sum(wa_hi[ks][2 * e + 1]);
          }
        }
      }
      const float qm[2] = {(has_mean ? wm[0] * qscale : 0.0f) - kCoeffBias * quad_sum(wsum[0]),
                           kHi ? (has_mean ? wm[2] * qscale : 0.0f) - kCoeffBias * quad_sum(wsum[1]) : 0.0f};

      // C_V fragments for RV >= 16 come from transposed ldmatrix: matrix m = 2h + e holds 8 token rows of
      // 16 bytes (ranks 16h..16h+15) of the 8-token half e of a 16-token step, row ρ being token
      // 8e + ρ/2 + 4(ρ%2). A lane (gid, tig) then receives ranks 16h + 2gid and 16h + 2gid + 1 of tokens
      // tig and tig + 4, the two k-slots of its P operand, in one 32-bit register: one byte permute per
      // pair of values instead of a permute, a mask and an xor (RV = 8 rows are too short for ldmatrix).
      constexpr bool kVLdsm = RV >= 16;
      [[maybe_unused]] std::uint32_t cv_lane = 0;
      if constexpr (kVLdsm) {
        const int m = (lane >> 3) & (RV >= 32 ? 3 : 1);
        const int rho = lane & 7;
        cv_lane = smem_u32(cv) + static_cast<std::uint32_t>((8 * (m & 1) + (rho >> 1) + 4 * (rho & 1)) * RV + 16 * (m >> 1));
      }

      // (B-D) scores, softmax, PC = P·C_V over this warp's 16-token steps ks = warp, warp + kWarps, ...
      float pc[kVT][4];
#pragma unroll
      for (int i = 0; i < kVT; ++i) pc[i][0] = pc[i][1] = pc[i][2] = pc[i][3] = 0.0f;
      // ps: P·1 by one more MMA per step, i.e. Σp over the FP16 weights the PC MMAs use (row gid in ps[0],
      // gid + 8 in ps[2]): the sum the C_V bias comes back out with, and the softmax denominator.
      float ps[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      float mw[2] = {-INFINITY, -INFINITY};
      const int L = a.block_size;
      const int nks = (L + 15) / 16;
      // One group of kKStepsPerGroup 16-token steps; kFull: every step lies inside the block, so the
      // range checks compile away (all groups but the last of a block whose size is a multiple of 16).
      auto score_group = [&](int ks0, auto full_tag) {
        constexpr bool kFull = decltype(full_tag)::value;
        // Raw scores W·C_Kᵀ (without q·mean_k); s[u][e][2 ri + c] is row gid + 8 ri.
        float s[kKStepsPerGroup][2][2 * kRows];
#pragma unroll
        for (int u = 0; u < kKStepsPerGroup; ++u) {
          const int ks = ks0 + kWarps * u;
#pragma unroll
          for (int e = 0; e < 2; ++e) {
#pragma unroll
            for (int c = 0; c < 2 * kRows; ++c) s[u][e][c] = -INFINITY;
            if (kFull || ks < nks) {
              float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
              // n-tile column n holds token 16ks + 8e + 4(n&1) + (n>>1): then lane (gid, tig) scores tokens
              // tig and tig + 4 of the half, the tokens its C_V fragment holds.
              const int row = 16 * ks + 8 * e + 4 * (gid & 1) + (gid >> 1);
              std::uint32_t w[(Tr::kKBytes + 3) / 4];
              load_bytes<Tr::kKBytes>(ck + row * RK + Tr::kKBytes * tig, w);
              if constexpr (RK == 8) {
                std::uint32_t b0, unused;
                i8x4_to_half2_biased(w[0], b0, unused);
                mma1688_f16(acc, wa_hi[0][0], wa_hi[0][1], b0);
                if constexpr (kHi) mma1688_f16(acc, wa_lo[0][0], wa_lo[0][1], b0);
              } else {
#pragma unroll
                for (int kk = 0; kk < kRKs; ++kk) {
                  std::uint32_t b0, b1;
                  i8x4_to_half2_biased(w[kk], b0, b1);
                  mma16816<__half>(acc, wa_hi[kk][0], wa_hi[kk][1], wa_hi[kk][2], wa_hi[kk][3], b0, b1);
                  if constexpr (kHi)
                    mma16816<__half>(acc, wa_lo[kk][0], wa_lo[kk][1], wa_lo[kk][2], wa_lo[kk][3], b0, b1);
                }
              }
              if constexpr (!kHi) {
                acc[0] += acc[2];
                acc[1] += acc[3];
              }
              const int tok = 16 * ks + 8 * e + tig;
#pragma unroll
              for (int ri = 0; ri < kRows; ++ri) {
                if (kFull || tok < L) s[u][e][2 * ri] = acc[2 * ri];
                if (kFull || tok + 4 < L) s[u][e][2 * ri + 1] = acc[2 * ri + 1];
              }
            }
          }
        }
        // Per row: the new running max (q·mean_k added to the raw max) and mu = max - q·mean_k, so that
        // p = exp2(raw - mu) = exp2(score - max).
        float mu[2] = {0.0f, 0.0f};
#pragma unroll
        for (int ri = 0; ri < kRows; ++ri) {
          float mx = -INFINITY;
#pragma unroll
          for (int u = 0; u < kKStepsPerGroup; ++u)
#pragma unroll
            for (int e = 0; e < 2; ++e) mx = fmaxf(mx, fmaxf(s[u][e][2 * ri], s[u][e][2 * ri + 1]));
          mx = quad_max(mx) + qm[ri];
          const float mn = fmaxf(mw[ri], mx);
          const float mref = finite_or_zero(mn);
          mu[ri] = mref - qm[ri];
          const float al = fast_exp2(mw[ri] - mref);
          mw[ri] = mn;
          if (ks0 != warp) {  // accumulators are still zero in the first group
            ps[2 * ri] *= al;
#pragma unroll
            for (int i = 0; i < kVT; ++i) {
              pc[i][2 * ri] *= al;
              pc[i][2 * ri + 1] *= al;
            }
          }
        }
#pragma unroll
        for (int u = 0; u < kKStepsPerGroup; ++u) {
          const int ks = ks0 + kWarps * u;
          if (kFull || ks < nks) {
            // p[e][2 ri + c]: row gid + 8 ri, token 16ks + 8e + tig + 4c.
            float p[2][2 * kRows];
#pragma unroll
            for (int e = 0; e < 2; ++e)
#pragma unroll
              for (int c = 0; c < 2 * kRows; ++c) p[e][c] = fast_exp2(s[u][e][c] - mu[c >> 1]);
            // A operand: (row gid, k-slots 2tig, 2tig + 1) = tokens tig, tig + 4 of half 0; (gid + 8, same);
            // then the same for half 1 (k-slots 2tig + 8, 2tig + 9). Rows 8..15 are zero without kHi.
            const std::uint32_t pa0 = pack2<__half>(p[0][0], p[0][1]);
            const std::uint32_t pa2 = pack2<__half>(p[1][0], p[1][1]);
            std::uint32_t pa1 = 0u, pa3 = 0u;
            if constexpr (kHi) {
              pa1 = pack2<__half>(p[0][2], p[0][3]);
              pa3 = pack2<__half>(p[1][2], p[1][3]);
            }
            if constexpr (kVLdsm) {
              constexpr int kMats = RV / 8;  // (half e, 16-rank slice h) pairs
              std::uint32_t r[kMats];
              const std::uint32_t addr = cv_lane + static_cast<std::uint32_t>(16 * ks * RV);
              if constexpr (RV == 16) {
                ldsm_x2_t(addr, r[0], r[1]);
              } else {
#pragma unroll
                for (int x = 0; x < RV / 32; ++x) {
                  std::uint32_t q4[4];
                  ldsm_x4_t(addr + 32 * x, q4);
#pragma unroll
                  for (int y = 0; y < 4; ++y) r[4 * x + y] = q4[y];
                }
              }
#pragma unroll
              for (int x = 0; x < kMats; ++x) r[x] ^= 0x80808080u;
#pragma unroll
              for (int i = 0; i < kVT; ++i) {
                // n-tile i: ranks 16(i/2) + 2n + i%2; bytes 0 and 2 (even rank) or 1 and 3 (odd rank) become
                // the mantissas of half(1024 + u), as in i8x4_to_half2_biased.
                const std::uint32_t sel = (i & 1) ? 0x4341u : 0x4240u;
                const std::uint32_t b0 = __byte_perm(r[2 * (i >> 1)], 0x64646464u, sel);
                const std::uint32_t b1 = __byte_perm(r[2 * (i >> 1) + 1], 0x64646464u, sel);
                mma16816<__half>(pc[i], pa0, pa1, pa2, pa3, b0, b1);
              }
            } else {
              // RV = 8: k-slot 2t+j (j = 0, 1) is token 16ks + 4j + t; k-slot 2t+8+j is token 16ks + 8 + 4j + t.
              std::uint32_t w[2][2][1];
#pragma unroll
              for (int e = 0; e < 2; ++e)
#pragma unroll
                for (int j = 0; j < 2; ++j)
                  load_bytes<Tr::kVBytes>(cv + (16 * ks + 8 * e + 4 * j + tig) * RV + Tr::kVBytes * gid, w[e][j]);
              const std::uint32_t b0 = i8pair_to_half2_biased(w[0][0][0], w[0][1][0], 0);
              const std::uint32_t b1 = i8pair_to_half2_biased(w[1][0][0], w[1][1][0], 0);
              mma16816<__half>(pc[0], pa0, pa1, pa2, pa3, b0, b1);
            }
            constexpr std::uint32_t kOnes = 0x3C003C00u;  // half2(1, 1)
            mma16816<__half>(ps, pa0, pa1, pa2, pa3, kOnes, kOnes);
          }
        }
      };
      for (int ks0 = warp; ks0 < nks; ks0 += kWarps * kKStepsPerGroup) {
        if (16 * (ks0 + kWarps * (kKStepsPerGroup - 1)) + 16 <= L) {
          score_group(ks0, std::true_type{});
        } else {
          score_group(ks0, std::false_type{});
        }
      }

      // (E) The warp's partial of this block goes straight into its private state (the state dense chunks
      // use), so warps never wait for each other inside a block:
      //   m = max(m, mw);  o = α·o + (β·PC·diag(scale_v))·B_V (+ β·Σp·mean_v);  l = α·l + β·Σp.
      // PC column n of n-tile i is rank Tr::pc_rank(i, n); the loader stored B_V row j in smem slot
      // vslot(j), so the projection's k-steps read 16 consecutive slots.
      float al[2] = {1.0f, 1.0f}, be[2] = {0.0f, 0.0f};
#pragma unroll
      for (int ri = 0; ri < kRows; ++ri) {  // without kHi, rows 8..15 are padding: their m and l stay unused
        const float mn = fmaxf(m_d[ri], mw[ri]);
        const float mref = finite_or_zero(mn);
        al[ri] = fast_exp2(m_d[ri] - mref);
        be[ri] = fast_exp2(mw[ri] - mref);
        // ps is the row's whole sum in every lane of the quad; l_d holds per-lane parts (quad-summed when the
        // segment ends), so each lane adds a quarter (exact).
        l_d[ri] = al[ri] * l_d[ri] + be[ri] * (0.25f * ps[2 * ri]);
        m_d[ri] = mn;
      }
      if constexpr (!kHi) al[1] = al[0];  // row gid + 8 holds head gid's projection remainders
      rescale_state(al);
      // β·scale_v·PC as FP16 hi + lo A operands of the projection (C fragment -> A fragment in place). Without
      // kHi the lo halves take the padding rows 8..15 (see the state above): one MMA per tile.
      std::uint32_t pa_hi[kRVs][4];
      [[maybe_unused]] std::uint32_t pa_lo[kRVs][4];
      // PC and Σp are FP32 sums of up to 1279·Σp, so the difference keeps ~2^-24 of that: relative to PC,
      // ~2^-24·1279/|c̄| for a p-weighted mean coefficient c̄; worst with flat attention over values whose
      // coefficients cancel (test DiffuseAttentionOverLongContext: 3.4e-4 of the output row's scale there,
      // against 1.8e-4 with the bias subtracted per pair; see docs/PERFORMANCE.md).
      const float pc_bias[2] = {kCoeffBias * ps[0], kCoeffBias * ps[2]};
#pragma unroll
      for (int i = 0; i < kVT; ++i) {
        const float sv0 = scale_v[Tr::pc_rank(i, 2 * tig)];
        const float sv1 = scale_v[Tr::pc_rank(i, 2 * tig + 1)];
        const int kp = RV == 8 ? 0 : i >> 1;
        const int hh = RV == 8 ? 0 : i & 1;
        // PC = P·(kCoeffBias + C) - kCoeffBias·Σp, the bias taken out before the scales.
        const float x0 = (pc[i][0] - pc_bias[0]) * (sv0 * be[0]), x1 = (pc[i][1] - pc_bias[0]) * (sv1 * be[0]);
        if constexpr (kHi) {
          split_half2(x0, x1, pa_hi[kp][2 * hh], pa_lo[kp][2 * hh]);
          split_half2((pc[i][2] - pc_bias[1]) * (sv0 * be[1]), (pc[i][3] - pc_bias[1]) * (sv1 * be[1]),
                      pa_hi[kp][2 * hh + 1], pa_lo[kp][2 * hh + 1]);
        } else {
          split_half2(x0, x1, pa_hi[kp][2 * hh], pa_hi[kp][2 * hh + 1]);
        }
      }
      if constexpr (RV == 8) {
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          std::uint32_t b0;
          ldsm_x1_t(sb + (RK + (lane & 7)) * kRow + dt * 16, b0);
          mma1688_f16(o_d[dt], pa_hi[0][0], pa_hi[0][1], b0);
          if constexpr (kHi) mma1688_f16(o_d[dt], pa_lo[0][0], pa_lo[0][1], b0);
        }
      } else {
        // One transposed x4 load gives the B fragments of two head_dim tiles (lanes 16..31 address the
        // second): 16-rank slice kp, tiles 2·dt2 and 2·dt2 + 1.
        const std::uint32_t bv_lane = sb + (RK + (lane & 15)) * kRow + (lane >> 4) * 16;
#pragma unroll
        for (int dt2 = 0; dt2 < kDTiles / 2; ++dt2) {
#pragma unroll
          for (int kp = 0; kp < kRVs; ++kp) {
            std::uint32_t r[4];
            ldsm_x4_t(bv_lane + 16 * kp * kRow + dt2 * 32, r);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              float (&o)[4] = o_d[2 * dt2 + h];
              mma16816<__half>(o, pa_hi[kp][0], pa_hi[kp][1], pa_hi[kp][2], pa_hi[kp][3], r[2 * h], r[2 * h + 1]);
              if constexpr (kHi)
                mma16816<__half>(o, pa_lo[kp][0], pa_lo[kp][1], pa_lo[kp][2], pa_lo[kp][3], r[2 * h], r[2 * h + 1]);
            }
          }
        }
      }
      if (has_mean) {
        const float l0 = ps[0] * be[0];
        const float l1 = kHi ? ps[2] * be[1] : 0.0f;
        const unsigned char* mean_v = st + (RK + RV + 1) * kRow;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          const float2 mv = __half22float2(*reinterpret_cast<const __half2*>(mean_v + (8 * dt + 2 * tig) * 2));
          o_d[dt][0] += l0 * mv.x;
          o_d[dt][1] += l0 * mv.y;
          if constexpr (kHi) {
            o_d[dt][2] += l1 * mv.x;
            o_d[dt][3] += l1 * mv.y;
          }
        }
      }
    }
  };

  // ---- End of a (sequence, head) segment: merge warp states, write the output or a partial. --------
  auto finalize = [&](int b, int h, int n_items) {
    const long long p = static_cast<long long>(b) * H + h;
    const long long start = static_cast<long long>(H) * prefix[b] + static_cast<long long>(h) * n_items;
    const SegmentMap map(total, G, start, n_items, p);
    const long long nseg = map.nseg;
    const long long slot = static_cast<long long>(blockIdx.x) + p;

    l_d[0] = quad_sum(l_d[0]);
    l_d[1] = quad_sum(l_d[1]);
    if ((kCold || std::is_same_v<T, __nv_bfloat16>) && !hi_rows) {  // fold rows 8..15's remainders into their heads
#pragma unroll
      for (int n = 0; n < kDTiles; ++n) {
        o_d[n][0] += o_d[n][2];
        o_d[n][1] += o_d[n][3];
      }
    }
    float2* wml = reinterpret_cast<float2*>(work);  // [kWarps][16]
    float* wo = work + 2 * kWarps * kMaxGroup;       // [kWarps][g][D]
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const int r = gid + 8 * ri;
      if (r < g) {
#pragma unroll
        for (int n = 0; n < kDTiles; ++n)
          *reinterpret_cast<float2*>(wo + (warp * g + r) * D + 8 * n + 2 * tig) =
              make_float2(o_d[n][2 * ri], o_d[n][2 * ri + 1]);
      }
      if (tig == 0) wml[warp * kMaxGroup + r] = make_float2(m_d[ri], l_d[ri]);
    }
    __syncthreads();
#pragma unroll
    for (int ri = 0; ri < 2; ++ri) {
      const int r = gid + 8 * ri;
      if (r >= g) continue;
      float m = -INFINITY;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) m = fmaxf(m, wml[w * kMaxGroup + r].x);
      const float mref = finite_or_zero(m);
      float f[kWarps];
      float l = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float2 ml = wml[w * kMaxGroup + r];
        f[w] = fast_exp2(ml.x - mref);
        l += f[w] * ml.y;
      }
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
#pragma unroll
      for (int sl = 0; sl < kSlice; ++sl) {
        const int d = 8 * (warp * kSlice + sl) + 2 * tig;
        float2 acc = make_float2(0.0f, 0.0f);
#pragma unroll
        for (int w = 0; w < kWarps; ++w) {
          const float2 v = *reinterpret_cast<const float2*>(wo + (w * g + r) * D + d);
          acc.x += f[w] * v.x;
          acc.y += f[w] * v.y;
        }
        acc.x *= inv;
        acc.y *= inv;
        if (nseg == 1) {
          const long long e = ((static_cast<long long>(b) * H + h) * g + r) * D + d;
          static_cast<std::uint32_t*>(a.out)[e / 2] = pack2<T>(acc.x, acc.y);
        } else {
          *reinterpret_cast<float2*>(a.partial_o + (slot * g + r) * D + d) = acc;
        }
      }
      if (nseg > 1 && warp == 0 && tig == 0) a.partial_ml[slot * g + r] = make_float2(m, l);
    }
    if (nseg > 1 && a.merge_in_kernel) {
      __threadfence();
      __syncthreads();
      int* flag = reinterpret_cast<int*>(misc + kWarps);
      if (tid == 0) *flag = atomicAdd(a.counters + p, 1u) == static_cast<unsigned>(nseg - 1);
      __syncthreads();
      if (*flag) {
        __threadfence();
        // Online log-sum-exp over the segments, eight at a time for two output elements per thread, so
        // that 32 L2 loads are in flight together: each dependent round trip costs about a microsecond
        // after an L2 flush, and this merge is on the critical path at small B·T.
        constexpr int kBatch = 8;
        constexpr int kPer = 2;
        for (int e0 = tid; e0 < g * (D / 2); e0 += kPer * kThreads) {
          int r[kPer], d[kPer];
          bool ok[kPer];
          float m[kPer], l[kPer], acc[kPer][2];
#pragma unroll
          for (int k = 0; k < kPer; ++k) {
            const int e = e0 + k * kThreads;
            ok[k] = e < g * (D / 2);
            r[k] = ok[k] ? e / (D / 2) : 0;
            d[k] = ok[k] ? 2 * (e % (D / 2)) : 0;
            m[k] = -INFINITY;
            l[k] = 0.0f;
            acc[k][0] = acc[k][1] = 0.0f;
          }
          for (long long s0 = 0; s0 < nseg; s0 += kBatch) {
            const int n = static_cast<int>(min(static_cast<long long>(kBatch), nseg - s0));
            float2 ml[kPer][kBatch];
            float v[kPer][kBatch][2];
#pragma unroll
            for (int u = 0; u < kBatch; ++u) {
              const long long ss = u < n ? map.slot(s0 + u) : 0;
#pragma unroll
              for (int k = 0; k < kPer; ++k) {
                ml[k][u] = make_float2(-INFINITY, 0.0f);  // padding entries weigh nothing
                float2 o = make_float2(0.0f, 0.0f);
                if (u < n && ok[k]) {
                  ml[k][u] = __ldcg(a.partial_ml + ss * g + r[k]);
                  o = __ldcg(reinterpret_cast<const float2*>(a.partial_o + (ss * g + r[k]) * D + d[k]));
                }
                v[k][u][0] = o.x;
                v[k][u][1] = o.y;
              }
            }
#pragma unroll
            for (int k = 0; k < kPer; ++k) fold_partials(m[k], l[k], acc[k], ml[k], v[k]);
          }
#pragma unroll
          for (int k = 0; k < kPer; ++k) {
            if (!ok[k]) continue;
            const float inv = l[k] > 0.0f ? 1.0f / l[k] : 0.0f;
            const long long oe = ((static_cast<long long>(b) * H + h) * g + r[k]) * D + d[k];
            static_cast<std::uint32_t*>(a.out)[oe / 2] = pack2<T>(acc[k][0] * inv, acc[k][1] * inv);
          }
        }
        if (tid == 0) a.counters[p] = 0u;  // ready for the next launch with this workspace
      }
    }
  };

  // Finalizes the pair that ends just before cursor c: the previous pair when c starts one, else c's own
  // (the cursor after a CTA's last item).
  auto finalize_before = [&](const Cursor& c) {
    int b = c.b, h = c.h;
    if (c.local == 0) {
      if (h == 0) {
        b -= 1;
        h = H - 1;
      } else {
        h -= 1;
      }
    }
    finalize(b, h, prefix[b + 1] - prefix[b]);
  };

  // ---- Main loop. -----------------------------------------------------------------------------------
  Cursor cc = lc;  // the loader has not moved yet
  {
    QRaw raw;
    load_q(cc.b, cc.h, raw);
    for (int s = 0; s < S - 1; ++s) {
      if (lx < x1) issue();
      cp_async_commit();
    }
    begin_segment(raw);
  }
  int cs = 0;              // stage of item x
  std::uint32_t cpar = 0;  // parity of its barrier phase
  for (long long x = x0; x < x1; ++x) {
    cp_async_wait(S - 2);  // this thread's copies of item x have landed
    __syncthreads();       // ... every thread's; and every warp is done with item x - 1, whose stage is refilled next
    if (lx < x1) issue();
    cp_async_commit();
    if (x != x0 && cc.local == 0) {  // a new (sequence, head) starts
      finalize_before(cc);
      __syncthreads();
      QRaw raw;
      load_q(cc.b, cc.h, raw);
      begin_segment(raw);
    }
    const unsigned char* st = stage0 + cs * a.stage_bytes;
    mbar_wait(bar0 + 8 * cs, cpar);
    const Item it = decode(cc);
    if (it.kind == 0) {
      if (hi_rows) {
        cold_item(st, std::true_type{});
      } else {
        cold_item(st, std::false_type{});
      }
    } else if (it.kind == 1) {
      const int len = seqs[cc.b].len[it.tier];
      dense_item(st, min(kChunk, len - it.idx * kChunk));
    }
    advance(cc);
    if (++cs == S) {
      cs = 0;
      cpar ^= 1u;
    }
  }
  cp_async_wait(0);
  __syncthreads();
  finalize_before(cc);
}

// ---------------------------------------------------------------------------------------------------
// Split merge by a second kernel (KernelArgs::merge_in_kernel = 0, chosen when the pairs are few next to the
// CTAs): one CTA per (sequence, head) pair whose items span several CTAs of the attention kernel combines
// their partials (m, l, o) by log-sum-exp. It is the attention kernel's programmatic dependent: its CTAs are
// scheduled as the attention kernel's CTAs exit, recompute the work list from the lengths and block offsets
// (inputs, not written by the attention kernel) and wait for the attention grid to complete before they read
// the partials. Measured on an H200 (B = 1, T = 128K, 33 partials per head), the merge inside the attention
// kernel kept the last CTA of each pair busy for ~12 µs after its last item: the fence and the atomic, five
// dependent rounds of L2 loads, and the first fetch of the merge code after an L2 flush.

constexpr int kMergeThreads = 256;
/// Segments whose loads one thread has in flight at once. At batch 1 with 8 KV heads a pair has 33 partials on
/// an H200 (264 CTAs), which two ways of 20 take in one round (up to 40: 160 SMs); with 16 a second round of
/// one segment cost 0.5-1 µs (dense B=1, T=4K 17.4 → 16.6 µs, spectral B=1, T=128K 38.5 → 37.5). Registers
/// only: 152, no spills.
constexpr int kMergeBatch = 20;

template <class T, int D>
__global__ void __launch_bounds__(kMergeThreads) decode_merge_kernel(const __grid_constant__ KernelArgs a, int grid, int cold) {
  __shared__ long long red[4][kMergeThreads / 32];
  __shared__ float part[6][kMergeThreads];
  extern __shared__ int seg_slot[];  // [grid]
  const int tid = threadIdx.x;
  const int H = a.num_kv_heads;
  const int g = a.group;
  const int pair = blockIdx.x;
  const int b = pair / H;
  const int h = pair % H;

  // Items before sequence b, of b, of all sequences and of the longest: the attention kernel's work list.
  long long before = 0, all = 0, mine = 0, most = 0;
  for (int s = tid; s < a.batch; s += kMergeThreads) {
    SeqInfo si;
    const int n = sequence_items(a, s, cold != 0, si);
    all += n;
    most = max(most, static_cast<long long>(n));
    if (s < b) before += n;
    if (s == b) mine = n;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    before += __shfl_xor_sync(0xffffffffu, before, o);
    all += __shfl_xor_sync(0xffffffffu, all, o);
    mine += __shfl_xor_sync(0xffffffffu, mine, o);
    most = max(most, __shfl_xor_sync(0xffffffffu, most, o));
  }
  if ((tid & 31) == 0) {
    red[0][tid >> 5] = before;
    red[1][tid >> 5] = all;
    red[2][tid >> 5] = mine;
    red[3][tid >> 5] = most;
  }
  __syncthreads();
  before = all = mine = most = 0;
#pragma unroll
  for (int w = 0; w < kMergeThreads / 32; ++w) {
    before += red[0][w];
    all += red[1][w];
    mine += red[2][w];
    most = max(most, red[3][w]);
  }
  const long long ctas = sharing_ctas(H * all, grid, a.batch * H, static_cast<int>(most));
  const SegmentMap map(H * all, ctas, H * before + h * mine, mine, pair);
  // The partials' slots (nseg <= ctas <= grid), worked out while the attention grid still runs: computed
  // between the loads, the sparse case's division spaced them ~70 instructions apart, and the loads of 16
  // segments took ~2 µs after the wait (H200, B = 1).
  for (long long s = tid; s < map.nseg; s += kMergeThreads) seg_slot[s] = static_cast<int>(map.slot(s));
  __syncthreads();
  // Every CTA waits, even one with nothing to merge: this grid must not complete before the attention grid,
  // since work enqueued after it waits only for it.
  grid_dependency_wait();
  if (map.nseg <= 1) return;  // the attention kernel wrote this pair's output itself

  // Thread (way j, group e) merges segments j, j + W, ... of the 4 output elements e of the pair (row e / (D/4)),
  // kMergeBatch segments' loads in flight at once; the W ways then combine through shared memory.
  const int groups = g * (D / 4);
  const int ways = max(1, kMergeThreads / groups);
  const int per_way = kMergeThreads / ways;
  const int j = tid / per_way;
  for (int e0 = 0; e0 < groups; e0 += per_way) {
    const int e = e0 + tid % per_way;
    const bool active = e < groups && j < ways;
    const int r = active ? e / (D / 4) : 0;
    const int d = active ? 4 * (e % (D / 4)) : 0;
    float m = -INFINITY, l = 0.0f, acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (long long s0 = j; active && s0 < map.nseg; s0 += static_cast<long long>(ways) * kMergeBatch) {
      float2 ml[kMergeBatch];
      float v[kMergeBatch][4];
#pragma unroll
      for (int u = 0; u < kMergeBatch; ++u) {
        const long long s = s0 + static_cast<long long>(ways) * u;
        ml[u] = make_float2(-INFINITY, 0.0f);  // missing segments weigh nothing
        float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (s < map.nseg) {
          const long long slot = seg_slot[s];
          ml[u] = __ldcg(a.partial_ml + slot * g + r);
          o = __ldcg(reinterpret_cast<const float4*>(a.partial_o + (slot * g + r) * D + d));
        }
        v[u][0] = o.x;
        v[u][1] = o.y;
        v[u][2] = o.z;
        v[u][3] = o.w;
      }
      fold_partials(m, l, acc, ml, v);
    }
    part[0][tid] = m;
    part[1][tid] = l;
#pragma unroll
    for (int e = 0; e < 4; ++e) part[2 + e][tid] = acc[e];
    __syncthreads();
    if (j == 0 && active) {
      float mx = -INFINITY;
      for (int w = 0; w < ways; ++w) mx = fmaxf(mx, part[0][w * per_way + tid]);
      const float mref = finite_or_zero(mx);
      float lt = 0.0f;
      float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      for (int w = 0; w < ways; ++w) {
        const int t = w * per_way + tid;
        const float f = fast_exp2(part[0][t] - mref);
        lt += f * part[1][t];
        o.x += f * part[2][t];
        o.y += f * part[3][t];
        o.z += f * part[4][t];
        o.w += f * part[5][t];
      }
      const float inv = lt > 0.0f ? 1.0f / lt : 0.0f;
      const long long oe = (static_cast<long long>(pair) * g + r) * D + d;
      std::uint32_t* o32 = static_cast<std::uint32_t*>(a.out) + oe / 2;
      o32[0] = pack2<T>(o.x * inv, o.y * inv);
      o32[1] = pack2<T>(o.z * inv, o.w * inv);
    }
    __syncthreads();  // part[] is reused by the next groups
  }
}

/// Definition of the launcher declared in decode_kernel_args.cuh; the instantiation files instantiate it.
template <class T, int D, int RK, int RV>
void launch_decode(const KernelArgs& args, int grid, int smem_bytes, cudaStream_t stream) {
  auto* fn = decode_attention_kernel<T, D, RK, RV>;
  // The attribute is per function and device; setting it is cheap next to a launch but not free, so it is
  // raised only when a call needs more than any earlier one on this device.
  static int raised[64] = {};
  int device = 0;
  cudaGetDevice(&device);
  if (device < 64 && raised[device] < smem_bytes) {
    cudaError_t st = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    // Two CTAs per SM need the largest shared-memory carveout; the default may pick a smaller one.
    if (st == cudaSuccess)
      st = cudaFuncSetAttribute(fn, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    if (st != cudaSuccess) {
      cudaGetLastError();
      check(st, "cudaFuncSetAttribute(decode_attention_kernel)");
    }
    raised[device] = smem_bytes;
  }
  // Both grids are programmatic dependents of what precedes them on the stream (nothing is read before that
  // work has finished), so a grid's launch overlaps the end of the one before it.
  launch_programmatic("cudaLaunchKernelEx(decode_attention_kernel)", fn, dim3(static_cast<unsigned>(grid)),
                      dim3(DecodeTraits<T, D, RK, RV>::kThreads), static_cast<std::size_t>(smem_bytes), stream, args);
  if (args.merge_in_kernel) return;
  launch_programmatic("cudaLaunchKernelEx(decode_merge_kernel)", decode_merge_kernel<T, D>,
                      dim3(static_cast<unsigned>(args.batch * args.num_kv_heads)), dim3(kMergeThreads),
                      static_cast<std::size_t>(grid) * sizeof(int), stream, args, grid, RK > 0 ? 1 : 0);
}

}  // namespace spectralkv::cuda::kernel
