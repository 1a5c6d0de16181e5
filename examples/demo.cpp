// Compression ratio and attention fidelity of the spectral cache on synthetic keys and values with the
// structure of real ones (a few dominant directions per head, per-channel offsets, noise).
//
//   spectralkv_demo [tokens=4096]
//
// For each rank pair it fills a cache with the same tokens, runs one decode step of GQA 32/8 attention
// at head_dim 128, and compares outputs and logits with dense attention over the original tokens.

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "spectralkv/spectralkv.hpp"

namespace {

using spectralkv::Half;

std::vector<Half> synthetic_tokens(std::int64_t n, int heads, int dim, int rank, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  std::vector<float> dirs(static_cast<std::size_t>(heads) * rank * dim), offset(static_cast<std::size_t>(heads) * dim);
  for (auto& x : dirs) x = normal(gen);
  for (auto& x : offset) x = normal(gen);
  std::vector<Half> out(static_cast<std::size_t>(n) * heads * dim);
  for (std::int64_t t = 0; t < n; ++t)
    for (int h = 0; h < heads; ++h) {
      std::vector<float> c(static_cast<std::size_t>(rank));
      for (int j = 0; j < rank; ++j) c[static_cast<std::size_t>(j)] = normal(gen) * std::pow(0.8f, static_cast<float>(j));
      for (int d = 0; d < dim; ++d) {
        float x = offset[static_cast<std::size_t>(h) * dim + d] + 0.05f * normal(gen);
        for (int j = 0; j < rank; ++j) x += c[static_cast<std::size_t>(j)] * dirs[(static_cast<std::size_t>(h) * rank + j) * dim + d];
        out[(static_cast<std::size_t>(t) * heads + h) * dim + d] = Half(x);
      }
    }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const std::int64_t tokens = argc > 1 ? std::atoll(argv[1]) : 4096;
  if (tokens < 1) {
    std::fprintf(stderr, "usage: spectralkv_demo [tokens >= 1]\n");
    return 2;
  }
  const int q_heads = 32, kv_heads = 8, dim = 128;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  const auto k = synthetic_tokens(tokens, kv_heads, dim, 24, 1);
  const auto v = synthetic_tokens(tokens, kv_heads, dim, 48, 2);
  std::vector<float> q(static_cast<std::size_t>(q_heads) * dim);
  std::mt19937 gen(3);
  std::normal_distribution<float> normal;
  for (auto& x : q) x = normal(gen);

  // Dense attention over the original tokens: the reference.
  std::vector<float> dense_out(q.size());
  std::vector<float> dense_logits;
  for (int h = 0; h < q_heads; ++h) {
    std::vector<float> logits;
    const std::size_t off = static_cast<std::size_t>(h / (q_heads / kv_heads)) * dim;
    spectralkv::dense_attend_one(k.data() + off, v.data() + off, kv_heads * dim, tokens - 1, q.data() + h * dim, dim,
                                 scale, dense_out.data() + h * dim, &logits);
    dense_logits.insert(dense_logits.end(), logits.begin(), logits.end());
  }

  std::printf("SpectralKV demo: %lld tokens, GQA %d/%d, head_dim %d, block 512, hot 64, FP16 storage\n\n",
              static_cast<long long>(tokens), q_heads, kv_heads, dim);
  std::printf("%-8s %10s %10s %12s %12s %10s %14s\n", "r_K/r_V", "KV MB", "dense MB", "compression", "out rel L2",
              "out cos", "score Pearson");
  for (const auto ranks : {spectralkv::LayerRanks{8, 16}, spectralkv::LayerRanks{16, 32}, spectralkv::LayerRanks{32, 64}}) {
    spectralkv::CacheConfig config;
    config.num_layers = 1;
    config.num_q_heads = q_heads;
    config.num_kv_heads = kv_heads;
    config.head_dim = dim;
    config.default_ranks = ranks;
    spectralkv::SpectralCache<Half> cache(config);
    cache.add_sequence(0);
    cache.append(0, 0, {k.data(), tokens, kv_heads, dim}, {v.data(), tokens, kv_heads, dim});
    std::vector<float> out(q.size());
    cache.attend(0, 0, spectralkv::TensorView<const float>{q.data(), 1, q_heads, dim},
                 spectralkv::TensorView<float>{out.data(), 1, q_heads, dim}, scale);
    std::vector<float> logits;
    for (const auto& row : cache.logits(0, 0, spectralkv::TensorView<const float>{q.data(), 1, q_heads, dim}, scale))
      logits.insert(logits.end(), row.begin(), row.end());
    const auto out_fid = spectralkv::fidelity(dense_out, out);
    const auto score_fid = spectralkv::fidelity(dense_logits, logits);
    const auto m = cache.memory_stats();
    std::printf("%3d/%-4d %10.2f %10.2f %11.2fx %12.4f %10.5f %14.5f\n", ranks.key, ranks.value,
                m.total_bytes() / 1e6, m.dense_equivalent_bytes / 1e6, m.compression_ratio(), out_fid.relative_l2,
                out_fid.cosine, score_fid.pearson);
  }
  return 0;
}
