#pragma once
// CPU truncated SVD of one block (the reference compression), in double precision through Eigen.
// The right singular vectors come from the symmetric eigen-solver on the Gram XᵀX: in double the squared
// condition number costs nothing at the ranks kept (their σ² sit far above 1e-16·σ₁²), it is 10× faster
// than a Jacobi SVD at D = 128, and it is robust on degenerate blocks (Eigen 3.4's BDCSVD asserts on a
// constant block). The singular values for the Eckart–Young checks come from a Jacobi SVD instead, an
// independent algorithm.

#include <Eigen/Dense>
#include <cstdint>
#include <vector>

#include "spectralkv/compress.hpp"
#include "spectralkv/numeric.hpp"

namespace spectralkv::cpu {

namespace detail {
template <class T>
Eigen::MatrixXd load_block(const T* x, std::int64_t row_stride, int rows, int cols) {
  Eigen::MatrixXd m(rows, cols);
  for (int t = 0; t < rows; ++t)
    for (int d = 0; d < cols; ++d) m(t, d) = to_float(x[t * row_stride + d]);
  return m;
}
}  // namespace detail

/// Rank-`rank` truncated SVD of the rows×cols block at `x` (row t at x + t·row_stride).
/// With `mean_center`, the per-column mean is rounded to FP16 (as it will be stored) and subtracted
/// first. The basis rows are the top right singular vectors, each signed so that its entry of largest
/// magnitude is positive: a deterministic choice, so CPU and GPU factors can be compared directly.
/// coeffs = (X − mean)·basisᵀ. Requires 1 ≤ rank ≤ min(rows, cols) (validated by the caller).
template <class T>
FactoredBlock truncated_svd(const T* x, std::int64_t row_stride, int rows, int cols, int rank, bool mean_center) {
  Eigen::MatrixXd m = detail::load_block(x, row_stride, rows, cols);
  FactoredBlock out;
  out.rows = rows;
  out.cols = cols;
  out.rank = rank;
  if (mean_center) {
    out.mean.resize(cols);
    for (int d = 0; d < cols; ++d) {
      out.mean[d] = static_cast<float>(Half(static_cast<float>(m.col(d).mean())));
      m.col(d).array() -= out.mean[d];
    }
  }
  const Eigen::MatrixXd gram = m.transpose() * m;
  const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(gram);  // eigenvalues ascending
  Eigen::MatrixXd basis = eig.eigenvectors().rightCols(rank).rowwise().reverse().transpose();  // rank × cols
  for (int j = 0; j < rank; ++j) {
    Eigen::Index arg = 0;
    basis.row(j).cwiseAbs().maxCoeff(&arg);
    if (basis(j, arg) < 0) basis.row(j) *= -1.0;
  }
  const Eigen::MatrixXd coeffs = m * basis.transpose();  // rows × rank
  out.basis.resize(static_cast<std::size_t>(rank) * cols);
  out.coeffs.resize(static_cast<std::size_t>(rows) * rank);
  for (int j = 0; j < rank; ++j)
    for (int d = 0; d < cols; ++d) out.basis[static_cast<std::size_t>(j) * cols + d] = static_cast<float>(basis(j, d));
  for (int t = 0; t < rows; ++t)
    for (int j = 0; j < rank; ++j) out.coeffs[static_cast<std::size_t>(t) * rank + j] = static_cast<float>(coeffs(t, j));
  return out;
}

/// All singular values of the (optionally mean-centred) block, descending: the Eckart–Young optimum
/// of a rank-r approximation is sqrt(Σ_{i>r} σ_i²).
template <class T>
std::vector<double> singular_values(const T* x, std::int64_t row_stride, int rows, int cols, bool mean_center) {
  Eigen::MatrixXd m = detail::load_block(x, row_stride, rows, cols);
  if (mean_center) {
    for (int d = 0; d < cols; ++d) m.col(d).array() -= static_cast<float>(Half(static_cast<float>(m.col(d).mean())));
  }
  Eigen::JacobiSVD<Eigen::MatrixXd> svd(m);
  const Eigen::VectorXd s = svd.singularValues();
  return std::vector<double>(s.data(), s.data() + s.size());
}

}  // namespace spectralkv::cpu
