#pragma once
// Programmatic dependent launch (PDL, sm_90): a grid launched as a programmatic dependent of the grid before
// it on the stream may be scheduled once that grid has triggered (launch_dependents) or finished; it must not
// read what that grid writes before grid_dependency_wait() returns.

#include <cuda_runtime.h>

#include <utility>

#include "spectralkv/cuda/error.cuh"

namespace spectralkv::cuda::kernel {

/// Returns once the grids this one depends on have completed and their writes are visible (at once when
/// it was not launched as a programmatic dependent).
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
/// Lets the programmatic dependent enqueued after this grid be scheduled once every CTA has called it or exited.
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

/// Launches `fn` as a programmatic dependent of the work before it on `stream`; a failed launch is cleared
/// (launch errors are not sticky, so a later check would report it again) and thrown as CudaError naming `what`.
template <class... Params, class... Args>
void launch_programmatic(const char* what, void (*fn)(Params...), dim3 grid, dim3 block, std::size_t smem_bytes,
                         cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = attribute;
  config.numAttrs = 1;
  const cudaError_t st = cudaLaunchKernelEx(&config, fn, std::forward<Args>(args)...);
  if (st != cudaSuccess) {
    cudaGetLastError();
    check(st, what);
  }
}

}  // namespace spectralkv::cuda::kernel
