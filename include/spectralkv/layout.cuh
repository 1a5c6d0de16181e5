#pragma once
// The cold-block layout: the one byte format of a compressed block, shared by the CPU reference and
// the CUDA kernels, so a cache built on one backend can be copied to the other and checked there.
// Device-visible (.cuh) but free of CUDA headers: it compiles with a plain C++17 compiler too.

#include <cstdint>

#ifdef __CUDACC__
#define SPECTRALKV_HD __host__ __device__
#else
#define SPECTRALKV_HD
#endif

namespace spectralkv {

/// Byte layout of one cold block of one layer.
///
/// A cold block holds `block_size` (L) consecutive tokens of one sequence for all `num_kv_heads`
/// (H) KV heads of one layer. It is one contiguous slab of `block_bytes` bytes; the slabs of a layer
/// live in a pool, `pool + block_id * block_bytes`, and a sequence's block table lists its block
/// ids oldest first. Inside a slab, head h starts at `h * head_bytes` and holds, in this order,
/// each section starting on a 16-byte boundary (so every section can be read with 16-byte loads):
///
/// | section   | type    | shape        | meaning                                                   |
/// |-----------|---------|--------------|-----------------------------------------------------------|
/// | basis_k   | fp16    | [r_K][D]     | rows: the top r_K right singular vectors of the key block |
/// | basis_v   | fp16    | [r_V][D]     | same for values                                           |
/// | mean_k    | fp16    | [D]          | per-channel key mean (present only if has_mean)           |
/// | mean_v    | fp16    | [D]          | per-channel value mean (present only if has_mean)         |
/// | scale_k   | fp32    | [r_K]        | scale of coefficient column j: max_t abs(C_K[t][j]) / 127 |
/// | scale_v   | fp32    | [r_V]        | same for values                                           |
/// | coeff_k   | int8    | [L][r_K]     | row t: the key coefficients of token t, C_K = (K - mean)·B_Kᵀ |
/// | coeff_v   | int8    | [L][r_V]     | same for values                                           |
///
/// The token t of the block is reconstructed as `k_t ≈ mean_k + Σ_j scale_k[j]·coeff_k[t][j]·basis_k[j]`
/// (mean 0 without has_mean); a zero column has scale 0 and zero coefficients. All arrays are
/// row-major: element (i, j) of an [m][n] array is at index i·n + j. `head_bytes` is a multiple of
/// 128 so each head starts on a cache-line boundary of the pool.
struct ColdBlockLayout {
  std::int32_t block_size = 0;  ///< L
  std::int32_t head_dim = 0;    ///< D
  std::int32_t num_kv_heads = 0;
  std::int32_t rank_k = 0;      ///< r_K
  std::int32_t rank_v = 0;      ///< r_V
  bool has_mean = false;

  // Byte offsets of the sections from the start of a head's section of the slab.
  std::int64_t basis_k = 0, basis_v = 0, mean_k = 0, mean_v = 0;
  std::int64_t scale_k = 0, scale_v = 0, coeff_k = 0, coeff_v = 0;
  std::int64_t head_bytes = 0;   ///< stride between heads inside a slab
  std::int64_t block_bytes = 0;  ///< stride between blocks in the pool

  static constexpr std::int64_t kSectionAlign = 16;
  static constexpr std::int64_t kHeadAlign = 128;

  SPECTRALKV_HD static constexpr std::int64_t align_up(std::int64_t n, std::int64_t a) {
    return (n + a - 1) / a * a;
  }

  /// Computes every offset from the shape. Arguments are assumed validated (see CacheConfig).
  SPECTRALKV_HD static constexpr ColdBlockLayout make(int block_size, int head_dim, int num_kv_heads,
                                                      int rank_k, int rank_v, bool has_mean) {
    ColdBlockLayout l{};
    l.block_size = block_size;
    l.head_dim = head_dim;
    l.num_kv_heads = num_kv_heads;
    l.rank_k = rank_k;
    l.rank_v = rank_v;
    l.has_mean = has_mean;
    std::int64_t at = 0;
    auto take = [&at](std::int64_t bytes) {
      const std::int64_t start = at;
      at = align_up(at + bytes, kSectionAlign);
      return start;
    };
    const std::int64_t d = head_dim;
    l.basis_k = take(2 * d * rank_k);
    l.basis_v = take(2 * d * rank_v);
    l.mean_k = take(has_mean ? 2 * d : 0);
    l.mean_v = take(has_mean ? 2 * d : 0);
    l.scale_k = take(std::int64_t{4} * rank_k);
    l.scale_v = take(std::int64_t{4} * rank_v);
    l.coeff_k = take(static_cast<std::int64_t>(block_size) * rank_k);
    l.coeff_v = take(static_cast<std::int64_t>(block_size) * rank_v);
    l.head_bytes = align_up(at, kHeadAlign);
    l.block_bytes = l.head_bytes * num_kv_heads;
    return l;
  }

  /// Whether the shape and every offset are equal; a layout handed to a kernel must equal make() of its
  /// own shape fields.
  SPECTRALKV_HD constexpr bool operator==(const ColdBlockLayout& o) const {
    return block_size == o.block_size && head_dim == o.head_dim && num_kv_heads == o.num_kv_heads &&
           rank_k == o.rank_k && rank_v == o.rank_v && has_mean == o.has_mean && basis_k == o.basis_k &&
           basis_v == o.basis_v && mean_k == o.mean_k && mean_v == o.mean_v && scale_k == o.scale_k &&
           scale_v == o.scale_v && coeff_k == o.coeff_k && coeff_v == o.coeff_v && head_bytes == o.head_bytes &&
           block_bytes == o.block_bytes;
  }
  SPECTRALKV_HD constexpr bool operator!=(const ColdBlockLayout& o) const { return !(*this == o); }

  /// Bytes the layout's data needs without alignment padding (for reporting).
  SPECTRALKV_HD constexpr std::int64_t payload_bytes_per_head() const {
    const std::int64_t d = head_dim;
    const std::int64_t r = std::int64_t{rank_k} + rank_v;
    return 2 * r * d + (has_mean ? 4 * d : 0) + 4 * r + static_cast<std::int64_t>(block_size) * r;
  }
};

}  // namespace spectralkv
