// Decode attention, one query token per sequence, on the GPU: the fused spectral kernel against the
// dense split-KV kernel and against decompress-then-attend, GQA 32/8, head_dim 128, ranks K16/V32,
// block 512, hot 64, FP16. The dense kernel reads K/V head-major ([B][H][T][D], the layout
// bench/torch_sdpa.py gives SDPA); DenseTokenMajor reads the same buffers as [B][T][H][D].
//
// Timing: CUDA events around the call, one call per repetition, 30 repetitions, medians reported
// (ReportAggregatesOnly). Before every timed call a kernel reads a 256 MB buffer, which evicts the 60 MB
// L2, so every figure reads its data from device memory; it also keeps the GPU busy while the host
// enqueues the call, so host-side argument checks are not inside the events. The flush reads rather than
// writes: a 256 MB memset leaves the L2 full of dirty lines, and the timed call then pays for writing
// ~60 MB of someone else's data back (SPECTRALKV_FLUSH=write selects the memset, for comparison).
// One untimed call per repetition warms up.
//
// Data: the caches are filled directly on the GPU with random valid contents (FP16 bases, INT8
// coefficients, positive scales, random dense tails) instead of being compressed on the CPU: the
// kernels' speed does not depend on the values. Block tables are a random permutation of the pool.
//
// Counters: bytes = what the kernel must move (DecodeAttention::bytes_moved for the spectral cache:
// bases, scales, coefficients, dense tail, q, out; K+V+q+out for dense), GBps = bytes / median time,
// us = time in microseconds; spectral and decompress rows also time the (head-major) dense kernel on
// the same shape in the same repetition (dense_us) and report speedup_vs_dense = dense_us / us.

#include <benchmark/benchmark.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "spectralkv/cuda/decode_attention.cuh"
#include "spectralkv/cuda/error.cuh"
#include "spectralkv/layout.cuh"

namespace {

using spectralkv::ColdBlockLayout;
using spectralkv::cuda::check;
namespace skc = spectralkv::cuda;

constexpr int kQHeads = 32;
constexpr int kKvHeads = 8;
constexpr int kHeadDim = 128;
constexpr int kRankK = 16;
constexpr int kRankV = 32;
constexpr int kBlock = 512;
constexpr int kHot = 64;
constexpr std::size_t kFlushBytes = std::size_t{256} << 20;

__device__ __forceinline__ float uniform01(std::uint64_t seed, std::uint64_t i) {
  std::uint64_t z = seed + 0x9E3779B97F4A7C15ull * (i + 1);  // splitmix64
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
}

__global__ void fill_half(__half* p, std::size_t n, std::uint64_t seed, float amplitude) {
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x)
    p[i] = __float2half_rn((2.0f * uniform01(seed, i) - 1.0f) * amplitude);
}

/// One CTA per (block, head): random FP16 bases, positive scales, random INT8 coefficients.
__global__ void fill_pool(unsigned char* pool, ColdBlockLayout l, std::uint64_t seed) {
  const long long e = blockIdx.x;
  unsigned char* head = pool + (e / l.num_kv_heads) * l.block_bytes + (e % l.num_kv_heads) * l.head_bytes;
  const std::uint64_t s = seed + 0x1000003ull * static_cast<std::uint64_t>(e);
  auto* bk = reinterpret_cast<__half*>(head + l.basis_k);
  auto* bv = reinterpret_cast<__half*>(head + l.basis_v);
  for (int i = threadIdx.x; i < l.rank_k * l.head_dim; i += blockDim.x) bk[i] = __float2half_rn(0.2f * uniform01(s, i) - 0.1f);
  for (int i = threadIdx.x; i < l.rank_v * l.head_dim; i += blockDim.x) bv[i] = __float2half_rn(0.2f * uniform01(s + 1, i) - 0.1f);
  auto* sk = reinterpret_cast<float*>(head + l.scale_k);
  auto* sv = reinterpret_cast<float*>(head + l.scale_v);
  for (int i = threadIdx.x; i < l.rank_k; i += blockDim.x) sk[i] = 0.01f + 0.01f * uniform01(s + 2, i);
  for (int i = threadIdx.x; i < l.rank_v; i += blockDim.x) sv[i] = 0.01f + 0.01f * uniform01(s + 3, i);
  auto* ck = reinterpret_cast<signed char*>(head + l.coeff_k);
  auto* cv = reinterpret_cast<signed char*>(head + l.coeff_v);
  for (int i = threadIdx.x; i < l.block_size * l.rank_k; i += blockDim.x)
    ck[i] = static_cast<signed char>(static_cast<int>(uniform01(s + 4, i) * 255.0f) - 127);
  for (int i = threadIdx.x; i < l.block_size * l.rank_v; i += blockDim.x)
    cv[i] = static_cast<signed char>(static_cast<int>(uniform01(s + 5, i) * 255.0f) - 127);
}

struct DeviceBuffer {
  void* ptr = nullptr;
  std::size_t bytes = 0;
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t n) : bytes(n) {
    if (n > 0) check(cudaMalloc(&ptr, n), "cudaMalloc");
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() {
    if (ptr != nullptr) cudaFree(ptr);
  }
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
};

template <class T>
std::unique_ptr<DeviceBuffer> upload(const std::vector<T>& v) {
  auto b = std::make_unique<DeviceBuffer>(v.size() * sizeof(T));
  check(cudaMemcpy(b->ptr, v.data(), b->bytes, cudaMemcpyHostToDevice), "cudaMemcpy");
  return b;
}

void fill(__half* p, std::size_t n, std::uint64_t seed, float amplitude) {
  fill_half<<<4096, 256>>>(p, n, seed, amplitude);
  skc::check_launch("fill_half");
}

/// Everything one (batch, length) shape needs, on the GPU. Only one shape is alive at a time. The figures come
/// from one process per shape (bench/run_decode_bench.sh): on an H200 the dense kernel ran up to 13% slower
/// on buffers allocated from the memory an earlier shape had freed (B=32, T=4K: 128.9 µs as a process's
/// first shape, 145-146 µs after the B=8 shapes), an artifact an engine, which allocates its cache once,
/// does not have; keeping every shape's buffers instead (~80 GB) slowed the last shapes.
struct Case {
  int batch = 0;
  std::int64_t length = 0;
  std::int64_t cold_blocks = 0, tail = 0;  // per sequence
  ColdBlockLayout layout{};
  std::unique_ptr<DeviceBuffer> pool, table, offsets, tail_k, tail_v, tail_ptrs, tail_lens, q, out, dense_k,
      dense_v, seq_lens, ws_spectral, ws_dense, ws_decompress;
  skc::DecodeAttentionParams spectral{};
  skc::DenseDecodeParams dense{};              ///< head-major K/V, the layout SDPA is given
  skc::DenseDecodeParams dense_token_major{};  ///< the same buffers read as [B][T][H][D]
  skc::DecompressParams decompress{};
  std::unique_ptr<skc::DecompressThenAttend> decompressor;
  std::int64_t spectral_bytes = 0, dense_bytes = 0;
};

std::unique_ptr<Case> g_case;
std::unique_ptr<DeviceBuffer> g_flush, g_flush_sink;
bool g_flush_write = false;

/// Reads the flush buffer through the L2 (the result is never stored: the buffer holds no such pattern).
__global__ void read_flush(const int4* p, std::size_t n, int* sink) {
  int acc = 0;
  for (std::size_t i = blockIdx.x * static_cast<std::size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::size_t>(gridDim.x) * blockDim.x) {
    const int4 v = __ldcg(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x5A5A5A5B) *sink = acc;  // the buffer is all 0x01 bytes, so every xor of words is 0
}
cudaStream_t g_stream = nullptr;
cudaEvent_t g_start = nullptr, g_stop = nullptr;

void global_setup() {
  if (g_stream != nullptr) return;
  check(cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking), "cudaStreamCreate");
  check(cudaEventCreate(&g_start), "cudaEventCreate");
  check(cudaEventCreate(&g_stop), "cudaEventCreate");
  g_flush = std::make_unique<DeviceBuffer>(kFlushBytes);
  g_flush_sink = std::make_unique<DeviceBuffer>(sizeof(int));
  check(cudaMemset(g_flush->ptr, 1, kFlushBytes), "cudaMemset(flush)");
  const char* mode = std::getenv("SPECTRALKV_FLUSH");
  g_flush_write = mode != nullptr && std::string(mode) == "write";
}

Case& get_case(int batch, std::int64_t length) {
  global_setup();
  if (g_case && g_case->batch == batch && g_case->length == length) return *g_case;
  g_case.reset();
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  auto c = std::make_unique<Case>();
  c->batch = batch;
  c->length = length;
  // The cache's policy: the tail holds hot..hot+block-1 tokens after every append.
  c->cold_blocks = length >= kHot + kBlock ? (length - kHot) / kBlock : 0;
  c->tail = length - c->cold_blocks * kBlock;
  c->layout = ColdBlockLayout::make(kBlock, kHeadDim, kKvHeads, kRankK, kRankV, false);
  const std::int64_t nblocks = batch * c->cold_blocks;
  const std::size_t token_elems = static_cast<std::size_t>(kKvHeads) * kHeadDim;

  c->pool = std::make_unique<DeviceBuffer>(std::max<std::int64_t>(1, nblocks) * c->layout.block_bytes);
  if (nblocks > 0) {
    fill_pool<<<static_cast<unsigned>(nblocks * kKvHeads), 256>>>(c->pool->as<unsigned char>(), c->layout, 7);
    skc::check_launch("fill_pool");
  }
  std::vector<std::int32_t> ids(static_cast<std::size_t>(nblocks));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), std::mt19937(11));
  if (ids.empty()) ids.push_back(0);
  std::vector<std::int32_t> offs(static_cast<std::size_t>(batch) + 1);
  for (int b = 0; b <= batch; ++b) offs[static_cast<std::size_t>(b)] = static_cast<std::int32_t>(b * c->cold_blocks);
  c->table = upload(ids);
  c->offsets = upload(offs);

  const std::size_t tail_elems = static_cast<std::size_t>(batch) * c->tail * token_elems;
  c->tail_k = std::make_unique<DeviceBuffer>(tail_elems * 2);
  c->tail_v = std::make_unique<DeviceBuffer>(tail_elems * 2);
  fill(c->tail_k->as<__half>(), tail_elems, 21, 2.0f);
  fill(c->tail_v->as<__half>(), tail_elems, 22, 2.0f);
  std::vector<const void*> ptrs(2 * static_cast<std::size_t>(batch));
  for (int b = 0; b < batch; ++b) {
    ptrs[static_cast<std::size_t>(b)] = c->tail_k->as<__half>() + b * c->tail * token_elems;
    ptrs[static_cast<std::size_t>(batch + b)] = c->tail_v->as<__half>() + b * c->tail * token_elems;
  }
  c->tail_ptrs = upload(ptrs);
  c->tail_lens = upload(std::vector<std::int32_t>(static_cast<std::size_t>(batch), static_cast<std::int32_t>(c->tail)));

  const std::size_t q_elems = static_cast<std::size_t>(batch) * kQHeads * kHeadDim;
  c->q = std::make_unique<DeviceBuffer>(q_elems * 2);
  c->out = std::make_unique<DeviceBuffer>(q_elems * 2);
  fill(c->q->as<__half>(), q_elems, 31, 2.0f);

  const std::size_t dense_elems = static_cast<std::size_t>(batch) * length * token_elems;
  c->dense_k = std::make_unique<DeviceBuffer>(dense_elems * 2);
  c->dense_v = std::make_unique<DeviceBuffer>(dense_elems * 2);
  fill(c->dense_k->as<__half>(), dense_elems, 41, 2.0f);
  fill(c->dense_v->as<__half>(), dense_elems, 42, 2.0f);
  c->seq_lens = upload(std::vector<std::int32_t>(static_cast<std::size_t>(batch), static_cast<std::int32_t>(length)));

  skc::DecodeAttentionParams& sp = c->spectral;
  sp.dtype = skc::DataType::kHalf;
  sp.batch = batch;
  sp.num_q_heads = kQHeads;
  sp.layout = c->layout;
  sp.scale = 1.0f / std::sqrt(static_cast<float>(kHeadDim));
  sp.q = c->q->ptr;
  sp.out = c->out->ptr;
  sp.pool = c->pool->as<std::uint8_t>();
  sp.block_table = c->table->as<std::int32_t>();
  sp.block_table_offsets = c->offsets->as<std::int32_t>();
  sp.tail.k = c->tail_ptrs->as<const void*>();
  sp.tail.v = c->tail_ptrs->as<const void*>() + batch;
  sp.tail.lengths = c->tail_lens->as<std::int32_t>();
  c->ws_spectral = std::make_unique<DeviceBuffer>(skc::DecodeAttention::get_workspace_size(sp));
  skc::DecodeAttention::initialize_workspace(sp, c->ws_spectral->ptr, g_stream);

  skc::DenseDecodeParams& dp = c->dense;
  dp.dtype = skc::DataType::kHalf;
  dp.batch = batch;
  dp.num_q_heads = kQHeads;
  dp.num_kv_heads = kKvHeads;
  dp.head_dim = kHeadDim;
  dp.scale = sp.scale;
  dp.q = c->q->ptr;
  dp.out = c->out->ptr;
  dp.k = c->dense_k->ptr;
  dp.v = c->dense_v->ptr;
  dp.max_len = length;
  dp.seq_lens = c->seq_lens->as<std::int32_t>();
  dp.layout = skc::KvLayout::kHeadMajor;
  c->dense_token_major = dp;
  c->dense_token_major.layout = skc::KvLayout::kTokenMajor;
  c->ws_dense = std::make_unique<DeviceBuffer>(skc::DenseDecodeAttention::get_workspace_size(dp));
  skc::DenseDecodeAttention::initialize_workspace(dp, c->ws_dense->ptr, g_stream);

  c->decompress.attention = sp;
  c->decompress.max_cold_blocks = c->cold_blocks;

  std::vector<std::int64_t> cold(static_cast<std::size_t>(batch), c->cold_blocks), sink(static_cast<std::size_t>(batch), 0),
      tail(static_cast<std::size_t>(batch), c->tail);
  c->spectral_bytes = skc::DecodeAttention::bytes_moved(sp, cold.data(), sink.data(), tail.data());
  c->dense_bytes = 2 * static_cast<std::int64_t>(dense_elems) * 2 + 2 * static_cast<std::int64_t>(q_elems) * 2;
  check(cudaStreamSynchronize(g_stream), "cudaStreamSynchronize");
  check(cudaDeviceSynchronize(), "cudaDeviceSynchronize(fill)");
  g_case = std::move(c);
  return *g_case;
}

/// Milliseconds of one call of `f`, L2 flushed first.
template <class F>
float time_call(F&& f) {
  if (g_flush_write) {
    static unsigned char value = 0;
    check(cudaMemsetAsync(g_flush->ptr, ++value, kFlushBytes, g_stream), "cudaMemsetAsync(flush)");
  } else {
    read_flush<<<1024, 256, 0, g_stream>>>(static_cast<const int4*>(g_flush->ptr), kFlushBytes / sizeof(int4),
                                           static_cast<int*>(g_flush_sink->ptr));
    check(cudaGetLastError(), "read_flush");
  }
  check(cudaEventRecord(g_start, g_stream), "cudaEventRecord");
  f();
  check(cudaEventRecord(g_stop, g_stream), "cudaEventRecord");
  check(cudaEventSynchronize(g_stop), "cudaEventSynchronize");
  float ms = 0.0f;
  check(cudaEventElapsedTime(&ms, g_start, g_stop), "cudaEventElapsedTime");
  return ms;
}

void run_dense(Case& c) { skc::DenseDecodeAttention::run(c.dense, c.ws_dense->ptr, c.ws_dense->bytes, g_stream); }
void run_dense_token_major(Case& c) {
  skc::DenseDecodeAttention::run(c.dense_token_major, c.ws_dense->ptr, c.ws_dense->bytes, g_stream);
}
void run_spectral(Case& c) {
  skc::DecodeAttention::run(c.spectral, c.ws_spectral->ptr, c.ws_spectral->bytes, g_stream);
}
void run_decompress(Case& c) {
  c.decompressor->run(c.decompress, c.ws_decompress->ptr, c.ws_decompress->bytes, g_stream);
}

void report(benchmark::State& state, std::int64_t bytes, float ms, float dense_ms) {
  state.SetIterationTime(ms * 1e-3);
  state.counters["us"] = ms * 1e3;
  state.counters["bytes"] = static_cast<double>(bytes);
  state.counters["GBps"] = static_cast<double>(bytes) / (ms * 1e-3) / 1e9;
  if (dense_ms > 0.0f) {
    state.counters["dense_us"] = dense_ms * 1e3;
    state.counters["speedup_vs_dense"] = dense_ms / ms;
  }
}

void BM_Dense(benchmark::State& state) {
  Case& c = get_case(static_cast<int>(state.range(0)), state.range(1));
  run_dense(c);
  for (auto _ : state) report(state, c.dense_bytes, time_call([&] { run_dense(c); }), 0.0f);
}

void BM_DenseTokenMajor(benchmark::State& state) {
  Case& c = get_case(static_cast<int>(state.range(0)), state.range(1));
  run_dense_token_major(c);
  for (auto _ : state) report(state, c.dense_bytes, time_call([&] { run_dense_token_major(c); }), 0.0f);
}

void BM_Spectral(benchmark::State& state) {
  Case& c = get_case(static_cast<int>(state.range(0)), state.range(1));
  run_spectral(c);
  for (auto _ : state) {
    const float ms = time_call([&] { run_spectral(c); });
    const float dense_ms = time_call([&] { run_dense(c); });
    report(state, c.spectral_bytes, ms, dense_ms);
  }
}

void BM_DecompressThenAttend(benchmark::State& state) {
  Case& c = get_case(static_cast<int>(state.range(0)), state.range(1));
  if (!c.decompressor) {
    c.decompressor = std::make_unique<skc::DecompressThenAttend>();
    c.ws_decompress = std::make_unique<DeviceBuffer>(skc::DecompressThenAttend::get_workspace_size(c.decompress));
    skc::DecompressThenAttend::initialize_workspace(c.decompress, c.ws_decompress->ptr, g_stream);
  }
  run_decompress(c);
  for (auto _ : state) {
    const float ms = time_call([&] { run_decompress(c); });
    const float dense_ms = time_call([&] { run_dense(c); });
    report(state, c.spectral_bytes, ms, dense_ms);
  }
}

void configure(benchmark::internal::Benchmark* b) {
  b->ArgNames({"B", "T"})->UseManualTime()->Iterations(1)->Repetitions(30)->ReportAggregatesOnly(true)->Unit(
      benchmark::kMicrosecond);
}

// Registered per shape, so each shape's data is built once and shared by the three methods.
int register_all() {
  for (int batch : {1, 8, 32}) {
    for (std::int64_t t : {4096, 16384, 65536, 131072}) {
      configure(benchmark::RegisterBenchmark("Dense", BM_Dense)->Args({batch, t}));
      configure(benchmark::RegisterBenchmark("DenseTokenMajor", BM_DenseTokenMajor)->Args({batch, t}));
      configure(benchmark::RegisterBenchmark("Spectral", BM_Spectral)->Args({batch, t}));
      configure(benchmark::RegisterBenchmark("DecompressThenAttend", BM_DecompressThenAttend)->Args({batch, t}));
    }
  }
  return 0;
}
const int kRegistered = register_all();

}  // namespace

int main(int argc, char** argv) {
  (void)kRegistered;
  if (!skc::device_available()) {
    std::fprintf(stderr, "bench_decode: no CUDA device present\n");
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  g_case.reset();
  g_flush.reset();
  g_flush_sink.reset();
  return 0;
}
