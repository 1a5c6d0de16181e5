#pragma once
// Synthetic keys, values and queries for the example engine's cache tests, and the error measure.

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

namespace spectralkv::llama::test {

/// [n][heads][dim] rows with real structure (four strong directions per head with decaying weights,
/// an offset) plus noise, never zero; multiplied by `amplitude`.
inline std::vector<float> structured_tokens(std::int64_t n, int heads, int dim, std::uint32_t seed, float amplitude = 1.0f) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal;
  const auto d_size = static_cast<std::size_t>(dim);
  std::vector<float> dirs(static_cast<std::size_t>(heads) * 4 * d_size), out(static_cast<std::size_t>(n) * heads * d_size);
  for (auto& x : dirs) x = normal(gen);
  for (std::int64_t t = 0; t < n; ++t) {
    for (int h = 0; h < heads; ++h) {
      float c[4];
      for (float& x : c) x = normal(gen);
      for (std::size_t d = 0; d < d_size; ++d) {
        float x = 0.3f + 0.1f * normal(gen);
        for (int j = 0; j < 4; ++j) x += c[j] / static_cast<float>(j + 1) * dirs[(static_cast<std::size_t>(h) * 4 + j) * d_size + d];
        out[(static_cast<std::size_t>(t) * heads + h) * d_size + d] = amplitude * x;
      }
    }
  }
  return out;
}

/// ‖a − ref‖ / ‖ref‖ in double.
inline double relative_error(const std::vector<float>& a, const std::vector<float>& ref) {
  double e = 0, r = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    e += (static_cast<double>(a[i]) - ref[i]) * (static_cast<double>(a[i]) - ref[i]);
    r += static_cast<double>(ref[i]) * ref[i];
  }
  return std::sqrt(e / r);
}

}  // namespace spectralkv::llama::test
