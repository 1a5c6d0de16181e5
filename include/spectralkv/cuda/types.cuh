#pragma once
// Maps the host storage types to CUDA's: same bits, so buffers are shared without conversion.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "spectralkv/numeric.hpp"

namespace spectralkv::cuda {

template <class T>
struct DeviceType;
template <>
struct DeviceType<Half> {
  using type = __half;
};
template <>
struct DeviceType<BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct DeviceType<float> {
  using type = float;
};
template <class T>
using device_t = typename DeviceType<T>::type;

static_assert(sizeof(__half) == sizeof(Half) && sizeof(__nv_bfloat16) == sizeof(BFloat16));

__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(float x) { return x; }

template <class T>
__device__ __forceinline__ T from_f32(float x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return x;
  }
}

}  // namespace spectralkv::cuda
