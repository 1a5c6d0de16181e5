#pragma once
// PTX wrappers (sm_80+: cp.async, ldmatrix, mma.sync), the numeric helpers and the chunk height of
// X's streaming that the compression kernels share.
// Private to kernels/compress.cu: reopens that translation unit's anonymous namespace, so the
// kernels and their helpers keep internal linkage.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace spectralkv::cuda {
namespace {

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

constexpr int kChunkRows = 64;  // rows of X staged per pipeline step (the Gram's and the projection's)

}  // namespace
}  // namespace spectralkv::cuda
