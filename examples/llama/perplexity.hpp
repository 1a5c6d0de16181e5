#pragma once
// Strict-mode perplexity of a dense cache against any number of spectral caches, run in lockstep on
// the same windows of text.
//
// Strict means every token attends to the cache exactly as it would during token-by-token generation.
// Tokens go through the model in chunks (multi-query attention, causal), and a chunk never spans a
// compression: it holds at most tokens_until_compression() tokens, or, when that is 0, the single
// token whose append forms the next cold block. Every query of a chunk then sees the same cache
// contents it would see when decoded alone, so the result equals token-by-token decoding. On the CUDA
// backend this needs the device cache's synchronous compression (CacheRequest::strict).

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backend.hpp"
#include "kv_cache.hpp"
#include "model.hpp"

namespace spectralkv::llama {

struct PerplexityOptions {
  std::int64_t context = 2048;  ///< tokens per window, BOS included
  std::int64_t windows = 1;     ///< non-overlapping windows, from the start of the text
  std::int32_t bos = 0;         ///< first token of every window
  std::int64_t max_chunk = 256; ///< bound on tokens per forward call (memory of the logits)
  bool fidelity = true;         ///< shadow every spectral cache with a dense one (CPU backend only)
  AttendPath attend = AttendPath::kFast;
  Backend backend = Backend::kCpu;  ///< where every arm's cache lives (backend.hpp)
  /// Called after every chunk: (window, tokens done in the window, window length).
  std::function<void(std::int64_t, std::int64_t, std::int64_t)> progress;
};

struct ArmResult {
  std::string name;
  bool spectral = false;
  CacheConfig config;
  int outliers = 0;         ///< experimental exact tokens per cold block and KV head (SpectralKvCache)
  NarrowCodes codes;         ///< experimental narrower coefficient codes (SpectralKvCache)
  double nll = 0;           ///< Σ −log p(target)
  double kl = 0;            ///< Σ KL(dense ‖ this arm) over scored positions
  std::int64_t top1_agree = 0;
  std::int64_t scored = 0;
  KvBytes bytes;            ///< at the end of the last window
  std::vector<LayerFidelity> fidelity;
  double seconds = 0;       ///< forward time of this arm alone

  double perplexity() const { return std::exp(nll / static_cast<double>(scored)); }
};

/// Length of the next strict chunk: as many of `remaining` tokens (at most `max_chunk`) as can be
/// appended before the cache compresses, or 1 when the very next token forms a block.
inline std::int64_t strict_chunk(const KvCache& cache, int num_layers, std::int64_t remaining, std::int64_t max_chunk) {
  std::int64_t room = std::min(remaining, max_chunk);
  for (int l = 0; l < num_layers; ++l) room = std::min(room, cache.tokens_until_compression(l));
  return std::max<std::int64_t>(room, 1);
}

/// The cache an arm needs (for make_cache and choose_backend).
inline CacheRequest arm_request(const ArmResult& arm, const LlamaConfig& mc, const PerplexityOptions& opt) {
  CacheRequest r;
  r.spectral = arm.spectral;
  if (arm.spectral) {
    r.config = arm.config;
  } else {
    r.config.num_layers = mc.num_layers;
    r.config.num_q_heads = mc.num_q_heads;
    r.config.num_kv_heads = mc.num_kv_heads;
    r.config.head_dim = mc.head_dim;
  }
  r.capacity = opt.context;
  r.max_chunk = opt.max_chunk;
  r.strict = true;
  r.fidelity = opt.fidelity;
  r.attend = opt.attend;
  r.outliers = arm.outliers;
  r.codes = arm.codes;
  return r;
}

namespace detail_ppl {
/// log Σ exp over a row, in double.
inline double log_sum_exp(const float* z, std::int64_t n) {
  const double m = *std::max_element(z, z + n);
  double s = 0;
  for (std::int64_t i = 0; i < n; ++i) s += std::exp(z[i] - m);
  return m + std::log(s);
}
}  // namespace detail_ppl

/// Windows of `text`: each is BOS followed by context − 1 text tokens; every text token of a window is
/// scored (the first one from BOS alone). Only whole windows are used, so every context length scores
/// windows of exactly its size.
/// \param arms  arms[0] is the dense reference; the others are spectral, each with its CacheConfig
/// \throws ModelError if the text has fewer tokens than one window needs
inline std::vector<ArmResult> evaluate_perplexity(const LlamaModel& model, const std::vector<std::int32_t>& text,
                                                  std::vector<ArmResult> arms, const PerplexityOptions& opt) {
  using Clock = std::chrono::steady_clock;
  const LlamaConfig& mc = model.config();
  const std::int64_t span = opt.context - 1;
  const std::int64_t available = static_cast<std::int64_t>(text.size()) / span;
  if (opt.context < 2 || opt.context > mc.context || available < 1) {
    throw ModelError(detail::concat("perplexity: context ", opt.context, " needs <= ", mc.context, " and at least ",
                                    span, " text tokens (the text has ", text.size(), ")"));
  }
  const std::int64_t windows = std::min(opt.windows, available);

  std::vector<std::unique_ptr<KvCache>> caches;
  for (const ArmResult& a : arms) caches.push_back(make_cache(opt.backend, arm_request(a, mc, opt)));
  std::vector<RowMatrix> logits(arms.size());
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(opt.context));
  for (std::int64_t w = 0; w < windows; ++w) {
    tokens[0] = opt.bos;
    std::copy(text.begin() + w * span, text.begin() + (w + 1) * span, tokens.begin() + 1);
    for (auto& c : caches) c->clear();
    for (std::int64_t pos = 0; pos < opt.context;) {
      std::int64_t n = opt.max_chunk;  // the arms' caches may compress at different times
      for (const auto& c : caches) n = std::min(n, strict_chunk(*c, mc.num_layers, opt.context - pos, opt.max_chunk));
      for (std::size_t a = 0; a < arms.size(); ++a) {
        const auto t0 = Clock::now();
        model.forward(tokens.data() + pos, n, *caches[a], logits[a]);
        arms[a].seconds += std::chrono::duration<double>(Clock::now() - t0).count();
      }
      // Row i predicts tokens[pos + i + 1].
      for (std::int64_t i = 0; i < n && pos + i + 1 < opt.context; ++i) {
        const std::int32_t target = tokens[static_cast<std::size_t>(pos + i + 1)];
        const float* zd = logits[0].row(i).data();
        const double lse_d = detail_ppl::log_sum_exp(zd, mc.vocab);
        const std::int64_t top_d = std::max_element(zd, zd + mc.vocab) - zd;
        for (std::size_t a = 0; a < arms.size(); ++a) {
          const float* z = logits[a].row(i).data();
          const double lse = a == 0 ? lse_d : detail_ppl::log_sum_exp(z, mc.vocab);
          arms[a].nll += lse - z[target];
          arms[a].scored += 1;
          if (a == 0) continue;
          double kl = 0;
          for (std::int64_t j = 0; j < mc.vocab; ++j) {
            const double log_pd = zd[j] - lse_d;
            kl += std::exp(log_pd) * (log_pd - (z[j] - lse));
          }
          arms[a].kl += kl;
          arms[a].top1_agree += (std::max_element(z, z + mc.vocab) - z) == top_d;
        }
      }
      pos += n;
      if (opt.progress) opt.progress(w, pos, opt.context);
    }
  }
  for (std::size_t a = 0; a < arms.size(); ++a) {
    arms[a].bytes = caches[a]->bytes();
    if (const auto* s = dynamic_cast<const SpectralKvCache*>(caches[a].get())) arms[a].fidelity = s->fidelity();
  }
  return arms;
}

}  // namespace spectralkv::llama
