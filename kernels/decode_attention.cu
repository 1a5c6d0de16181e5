// Host API of DecodeAttention and DenseDecodeAttention (spectralkv/cuda/decode_attention.cuh): argument
// checks, shared-memory and workspace plans, and dispatch onto the compiled kernel instantiations.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

#include "decode_host.cuh"
#include "spectralkv/cuda/decode_attention.cuh"

namespace spectralkv::cuda {

namespace {

using decode_host::fail;
constexpr float kLog2e = 1.4426950408889634f;

Status check_tier(const char* what, const char* name_k, const char* name_v, const DenseTier& t) {
  if (t.lengths == nullptr) return Status::success();
  if (t.k == nullptr) return decode_host::fail(what, name_k, "nullptr", "required when the tier has lengths");
  if (t.v == nullptr) return decode_host::fail(what, name_v, "nullptr", "required when the tier has lengths");
  return Status::success();
}

decode_host::Shape spectral_shape(const DecodeAttentionParams& p) {
  decode_host::Shape s =
      decode_host::base_shape(p.dtype, p.batch, p.num_q_heads, p.layout.num_kv_heads, p.layout.head_dim);
  s.rank_k = p.layout.rank_k;
  s.rank_v = p.layout.rank_v;
  s.region_bytes = static_cast<int>(decode_host::region_bytes(p.layout));  // can_implement bounds it
  return s;
}

kernel::TierArgs tier_args(const DenseTier& t) {
  kernel::TierArgs a;
  a.k_ptrs = t.k;
  a.v_ptrs = t.v;
  a.lengths = t.lengths;
  return a;
}

decode_host::Shape dense_shape(const DenseDecodeParams& p) {
  return decode_host::base_shape(p.dtype, p.batch, p.num_q_heads, p.num_kv_heads, p.head_dim);
}

Status check_workspace(const char* what, std::size_t need, const void* workspace, std::size_t bytes) {
  if (bytes < need)
    return fail(what, "workspace_bytes", bytes, detail::concat("get_workspace_size() requires ", need));
  if (need > 0 && workspace == nullptr) return fail(what, "workspace", "nullptr", "required");
  if (!decode_host::aligned(workspace, 256)) return fail(what, "workspace", workspace, "must be 256-byte aligned");
  return Status::success();
}

}  // namespace

// ---- DecodeAttention --------------------------------------------------------------------------------------

Status DecodeAttention::can_implement(const DecodeAttentionParams& p) {
  constexpr const char* kWhat = "DecodeAttention";
  const ColdBlockLayout& l = p.layout;
  if (p.dtype != DataType::kHalf && p.dtype != DataType::kBFloat16)
    return fail(kWhat, "dtype", static_cast<int>(p.dtype), "must be kHalf or kBFloat16");
  if (p.batch < 0 || p.batch > kernel::kMaxBatch)
    return fail(kWhat, "batch", p.batch, detail::concat("must be in [0, ", kernel::kMaxBatch, "]"));
  if (l.num_kv_heads < 1) return fail(kWhat, "layout.num_kv_heads", l.num_kv_heads, "must be positive");
  if (p.num_q_heads < 1 || p.num_q_heads % l.num_kv_heads != 0)
    return fail(kWhat, "num_q_heads", p.num_q_heads,
                detail::concat("must be a positive multiple of layout.num_kv_heads = ", l.num_kv_heads));
  if (p.num_q_heads / l.num_kv_heads > kernel::kMaxGroup)
    return fail(kWhat, "num_q_heads", p.num_q_heads,
                detail::concat("group size num_q_heads / num_kv_heads must be at most ", kernel::kMaxGroup));
  if (l.head_dim != 64 && l.head_dim != 128) return fail(kWhat, "layout.head_dim", l.head_dim, "must be 64 or 128");
  auto rank_ok = [](int r) { return r == 8 || r == 16 || r == 32 || r == 64; };
  if (!rank_ok(l.rank_k)) return fail(kWhat, "layout.rank_k", l.rank_k, "must be 8, 16, 32 or 64");
  if (!rank_ok(l.rank_v)) return fail(kWhat, "layout.rank_v", l.rank_v, "must be 8, 16, 32 or 64");
  if (l.block_size < 1) return fail(kWhat, "layout.block_size", l.block_size, "must be positive");
  if (l != ColdBlockLayout::make(l.block_size, l.head_dim, l.num_kv_heads, l.rank_k, l.rank_v, l.has_mean))
    return fail(kWhat, "layout", "(offsets)", "must equal ColdBlockLayout::make() of its own shape fields");
  // Offsets inside a head are 32-bit in the kernel (computed from make()'s offsets, checked just above, so
  // this does not overflow).
  if (decode_host::region_bytes(l) > std::numeric_limits<int>::max())
    return fail(kWhat, "layout.block_size", l.block_size,
                detail::concat("a head's scales and coefficients take ", decode_host::region_bytes(l), " bytes"));
  if (!std::isfinite(p.scale)) return fail(kWhat, "scale", p.scale, "must be finite");
  if (p.batch > 0) {
    if (p.q == nullptr) return fail(kWhat, "q", "nullptr", "required");
    if (p.out == nullptr) return fail(kWhat, "out", "nullptr", "required");
    if (!decode_host::aligned(p.q, 4)) return fail(kWhat, "q", p.q, "must be 4-byte aligned");
    if (!decode_host::aligned(p.out, 4)) return fail(kWhat, "out", p.out, "must be 4-byte aligned");
  }
  if (p.block_table_offsets != nullptr) {
    if (p.pool == nullptr) return fail(kWhat, "pool", "nullptr", "required with block tables");
    if (!decode_host::aligned(p.pool, 16)) return fail(kWhat, "pool", static_cast<const void*>(p.pool), "must be 16-byte aligned");
    if (p.block_table == nullptr) return fail(kWhat, "block_table", "nullptr", "required with block_table_offsets");
  }
  if (Status s = check_tier(kWhat, "sink.k", "sink.v", p.sink); !s) return s;
  if (Status s = check_tier(kWhat, "tail.k", "tail.v", p.tail); !s) return s;
  decode_host::DeviceInfo dev;
  std::string why;
  if (!decode_host::device_info(dev, why)) return Status::failure(detail::concat(kWhat, ": ", why));
  decode_host::Plan plan;
  if (!decode_host::make_plan(spectral_shape(p), dev, plan, why)) return fail(kWhat, "layout.block_size", l.block_size, why);
  return Status::success();
}

std::size_t DecodeAttention::get_workspace_size(const DecodeAttentionParams& p) {
  if (Status s = can_implement(p); !s) throw InvalidArgument(s.message);
  return decode_host::plan_for(spectral_shape(p)).bytes;
}

void DecodeAttention::initialize_workspace(const DecodeAttentionParams& p, void* workspace, cudaStream_t stream) {
  const std::size_t bytes = get_workspace_size(p);
  if (bytes > 0) {
    if (workspace == nullptr) throw InvalidArgument("DecodeAttention::initialize_workspace: argument workspace = nullptr (required)");
    check(cudaMemsetAsync(workspace, 0, bytes, stream), "cudaMemsetAsync(decode workspace)");
  }
}

void DecodeAttention::run(const DecodeAttentionParams& p, void* workspace, std::size_t workspace_bytes,
                          cudaStream_t stream) {
  constexpr const char* kWhat = "DecodeAttention::run";
  if (Status s = can_implement(p); !s) throw InvalidArgument(s.message);
  if (p.batch == 0) return;
  const decode_host::Shape shape = spectral_shape(p);
  const decode_host::Plan plan = decode_host::plan_for(shape);
  if (Status s = check_workspace(kWhat, plan.bytes, workspace, workspace_bytes); !s) throw InvalidArgument(s.message);

  const ColdBlockLayout& l = p.layout;
  kernel::KernelArgs k;
  k.q = p.q;
  k.out = p.out;
  k.score_scale = p.scale * kLog2e;
  k.batch = p.batch;
  k.num_kv_heads = l.num_kv_heads;
  k.group = shape.group;
  k.pool = p.pool;
  k.block_table = p.block_table;
  k.block_offsets = p.block_table_offsets;
  k.block_bytes = l.block_bytes;
  k.head_bytes = l.head_bytes;
  k.block_size = l.block_size;
  k.has_mean = l.has_mean ? 1 : 0;
  k.off_basis_k = l.basis_k;
  k.off_basis_v = l.basis_v;
  k.off_mean_k = l.mean_k;
  k.off_mean_v = l.mean_v;
  k.off_region = l.scale_k;
  k.region_bytes = shape.region_bytes;
  k.reg_scale_v = static_cast<int>(l.scale_v - l.scale_k);
  k.reg_coeff_k = static_cast<int>(l.coeff_k - l.scale_k);
  k.reg_coeff_v = static_cast<int>(l.coeff_v - l.scale_k);
  k.tiers[0] = tier_args(p.sink);
  k.tiers[2] = tier_args(p.tail);
  for (kernel::TierArgs& t : k.tiers) decode_host::set_token_major(t, l.num_kv_heads, l.head_dim);
  decode_host::apply_plan(plan, workspace, k);
  if (Status s = decode_host::launch(kWhat, shape, plan, k, stream); !s) throw InvalidArgument(s.message);
}

std::int64_t DecodeAttention::bytes_moved(const DecodeAttentionParams& p, const std::int64_t* cold_blocks,
                                          const std::int64_t* sink_len, const std::int64_t* tail_len) {
  const ColdBlockLayout& l = p.layout;
  const std::int64_t elem = 2;
  const std::int64_t cold_head = static_cast<std::int64_t>(l.rank_k + l.rank_v + (l.has_mean ? 2 : 0)) * l.head_dim * 2 +
                                 decode_host::region_bytes(l);
  const std::int64_t dense_token = 2 * static_cast<std::int64_t>(l.num_kv_heads) * l.head_dim * elem;
  std::int64_t bytes = 2 * static_cast<std::int64_t>(p.batch) * p.num_q_heads * l.head_dim * elem;  // q, out
  for (int b = 0; b < p.batch; ++b) {
    bytes += cold_blocks[b] * l.num_kv_heads * cold_head;
    bytes += (sink_len[b] + tail_len[b]) * dense_token;
  }
  return bytes;
}

// ---- DenseDecodeAttention ---------------------------------------------------------------------------------

Status DenseDecodeAttention::can_implement(const DenseDecodeParams& p) {
  constexpr const char* kWhat = "DenseDecodeAttention";
  if (p.dtype != DataType::kHalf && p.dtype != DataType::kBFloat16)
    return fail(kWhat, "dtype", static_cast<int>(p.dtype), "must be kHalf or kBFloat16");
  if (p.batch < 0 || p.batch > kernel::kMaxBatch)
    return fail(kWhat, "batch", p.batch, detail::concat("must be in [0, ", kernel::kMaxBatch, "]"));
  if (p.num_kv_heads < 1) return fail(kWhat, "num_kv_heads", p.num_kv_heads, "must be positive");
  if (p.num_q_heads < 1 || p.num_q_heads % p.num_kv_heads != 0)
    return fail(kWhat, "num_q_heads", p.num_q_heads,
                detail::concat("must be a positive multiple of num_kv_heads = ", p.num_kv_heads));
  if (p.num_q_heads / p.num_kv_heads > kernel::kMaxGroup)
    return fail(kWhat, "num_q_heads", p.num_q_heads,
                detail::concat("group size num_q_heads / num_kv_heads must be at most ", kernel::kMaxGroup));
  if (p.head_dim != 64 && p.head_dim != 128) return fail(kWhat, "head_dim", p.head_dim, "must be 64 or 128");
  if (!std::isfinite(p.scale)) return fail(kWhat, "scale", p.scale, "must be finite");
  if (p.max_len < 0) return fail(kWhat, "max_len", p.max_len, "must be non-negative");
  // The strides of the dense arrays, max_len · num_kv_heads · head_dim · 2 bytes per sequence, are 64-bit.
  if (p.max_len > (std::int64_t{1} << 62) / (2LL * p.num_kv_heads * p.head_dim * std::max(p.batch, 1)))
    return fail(kWhat, "max_len", p.max_len, "the dense K and V arrays would exceed 2^62 bytes");
  if (p.layout != KvLayout::kTokenMajor && p.layout != KvLayout::kHeadMajor)
    return fail(kWhat, "layout", static_cast<int>(p.layout), "must be kTokenMajor or kHeadMajor");
  if (p.batch > 0) {
    if (p.q == nullptr) return fail(kWhat, "q", "nullptr", "required");
    if (p.out == nullptr) return fail(kWhat, "out", "nullptr", "required");
    if (!decode_host::aligned(p.q, 4)) return fail(kWhat, "q", p.q, "must be 4-byte aligned");
    if (!decode_host::aligned(p.out, 4)) return fail(kWhat, "out", p.out, "must be 4-byte aligned");
    if (p.seq_lens == nullptr) return fail(kWhat, "seq_lens", "nullptr", "required");
    if (p.max_len > 0) {
      if (p.k == nullptr) return fail(kWhat, "k", "nullptr", "required");
      if (p.v == nullptr) return fail(kWhat, "v", "nullptr", "required");
      if (!decode_host::aligned(p.k, 16)) return fail(kWhat, "k", p.k, "must be 16-byte aligned");
      if (!decode_host::aligned(p.v, 16)) return fail(kWhat, "v", p.v, "must be 16-byte aligned");
    }
  }
  decode_host::DeviceInfo dev;
  std::string why;
  if (!decode_host::device_info(dev, why)) return Status::failure(detail::concat(kWhat, ": ", why));
  decode_host::Plan plan;
  if (!decode_host::make_plan(dense_shape(p), dev, plan, why)) return fail(kWhat, "batch", p.batch, why);
  return Status::success();
}

std::size_t DenseDecodeAttention::get_workspace_size(const DenseDecodeParams& p) {
  if (Status s = can_implement(p); !s) throw InvalidArgument(s.message);
  return decode_host::plan_for(dense_shape(p)).bytes;
}

void DenseDecodeAttention::initialize_workspace(const DenseDecodeParams& p, void* workspace, cudaStream_t stream) {
  const std::size_t bytes = get_workspace_size(p);
  if (bytes > 0) {
    if (workspace == nullptr) throw InvalidArgument("DenseDecodeAttention::initialize_workspace: argument workspace = nullptr (required)");
    check(cudaMemsetAsync(workspace, 0, bytes, stream), "cudaMemsetAsync(dense decode workspace)");
  }
}

void DenseDecodeAttention::run(const DenseDecodeParams& p, void* workspace, std::size_t workspace_bytes,
                               cudaStream_t stream) {
  constexpr const char* kWhat = "DenseDecodeAttention::run";
  if (Status s = can_implement(p); !s) throw InvalidArgument(s.message);
  if (p.batch == 0) return;
  const decode_host::Shape shape = dense_shape(p);
  const decode_host::Plan plan = decode_host::plan_for(shape);
  if (Status s = check_workspace(kWhat, plan.bytes, workspace, workspace_bytes); !s) throw InvalidArgument(s.message);

  kernel::KernelArgs k;
  k.q = p.q;
  k.out = p.out;
  k.score_scale = p.scale * kLog2e;
  k.batch = p.batch;
  k.num_kv_heads = p.num_kv_heads;
  k.group = shape.group;
  kernel::TierArgs& t = k.tiers[2];
  t.k_base = static_cast<const char*>(p.k);
  t.v_base = static_cast<const char*>(p.v);
  t.seq_stride_bytes = p.max_len * p.num_kv_heads * p.head_dim * 2;
  if (p.layout == KvLayout::kHeadMajor) {
    t.token_stride_bytes = 2LL * p.head_dim;
    t.head_stride_bytes = p.max_len * t.token_stride_bytes;
  } else {
    decode_host::set_token_major(t, p.num_kv_heads, p.head_dim);
  }
  t.lengths = p.seq_lens;
  decode_host::apply_plan(plan, workspace, k);
  if (Status s = decode_host::launch(kWhat, shape, plan, k, stream); !s) throw InvalidArgument(s.message);
}

}  // namespace spectralkv::cuda
