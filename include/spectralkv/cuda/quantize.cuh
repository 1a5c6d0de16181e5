#pragma once
// The INT8 rule of the cold layout in device code: q = round-to-nearest-even(c / scale), bit for bit
// the CPU rule (quantize_columns, spectralkv/compress.hpp), without an IEEE division per coefficient.
// An IEEE single-precision division is a reciprocal approximation, its refinement, two correction
// steps and a range check with a slow path; in the projection kernels the quantisation, divisions and
// all, took a third of the time. With one correctly rounded reciprocal per column, the two correction
// steps alone give the same quotient.

#include <cuda_runtime.h>

namespace spectralkv::cuda {

/// Scales inside [2^-90, 2^90] take the division-free path; the others (far outside any KV cache's
/// range) keep the IEEE division.
constexpr float kQuantizeMinScale = 0x1p-90f;
constexpr float kQuantizeMaxScale = 0x1p90f;

/// The per-column factor for quantize_coefficient: RN(1/scale) when scale is inside
/// [kQuantizeMinScale, kQuantizeMaxScale], else 0 (a zero scale, or one that takes the division).
__device__ __forceinline__ float quantize_reciprocal(float scale) {
  return scale >= kQuantizeMinScale && scale <= kQuantizeMaxScale ? __frcp_rn(scale) : 0.0f;
}

/// round-to-nearest-even(c / scale) as an int, 0 when scale is 0; `inv` = quantize_reciprocal(scale).
/// Callers guarantee |c| ≤ 127·scale (scale = max|c| / 127), so the result lies in [-127, 127].
///
/// The steps of the IEEE division's own fast path, with its reciprocal refinement and range check
/// replaced by the correctly rounded reciprocal y = RN(1/scale) of the column: q0 = RN(c·y) is within
/// 1.5 ulp of c/scale; q1 = RN(q0 + RN(c − q0·scale)·y) is within one ulp (that first remainder may
/// need 25 bits and lose its last one, which moves q1 by ~2^-24 ulp); for |c/scale| ≥ 1/4 the second
/// remainder c − q1·scale is then exact in one FMA (at most 2^24 steps of 2^-138 ≤ ulp(q1)·ulp(scale));
/// and Markstein's theorem (y within half an ulp of 1/b, q within one ulp of a/b, the remainder
/// exact ⇒ RN(q + (a − q·b)·y) = RN(a/b)) makes the last step the correctly rounded quotient. Below
/// 1/4 the quotient rounds to 0, as the division's does, whatever its last bits.
/// tests/gpu/test_compress.cu compares every coefficient of every binade from 2^-30·scale to 128·scale
/// with the division, for scales across the accepted range.
__device__ __forceinline__ int quantize_coefficient(float c, float scale, float inv) {
  if (inv == 0.0f) return scale > 0.0f ? __float2int_rn(__fdiv_rn(c, scale)) : 0;
  const float q0 = __fmul_rn(c, inv);
  const float q1 = __fmaf_rn(__fmaf_rn(-q0, scale, c), inv, q0);
  return __float2int_rn(__fmaf_rn(__fmaf_rn(-q1, scale, c), inv, q1));
}

}  // namespace spectralkv::cuda
