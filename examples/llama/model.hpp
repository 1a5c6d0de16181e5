#pragma once
// A Llama-architecture decoder (pre-norm RMSNorm, RoPE on adjacent pairs, grouped-query attention,
// SwiGLU, optionally tied embeddings) over weights dequantised to float, FP32 throughout. The KV cache
// is whatever implements KvCache: the model hands it post-RoPE keys and values and asks it for the
// attention output, which is all an engine has to change to adopt SpectralKV.
//
// Activations are row-major [tokens][features], so a token's Q, K and V rows are exactly the
// [tokens][heads][head_dim] TensorViews the cache takes. A GGUF weight with ne = [in, out] is ne[1]
// rows of ne[0] floats: a row-major out×in matrix W, applied as X·Wᵀ.

#include <Eigen/Dense>

#if defined(__SSE3__) || defined(__x86_64__)
#include <pmmintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "gguf.hpp"
#include "kv_cache.hpp"

namespace spectralkv::llama {

class ModelError : public Error {
 public:
  using Error::Error;
};

/// Flushes subnormal floats to zero on this thread (and on threads it creates later). SiLU of a very
/// negative gate and the softmax of far-away tokens produce subnormals, which x86 cores process
/// ~100× slower; without this the whole forward pass runs about 3× slower. Numerically irrelevant
/// (|x| < 1.2e-38). Call it once at start-up, before any worker thread exists.
inline void flush_denormals_to_zero() {
#if defined(__SSE3__) || defined(__x86_64__)
  _MM_SET_FLUSH_ZERO_MODE(_MM_FLUSH_ZERO_ON);
  _MM_SET_DENORMALS_ZERO_MODE(_MM_DENORMALS_ZERO_ON);
#endif
}

struct LlamaConfig {
  int num_layers = 0, d_model = 0, d_ff = 0, num_q_heads = 0, num_kv_heads = 0, head_dim = 0, vocab = 0;
  std::int64_t context = 0;
  double rope_theta = 10000.0, rms_eps = 1e-5;

  /// \throws GgufError for a missing key, ModelError for an architecture this program cannot run.
  static LlamaConfig from_gguf(const GgufFile& f) {
    const std::string arch = f.get_string("general.architecture");
    if (arch != "llama") throw ModelError(f.path() + ": general.architecture = '" + arch + "', expected 'llama'");
    LlamaConfig c;
    c.num_layers = static_cast<int>(f.get_int("llama.block_count"));
    c.d_model = static_cast<int>(f.get_int("llama.embedding_length"));
    c.d_ff = static_cast<int>(f.get_int("llama.feed_forward_length"));
    c.num_q_heads = static_cast<int>(f.get_int("llama.attention.head_count"));
    c.num_kv_heads = static_cast<int>(f.get_int("llama.attention.head_count_kv", c.num_q_heads));
    c.context = f.get_int("llama.context_length");
    c.rope_theta = f.get_float("llama.rope.freq_base", 10000.0);
    c.rms_eps = f.get_float("llama.attention.layer_norm_rms_epsilon");
    c.vocab = static_cast<int>(f.tensor("token_embd.weight").ne[1]);
    if (c.num_layers <= 0 || c.num_q_heads <= 0 || c.num_kv_heads <= 0 || c.d_model % c.num_q_heads != 0 ||
        c.num_q_heads % c.num_kv_heads != 0) {
      throw ModelError(f.path() + ": inconsistent head counts");
    }
    c.head_dim = c.d_model / c.num_q_heads;
    if (c.head_dim % 2 != 0 || f.get_int("llama.rope.dimension_count", c.head_dim) != c.head_dim) {
      throw ModelError(f.path() + ": RoPE must cover the whole (even) head dimension");
    }
    return c;
  }
};

class LlamaModel {
 public:
  /// Dequantises every weight of `f` (the file can be dropped afterwards).
  /// \throws GgufError (missing tensor, unsupported type), ModelError (a tensor of the wrong shape)
  explicit LlamaModel(const GgufFile& f) : config_(LlamaConfig::from_gguf(f)) {
    const LlamaConfig& c = config_;
    embedding_ = load(f, "token_embd.weight", c.vocab, c.d_model);
    // Tied embeddings: without output.weight the LM head is the embedding matrix.
    if (f.has_tensor("output.weight")) head_ = load(f, "output.weight", c.vocab, c.d_model);
    output_norm_ = load(f, "output_norm.weight", 1, c.d_model);
    const int kv = c.num_kv_heads * c.head_dim;
    for (int l = 0; l < c.num_layers; ++l) {
      const std::string p = "blk." + std::to_string(l) + ".";
      layers_.push_back({load(f, p + "attn_norm.weight", 1, c.d_model), load(f, p + "attn_q.weight", c.d_model, c.d_model),
                         load(f, p + "attn_k.weight", kv, c.d_model), load(f, p + "attn_v.weight", kv, c.d_model),
                         load(f, p + "attn_output.weight", c.d_model, c.d_model),
                         load(f, p + "ffn_norm.weight", 1, c.d_model), load(f, p + "ffn_gate.weight", c.d_ff, c.d_model),
                         load(f, p + "ffn_up.weight", c.d_ff, c.d_model), load(f, p + "ffn_down.weight", c.d_model, c.d_ff)});
    }
    // cos/sin of pos·θ^(−2i/D) in double, rounded once, for every position the model declares.
    const int half = c.head_dim / 2;
    rope_cos_.resize(static_cast<std::size_t>(c.context * half));
    rope_sin_.resize(rope_cos_.size());
    for (std::int64_t pos = 0; pos < c.context; ++pos) {
      for (int i = 0; i < half; ++i) {
        const double angle = static_cast<double>(pos) * std::pow(c.rope_theta, -2.0 * i / c.head_dim);
        rope_cos_[static_cast<std::size_t>(pos * half + i)] = static_cast<float>(std::cos(angle));
        rope_sin_[static_cast<std::size_t>(pos * half + i)] = static_cast<float>(std::sin(angle));
      }
    }
  }

  const LlamaConfig& config() const { return config_; }

  /// Runs `n` tokens that follow what `cache` holds (positions cache.length(0) ...) through the model,
  /// appending their keys and values to the cache layer by layer.
  /// \param logits  resized to [n][vocab] (all_logits) or [1][vocab] (the last token's only)
  void forward(const std::int32_t* tokens, std::int64_t n, KvCache& cache, RowMatrix& logits,
               bool all_logits = true) const {
    const LlamaConfig& c = config_;
    const std::int64_t pos0 = cache.length(0);
    if (n <= 0 || pos0 + n > c.context) {
      throw ModelError(detail::concat("forward: positions [", pos0, ", ", pos0 + n, ") outside [0, ", c.context, ")"));
    }
    RowMatrix x(n, c.d_model);
    for (std::int64_t t = 0; t < n; ++t) {
      if (tokens[t] < 0 || tokens[t] >= c.vocab) throw ModelError(detail::concat("forward: token id ", tokens[t]));
      x.row(t) = embedding_.row(tokens[t]);
    }
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    RowMatrix h, q, k, v, att(n, c.d_model), gate, up;
    for (int l = 0; l < c.num_layers; ++l) {
      const Layer& w = layers_[static_cast<std::size_t>(l)];
      rms_norm(x, w.attn_norm, h);
      q.noalias() = h * w.wq.transpose();
      k.noalias() = h * w.wk.transpose();
      v.noalias() = h * w.wv.transpose();
      rope(q, pos0);
      rope(k, pos0);
      cache.append(l, view(k, c.num_kv_heads), view(v, c.num_kv_heads));
      cache.attend(l, view(q, c.num_q_heads), {att.data(), n, c.num_q_heads, c.head_dim}, scale);
      x.noalias() += att * w.wo.transpose();

      rms_norm(x, w.ffn_norm, h);
      gate.noalias() = h * w.w_gate.transpose();
      up.noalias() = h * w.w_up.transpose();
      gate = (gate.array() / (1.0f + (-gate.array()).exp())) * up.array();  // SiLU(gate) ⊙ up
      x.noalias() += gate * w.w_down.transpose();
    }
    const RowMatrix& lm = head_.size() > 0 ? head_ : embedding_;
    if (all_logits) {
      rms_norm(x, output_norm_, h);
    } else {
      rms_norm(x.bottomRows(1), output_norm_, h);
    }
    logits.noalias() = h * lm.transpose();
  }

 private:
  struct Layer {
    RowMatrix attn_norm, wq, wk, wv, wo, ffn_norm, w_gate, w_up, w_down;
  };

  static RowMatrix load(const GgufFile& f, const std::string& name, std::int64_t rows, std::int64_t cols) {
    const GgufTensorInfo& t = f.tensor(name);
    if (t.elements() != rows * cols || t.ne[0] != cols) {
      throw ModelError(detail::concat(f.path(), ": tensor '", name, "' has shape ", t.shape(), ", expected ", rows,
                                      " rows of ", cols));
    }
    const std::vector<float> data = f.dequantize(name);
    return Eigen::Map<const RowMatrix>(data.data(), rows, cols);
  }

  template <class In>
  void rms_norm(const In& x, const RowMatrix& weight, RowMatrix& out) const {
    out.resize(x.rows(), x.cols());
    for (Eigen::Index t = 0; t < x.rows(); ++t) {
      const float inv = 1.0f / std::sqrt(x.row(t).squaredNorm() / static_cast<float>(x.cols()) +
                                         static_cast<float>(config_.rms_eps));
      out.row(t) = (x.row(t) * inv).cwiseProduct(weight.row(0));
    }
  }

  /// Rotates adjacent pairs (x[2i], x[2i+1]) of every head by pos·θ^(−2i/D). The GGUF converter
  /// permuted attn_q / attn_k rows for exactly this pairing (not the split-halves form).
  void rope(RowMatrix& m, std::int64_t pos0) const {
    const int half = config_.head_dim / 2;
    for (Eigen::Index t = 0; t < m.rows(); ++t) {
      const float* cs = rope_cos_.data() + (pos0 + t) * half;
      const float* sn = rope_sin_.data() + (pos0 + t) * half;
      float* row = m.row(t).data();
      for (Eigen::Index base = 0; base < m.cols(); base += config_.head_dim) {
        for (int i = 0; i < half; ++i) {
          const float a = row[base + 2 * i], b = row[base + 2 * i + 1];
          row[base + 2 * i] = a * cs[i] - b * sn[i];
          row[base + 2 * i + 1] = a * sn[i] + b * cs[i];
        }
      }
    }
  }

  TensorView<const float> view(const RowMatrix& m, int heads) const {
    return {m.data(), m.rows(), heads, config_.head_dim};
  }

  LlamaConfig config_;
  RowMatrix embedding_, head_, output_norm_;
  std::vector<Layer> layers_;
  std::vector<float> rope_cos_, rope_sin_;
};

}  // namespace spectralkv::llama
