// The CUDA backend of the example's KV cache: cuda::DeviceSpectralCache<Half> behind KvCache (see
// cuda_kv_cache.hpp for what runs where).

#include "cuda_kv_cache.hpp"

#include <cuda_runtime.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "spectralkv/cuda/device_cache.cuh"
#include "spectralkv/cuda/error.cuh"
#include "spectralkv/error.hpp"
#include "spectralkv/numeric.hpp"

namespace spectralkv::llama {
namespace {

constexpr SequenceId kSeq = 0;

/// A stream owned by the cache; destroyed last (the device cache synchronises it in its destructor).
class Stream {
 public:
  Stream() { cuda::check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags"); }
  ~Stream() { cudaStreamDestroy(stream_); }
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

/// Device memory for `n` elements of T, allocated once.
template <class T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t n) { cuda::check(cudaMalloc(&ptr_, std::max<std::size_t>(n, 1) * sizeof(T)), "cudaMalloc"); }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  T* get() const { return ptr_; }

 private:
  T* ptr_ = nullptr;
};

class CudaKvCache final : public KvCache {
 public:
  /// \param dense  every position is a sink (see make_cuda_dense_cache): never compresses
  CudaKvCache(const CacheConfig& config, bool dense, std::int64_t capacity, std::int64_t max_chunk,
              cuda::CompressionMode mode)
      : config_(config),
        dense_(dense),
        capacity_(capacity),
        max_chunk_(max_chunk),
        cache_(config, options(config, dense, capacity, max_chunk, mode, stream_.get())),
        k_(static_cast<std::size_t>(max_chunk * config.num_kv_heads * config.head_dim)),
        v_(static_cast<std::size_t>(max_chunk * config.num_kv_heads * config.head_dim)),
        q_(static_cast<std::size_t>(max_chunk * config.num_q_heads * config.head_dim)),
        out_(static_cast<std::size_t>(max_chunk * config.num_q_heads * config.head_dim)) {
    cache_.add_sequence(kSeq);
  }

  void clear() override {
    cache_.remove_sequence(kSeq);  // its blocks return to the pool for the next window
    cache_.add_sequence(kSeq);
  }

  std::int64_t length(int layer) const override { return cache_.length(kSeq, layer); }

  void append(int layer, TensorView<const float> k, TensorView<const float> v) override {
    constexpr const char* kWhat = "CudaKvCache::append";
    detail::require(k.tokens <= max_chunk_, kWhat, "k.tokens", k.tokens,
                    detail::concat("must be at most max_chunk = ", max_chunk_));
    detail::require(!dense_ || length(layer) + k.tokens <= capacity_, kWhat, "k.tokens", k.tokens,
                    detail::concat("exceeds the dense cache's capacity of ", capacity_, " tokens (", length(layer),
                                   " held)"));
    upload(k, host_k_, k_.get());
    upload(v, host_v_, v_.get());
    cache_.append(layer, kSeq, TensorView<const Half>{k_.get(), k.tokens, k.heads, k.head_dim},
                  TensorView<const Half>{v_.get(), v.tokens, v.heads, v.head_dim}, stream_.get());
  }

  void attend(int layer, TensorView<const float> q, TensorView<float> out, float scale) override {
    detail::require(q.tokens <= max_chunk_, "CudaKvCache::attend", "q.tokens", q.tokens,
                    detail::concat("must be at most max_chunk = ", max_chunk_));
    upload(q, host_q_, q_.get());
    cache_.attend(layer, kSeq, TensorView<const Half>{q_.get(), q.tokens, q.heads, q.head_dim},
                  TensorView<Half>{out_.get(), q.tokens, q.heads, q.head_dim}, scale, stream_.get());
    host_out_.resize(static_cast<std::size_t>(out.size()));
    cuda::check(cudaMemcpyAsync(host_out_.data(), out_.get(), host_out_.size() * sizeof(Half), cudaMemcpyDeviceToHost,
                                stream_.get()),
                "cudaMemcpyAsync(attention output)");
    cuda::check(cudaStreamSynchronize(stream_.get()), "cudaStreamSynchronize");
    for (std::int64_t i = 0; i < out.size(); ++i) out.data[i] = static_cast<float>(host_out_[static_cast<std::size_t>(i)]);
  }

  std::int64_t tokens_until_compression(int layer) const override {
    return dense_ ? std::numeric_limits<std::int64_t>::max() : cache_.tokens_until_compression(kSeq, layer);
  }

  KvBytes bytes() const override {
    const MemoryStats m = cache_.memory_stats();
    const std::int64_t token_fp16 = 2 * std::int64_t{config_.num_kv_heads} * config_.head_dim * 2;
    KvBytes b;
    b.tokens = m.sink_tokens + m.cold_tokens + m.tail_tokens;
    b.cold_tokens = m.cold_tokens;
    b.stored = m.cold_bytes + (m.sink_tokens + m.tail_tokens) * token_fp16;
    b.dense_fp16 = b.tokens * token_fp16;
    return b;
  }

 private:
  static cuda::DeviceCacheOptions options(const CacheConfig& c, bool dense, std::int64_t capacity,
                                          std::int64_t max_chunk, cuda::CompressionMode mode, cudaStream_t stream) {
    cuda::DeviceCacheOptions o;
    o.max_sequences = 1;
    // A dense cache never forms a block, but the device cache wants a pool of at least one.
    o.max_blocks_per_layer = dense ? 1 : capacity / c.block_size + 1;
    o.max_append_tokens = max_chunk;
    o.compression = mode;
    o.stream = stream;
    return o;
  }

  /// FP32 rows -> FP16 on the host -> device. The copy is from pageable memory, which returns only once
  /// the host buffer has been read, so the buffer can be refilled by the next call.
  void upload(TensorView<const float> x, std::vector<Half>& host, Half* device) {
    host.resize(static_cast<std::size_t>(x.size()));
    for (std::int64_t i = 0; i < x.size(); ++i) host[static_cast<std::size_t>(i)] = Half(x.data[i]);
    cuda::check(cudaMemcpyAsync(device, host.data(), host.size() * sizeof(Half), cudaMemcpyHostToDevice, stream_.get()),
                "cudaMemcpyAsync(upload)");
  }

  CacheConfig config_;
  bool dense_;
  std::int64_t capacity_, max_chunk_;
  Stream stream_;  // declared before cache_: destroyed after it
  cuda::DeviceSpectralCache<Half> cache_;
  DeviceBuffer<Half> k_, v_, q_, out_;
  std::vector<Half> host_k_, host_v_, host_q_, host_out_;
};

void require_chunk(const char* what, std::int64_t capacity, std::int64_t max_chunk) {
  detail::require(capacity > 0, what, "capacity", capacity, "must be positive");
  detail::require(max_chunk > 0, what, "max_chunk", max_chunk, "must be positive");
}

}  // namespace

bool cuda_device_present() { return cuda::device_available(); }

std::string cuda_device_name() {
  int device = 0;
  cudaDeviceProp prop{};
  cuda::check(cudaGetDevice(&device), "cudaGetDevice");
  cuda::check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  return prop.name;
}

std::string cuda_cache_unsupported(const CacheConfig& c) {
  if (c.head_dim != 64 && c.head_dim != 128) return detail::concat("head_dim ", c.head_dim, " (the kernels take 64 or 128)");
  if (c.group_size() > 16) return detail::concat("GQA group ", c.group_size(), " (the kernels take at most 16)");
  auto rank_ok = [](int r) { return r == 8 || r == 16 || r == 32 || r == 64; };
  for (int l = 0; l < c.num_layers; ++l) {
    const LayerRanks r = c.ranks(l);
    if (!rank_ok(r.key) || !rank_ok(r.value)) {
      return detail::concat("ranks ", r.key, "/", r.value, " in layer ", l, " (the kernels take 8, 16, 32 or 64)");
    }
  }
  return "";
}

std::unique_ptr<KvCache> make_cuda_spectral_cache(const CacheConfig& config, std::int64_t capacity,
                                                  std::int64_t max_chunk, bool synchronous) {
  require_chunk("make_cuda_spectral_cache", capacity, max_chunk);
  return std::make_unique<CudaKvCache>(config, false, capacity, max_chunk,
                                       synchronous ? cuda::CompressionMode::kSynchronous : cuda::CompressionMode::kAsync);
}

std::unique_ptr<KvCache> make_cuda_dense_cache(const CacheConfig& shape, std::int64_t capacity, std::int64_t max_chunk) {
  require_chunk("make_cuda_dense_cache", capacity, max_chunk);
  CacheConfig c;  // library defaults for everything the sinks make irrelevant (valid ranks, block size)
  c.num_layers = shape.num_layers;
  c.num_q_heads = shape.num_q_heads;
  c.num_kv_heads = shape.num_kv_heads;
  c.head_dim = shape.head_dim;
  c.sink_tokens = static_cast<int>(capacity);
  return std::make_unique<CudaKvCache>(c, true, capacity, max_chunk, cuda::CompressionMode::kSynchronous);
}

}  // namespace spectralkv::llama
