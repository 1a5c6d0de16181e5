// Kernels of the device-resident cache that no library provides: the scatter of a ragged batch of new
// token rows to their sink and staging rows. One launch per append replaces a memcpy per sequence and
// tier (launch overhead would dominate a decode step otherwise).

#include <cuda_runtime.h>

#include <cstdint>

#include "spectralkv/cuda/device_cache.cuh"
#include "spectralkv/cuda/error.cuh"

namespace spectralkv::cuda::detail {
namespace {

/// One CTA per row; 16-byte copies (row_bytes is a multiple of 16: head_dim is a multiple of 8).
__global__ void scatter_rows_kernel(const uint4* src_k, const uint4* src_v, void* const* dst_k, void* const* dst_v,
                                    int vecs_per_row) {
  const int row = blockIdx.x;
  const uint4* sk = src_k + static_cast<std::int64_t>(row) * vecs_per_row;
  const uint4* sv = src_v + static_cast<std::int64_t>(row) * vecs_per_row;
  auto* dk = static_cast<uint4*>(dst_k[row]);
  auto* dv = static_cast<uint4*>(dst_v[row]);
  for (int i = threadIdx.x; i < vecs_per_row; i += blockDim.x) {
    dk[i] = sk[i];
    dv[i] = sv[i];
  }
}

}  // namespace

void scatter_rows(const void* src_k, const void* src_v, void* const* dst_k, void* const* dst_v, int rows, int row_bytes,
                  cudaStream_t stream) {
  if (rows == 0) return;
  if (row_bytes % 16 != 0 || reinterpret_cast<std::uintptr_t>(src_k) % 16 != 0 ||
      reinterpret_cast<std::uintptr_t>(src_v) % 16 != 0) {
    throw InvalidArgument(::spectralkv::detail::concat(
        "DeviceSpectralCache::append: argument k/v = ", src_k, "/", src_v,
        " (device K and V must be 16-byte aligned with rows of a multiple of 16 bytes)"));
  }
  const int vecs = row_bytes / 16;
  scatter_rows_kernel<<<rows, vecs < 256 ? ((vecs + 31) / 32) * 32 : 256, 0, stream>>>(
      static_cast<const uint4*>(src_k), static_cast<const uint4*>(src_v), dst_k, dst_v, vecs);
  check_launch("scatter_rows_kernel");
}

}  // namespace spectralkv::cuda::detail
