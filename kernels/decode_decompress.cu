// DecompressThenAttend: rebuild K and V of every cold block with batched cuBLAS GEMMs, then run the dense
// decode kernel over sinks, rebuilt tokens and tail. This is what attention over a compressed cache costs
// without attention in the compressed space, and the comparison the fused kernel has to win.

#include <cublas_v2.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "decode_host.cuh"
#include "spectralkv/cuda/decode_attention.cuh"

namespace spectralkv::cuda {

namespace {

using decode_host::align_up;
using decode_host::fail;
constexpr float kLog2e = 1.4426950408889634f;
constexpr const char* kWhat = "DecompressThenAttend";

/// Workspace of the rebuild, after the dense kernel's own workspace.
struct RebuildPlan {
  long long entries = 0;  ///< batch * max_cold_blocks * num_kv_heads GEMMs per K and per V
  std::size_t off_recon_k = 0, off_recon_v = 0, off_coeff = 0, off_ptrs = 0, off_lens = 0, off_zero = 0;
  std::size_t bytes = 0;
};

RebuildPlan rebuild_plan(const DecompressParams& p, std::size_t start) {
  const ColdBlockLayout& l = p.attention.layout;
  RebuildPlan r;
  r.entries = static_cast<long long>(p.attention.batch) * p.max_cold_blocks * l.num_kv_heads;
  const long long recon = static_cast<long long>(p.attention.batch) * p.max_cold_blocks * l.block_size *
                          l.num_kv_heads * l.head_dim * 2;
  std::size_t w = align_up(static_cast<long long>(start), 256);
  r.off_recon_k = w;
  w = align_up(static_cast<long long>(w) + recon, 256);
  r.off_recon_v = w;
  w = align_up(static_cast<long long>(w) + recon, 256);
  r.off_coeff = w;
  w = align_up(static_cast<long long>(w) + r.entries * l.block_size * (l.rank_k + l.rank_v) * 2, 256);
  r.off_ptrs = w;
  w = align_up(static_cast<long long>(w) + 6 * 8 * r.entries, 256);
  r.off_lens = w;
  w = align_up(static_cast<long long>(w) + 4LL * p.attention.batch, 256);
  r.off_zero = w;  // a zero basis for GEMMs of block slots a sequence does not use
  w = align_up(static_cast<long long>(w) + 2LL * std::max(l.rank_k, l.rank_v) * l.head_dim, 256);
  r.bytes = w;
  return r;
}

struct PrepArgs {
  const unsigned char* pool;
  const int* block_table;
  const int* block_offsets;
  long long block_bytes, head_bytes;
  long long basis_k, basis_v, mean_k, mean_v, scale_k, scale_v, coeff_k, coeff_v;
  int block_size, head_dim, num_kv_heads, rank_k, rank_v, has_mean, max_cold;
  __half* recon_k;
  __half* recon_v;
  __half* coeff;
  const void** ptrs;  ///< [6][entries]: basis_k, coeff_k, recon_k, basis_v, coeff_v, recon_v
  int* recon_len;
  const __half* zero_basis;
  long long entries;
};

/// One CTA per (sequence, block slot, head): dequantised coefficients (scale folded in) and GEMM pointers;
/// with has_mean the destination rows are prefilled with the mean (the GEMM then adds with beta = 1).
__global__ void prepare_rebuild(const PrepArgs a) {
  const long long e = blockIdx.x;
  const int h = static_cast<int>(e % a.num_kv_heads);
  const int i = static_cast<int>((e / a.num_kv_heads) % a.max_cold);
  const int b = static_cast<int>(e / (static_cast<long long>(a.num_kv_heads) * a.max_cold));
  const int L = a.block_size, D = a.head_dim, H = a.num_kv_heads;
  const int ncold = a.block_offsets != nullptr ? a.block_offsets[b + 1] - a.block_offsets[b] : 0;
  const bool valid = i < ncold;
  __half* ck = a.coeff + e * L * (a.rank_k + a.rank_v);
  __half* cv = ck + static_cast<long long>(L) * a.rank_k;
  const long long row0 = (static_cast<long long>(b) * a.max_cold + i) * L;  // first rebuilt token row
  __half* rk = a.recon_k + (row0 * H + h) * D;
  __half* rv = a.recon_v + (row0 * H + h) * D;
  const unsigned char* src = nullptr;
  if (valid) {
    src = a.pool + static_cast<long long>(a.block_table[a.block_offsets[b] + i]) * a.block_bytes +
          static_cast<long long>(h) * a.head_bytes;
    const float* sk = reinterpret_cast<const float*>(src + a.scale_k);
    const float* sv = reinterpret_cast<const float*>(src + a.scale_v);
    const signed char* qk = reinterpret_cast<const signed char*>(src + a.coeff_k);
    const signed char* qv = reinterpret_cast<const signed char*>(src + a.coeff_v);
    for (int x = threadIdx.x; x < L * a.rank_k; x += blockDim.x) ck[x] = __float2half_rn(qk[x] * sk[x % a.rank_k]);
    for (int x = threadIdx.x; x < L * a.rank_v; x += blockDim.x) cv[x] = __float2half_rn(qv[x] * sv[x % a.rank_v]);
    if (a.has_mean) {
      const __half* mk = reinterpret_cast<const __half*>(src + a.mean_k);
      const __half* mv = reinterpret_cast<const __half*>(src + a.mean_v);
      for (int x = threadIdx.x; x < L * D; x += blockDim.x) {
        const long long t = x / D, d = x % D;
        rk[t * H * D + d] = mk[d];
        rv[t * H * D + d] = mv[d];
      }
    }
  }
  if (threadIdx.x == 0) {
    a.ptrs[0 * a.entries + e] = valid ? static_cast<const void*>(src + a.basis_k) : a.zero_basis;
    a.ptrs[1 * a.entries + e] = ck;
    a.ptrs[2 * a.entries + e] = rk;
    a.ptrs[3 * a.entries + e] = valid ? static_cast<const void*>(src + a.basis_v) : a.zero_basis;
    a.ptrs[4 * a.entries + e] = cv;
    a.ptrs[5 * a.entries + e] = rv;
    if (i == 0 && h == 0) a.recon_len[b] = ncold * L;
  }
}

decode_host::Shape dense_shape_of(const DecodeAttentionParams& p) {
  return decode_host::base_shape(p.dtype, p.batch, p.num_q_heads, p.layout.num_kv_heads, p.layout.head_dim);
}

}  // namespace

DecompressThenAttend::DecompressThenAttend() {
  cublasHandle_t h = nullptr;
  check(cublasCreate(&h), "cublasCreate");
  handle_ = h;
}

DecompressThenAttend::~DecompressThenAttend() {
  if (handle_ != nullptr) cublasDestroy(static_cast<cublasHandle_t>(handle_));
}

Status DecompressThenAttend::can_implement(const DecompressParams& p) {
  if (Status s = DecodeAttention::can_implement(p.attention); !s) return s;
  if (p.attention.dtype != DataType::kHalf)
    return fail(kWhat, "attention.dtype", static_cast<int>(p.attention.dtype), "only kHalf is supported");
  if (p.max_cold_blocks < 0) return fail(kWhat, "max_cold_blocks", p.max_cold_blocks, "must be non-negative");
  // The rebuilt K (and V) hold batch · max_cold_blocks · block_size · num_kv_heads · head_dim halves; the
  // GEMM batch counts are ints.
  const ColdBlockLayout& l = p.attention.layout;
  const long double recon = static_cast<long double>(p.attention.batch) * p.max_cold_blocks * l.block_size *
                            l.num_kv_heads * l.head_dim * 2;
  if (p.max_cold_blocks > std::numeric_limits<int>::max() / std::max(1, l.num_kv_heads) / std::max(1, p.attention.batch) ||
      recon > static_cast<long double>(std::int64_t{1} << 60))
    return fail(kWhat, "max_cold_blocks", p.max_cold_blocks,
                "batch · max_cold_blocks · num_kv_heads GEMMs must fit an int, and the rebuilt K and V 2^60 bytes");
  return Status::success();
}

std::size_t DecompressThenAttend::get_workspace_size(const DecompressParams& p) {
  if (Status s = can_implement(p); !s) throw InvalidArgument(s.message);
  const decode_host::Plan plan = decode_host::plan_for(dense_shape_of(p.attention));
  return rebuild_plan(p, plan.bytes).bytes;
}

void DecompressThenAttend::initialize_workspace(const DecompressParams& p, void* workspace, cudaStream_t stream) {
  const std::size_t bytes = get_workspace_size(p);
  if (workspace == nullptr) throw InvalidArgument("DecompressThenAttend::initialize_workspace: argument workspace = nullptr (required)");
  const decode_host::Plan plan = decode_host::plan_for(dense_shape_of(p.attention));
  const RebuildPlan r = rebuild_plan(p, plan.bytes);
  check(cudaMemsetAsync(workspace, 0, plan.bytes, stream), "cudaMemsetAsync(decompress workspace)");
  check(cudaMemsetAsync(static_cast<unsigned char*>(workspace) + r.off_zero, 0, bytes - r.off_zero, stream),
        "cudaMemsetAsync(decompress zero basis)");
}

void DecompressThenAttend::run(const DecompressParams& p, void* workspace, std::size_t workspace_bytes,
                               cudaStream_t stream) {
  if (Status s = can_implement(p); !s) throw InvalidArgument(s.message);
  const DecodeAttentionParams& ap = p.attention;
  if (ap.batch == 0) return;
  const ColdBlockLayout& l = ap.layout;
  const decode_host::Shape shape = dense_shape_of(ap);
  const decode_host::Plan plan = decode_host::plan_for(shape);
  const RebuildPlan r = rebuild_plan(p, plan.bytes);
  if (workspace_bytes < r.bytes)
    throw InvalidArgument(detail::concat("DecompressThenAttend::run: argument workspace_bytes = ", workspace_bytes,
                                         " (get_workspace_size() requires ", r.bytes, ")"));
  if (workspace == nullptr || !decode_host::aligned(workspace, 256))
    throw InvalidArgument("DecompressThenAttend::run: argument workspace (must be non-null and 256-byte aligned)");
  auto* ws = static_cast<unsigned char*>(workspace);
  auto* recon_k = reinterpret_cast<__half*>(ws + r.off_recon_k);
  auto* recon_v = reinterpret_cast<__half*>(ws + r.off_recon_v);
  auto* lens = reinterpret_cast<int*>(ws + r.off_lens);
  auto** ptrs = reinterpret_cast<const void**>(ws + r.off_ptrs);
  auto** out_ptrs = reinterpret_cast<void**>(ws + r.off_ptrs);

  if (r.entries > 0) {
    PrepArgs a{};
    a.pool = ap.pool;
    a.block_table = ap.block_table;
    a.block_offsets = ap.block_table_offsets;
    a.block_bytes = l.block_bytes;
    a.head_bytes = l.head_bytes;
    a.basis_k = l.basis_k;
    a.basis_v = l.basis_v;
    a.mean_k = l.mean_k;
    a.mean_v = l.mean_v;
    a.scale_k = l.scale_k;
    a.scale_v = l.scale_v;
    a.coeff_k = l.coeff_k;
    a.coeff_v = l.coeff_v;
    a.block_size = l.block_size;
    a.head_dim = l.head_dim;
    a.num_kv_heads = l.num_kv_heads;
    a.rank_k = l.rank_k;
    a.rank_v = l.rank_v;
    a.has_mean = l.has_mean ? 1 : 0;
    a.max_cold = static_cast<int>(p.max_cold_blocks);
    a.recon_k = recon_k;
    a.recon_v = recon_v;
    a.coeff = reinterpret_cast<__half*>(ws + r.off_coeff);
    a.ptrs = ptrs;
    a.recon_len = lens;
    a.zero_basis = reinterpret_cast<const __half*>(ws + r.off_zero);
    a.entries = r.entries;
    prepare_rebuild<<<static_cast<unsigned>(r.entries), 256, 0, stream>>>(a);
    check_launch("prepare_rebuild");

    auto handle = static_cast<cublasHandle_t>(handle_);
    check(cublasSetStream(handle, stream), "cublasSetStream");
    const float alpha = 1.0f;
    const float beta = l.has_mean ? 1.0f : 0.0f;
    const int ldc = l.num_kv_heads * l.head_dim;
    // Column-major view: rebuilt rows (D x L, ld = H*D) = basis (D x r, ld = D) * coefficients (r x L, ld = r).
    for (int kv = 0; kv < 2; ++kv) {
      const int rank = kv == 0 ? l.rank_k : l.rank_v;
      check(cublasGemmBatchedEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, l.head_dim, l.block_size, rank, &alpha,
                                ptrs + (3 * kv + 0) * r.entries, CUDA_R_16F, l.head_dim,
                                ptrs + (3 * kv + 1) * r.entries, CUDA_R_16F, rank, &beta,
                                out_ptrs + (3 * kv + 2) * r.entries, CUDA_R_16F, ldc, static_cast<int>(r.entries), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            "cublasGemmBatchedEx(rebuild)");
    }
  } else {
    check(cudaMemsetAsync(lens, 0, 4 * static_cast<std::size_t>(ap.batch), stream), "cudaMemsetAsync(rebuilt lengths)");
  }

  kernel::KernelArgs k;
  k.q = ap.q;
  k.out = ap.out;
  k.score_scale = ap.scale * kLog2e;
  k.batch = ap.batch;
  k.num_kv_heads = l.num_kv_heads;
  k.group = shape.group;
  k.tiers[0].k_ptrs = ap.sink.k;
  k.tiers[0].v_ptrs = ap.sink.v;
  k.tiers[0].lengths = ap.sink.lengths;
  k.tiers[1].k_base = reinterpret_cast<const char*>(recon_k);
  k.tiers[1].v_base = reinterpret_cast<const char*>(recon_v);
  k.tiers[1].seq_stride_bytes = p.max_cold_blocks * l.block_size * l.num_kv_heads * l.head_dim * 2;
  k.tiers[1].lengths = lens;
  k.tiers[2].k_ptrs = ap.tail.k;
  k.tiers[2].v_ptrs = ap.tail.v;
  k.tiers[2].lengths = ap.tail.lengths;
  for (kernel::TierArgs& t : k.tiers) decode_host::set_token_major(t, l.num_kv_heads, l.head_dim);
  decode_host::apply_plan(plan, workspace, k);
  if (Status s = decode_host::launch("DecompressThenAttend::run", shape, plan, k, stream); !s)
    throw InvalidArgument(s.message);
}

}  // namespace spectralkv::cuda
