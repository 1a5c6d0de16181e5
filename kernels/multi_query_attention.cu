// Unfused multi-query attention over the compressed cache (see multi_query_attention.cuh).
//
// One CTA per (query row, KV head) serves the g query heads of the group. Tokens are visited in
// tiles of kTile that never straddle a tier or a cold block; for each tile the CTA computes the g×kTile
// scores into shared memory, updates the online softmax per head, and accumulates the output: dense
// tiles directly in feature space, cold tiles in rank space (w += p·C_V), folded back through B_V once
// per block. Accumulation is FP32 throughout.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "spectralkv/cuda/error.cuh"
#include "spectralkv/cuda/multi_query_attention.cuh"
#include "spectralkv/error.hpp"

namespace spectralkv::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kTile = 32;
constexpr int kMaxGroup = 16;
constexpr int kMaxDim = 128;
constexpr int kMaxRank = 64;

template <class T>
__device__ float load(const T* p, std::int64_t i);
template <>
__device__ float load<__half>(const __half* p, std::int64_t i) { return __half2float(p[i]); }
template <>
__device__ float load<__nv_bfloat16>(const __nv_bfloat16* p, std::int64_t i) { return __bfloat162float(p[i]); }

template <class T>
__device__ void store(T* p, std::int64_t i, float x);
template <>
__device__ void store<__half>(__half* p, std::int64_t i, float x) { p[i] = __float2half_rn(x); }
template <>
__device__ void store<__nv_bfloat16>(__nv_bfloat16* p, std::int64_t i, float x) { p[i] = __float2bfloat16_rn(x); }

__device__ __forceinline__ std::int64_t min64(std::int64_t a, std::int64_t b) { return a < b ? a : b; }

struct Shared {
  float q[kMaxGroup][kMaxDim];
  float o[kMaxGroup][kMaxDim];
  float w[kMaxGroup][kMaxRank];   // rank-space value accumulator of the current cold block
  float qb[kMaxGroup][kMaxRank];  // q·B_Kᵀ of the current cold block
  float qm[kMaxGroup];            // q·mean_K of the current cold block
  float psum[kMaxGroup];          // Σ p over the current cold block (weight of mean_V)
  float s[kMaxGroup][kTile];
  float m[kMaxGroup], l[kMaxGroup], alpha[kMaxGroup];
};

template <class T>
__global__ void __launch_bounds__(kThreads) multi_query_kernel(MultiQueryParams p) {
  __shared__ Shared sh;
  const int row = blockIdx.x, kvh = blockIdx.y, tid = threadIdx.x;
  const int D = p.layout.head_dim, H = p.layout.num_kv_heads, g = p.num_q_heads / H;
  const int b = p.row_sequence[row];
  const std::int64_t n_rows = p.q_offsets[b + 1] - p.q_offsets[b];
  const std::int64_t sink_len = p.sink.lengths ? p.sink.lengths[b] : 0;
  const std::int64_t tail_len = p.tail.lengths ? p.tail.lengths[b] : 0;
  const std::int64_t first_block = p.block_table_offsets ? p.block_table_offsets[b] : 0;
  const std::int64_t n_blocks = p.block_table_offsets ? p.block_table_offsets[b + 1] - first_block : 0;
  const int L = p.layout.block_size;
  const std::int64_t len = sink_len + n_blocks * L + tail_len;
  const std::int64_t limit = len - n_rows + (row - p.q_offsets[b]);  // last visible position

  const T* q = static_cast<const T*>(p.q) + (static_cast<std::int64_t>(row) * p.num_q_heads + kvh * g) * D;
  for (int i = tid; i < g * D; i += kThreads) {
    sh.q[i / D][i % D] = load(q, i);
    sh.o[i / D][i % D] = 0.0f;
  }
  for (int h = tid; h < g; h += kThreads) {
    sh.m[h] = -INFINITY;
    sh.l[h] = 0.0f;
  }
  __syncthreads();

  // Online-softmax update over the scores of one tile (sh.s[h][0..n)); sets sh.alpha and leaves
  // p = exp(s − m_new) in sh.s.
  auto softmax_tile = [&](int n) {
    const int warp = tid / 32, lane = tid % 32;
    for (int h = warp; h < g; h += kThreads / 32) {
      float x = lane < n ? sh.s[h][lane] : -INFINITY;
      float mx = x;
      for (int off = 16; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
      const float m_new = fmaxf(sh.m[h], mx);
      const float e = lane < n && x > -INFINITY ? __expf(x - m_new) : 0.0f;
      float sum = e;
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      if (lane < n) sh.s[h][lane] = e;
      if (lane == 0) {
        const float a = sh.m[h] == -INFINITY ? 0.0f : __expf(sh.m[h] - m_new);
        sh.alpha[h] = a;
        sh.l[h] = sh.l[h] * a + sum;
        sh.m[h] = m_new;
      }
    }
    __syncthreads();
  };

  // Dense run: `count` tokens at k/v (token stride H·D, already offset to this head), positions from `first`.
  auto dense_run = [&](const T* k, const T* v, std::int64_t count, std::int64_t first) {
    const std::int64_t stride = static_cast<std::int64_t>(H) * D;
    for (std::int64_t t0 = 0; t0 < count && first + t0 <= limit; t0 += kTile) {
      const int n = static_cast<int>(min64(kTile, min64(count - t0, limit - first - t0 + 1)));
      for (int i = tid; i < g * kTile; i += kThreads) {
        const int h = i / kTile, t = i % kTile;
        float acc = -INFINITY;
        if (t < n) {
          acc = 0.0f;
          const T* kt = k + (t0 + t) * stride;
          for (int d = 0; d < D; ++d) acc += sh.q[h][d] * load(kt, d);
          acc *= p.scale;
        }
        sh.s[h][t] = acc;
      }
      __syncthreads();
      softmax_tile(n);
      for (int i = tid; i < g * D; i += kThreads) {
        const int h = i / D, d = i % D;
        float acc = sh.o[h][d] * sh.alpha[h];
        for (int t = 0; t < n; ++t) acc += sh.s[h][t] * load(v + (t0 + t) * stride, d);
        sh.o[h][d] = acc;
      }
      __syncthreads();
    }
  };

  if (sink_len > 0) {
    const std::int64_t off = static_cast<std::int64_t>(kvh) * D;
    dense_run(static_cast<const T*>(p.sink.k[b]) + off, static_cast<const T*>(p.sink.v[b]) + off, sink_len, 0);
  }

  const ColdBlockLayout& lay = p.layout;
  const int rk = lay.rank_k, rv = lay.rank_v;
  for (std::int64_t blk = 0; blk < n_blocks; ++blk) {
    const std::int64_t first = sink_len + blk * L;
    if (first > limit) break;
    const std::uint8_t* head = p.pool + static_cast<std::int64_t>(p.block_table[first_block + blk]) * lay.block_bytes +
                               static_cast<std::int64_t>(kvh) * lay.head_bytes;
    const __half* bk = reinterpret_cast<const __half*>(head + lay.basis_k);
    const __half* bv = reinterpret_cast<const __half*>(head + lay.basis_v);
    const float* sk = reinterpret_cast<const float*>(head + lay.scale_k);
    const float* sv = reinterpret_cast<const float*>(head + lay.scale_v);
    const std::int8_t* ck = reinterpret_cast<const std::int8_t*>(head + lay.coeff_k);
    const std::int8_t* cv = reinterpret_cast<const std::int8_t*>(head + lay.coeff_v);
    const __half* mk = reinterpret_cast<const __half*>(head + lay.mean_k);
    const __half* mv = reinterpret_cast<const __half*>(head + lay.mean_v);
    // Project the queries on the key basis once per block; fold the scales into qb.
    for (int i = tid; i < g * rk; i += kThreads) {
      const int h = i / rk, j = i % rk;
      float acc = 0.0f;
      for (int d = 0; d < D; ++d) acc += sh.q[h][d] * __half2float(bk[j * D + d]);
      sh.qb[h][j] = acc * sk[j];
    }
    for (int i = tid; i < g * rv; i += kThreads) sh.w[i / rv][i % rv] = 0.0f;
    for (int h = tid; h < g; h += kThreads) {
      float acc = 0.0f;
      if (lay.has_mean)
        for (int d = 0; d < D; ++d) acc += sh.q[h][d] * __half2float(mk[d]);
      sh.qm[h] = acc;
      sh.psum[h] = 0.0f;
    }
    __syncthreads();
    for (int t0 = 0; t0 < L && first + t0 <= limit; t0 += kTile) {
      const int n = static_cast<int>(min64(min(kTile, L - t0), limit - first - t0 + 1));
      for (int i = tid; i < g * kTile; i += kThreads) {
        const int h = i / kTile, t = i % kTile;
        float acc = -INFINITY;
        if (t < n) {
          acc = sh.qm[h];
          const std::int8_t* c = ck + static_cast<std::int64_t>(t0 + t) * rk;
          for (int j = 0; j < rk; ++j) acc += sh.qb[h][j] * static_cast<float>(c[j]);
          acc *= p.scale;
        }
        sh.s[h][t] = acc;
      }
      __syncthreads();
      softmax_tile(n);
      // Rescale the feature-space accumulator too: o and w share the running maximum.
      for (int i = tid; i < g * D; i += kThreads) sh.o[i / D][i % D] *= sh.alpha[i / D];
      for (int i = tid; i < g * rv; i += kThreads) {
        const int h = i / rv, j = i % rv;
        float acc = sh.w[h][j] * sh.alpha[h];
        for (int t = 0; t < n; ++t) acc += sh.s[h][t] * static_cast<float>(cv[static_cast<std::int64_t>(t0 + t) * rv + j]);
        sh.w[h][j] = acc;
      }
      for (int h = tid; h < g; h += kThreads) {
        float acc = sh.psum[h] * sh.alpha[h];
        for (int t = 0; t < n; ++t) acc += sh.s[h][t];
        sh.psum[h] = acc;
      }
      __syncthreads();
    }
    // Back to feature space: o += (w ⊙ scale_V)·B_V + psum·mean_V.
    for (int i = tid; i < g * D; i += kThreads) {
      const int h = i / D, d = i % D;
      float acc = lay.has_mean ? sh.psum[h] * __half2float(mv[d]) : 0.0f;
      for (int j = 0; j < rv; ++j) acc += sh.w[h][j] * sv[j] * __half2float(bv[j * D + d]);
      sh.o[h][d] += acc;
    }
    __syncthreads();
  }

  if (tail_len > 0) {
    const std::int64_t off = static_cast<std::int64_t>(kvh) * D;
    dense_run(static_cast<const T*>(p.tail.k[b]) + off, static_cast<const T*>(p.tail.v[b]) + off, tail_len,
              sink_len + n_blocks * L);
  }

  T* out = static_cast<T*>(p.out) + (static_cast<std::int64_t>(row) * p.num_q_heads + kvh * g) * D;
  for (int i = tid; i < g * D; i += kThreads) {
    const int h = i / D;
    store(out, i, sh.l[h] > 0.0f ? sh.o[h][i % D] / sh.l[h] : 0.0f);
  }
}

}  // namespace

Status MultiQueryAttention::can_implement(const MultiQueryParams& p) {
  const ColdBlockLayout& lay = p.layout;
  auto bad = [](const char* name, auto value, const char* why) {
    return Status::failure(detail::concat("MultiQueryAttention: argument ", name, " = ", value, " (", why, ")"));
  };
  if (p.dtype != DataType::kHalf && p.dtype != DataType::kBFloat16)
    return bad("dtype", static_cast<int>(p.dtype), "must be kHalf or kBFloat16");
  if (p.batch <= 0) return bad("batch", p.batch, "must be positive");
  if (p.total_rows <= 0) return bad("total_rows", p.total_rows, "must be positive");
  if (lay.num_kv_heads <= 0 || lay.num_kv_heads > 65535)
    return bad("layout.num_kv_heads", lay.num_kv_heads, "must be in [1, 65535] (one grid row per KV head)");
  if (p.num_q_heads <= 0 || p.num_q_heads % lay.num_kv_heads != 0)
    return bad("num_q_heads", p.num_q_heads, "must be a positive multiple of layout.num_kv_heads");
  if (p.num_q_heads / lay.num_kv_heads > kMaxGroup) return bad("num_q_heads", p.num_q_heads, "GQA group above 16");
  if (lay.head_dim <= 0 || lay.head_dim > kMaxDim || lay.head_dim % 8 != 0)
    return bad("layout.head_dim", lay.head_dim, "must be a multiple of 8 in [8, 128]");
  if (lay.block_size <= 0) return bad("layout.block_size", lay.block_size, "must be positive");
  if (lay.rank_k <= 0 || lay.rank_k > kMaxRank) return bad("layout.rank_k", lay.rank_k, "must be in [1, 64]");
  if (lay.rank_v <= 0 || lay.rank_v > kMaxRank) return bad("layout.rank_v", lay.rank_v, "must be in [1, 64]");
  if (lay != ColdBlockLayout::make(lay.block_size, lay.head_dim, lay.num_kv_heads, lay.rank_k, lay.rank_v, lay.has_mean))
    return bad("layout", "(offsets)", "must equal ColdBlockLayout::make() of its own shape fields");
  if (!std::isfinite(p.scale)) return bad("scale", p.scale, "must be finite");
  if (!p.q || !p.out || !p.q_offsets || !p.row_sequence) return bad("q/out/q_offsets/row_sequence", "nullptr", "required");
  auto aligned = [](const void* ptr, std::uintptr_t a) { return reinterpret_cast<std::uintptr_t>(ptr) % a == 0; };
  if (!aligned(p.q, 2)) return bad("q", p.q, "must be 2-byte aligned");
  if (!aligned(p.out, 2)) return bad("out", p.out, "must be 2-byte aligned");
  if (p.block_table_offsets && (!p.block_table || !p.pool)) return bad("block_table/pool", "nullptr", "required with block_table_offsets");
  if (p.block_table_offsets && !aligned(p.pool, 16))
    return bad("pool", static_cast<const void*>(p.pool), "must be 16-byte aligned");
  return Status::success();
}

void MultiQueryAttention::run(const MultiQueryParams& p, cudaStream_t stream) {
  const Status st = can_implement(p);
  if (!st) throw InvalidArgument(st.message);
  const dim3 grid(static_cast<unsigned>(p.total_rows), static_cast<unsigned>(p.layout.num_kv_heads));
  if (p.dtype == DataType::kHalf) {
    multi_query_kernel<__half><<<grid, kThreads, 0, stream>>>(p);
  } else {
    multi_query_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p);
  }
  check_launch("multi_query_kernel");
}

}  // namespace spectralkv::cuda
