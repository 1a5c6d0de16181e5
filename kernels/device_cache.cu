// Kernels of the device-resident cache that no library provides: the scatter of a ragged batch of new
// token rows to their sink and staging rows (one launch per append replaces a memcpy per sequence and
// tier: launch overhead would dominate a decode step otherwise), and the copy of a call's metadata from
// the mapped pinned ring to device memory (cheaper between two kernels than a copy-engine transfer).

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "spectralkv/cuda/device_cache.cuh"
#include "spectralkv/cuda/error.cuh"
#include "programmatic_launch.cuh"

namespace spectralkv::cuda::detail {
namespace {

using kernel::grid_dependency_wait;
using kernel::launch_dependents;

/// One CTA per row; 16-byte copies (row_bytes is a multiple of 16: head_dim is a multiple of 8).
__global__ void scatter_rows_kernel(const uint4* src_k, const uint4* src_v, void* const* dst_k, void* const* dst_v,
                                    int vecs_per_row) {
  // A programmatic dependent enqueued next (the next call's metadata copy) may be scheduled now; that copy
  // completes only after this grid.
  launch_dependents();
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

/// Launched as a programmatic dependent of the kernel before it, which it need not wait for: it reads the
/// host's ring, and its destination is read by no kernel until this call's (the ring is reused only after the
/// event recorded behind the region's last readers). It waits before it completes, so that the kernels after
/// it, which wait for it, follow the kernel before it too. The attention kernel after it may be scheduled at once.
__global__ void copy_metadata_kernel(uint4* dst, const uint4* src, std::size_t vecs) {
  launch_dependents();
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < vecs;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    dst[i] = src[i];
  grid_dependency_wait();
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

void copy_metadata(void* dst, const void* src, std::size_t bytes, cudaStream_t stream) {
  if (bytes == 0) return;
  // A decode call's few kilobytes take one CTA; a prefill's megabytes keep enough reads in flight to fill the bus.
  constexpr unsigned kThreads = 512, kMaxBlocks = 1024;
  const std::size_t vecs = (bytes + 15) / 16;
  const auto blocks = static_cast<unsigned>(std::min<std::size_t>((vecs + kThreads - 1) / kThreads, kMaxBlocks));
  kernel::launch_programmatic("cudaLaunchKernelEx(copy_metadata_kernel)", copy_metadata_kernel, dim3(blocks),
                              dim3(kThreads), 0, stream, static_cast<uint4*>(dst), static_cast<const uint4*>(src), vecs);
}

}  // namespace spectralkv::cuda::detail
