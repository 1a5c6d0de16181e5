#pragma once
// CUDA, cuBLAS and cuSOLVER status checks that throw spectralkv::CudaError naming the call.

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include "spectralkv/error.hpp"

namespace spectralkv::cuda {

inline void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw CudaError(detail::concat(what, " failed: ", cudaGetErrorName(status), " (",
                                   cudaGetErrorString(status), ")"));
  }
}

inline void check(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw CudaError(detail::concat(what, " failed: cuBLAS status ", static_cast<int>(status)));
  }
}

inline void check(cusolverStatus_t status, const char* what) {
  if (status != CUSOLVER_STATUS_SUCCESS) {
    throw CudaError(detail::concat(what, " failed: cuSOLVER status ", static_cast<int>(status)));
  }
}

/// Checks the launch of the kernel just issued (configuration errors surface here, not later).
inline void check_launch(const char* kernel) { check(cudaGetLastError(), kernel); }

/// True when a CUDA device is present and usable; GPU tests skip otherwise.
inline bool device_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

}  // namespace spectralkv::cuda
