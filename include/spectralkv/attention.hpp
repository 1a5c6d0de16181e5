#pragma once
// Dual-spectral attention, CPU reference. For one KV head and one query position, the tokens a query
// sees come as runs in position order: dense runs (sinks, tail) and compressed blocks. One softmax
// covers all of them. A compressed block never gets rebuilt:
//   scores  s_t = (q·B_Kᵀ)·c_Kt + q·mean_K
//   output  o  += (Σ_t p_t·c_Vt)·B_V + (Σ_t p_t)·mean_V
// Accumulation is in double so that this path is the exact yardstick the GPU kernels are held to.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "spectralkv/numeric.hpp"

namespace spectralkv {

/// `count` dense tokens of one KV head: key i at k + i·stride, value i at v + i·stride.
template <class T>
struct DenseRun {
  const T* k = nullptr;
  const T* v = nullptr;
  std::int64_t stride = 0;
  std::int64_t count = 0;
  std::int64_t first_position = 0;
};

/// One compressed block of one KV head. KView / VView model FactorView: rows(), rank(), dim(),
/// basis(j, d), coeff(t, j), mean(d), all returning float (see compress.hpp).
template <class KView, class VView>
struct CompressedRun {
  KView k;
  VView v;
  std::int64_t first_position = 0;
};

/// Attention of one query vector over dense runs and compressed blocks of one KV head.
/// \param q              [dim] query, FP32
/// \param scale          logit = scale · q·k
/// \param max_position   causal limit: tokens at positions > max_position are not attended
/// \param out            [dim] output, FP32
/// \param logits         optional: receives the logits of the attended tokens in position order
/// Runs must be given in increasing position order (sinks, blocks, tail) for `logits` to be ordered.
template <class T, class KView, class VView>
void attend_one(const std::vector<DenseRun<T>>& dense_before, const std::vector<CompressedRun<KView, VView>>& blocks,
                const std::vector<DenseRun<T>>& dense_after, const float* q, int dim, float scale,
                std::int64_t max_position, float* out, std::vector<float>* logits = nullptr) {
  std::vector<double> s;  // logits in position order
  auto visible = [&](std::int64_t first, std::int64_t count) {
    return std::max<std::int64_t>(0, std::min<std::int64_t>(count, max_position - first + 1));
  };
  auto score_dense = [&](const DenseRun<T>& r) {
    for (std::int64_t i = 0, n = visible(r.first_position, r.count); i < n; ++i) {
      double acc = 0.0;
      for (int d = 0; d < dim; ++d) acc += static_cast<double>(q[d]) * to_float(r.k[i * r.stride + d]);
      s.push_back(scale * acc);
    }
  };
  std::vector<double> qb;
  for (const auto& r : dense_before) score_dense(r);
  for (const auto& b : blocks) {
    const std::int64_t n = visible(b.first_position, b.k.rows());
    if (n == 0) continue;
    qb.assign(b.k.rank(), 0.0);
    double qm = 0.0;
    for (int d = 0; d < dim; ++d) qm += static_cast<double>(q[d]) * b.k.mean(d);
    for (int j = 0; j < b.k.rank(); ++j)
      for (int d = 0; d < dim; ++d) qb[j] += static_cast<double>(q[d]) * b.k.basis(j, d);
    for (std::int64_t t = 0; t < n; ++t) {
      double acc = qm;
      for (int j = 0; j < b.k.rank(); ++j) acc += qb[j] * b.k.coeff(static_cast<int>(t), j);
      s.push_back(scale * acc);
    }
  }
  for (const auto& r : dense_after) score_dense(r);

  if (logits) logits->assign(s.begin(), s.end());
  const double m = s.empty() ? 0.0 : *std::max_element(s.begin(), s.end());
  double l = 0.0;
  for (double& x : s) l += (x = std::exp(x - m));
  std::vector<double> o(dim, 0.0);
  std::size_t at = 0;
  auto accumulate_dense = [&](const DenseRun<T>& r) {
    for (std::int64_t i = 0, n = visible(r.first_position, r.count); i < n; ++i, ++at) {
      for (int d = 0; d < dim; ++d) o[d] += s[at] * to_float(r.v[i * r.stride + d]);
    }
  };
  std::vector<double> w;
  for (const auto& r : dense_before) accumulate_dense(r);
  for (const auto& b : blocks) {
    const std::int64_t n = visible(b.first_position, b.v.rows());
    if (n == 0) continue;
    w.assign(b.v.rank(), 0.0);
    double p_sum = 0.0;
    for (std::int64_t t = 0; t < n; ++t, ++at) {
      p_sum += s[at];
      for (int j = 0; j < b.v.rank(); ++j) w[j] += s[at] * b.v.coeff(static_cast<int>(t), j);
    }
    for (int d = 0; d < dim; ++d) {
      double acc = p_sum * b.v.mean(d);
      for (int j = 0; j < b.v.rank(); ++j) acc += w[j] * b.v.basis(j, d);
      o[d] += acc;
    }
  }
  for (const auto& r : dense_after) accumulate_dense(r);

  for (int d = 0; d < dim; ++d) out[d] = l > 0.0 ? static_cast<float>(o[d] / l) : 0.0f;
}

/// Plain softmax attention over dense tokens: the reference for everything else.
/// \param k, v   [count] tokens of one KV head, token i at k + i·stride
/// \param q      [dim]; only tokens 0..max_index are attended
template <class T>
void dense_attend_one(const T* k, const T* v, std::int64_t stride, std::int64_t max_index, const float* q, int dim,
                      float scale, float* out, std::vector<float>* logits = nullptr) {
  struct NoView {
    int rows() const { return 0; }
    int rank() const { return 0; }
    float basis(int, int) const { return 0; }
    float coeff(int, int) const { return 0; }
    float mean(int) const { return 0; }
  };
  const std::vector<DenseRun<T>> runs{{k, v, stride, max_index + 1, 0}};
  attend_one<T, NoView, NoView>(runs, {}, {}, q, dim, scale, max_index, out, logits);
}

}  // namespace spectralkv
