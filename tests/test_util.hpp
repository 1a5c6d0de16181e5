#pragma once
// Shared helpers of the CPU tests: realistic random data and a byte snapshot of a cache's whole state.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "spectralkv/spectralkv.hpp"

namespace spectralkv::test {

/// Tokens [n][heads][dim] with the structure of real keys and values: a few strong directions per head
/// (low rank), a per-channel offset, plus small isotropic noise. Never all zeros.
template <class T>
std::vector<T> low_rank_tokens(std::int64_t n, int heads, int dim, int rank, std::uint32_t seed, float noise = 0.05f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  std::vector<float> dirs(static_cast<std::size_t>(heads) * rank * dim), offset(static_cast<std::size_t>(heads) * dim);
  for (auto& x : dirs) x = normal(gen);
  for (auto& x : offset) x = 0.5f * normal(gen);
  std::vector<T> out(static_cast<std::size_t>(n) * heads * dim);
  std::vector<float> coef(static_cast<std::size_t>(rank));
  for (std::int64_t t = 0; t < n; ++t) {
    for (int h = 0; h < heads; ++h) {
      for (int j = 0; j < rank; ++j) coef[static_cast<std::size_t>(j)] = normal(gen) / static_cast<float>(1 + j);
      for (int d = 0; d < dim; ++d) {
        float x = offset[static_cast<std::size_t>(h) * dim + d] + noise * normal(gen);
        for (int j = 0; j < rank; ++j) x += coef[static_cast<std::size_t>(j)] * dirs[(static_cast<std::size_t>(h) * rank + j) * dim + d];
        out[(static_cast<std::size_t>(t) * heads + h) * dim + d] = from_float<T>(x);
      }
    }
  }
  return out;
}

template <class T>
std::vector<T> normal_tokens(std::int64_t n, int heads, int dim, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  std::vector<T> out(static_cast<std::size_t>(n) * heads * dim);
  for (auto& x : out) x = from_float<T>(normal(gen));
  return out;
}

template <class T>
TensorView<const T> view(const std::vector<T>& v, std::int64_t tokens, int heads, int dim) {
  return {v.data(), tokens, heads, dim};
}
template <class T>
TensorView<T> view(std::vector<T>& v, std::int64_t tokens, int heads, int dim) {
  return {v.data(), tokens, heads, dim};
}

/// Everything observable about a cache, as bytes: sequences, per-layer dense tiers, block tables and
/// the contents of every block in use, and the pool counters. Equal snapshots mean equal caches.
template <class T>
std::vector<std::uint8_t> snapshot(const SpectralCache<T>& cache) {
  std::vector<std::uint8_t> out;
  auto put = [&out](const void* p, std::size_t n) {
    const auto* b = static_cast<const std::uint8_t*>(p);
    out.insert(out.end(), b, b + n);
  };
  const CacheConfig& c = cache.config();
  const std::size_t tok = static_cast<std::size_t>(c.num_kv_heads) * c.head_dim * sizeof(T);
  for (SequenceId id : cache.sequences()) {
    put(&id, sizeof id);
    for (int l = 0; l < c.num_layers; ++l) {
      const auto s = cache.state(id, l);
      const auto& lay = cache.layout(l);
      put(&s.sink_len, sizeof s.sink_len);
      put(s.sink_k, s.sink_len * tok);
      put(s.sink_v, s.sink_len * tok);
      put(&s.num_blocks, sizeof s.num_blocks);
      for (std::int64_t b = 0; b < s.num_blocks; ++b) {
        put(&s.blocks[b], sizeof(std::int32_t));
        put(cache.pool(l) + s.blocks[b] * lay.block_bytes, static_cast<std::size_t>(lay.block_bytes));
      }
      put(&s.tail_len, sizeof s.tail_len);
      put(s.tail_k, s.tail_len * tok);
      put(s.tail_v, s.tail_len * tok);
    }
  }
  // Pool capacity is left out on purpose: how far a pool has grown is not part of the cache's content.
  for (int l = 0; l < c.num_layers; ++l) {
    const std::int64_t in_use = cache.blocks_in_use(l);
    put(&in_use, sizeof in_use);
  }
  return out;
}

/// Largest |a − b| / max(|b|_∞, tiny) over all entries: error relative to the reference's scale.
inline double max_rel_error(const std::vector<float>& ref, const std::vector<float>& got) {
  double scale = 1e-30, err = 0.0;
  if (ref.size() != got.size()) return INFINITY;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    // NaN would otherwise vanish in std::max, on either side.
    if (!std::isfinite(got[i]) || !std::isfinite(ref[i])) return INFINITY;
    scale = std::max(scale, static_cast<double>(std::fabs(ref[i])));
    err = std::max(err, static_cast<double>(std::fabs(ref[i] - got[i])));
  }
  return err / scale;
}

}  // namespace spectralkv::test
