#pragma once
// Host-side planning and dispatch for the decode-attention kernel: shared-memory plan, workspace layout,
// and the switches that map runtime shapes (type, head_dim, ranks) onto compiled instantiations.
// Private to the kernel library.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <string>
#include <type_traits>

#include "decode_kernel_args.cuh"
#include "spectralkv/cuda/decode_attention.cuh"
#include "spectralkv/cuda/error.cuh"
#include "spectralkv/error.hpp"
#include "spectralkv/layout.cuh"

namespace spectralkv::cuda::decode_host {

inline long long align_up(long long n, long long a) { return (n + a - 1) / a * a; }

/// The merge kernel takes over the split merge when the pairs are spread over more than this many CTAs each.
constexpr long long kMergeKernelMaxSplit = 8;

struct DeviceInfo {
  int sm_count = 0;
  int smem_optin = 0;     ///< dynamic shared memory one CTA may opt into
  int smem_per_sm = 0;    ///< shared memory of one SM
  int smem_reserved = 0;  ///< shared memory the system reserves per CTA
};

/// Attributes of the current device, read once per device. False (and `why`) without a usable device.
inline bool device_info(DeviceInfo& info, std::string& why) {
  static std::mutex mutex;
  static DeviceInfo cache[64];
  int device = 0;
  cudaError_t st = cudaGetDevice(&device);
  if (st != cudaSuccess) {
    cudaGetLastError();
    why = detail::concat("no usable CUDA device (cudaGetDevice: ", cudaGetErrorName(st), ")");
    return false;
  }
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= 0 && device < 64 && cache[device].sm_count > 0) {
    info = cache[device];
    return true;
  }
  DeviceInfo d;
  st = cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device);
  if (st == cudaSuccess) st = cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (st == cudaSuccess)
    st = cudaDeviceGetAttribute(&d.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  if (st == cudaSuccess)
    st = cudaDeviceGetAttribute(&d.smem_reserved, cudaDevAttrReservedSharedMemoryPerBlock, device);
  if (st != cudaSuccess) {
    cudaGetLastError();
    why = detail::concat("cannot read device ", device, " attributes (", cudaGetErrorName(st), ")");
    return false;
  }
  if (device >= 0 && device < 64) cache[device] = d;
  info = d;
  return true;
}

/// Everything the plan depends on.
struct Shape {
  DataType dtype = DataType::kHalf;
  int batch = 0, num_kv_heads = 0, group = 0, head_dim = 0;
  int rank_k = 0, rank_v = 0;  ///< 0: dense tiers only
  int region_bytes = 0;        ///< bytes of scales + coefficients copied per cold block and head
};

/// The fields of a Shape that every decode kernel has (no cold blocks).
inline Shape base_shape(DataType dtype, int batch, int num_q_heads, int num_kv_heads, int head_dim) {
  Shape s;
  s.dtype = dtype;
  s.batch = batch;
  s.num_kv_heads = num_kv_heads;
  s.group = num_kv_heads > 0 ? num_q_heads / num_kv_heads : 0;
  s.head_dim = head_dim;
  return s;
}

struct Plan {
  int grid = 0, stages = 0, stage_bytes = 0, smem_bytes = 0, ctas_per_sm = 0;
  int smem_seq = 0, smem_prefix = 0, smem_qf = 0, smem_qt = 0, smem_work = 0, smem_misc = 0, smem_bar = 0,
      smem_stage = 0;
  long long pairs = 0, slots = 0;
  bool merge_in_kernel = true;
  std::size_t off_partial_o = 0, off_partial_ml = 0, off_counters = 0, bytes = 0;  ///< workspace layout
};

/// Shared-memory and workspace plan; false with `why` when no stage ring of depth 2 fits.
inline bool make_plan(const Shape& s, const DeviceInfo& dev, Plan& p, std::string& why) {
  using kernel::kChunk;
  using kernel::kMaxGroup;
  const int warps = kernel::kWarpsPerCta;
  const long long row = 2LL * s.head_dim + 16;                    // padded basis row (DecodeTraits::kRow)
  const long long dense_stage = 2LL * kChunk * 2 * s.head_dim;   // swizzled unpadded rows (kRowD)
  long long cold_stage = 0;
  if (s.rank_k > 0) {
    // Bases in padded rows, the region as stored, and slack for the 16-token steps past block_size.
    cold_stage = (s.rank_k + s.rank_v + 2) * row + s.region_bytes + 16LL * std::max(s.rank_k, s.rank_v) + 16;
  }
  const long long stage = align_up(std::max(dense_stage, cold_stage), 128);
  long long off = 0;
  p.smem_seq = static_cast<int>(off);
  off = align_up(off + static_cast<long long>(s.batch) * sizeof(kernel::SeqInfo), 16);
  p.smem_prefix = static_cast<int>(off);
  off = align_up(off + 4LL * (s.batch + 1), 16);
  p.smem_qf = static_cast<int>(off);
  if (s.rank_k > 0) off += (s.head_dim / 16) * 32 * 16;  // FP16 q fragments of the cold path
  p.smem_qt = static_cast<int>(off);
  off += (s.head_dim / 16) * 32 * 16;
  p.smem_work = static_cast<int>(off);
  // Work area: the warps' states (m, l; o over head_dim) when a (sequence, head) segment ends.
  const long long work_floats = 2LL * warps * kMaxGroup + static_cast<long long>(warps) * s.group * s.head_dim;
  off = align_up(off + 4 * work_floats, 16);
  p.smem_misc = static_cast<int>(off);
  off = align_up(off + 64, 16);
  p.smem_bar = static_cast<int>(off);  // one 8-byte mbarrier per stage
  off = align_up(off + 8 * kernel::kMaxStages, 128);
  p.smem_stage = static_cast<int>(off);
  // The instantiation's CTAs per SM when two stages fit in their share of the SM's shared memory (large
  // ranks do not), else one CTA per SM with all of it. The kernel cuts the work list among the CTAs (sharing_ctas).
  int ctas = kernel::kCtasPerSm;
  long long budget = dev.smem_optin;
  for (; ctas > 1; --ctas) {
    budget = std::min<long long>(dev.smem_optin, dev.smem_per_sm / ctas - dev.smem_reserved);
    if ((budget - off) / stage >= 2) break;
    budget = dev.smem_optin;
  }
  const long long fit = (budget - off) / stage;
  if (fit < 2) {
    why = detail::concat("needs ", off + 2 * stage, " bytes of shared memory (two stages of ", stage,
                         " bytes), the device offers ", dev.smem_optin);
    return false;
  }
  p.stages = static_cast<int>(std::min<long long>(kernel::kMaxStages, fit));
  p.stage_bytes = static_cast<int>(stage);
  p.smem_bytes = static_cast<int>(off + p.stages * stage);
  p.ctas_per_sm = ctas;
  p.grid = dev.sm_count * ctas;
  p.pairs = static_cast<long long>(s.batch) * s.num_kv_heads;
  p.slots = p.grid + p.pairs;  // a segment (CTA c, pair q) uses slot c + q: distinct, below grid + pairs
  // Few pairs on many CTAs (batch 1 at long context: 33 CTAs per head on 132 SMs) leave each pair's merge
  // to one CTA after all of its partials exist, a chain of rounds of L2 loads on the critical path: the
  // merge kernel takes those pairs in parallel. With many pairs the last CTA of a pair merges while other
  // CTAs still work, and a second kernel would only add its launch and wait (measured on an H200: batch 8
  // and 32 at T = 4K 1.5-2.5 µs slower with the merge kernel, batch 1 2-4 µs faster).
  p.merge_in_kernel = p.pairs * kMergeKernelMaxSplit >= p.grid;
  std::size_t w = 0;
  p.off_partial_o = w;
  w = align_up(static_cast<long long>(w) + 4 * p.slots * s.group * s.head_dim, 256);
  p.off_partial_ml = w;
  w = align_up(static_cast<long long>(w) + 8 * p.slots * s.group, 256);
  p.off_counters = w;
  w = align_up(static_cast<long long>(w) + 4 * p.pairs, 256);
  p.bytes = s.batch > 0 ? w : 0;
  return true;
}

/// The plan of a shape that can_implement has accepted, so that neither the device query nor the
/// plan can fail here (both already succeeded for the same arguments).
inline Plan plan_for(const Shape& s) {
  DeviceInfo dev;
  Plan plan;
  std::string why;
  device_info(dev, why);
  make_plan(s, dev, plan, why);
  return plan;
}

/// Copies the plan and workspace pointers into the kernel arguments.
inline void apply_plan(const Plan& p, void* workspace, kernel::KernelArgs& k) {
  k.stages = p.stages;
  k.merge_in_kernel = p.merge_in_kernel ? 1 : 0;
  k.stage_bytes = p.stage_bytes;
  k.smem_seq = p.smem_seq;
  k.smem_prefix = p.smem_prefix;
  k.smem_qf = p.smem_qf;
  k.smem_qt = p.smem_qt;
  k.smem_work = p.smem_work;
  k.smem_misc = p.smem_misc;
  k.smem_bar = p.smem_bar;
  k.smem_stage = p.smem_stage;
  auto* base = static_cast<unsigned char*>(workspace);
  k.partial_o = reinterpret_cast<float*>(base + p.off_partial_o);
  k.partial_ml = reinterpret_cast<float2*>(base + p.off_partial_ml);
  k.counters = reinterpret_cast<unsigned int*>(base + p.off_counters);
}

/// Strides of a token-major dense tier: [tokens][num_kv_heads][head_dim] of 2-byte elements.
inline void set_token_major(kernel::TierArgs& t, int num_kv_heads, int head_dim) {
  t.head_stride_bytes = 2LL * head_dim;
  t.token_stride_bytes = t.head_stride_bytes * num_kv_heads;
}

/// Bytes of scales and coefficients of one head of a cold block (the contiguous region the kernel copies).
inline long long region_bytes(const ColdBlockLayout& l) {
  const long long end = l.coeff_v + static_cast<long long>(l.block_size) * l.rank_v;
  return align_up(end, 16) - l.scale_k;
}

template <class V>
Status fail(const char* what, const char* name, const V& value, const std::string& why) {
  return Status::failure(detail::concat(what, ": argument ", name, " = ", value, " (", why, ")"));
}

inline bool aligned(const void* p, std::uintptr_t a) { return reinterpret_cast<std::uintptr_t>(p) % a == 0; }

// ---- Runtime -> compile-time switches. Each returns the callee's Status, or a failure naming the value.

template <class T>
struct TypeTag {
  using type = T;
};
template <int N>
using Int = std::integral_constant<int, N>;

template <class F>
Status with_dtype(const char* what, DataType t, F&& f) {
  switch (t) {
    case DataType::kHalf: return f(TypeTag<__half>{});
    case DataType::kBFloat16: return f(TypeTag<__nv_bfloat16>{});
  }
  return fail(what, "dtype", static_cast<int>(t), "must be kHalf or kBFloat16");
}
template <class F>
Status with_head_dim(const char* what, int d, F&& f) {
  switch (d) {
    case 64: return f(Int<64>{});
    case 128: return f(Int<128>{});
    default: return fail(what, "head_dim", d, "must be 64 or 128");
  }
}
template <class F>
Status with_rank(const char* what, const char* name, int r, F&& f) {
  switch (r) {
    case 8: return f(Int<8>{});
    case 16: return f(Int<16>{});
    case 32: return f(Int<32>{});
    case 64: return f(Int<64>{});
    default: return fail(what, name, r, "must be 8, 16, 32 or 64");
  }
}

/// Launches the fused kernel for the shape's type, head_dim and ranks (ranks 0: the dense instantiation).
inline Status launch(const char* what, const Shape& s, const Plan& p, const kernel::KernelArgs& args,
                     cudaStream_t stream) {
  return with_dtype(what, s.dtype, [&](auto t) {
    using T = typename decltype(t)::type;
    return with_head_dim(what, s.head_dim, [&](auto d) {
      constexpr int kD = decltype(d)::value;
      if (s.rank_k == 0) {
        kernel::launch_decode<T, kD, 0, 0>(args, p.grid, p.smem_bytes, stream);
        return Status::success();
      }
      return with_rank(what, "layout.rank_k", s.rank_k, [&](auto rk) {
        return with_rank(what, "layout.rank_v", s.rank_v, [&](auto rv) {
          kernel::launch_decode<T, kD, decltype(rk)::value, decltype(rv)::value>(args, p.grid, p.smem_bytes, stream);
          return Status::success();
        });
      });
    });
  });
}

}  // namespace spectralkv::cuda::decode_host
