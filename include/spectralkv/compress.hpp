#pragma once
// Block factors and the INT8 storage rule: how a rank-r factorisation X ≈ mean + C·B of one block
// of one head becomes the bytes of the cold layout, and how those bytes are read back.
// The rule is shared with the CUDA compression kernel, which must produce the same bytes.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "spectralkv/layout.cuh"
#include "spectralkv/numeric.hpp"

namespace spectralkv {

/// An unquantised rank-r factorisation of one L×D block: X ≈ 1·meanᵀ + coeffs·basis.
struct FactoredBlock {
  int rows = 0;  ///< L (tokens)
  int cols = 0;  ///< D (head_dim)
  int rank = 0;  ///< r
  std::vector<float> basis;   ///< [rank][cols], orthonormal rows
  std::vector<float> coeffs;  ///< [rows][rank]
  std::vector<float> mean;    ///< [cols], or empty when the block was not mean-centred
};

/// Which half of a head section of the cold layout: keys or values.
enum class Part { kKey, kValue };

/// Per-column symmetric INT8 quantisation: scale_j = max_t |c[t][j]| / 127 and
/// q[t][j] = round-to-nearest-even(c[t][j] / scale_j). A column of zeros gets scale 0 and zeros, so
/// nothing is divided by zero. |c − scale·q| ≤ scale / 2 per element, the bound the tests check.
/// \param c       [rows][rank] FP32 coefficients
/// \param q       [rows][rank] output
/// \param scales  [rank] output
inline void quantize_columns(const float* c, int rows, int rank, std::int8_t* q, float* scales) {
  for (int j = 0; j < rank; ++j) {
    float amax = 0.0f;
    for (int t = 0; t < rows; ++t) amax = std::max(amax, std::fabs(c[static_cast<std::size_t>(t) * rank + j]));
    const float scale = amax / 127.0f;
    scales[j] = scale;
    for (int t = 0; t < rows; ++t) {
      const std::size_t i = static_cast<std::size_t>(t) * rank + j;
      // |c / scale| <= 127 up to one rounding of the division, so the rounded value is in [-127, 127].
      q[i] = scale > 0.0f ? static_cast<std::int8_t>(std::nearbyint(c[i] / scale)) : std::int8_t{0};
    }
  }
}

/// Byte offsets of one part (K or V) of a head section.
struct PartOffsets {
  int rank;
  std::int64_t basis, mean, scale, coeff;
};
inline PartOffsets part_offsets(const ColdBlockLayout& layout, Part part) {
  return part == Part::kKey
             ? PartOffsets{layout.rank_k, layout.basis_k, layout.mean_k, layout.scale_k, layout.coeff_k}
             : PartOffsets{layout.rank_v, layout.basis_v, layout.mean_v, layout.scale_v, layout.coeff_v};
}

/// Writes the factors of the block `x` (rows×cols, row t at x + t·row_stride) as part `part` of the head
/// section that starts at `head` (a slab pointer plus h·layout.head_bytes). The basis and mean are
/// rounded to FP16 first and the coefficients are computed against them, C = (X − mean)·B̂ᵀ, then
/// quantised per column: the stored basis is exactly the one the coefficients were projected on. The
/// CUDA compression kernel follows the same rule.
template <class T>
void store_factors(const T* x, std::int64_t row_stride, const FactoredBlock& block, const ColdBlockLayout& layout,
                   Part part, std::uint8_t* head) {
  const PartOffsets o = part_offsets(layout, part);
  const int rows = block.rows, cols = block.cols, rank = block.rank;
  auto* basis = reinterpret_cast<Half*>(head + o.basis);
  std::vector<float> b(block.basis.size()), m(static_cast<std::size_t>(cols), 0.0f);
  for (std::size_t i = 0; i < block.basis.size(); ++i) {
    basis[i] = Half(block.basis[i]);
    b[i] = static_cast<float>(basis[i]);
  }
  if (layout.has_mean) {
    auto* mean = reinterpret_cast<Half*>(head + o.mean);
    for (int d = 0; d < cols; ++d) {
      mean[d] = Half(block.mean.empty() ? 0.0f : block.mean[static_cast<std::size_t>(d)]);
      m[static_cast<std::size_t>(d)] = static_cast<float>(mean[d]);
    }
  }
  std::vector<float> c(static_cast<std::size_t>(rows) * rank);
  for (int t = 0; t < rows; ++t) {
    for (int j = 0; j < rank; ++j) {
      double acc = 0.0;
      for (int d = 0; d < cols; ++d) {
        acc += (static_cast<double>(to_float(x[t * row_stride + d])) - m[static_cast<std::size_t>(d)]) *
               b[static_cast<std::size_t>(j) * cols + d];
      }
      c[static_cast<std::size_t>(t) * rank + j] = static_cast<float>(acc);
    }
  }
  quantize_columns(c.data(), rows, rank, reinterpret_cast<std::int8_t*>(head + o.coeff),
                   reinterpret_cast<float*>(head + o.scale));
}

/// Read access to stored factors of one part of one head of one cold block, dequantised to float.
/// Satisfies the FactorView interface the attention functors use (rows, rank, dim, basis, coeff, mean).
class StoredFactorView {
 public:
  StoredFactorView(const ColdBlockLayout& layout, Part part, const std::uint8_t* head)
      : rows_(layout.block_size), dim_(layout.head_dim), has_mean_(layout.has_mean) {
    const PartOffsets o = part_offsets(layout, part);
    rank_ = o.rank;
    basis_ = reinterpret_cast<const Half*>(head + o.basis);
    mean_ = reinterpret_cast<const Half*>(head + o.mean);
    scale_ = reinterpret_cast<const float*>(head + o.scale);
    coeff_ = reinterpret_cast<const std::int8_t*>(head + o.coeff);
  }
  int rows() const { return rows_; }
  int rank() const { return rank_; }
  int dim() const { return dim_; }
  float basis(int j, int d) const { return static_cast<float>(basis_[static_cast<std::size_t>(j) * dim_ + d]); }
  float coeff(int t, int j) const { return scale_[j] * coeff_[static_cast<std::size_t>(t) * rank_ + j]; }
  float mean(int d) const { return has_mean_ ? static_cast<float>(mean_[d]) : 0.0f; }

 private:
  int rows_, dim_, rank_ = 0;
  bool has_mean_;
  const Half* basis_;
  const Half* mean_;
  const float* scale_;
  const std::int8_t* coeff_;
};

/// FactorView over unquantised FP32 factors (used to test the attention algebra exactly).
class FactoredBlockView {
 public:
  explicit FactoredBlockView(const FactoredBlock& b) : b_(&b) {}
  int rows() const { return b_->rows; }
  int rank() const { return b_->rank; }
  int dim() const { return b_->cols; }
  float basis(int j, int d) const { return b_->basis[static_cast<std::size_t>(j) * b_->cols + d]; }
  float coeff(int t, int j) const { return b_->coeffs[static_cast<std::size_t>(t) * b_->rank + j]; }
  float mean(int d) const { return b_->mean.empty() ? 0.0f : b_->mean[d]; }

 private:
  const FactoredBlock* b_;
};

/// Rebuilds the L×D block a FactorView stands for, in FP32 ([rows][dim]); the test path.
template <class View>
std::vector<float> reconstruct(const View& f) {
  std::vector<float> x(static_cast<std::size_t>(f.rows()) * f.dim());
  for (int t = 0; t < f.rows(); ++t) {
    for (int d = 0; d < f.dim(); ++d) {
      double acc = f.mean(d);
      for (int j = 0; j < f.rank(); ++j) acc += static_cast<double>(f.coeff(t, j)) * f.basis(j, d);
      x[static_cast<std::size_t>(t) * f.dim() + d] = static_cast<float>(acc);
    }
  }
  return x;
}

}  // namespace spectralkv
