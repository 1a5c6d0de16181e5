#pragma once
// Where the KV cache lives. The model's matmuls always run on the CPU (FP32, Eigen); the backend decides
// only where the cache stores K and V and where attention and compression run:
//   cpu   DenseKvCache / SpectralKvCache (kv_cache.hpp): FP32 dense rows (cold blocks in the shared
//         layout: FP16 bases, INT8 coefficients), FP32 GEMM attention, the CPU reference compression;
//   cuda  cuda_kv_cache.hpp: cuda::DeviceSpectralCache<Half>, FP16 dense rows, the library's CUDA
//         kernels for attention and compression. Present only in a build with CUDA (SPECTRALKV_LLAMA_CUDA).
// --backend auto takes cuda when it is compiled in, a device is present and every cache asked for is one
// the device cache can hold; otherwise cpu, and says why.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kv_cache.hpp"
#include "spectralkv/config.hpp"
#include "spectralkv/error.hpp"
#ifndef SPECTRALKV_LLAMA_CUDA
#define SPECTRALKV_LLAMA_CUDA 0
#endif
#if SPECTRALKV_LLAMA_CUDA
#include "cuda_kv_cache.hpp"
#endif

namespace spectralkv::llama {

enum class Backend { kCpu, kCuda };

inline const char* backend_name(Backend b) { return b == Backend::kCuda ? "cuda" : "cpu"; }

/// One cache the program needs.
struct CacheRequest {
  bool spectral = false;
  CacheConfig config;            ///< spectral: the configuration; dense: only the shape is read
  std::int64_t capacity = 0;     ///< most tokens the sequence reaches
  std::int64_t max_chunk = 256;  ///< most tokens one forward call appends
  /// Every query must see exactly the cache token-by-token decoding would (strict-mode perplexity):
  /// compression completes inside the append that fills a block (see make_cuda_spectral_cache).
  bool strict = false;
  bool fidelity = false;                  ///< CPU only: shadow dense cache and per-layer fidelity
  AttendPath attend = AttendPath::kFast;  ///< CPU only: which CPU code attends
  int outliers = 0;                       ///< CPU only (experimental outlier tokens)
  NarrowCodes codes;                       ///< CPU only when narrow (experimental coefficient codes)
};

/// Why `backend` cannot build the cache `r`, or "" when it can.
inline std::string unsupported(Backend backend, const CacheRequest& r) {
  if (backend == Backend::kCpu) return "";
#if SPECTRALKV_LLAMA_CUDA
  if (!cuda_device_present()) return "no CUDA device present";
  if (r.attend == AttendPath::kLibrary) return "--attend library is the CPU reference path";
  if (r.outliers > 0) return "outlier tokens are an experiment of the CPU backend";
  if (r.codes.narrow()) return "narrower coefficient or basis codes are an experiment of the CPU backend";
  return r.spectral ? cuda_cache_unsupported(r.config) : "";
#else
  (void)r;
  return "this program was built without CUDA";
#endif
}

/// \throws InvalidArgument naming the reason when `backend` cannot build the cache
inline std::unique_ptr<KvCache> make_cache(Backend backend, const CacheRequest& r) {
  const std::string why = unsupported(backend, r);
  detail::require(why.empty(), "make_cache", "backend", backend_name(backend), why);
  const CacheConfig& c = r.config;
#if SPECTRALKV_LLAMA_CUDA
  if (backend == Backend::kCuda) {
    return r.spectral ? make_cuda_spectral_cache(c, r.capacity, r.max_chunk, r.strict)
                      : make_cuda_dense_cache(c, r.capacity, r.max_chunk);
  }
#endif
  if (r.spectral) return std::make_unique<SpectralKvCache>(c, r.fidelity, r.attend, r.outliers, r.codes);
  return std::make_unique<DenseKvCache>(c.num_layers, c.num_kv_heads, c.head_dim, r.capacity);
}

struct BackendChoice {
  Backend backend = Backend::kCpu;
  std::string reason;  ///< why, for the log line
};

/// Resolves --backend auto|cpu|cuda for the caches a command needs.
/// \throws InvalidArgument for another value, or for cuda when it cannot build one of the caches
inline BackendChoice choose_backend(const std::string& requested, const std::vector<CacheRequest>& caches) {
  if (requested == "cpu") return {Backend::kCpu, "requested"};
  if (requested != "cuda" && requested != "auto") {
    detail::fail("choose_backend", "--backend", requested, "must be auto, cpu or cuda");
  }
  for (const CacheRequest& r : caches) {
    const std::string why = unsupported(Backend::kCuda, r);
    if (why.empty()) continue;
    if (requested == "cuda") detail::fail("choose_backend", "--backend", requested, why);
    return {Backend::kCpu, "auto: " + why};
  }
#if SPECTRALKV_LLAMA_CUDA
  return {Backend::kCuda, (requested == "auto" ? "auto: " : "") + cuda_device_name()};
#else
  return {Backend::kCpu, "auto: this program was built without CUDA"};  // reached only with no caches
#endif
}

}  // namespace spectralkv::llama
