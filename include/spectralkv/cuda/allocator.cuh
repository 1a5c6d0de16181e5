#pragma once
// The allocator hook of the CUDA backend. The cache allocates all of its device memory up front
// through it (and frees it in its destructor), never on the hot path.

#include <cuda_runtime.h>

#include <cstddef>
#include <functional>

#include "spectralkv/cuda/error.cuh"

namespace spectralkv::cuda {

struct Allocator {
  /// Returns `bytes` of device memory (256-byte aligned) usable after `stream` reaches this point, or throws;
  /// the cache rejects a null or misaligned result with CudaError.
  std::function<void*(std::size_t bytes, cudaStream_t stream)> allocate;
  /// Returns memory from `allocate`; the stream orders the release after earlier work.
  std::function<void(void* ptr, cudaStream_t stream)> deallocate;

  /// cudaMallocAsync / cudaFreeAsync on the device's default memory pool.
  static Allocator stream_ordered() {
    Allocator a;
    a.allocate = [](std::size_t bytes, cudaStream_t stream) {
      void* p = nullptr;
      check(cudaMallocAsync(&p, bytes, stream), "cudaMallocAsync");
      return p;
    };
    a.deallocate = [](void* p, cudaStream_t stream) { cudaFreeAsync(p, stream); };
    return a;
  }
};

}  // namespace spectralkv::cuda
