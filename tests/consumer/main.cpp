// A project outside the source tree, built against the installed package.
#include <spectralkv/spectralkv.hpp>

#include <cstdio>
#include <vector>

int main() {
  spectralkv::CacheConfig config;
  config.num_layers = 1;
  config.num_q_heads = 4;
  config.num_kv_heads = 2;
  config.head_dim = 16;
  config.block_size = 16;
  config.hot_tokens = 4;
  config.sink_tokens = 0;
  config.default_ranks = {4, 8};
  spectralkv::SpectralCache<float> cache(config);
  cache.add_sequence(0);
  std::vector<float> kv(40 * 2 * 16);
  for (std::size_t i = 0; i < kv.size(); ++i) kv[i] = static_cast<float>((i * 37) % 11) - 5.0f;
  cache.append(0, 0, spectralkv::TensorView<const float>{kv.data(), 40, 2, 16},
               spectralkv::TensorView<const float>{kv.data(), 40, 2, 16});
  std::vector<float> q(4 * 16, 0.1f), out(4 * 16);
  cache.attend(0, 0, spectralkv::TensorView<const float>{q.data(), 1, 4, 16},
               spectralkv::TensorView<float>{out.data(), 1, 4, 16}, 0.25f);
  std::printf("consumer: %lld tokens, %lld cold blocks\n", static_cast<long long>(cache.length(0, 0)),
              static_cast<long long>(cache.blocks_in_use(0)));
  return cache.blocks_in_use(0) == 2 ? 0 : 1;
}
