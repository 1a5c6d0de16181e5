#pragma once
// The CPU KV caches behind the interface of kv_interface.hpp (one sequence, all layers, post-RoPE keys
// and values in, attention outputs out). Two implementations:
//   DenseKvCache     plain float vectors and exact softmax attention (Eigen GEMMs);
//   SpectralKvCache  spectralkv::SpectralCache<float>: old tokens in compressed blocks, attention in
//                    the compressed space. It can also shadow every layer with a dense cache fed the
//                    same keys and values, to measure attention fidelity on identical inputs.
//
// Shapes follow spectralkv::TensorView: k, v are [tokens][num_kv_heads][head_dim], q and out are
// [tokens][num_q_heads][head_dim]; query head h reads KV head h / (num_q_heads / num_kv_heads).

#include <Eigen/Dense>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "kv_interface.hpp"
#include "spectralkv/cache.hpp"
#include "spectralkv/metrics.hpp"
#include "spectralkv/tensor.hpp"

namespace spectralkv::llama {

using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Softmax attention of the newest q.tokens queries over `len` dense tokens, one GEMM per query head.
/// \param k, v  [len][num_kv_heads][head_dim] (token stride num_kv_heads·head_dim)
/// \param last_logits  optional: receives [num_q_heads][len] logits of the last query
inline void dense_attention(const float* k, const float* v, std::int64_t len, int num_kv_heads,
                            TensorView<const float> q, TensorView<float> out, float scale,
                            std::vector<std::vector<float>>* last_logits = nullptr) {
  using Stride = Eigen::OuterStride<>;
  using ConstMap = Eigen::Map<const RowMatrix, 0, Stride>;
  const auto n = q.tokens, d = q.head_dim, hq = q.heads, group = hq / num_kv_heads;
  const std::int64_t kv_stride = num_kv_heads * d, q_stride = hq * d;
  if (last_logits) last_logits->assign(static_cast<std::size_t>(hq), {});
#pragma omp parallel for schedule(dynamic, 1)
  for (std::int64_t h = 0; h < hq; ++h) {
    const std::int64_t g = h / group;
    const ConstMap kg(k + g * d, len, d, Stride(kv_stride));
    const ConstMap vg(v + g * d, len, d, Stride(kv_stride));
    const ConstMap qh(q.data + h * d, n, d, Stride(q_stride));
    RowMatrix s = (qh * kg.transpose()) * scale;  // [n][len]
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t visible = len - n + i + 1;
      auto row = s.row(i);
      row.tail(len - visible).setConstant(-std::numeric_limits<float>::infinity());
      if (last_logits && i == n - 1) (*last_logits)[h].assign(row.data(), row.data() + len);
      const float m = row.head(visible).maxCoeff();
      row = (row.array() - m).exp();
      row /= row.head(visible).sum();
    }
    Eigen::Map<RowMatrix, 0, Stride> oh(out.data + h * d, n, d, Stride(q_stride));
    oh.noalias() = s * vg;
  }
}

/// Experimental, emulating a proposed library feature: per cold block and KV head, the exact keys and
/// values of a few tokens (those with the smallest key norm: the "secondary attention sinks" such as
/// " the" that absorb attention in middle layers and that a low-rank basis fitted to the bulk misses).
/// Attention uses them instead of their compressed rows. [layer][block][kv head] -> tokens.
struct OutlierTokens {
  std::vector<std::int32_t> index;  ///< position inside the block, increasing
  RowMatrix k, v;                   ///< [count][head_dim]
};
using OutlierTable = std::vector<std::vector<std::vector<OutlierTokens>>>;

/// Experimental, emulating narrower codes on the library's store (INT8 coefficients, FP16 bases):
/// - coefficient columns j ≥ lead of each part (the weaker singular directions) are re-rounded to
///   `bits`-bit symmetric codes with the column scale max|c| / (2^(bits−1) − 1); the first `lead`
///   columns keep INT8;
/// - with basis_bits < 16, every basis row is re-rounded to basis_bits-bit symmetric codes with a
///   per-row FP32 scale max|b| / (2^(basis_bits−1) − 1).
/// As a narrower store would hold them, except that the stored coefficients were projected on the FP16
/// basis and rounded to INT8 first: the emulated error is, if anything, slightly larger.
struct NarrowCodes {
  int bits = 8;
  int lead = 0;
  int basis_bits = 16;
  bool narrow() const { return bits < 8 || basis_bits < 16; }
};

/// Attention of the newest q.tokens queries of sequence `id` over a SpectralCache<float>, computed in
/// the compressed space straight from the cache's raw state (state(), pool(), layout()), with GEMMs:
/// per cold block and query head, logits = (Q·B_Kᵀ)·C_Kᵀ + Q·mean_K and output += (P·C_V)·B_V +
/// rowsum(P)·mean_V — the same algebra as SpectralCache::attend (which accumulates in double, one
/// query at a time, as the reference) at the cost of FP32 rounding. This is what an engine's own CPU
/// kernel over the cold layout looks like.
/// \param outliers  optional exact tokens per block (see OutlierTokens), or nullptr
/// \param codes     experimental narrower coefficient codes (NarrowCodes); default: the stored INT8
inline void spectral_attention(const SpectralCache<float>& cache, SequenceId id, int layer, TensorView<const float> q,
                               TensorView<float> out, float scale, const OutlierTable* outliers = nullptr,
                               NarrowCodes codes = {}) {
  using Stride = Eigen::OuterStride<>;
  using ConstMap = Eigen::Map<const RowMatrix, 0, Stride>;
  const auto st = cache.state(id, layer);
  const ColdBlockLayout& lay = cache.layout(layer);
  const std::uint8_t* pool = cache.pool(layer);
  const CacheConfig& c = cache.config();
  const std::int64_t n = q.tokens, d = c.head_dim, hq = c.num_q_heads, group = c.group_size(), L = c.block_size;
  const std::int64_t kv_stride = std::int64_t{c.num_kv_heads} * d, q_stride = hq * d;
  const std::int64_t cold_end = st.sink_len + st.num_blocks * L, len = cold_end + st.tail_len;
  // Dequantised factors of one part (K or V) of one head of one block: basis [r][D], coefficients
  // [L][r] with the column scales applied, mean [D] (zeros without mean-centering).
  struct Factors {
    RowMatrix basis, coeff;
    Eigen::RowVectorXf mean;
  };
  auto factors = [&](const std::uint8_t* head, Part part) {
    const PartOffsets o = part_offsets(lay, part);
    Factors f{RowMatrix(o.rank, d), RowMatrix(L, o.rank), Eigen::RowVectorXf::Zero(d)};
    const auto* basis = reinterpret_cast<const Half*>(head + o.basis);
    for (std::int64_t i = 0; i < o.rank * d; ++i) f.basis.data()[i] = static_cast<float>(basis[i]);
    if (codes.basis_bits < 16) {
      const float levels = static_cast<float>((1 << (codes.basis_bits - 1)) - 1);
      for (int j = 0; j < o.rank; ++j) {
        const float step = f.basis.row(j).cwiseAbs().maxCoeff() / levels;
        if (step > 0.0f) f.basis.row(j) = (f.basis.row(j).array() / step).round() * step;
      }
    }
    if (lay.has_mean) {
      const auto* mean = reinterpret_cast<const Half*>(head + o.mean);
      for (std::int64_t i = 0; i < d; ++i) f.mean[i] = static_cast<float>(mean[i]);
    }
    const auto* scales = reinterpret_cast<const float*>(head + o.scale);
    const auto* q8 = reinterpret_cast<const std::int8_t*>(head + o.coeff);
    for (std::int64_t t = 0; t < L; ++t) {
      for (int j = 0; j < o.rank; ++j) f.coeff(t, j) = scales[j] * static_cast<float>(q8[t * o.rank + j]);
    }
    if (codes.bits < 8) {
      const float levels = static_cast<float>((1 << (codes.bits - 1)) - 1);
      for (int j = codes.lead; j < o.rank; ++j) {
        const float step = scales[j] * 127.0f / levels;  // max|c| / levels
        if (step > 0.0f) f.coeff.col(j) = (f.coeff.col(j).array() / step).round() * step;
      }
    }
    return f;
  };
#pragma omp parallel for schedule(dynamic, 1)
  for (std::int64_t h = 0; h < hq; ++h) {
    const std::int64_t g = h / group;
    const ConstMap qh(q.data + h * d, n, d, Stride(q_stride));
    RowMatrix s(n, len);
    std::vector<Factors> kf, vf;
    if (st.sink_len > 0) s.leftCols(st.sink_len).noalias() = qh * ConstMap(st.sink_k + g * d, st.sink_len, d, Stride(kv_stride)).transpose();
    for (std::int64_t b = 0; b < st.num_blocks; ++b) {
      const std::uint8_t* head = pool + static_cast<std::int64_t>(st.blocks[b]) * lay.block_bytes + g * lay.head_bytes;
      kf.push_back(factors(head, Part::kKey));
      vf.push_back(factors(head, Part::kValue));
      auto cols = s.middleCols(st.sink_len + b * L, L);
      cols.noalias() = (qh * kf.back().basis.transpose()) * kf.back().coeff.transpose();
      cols.colwise() += qh * kf.back().mean.transpose();
      if (outliers) {
        const OutlierTokens& o = (*outliers)[layer][b][g];
        for (std::size_t i = 0; i < o.index.size(); ++i) {
          cols.col(o.index[i]).noalias() = qh * o.k.row(static_cast<Eigen::Index>(i)).transpose();
          vf.back().coeff.row(o.index[i]).setZero();  // its value comes from o.v instead
        }
      }
    }
    if (st.tail_len > 0) s.rightCols(st.tail_len).noalias() = qh * ConstMap(st.tail_k + g * d, st.tail_len, d, Stride(kv_stride)).transpose();
    s *= scale;
    for (std::int64_t i = 0; i < n; ++i) {  // causal by absolute position, then softmax
      const std::int64_t visible = len - n + i + 1;
      auto row = s.row(i);
      row.tail(len - visible).setConstant(-std::numeric_limits<float>::infinity());
      row = (row.array() - row.head(visible).maxCoeff()).exp();
      row /= row.head(visible).sum();
    }
    Eigen::Map<RowMatrix, 0, Stride> oh(out.data + h * d, n, d, Stride(q_stride));
    oh.setZero();
    if (st.sink_len > 0) oh.noalias() += s.leftCols(st.sink_len) * ConstMap(st.sink_v + g * d, st.sink_len, d, Stride(kv_stride));
    for (std::int64_t b = 0; b < st.num_blocks; ++b) {
      const auto p = s.middleCols(st.sink_len + b * L, L);
      oh.noalias() += (p * vf[b].coeff) * vf[b].basis;
      Eigen::VectorXf mass = p.rowwise().sum();
      if (outliers) {
        const OutlierTokens& o = (*outliers)[layer][b][g];
        for (std::size_t i = 0; i < o.index.size(); ++i) {
          mass -= p.col(o.index[i]);
          oh.noalias() += p.col(o.index[i]) * o.v.row(static_cast<Eigen::Index>(i));
        }
      }
      oh.noalias() += mass * vf[b].mean;
    }
    if (st.tail_len > 0) oh.noalias() += s.rightCols(st.tail_len) * ConstMap(st.tail_v + g * d, st.tail_len, d, Stride(kv_stride));
  }
}

class DenseKvCache : public KvCache {
 public:
  /// \param capacity  tokens to reserve per layer (growth beyond it is allowed)
  DenseKvCache(int num_layers, int num_kv_heads, int head_dim, std::int64_t capacity = 0)
      : heads_(num_kv_heads), dim_(head_dim), k_(num_layers), v_(num_layers) {
    for (int l = 0; l < num_layers; ++l) {
      k_[l].reserve(static_cast<std::size_t>(capacity * heads_ * dim_));
      v_[l].reserve(static_cast<std::size_t>(capacity * heads_ * dim_));
    }
  }
  void clear() override {
    for (auto& x : k_) x.clear();
    for (auto& x : v_) x.clear();
  }
  std::int64_t length(int layer) const override {
    return static_cast<std::int64_t>(k_[layer].size()) / (heads_ * dim_);
  }
  void append(int layer, TensorView<const float> k, TensorView<const float> v) override {
    k_[layer].insert(k_[layer].end(), k.data, k.data + k.size());
    v_[layer].insert(v_[layer].end(), v.data, v.data + v.size());
  }
  void attend(int layer, TensorView<const float> q, TensorView<float> out, float scale) override {
    dense_attention(k_[layer].data(), v_[layer].data(), length(layer), heads_, q, out, scale);
  }
  std::int64_t tokens_until_compression(int) const override { return std::numeric_limits<std::int64_t>::max(); }
  KvBytes bytes() const override {
    KvBytes b;
    for (std::size_t l = 0; l < k_.size(); ++l) b.tokens += length(static_cast<int>(l));
    b.dense_fp16 = b.stored = b.tokens * 2 * heads_ * dim_ * 2;
    return b;
  }
  const float* keys(int layer) const { return k_[layer].data(); }
  const float* values(int layer) const { return v_[layer].data(); }
  int num_kv_heads() const { return heads_; }

 private:
  std::int64_t heads_, dim_;
  std::vector<std::vector<float>> k_, v_;
};

/// Attention fidelity of one layer, spectral against dense on the same q, k, v.
struct LayerFidelity {
  double err2 = 0, ref2 = 0;           ///< Σ‖o_spectral − o_dense‖², Σ‖o_dense‖² over tokens and heads
  double score_corr_sum = 0;           ///< Σ Pearson(logits) over probes (cold positions only)
  std::int64_t score_probes = 0;
  double relative_error() const { return ref2 > 0 ? std::sqrt(err2 / ref2) : 0.0; }
  double score_corr() const { return score_probes > 0 ? score_corr_sum / static_cast<double>(score_probes) : 1.0; }
};

/// Which code computes attention over a SpectralCache: the library's reference (SpectralCache::attend:
/// double accumulation, one query and head at a time) or spectral_attention() above (FP32 GEMMs, the
/// same algebra over the same bytes, many times faster).
enum class AttendPath { kFast, kLibrary };

class SpectralKvCache : public KvCache {
 public:
  /// \param shadow  also keep a dense copy of every layer and record LayerFidelity (costs one dense
  ///                attention per layer and the dense cache's memory)
  /// \param outliers  experimental: exact tokens kept per cold block and KV head (OutlierTokens); needs
  ///                  the fast path
  /// \param codes  experimental narrower coefficient codes (NarrowCodes); needs the fast path; bytes()
  ///               counts them at their width
  explicit SpectralKvCache(const CacheConfig& config, bool shadow = false, AttendPath path = AttendPath::kFast,
                           int outliers = 0, NarrowCodes codes = {})
      : cache_(config), path_(path), outliers_per_block_(outliers), codes_(codes) {
    detail::require(codes.bits >= 2 && codes.bits <= 8, "SpectralKvCache", "codes.bits", codes.bits, "must be in [2, 8]");
    detail::require(codes.lead >= 0, "SpectralKvCache", "codes.lead", codes.lead, "must be >= 0");
    detail::require(codes.basis_bits >= 2 && codes.basis_bits <= 16, "SpectralKvCache", "codes.basis_bits",
                    codes.basis_bits, "must be in [2, 16]");
    detail::require(!codes.narrow() || path == AttendPath::kFast, "SpectralKvCache", "codes.bits", codes.bits,
                    "narrower coefficients need AttendPath::kFast");
    detail::require(outliers >= 0 && outliers <= config.block_size, "SpectralKvCache", "outliers", outliers,
                    detail::concat("must be in [0, block_size = ", config.block_size, "]"));
    detail::require(outliers == 0 || path == AttendPath::kFast, "SpectralKvCache", "outliers", outliers,
                    "outlier tokens need AttendPath::kFast");
    outliers_.resize(static_cast<std::size_t>(config.num_layers));
    cache_.add_sequence(kSeq);
    if (shadow) {
      shadow_ = std::make_unique<DenseKvCache>(config.num_layers, config.num_kv_heads, config.head_dim);
      fidelity_.resize(static_cast<std::size_t>(config.num_layers));
    }
  }
  void clear() override {
    cache_.remove_sequence(kSeq);  // its blocks return to the pool, which is reused by the next window
    cache_.add_sequence(kSeq);
    if (shadow_) shadow_->clear();
    for (auto& layer : outliers_) layer.clear();
  }
  std::int64_t length(int layer) const override { return cache_.length(kSeq, layer); }
  void append(int layer, TensorView<const float> k, TensorView<const float> v) override {
    if (outliers_per_block_ == 0) {
      cache_.append(layer, kSeq, k, v);
    } else {
      append_keeping_outliers(layer, k, v);
    }
    if (shadow_) shadow_->append(layer, k, v);
  }
  void attend(int layer, TensorView<const float> q, TensorView<float> out, float scale) override {
    if (path_ == AttendPath::kLibrary) {
      cache_.attend(layer, kSeq, q, out, scale);
    } else {
      spectral_attention(cache_, kSeq, layer, q, out, scale, outliers_per_block_ > 0 ? &outliers_ : nullptr, codes_);
    }
    if (shadow_) probe(layer, q, out, scale);
  }
  std::int64_t tokens_until_compression(int layer) const override {
    return cache_.tokens_until_compression(kSeq, layer);
  }
  KvBytes bytes() const override {
    const MemoryStats m = cache_.memory_stats();
    const std::int64_t token_fp16 = 2 * std::int64_t{cache_.config().num_kv_heads} * cache_.config().head_dim * 2;
    KvBytes b;
    b.tokens = m.sink_tokens + m.cold_tokens + m.tail_tokens;
    b.cold_tokens = m.cold_tokens;
    // Outliers as an engine would store them: FP16 K and V rows plus a 16-bit index each.
    const std::int64_t outlier_bytes = m.cold_blocks * cache_.config().num_kv_heads * outliers_per_block_ *
                                       (2 * std::int64_t{cache_.config().head_dim} * 2 + 2);
    // Narrower codes: the columns past `lead` of the [L][r] coefficient sections at their width, the
    // [r][D] bases at basis_bits plus an FP32 scale per row (padding left as in the library's layout).
    std::int64_t saved = 0;
    for (int l = 0; l < cache_.config().num_layers; ++l) {
      const ColdBlockLayout& lay = cache_.layout(l);
      const std::int64_t narrow_cols = std::max(lay.rank_k - codes_.lead, 0) + std::max(lay.rank_v - codes_.lead, 0);
      const std::int64_t rows = lay.rank_k + lay.rank_v;
      const std::int64_t basis_saved = codes_.basis_bits < 16 ? rows * lay.head_dim * (16 - codes_.basis_bits) / 8 - rows * 4 : 0;
      saved += cache_.state(kSeq, l).num_blocks * lay.num_kv_heads *
               (std::int64_t{lay.block_size} * narrow_cols * (8 - codes_.bits) / 8 + basis_saved);
    }
    b.stored = m.cold_bytes - saved + (m.sink_tokens + m.tail_tokens) * token_fp16 + outlier_bytes;
    b.dense_fp16 = b.tokens * token_fp16;
    return b;
  }
  const SpectralCache<float>& cache() const { return cache_; }
  const std::vector<LayerFidelity>& fidelity() const { return fidelity_; }

 private:
  static constexpr SequenceId kSeq = 0;

  /// The tokens a block forms from are the oldest of (tail before the append, then k, v): keep them
  /// until append returns, then record the outliers of every block that formed.
  void append_keeping_outliers(int layer, TensorView<const float> k, TensorView<const float> v) {
    const CacheConfig& c = cache_.config();
    const std::int64_t width = std::int64_t{c.num_kv_heads} * c.head_dim;
    const auto before = cache_.state(kSeq, layer);
    const std::int64_t sink_room = c.sink_tokens - before.sink_len;  // the first tokens fill the sinks
    std::vector<float> pending_k(before.tail_k, before.tail_k + before.tail_len * width);
    std::vector<float> pending_v(before.tail_v, before.tail_v + before.tail_len * width);
    const std::int64_t skip = std::min<std::int64_t>(std::max<std::int64_t>(sink_room, 0), k.tokens);
    pending_k.insert(pending_k.end(), k.data + skip * width, k.data + k.size());
    pending_v.insert(pending_v.end(), v.data + skip * width, v.data + v.size());
    cache_.append(layer, kSeq, k, v);
    auto& table = outliers_[static_cast<std::size_t>(layer)];
    const std::int64_t formed = cache_.state(kSeq, layer).num_blocks - static_cast<std::int64_t>(table.size());
    for (std::int64_t b = 0; b < formed; ++b) {
      std::vector<OutlierTokens> heads(static_cast<std::size_t>(c.num_kv_heads));
      for (int g = 0; g < c.num_kv_heads; ++g) {
        const float* kb = pending_k.data() + b * c.block_size * width + g * c.head_dim;
        const float* vb = pending_v.data() + b * c.block_size * width + g * c.head_dim;
        std::vector<std::pair<float, std::int32_t>> norms;
        for (std::int32_t t = 0; t < c.block_size; ++t) {
          norms.emplace_back(Eigen::Map<const Eigen::VectorXf>(kb + t * width, c.head_dim).squaredNorm(), t);
        }
        std::partial_sort(norms.begin(), norms.begin() + outliers_per_block_, norms.end());
        OutlierTokens& o = heads[static_cast<std::size_t>(g)];
        for (int i = 0; i < outliers_per_block_; ++i) o.index.push_back(norms[static_cast<std::size_t>(i)].second);
        std::sort(o.index.begin(), o.index.end());
        o.k.resize(outliers_per_block_, c.head_dim);
        o.v.resize(outliers_per_block_, c.head_dim);
        for (int i = 0; i < outliers_per_block_; ++i) {
          for (int d = 0; d < c.head_dim; ++d) {  // stored as FP16, as an engine would
            o.k(i, d) = static_cast<float>(Half(kb[o.index[static_cast<std::size_t>(i)] * width + d]));
            o.v(i, d) = static_cast<float>(Half(vb[o.index[static_cast<std::size_t>(i)] * width + d]));
          }
        }
      }
      table.push_back(std::move(heads));
    }
  }

  void probe(int layer, TensorView<const float> q, TensorView<const float> out, float scale) {
    LayerFidelity& f = fidelity_[static_cast<std::size_t>(layer)];
    scratch_.resize(static_cast<std::size_t>(q.size()));
    std::vector<std::vector<float>> dense_logits;
    dense_attention(shadow_->keys(layer), shadow_->values(layer), shadow_->length(layer), shadow_->num_kv_heads(),
                    q, {scratch_.data(), q.tokens, q.heads, q.head_dim}, scale, &dense_logits);
    for (std::int64_t i = 0; i < q.size(); ++i) {
      const double diff = static_cast<double>(out.data[i]) - scratch_[static_cast<std::size_t>(i)];
      f.err2 += diff * diff;
      f.ref2 += static_cast<double>(scratch_[static_cast<std::size_t>(i)]) * scratch_[static_cast<std::size_t>(i)];
    }
    // Logit correlation of the newest token over the compressed positions (sinks and tail are exact,
    // so including them would only inflate the number). The library's logits know nothing of outlier
    // tokens: with outliers this measures the compressed rows alone.
    const auto st = cache_.state(kSeq, layer);
    const std::int64_t cold_begin = st.sink_len, cold_end = st.sink_len + st.num_blocks * cache_.config().block_size;
    if (cold_end == cold_begin) return;
    const TensorView<const float> last{q.token(q.tokens - 1), 1, q.heads, q.head_dim};
    const auto spectral_logits = cache_.logits(layer, kSeq, last, scale);
    for (std::size_t h = 0; h < spectral_logits.size(); ++h) {
      const std::vector<float> ref(dense_logits[h].begin() + cold_begin, dense_logits[h].begin() + cold_end);
      const std::vector<float> approx(spectral_logits[h].begin() + cold_begin, spectral_logits[h].begin() + cold_end);
      f.score_corr_sum += spectralkv::fidelity(ref, approx).pearson;
      ++f.score_probes;
    }
  }

  SpectralCache<float> cache_;
  AttendPath path_;
  int outliers_per_block_;
  NarrowCodes codes_;
  OutlierTable outliers_;
  std::unique_ptr<DenseKvCache> shadow_;
  std::vector<LayerFidelity> fidelity_;
  std::vector<float> scratch_;
};

}  // namespace spectralkv::llama
