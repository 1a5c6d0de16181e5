#pragma once
// The checks of a job descriptor, one predicate per field: the host words them as validate_jobs's
// messages, the kernels apply them to descriptors that live on the device.
// Private to kernels/compress.cu: reopens that translation unit's anonymous namespace, so the
// kernels and their helpers keep internal linkage.

#include <cuda_runtime.h>

#include <cstdint>

#include "spectralkv/cuda/compress.cuh"

namespace spectralkv::cuda {
namespace {

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

}  // namespace
}  // namespace spectralkv::cuda
