// The example's CUDA backend (cuda_kv_cache.cu: cuda::DeviceSpectralCache<Half> behind KvCache) against
// its CPU caches: bookkeeping and attention on synthetic keys and values, then strict-mode perplexity of
// the first window of the real text with both backends. Every test skips without a CUDA device; the
// real-model test also skips when the model or the text is absent, as the CPU real-model tests do.

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "backend.hpp"
#include "kv_cache.hpp"
#include "synthetic_tokens.hpp"
#include "model.hpp"
#include "perplexity.hpp"
#include "spectralkv/cuda/error.cuh"
#include "tokenizer.hpp"

namespace spectralkv::llama {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (!spectralkv::cuda::device_available()) GTEST_SKIP() << "no CUDA device present"

// The device kernels take head_dim 64 or 128; GQA group 3 as in the real model.
constexpr int kQHeads = 9, kKvHeads = 3, kDim = 64;

std::vector<float> tokens(std::int64_t n, int heads, std::uint32_t seed) {
  return test::structured_tokens(n, heads, kDim, seed, 0.5f);
}

std::vector<float> rounded_to_half(std::vector<float> x) {
  for (float& e : x) e = static_cast<float>(Half(e));
  return x;
}

using test::relative_error;

CacheRequest request(bool spectral) {
  CacheRequest r;
  r.spectral = spectral;
  r.config.num_layers = 2;
  r.config.num_q_heads = kQHeads;
  r.config.num_kv_heads = kKvHeads;
  r.config.head_dim = kDim;
  r.config.block_size = 64;
  r.config.hot_tokens = 16;
  r.config.sink_tokens = 4;
  r.config.default_ranks = {16, 32};
  r.capacity = 400;
  r.max_chunk = 48;
  r.strict = true;
  return r;
}

/// Feeds the same tokens to a CPU and a CUDA cache in strict chunks (both caches must agree on where
/// they are, which is checked at every chunk), then attends `q_len` queries in both.
struct Pair {
  std::unique_ptr<KvCache> cpu, gpu;
  std::vector<float> k, v;

  explicit Pair(bool spectral)
      : cpu(make_cache(Backend::kCpu, request(spectral))), gpu(make_cache(Backend::kCuda, request(spectral))) {}

  void fill(std::int64_t len, std::uint32_t seed) {
    const CacheRequest r = request(true);
    k = tokens(len, kKvHeads, seed);
    v = tokens(len, kKvHeads, seed + 1);
    for (std::int64_t at = 0; at < len;) {
      const std::int64_t n = std::min(strict_chunk(*cpu, r.config.num_layers, len - at, r.max_chunk), len - at);
      for (int layer = 0; layer < r.config.num_layers; ++layer) {
        const TensorView<const float> kv_k{k.data() + at * kKvHeads * kDim, n, kKvHeads, kDim};
        const TensorView<const float> kv_v{v.data() + at * kKvHeads * kDim, n, kKvHeads, kDim};
        cpu->append(layer, kv_k, kv_v);
        gpu->append(layer, kv_k, kv_v);
        ASSERT_EQ(gpu->length(layer), cpu->length(layer));
        ASSERT_EQ(gpu->tokens_until_compression(layer), cpu->tokens_until_compression(layer)) << "at " << at + n;
      }
      at += n;
    }
  }
  /// Attention of the newest q_len tokens in layer 1: {cpu, gpu} outputs (poisoned first).
  std::pair<std::vector<float>, std::vector<float>> attend(std::int64_t q_len, std::uint32_t seed) {
    const auto q = tokens(q_len, kQHeads, seed);
    std::vector<float> a(q.size(), std::nanf("")), b(q.size(), std::nanf(""));
    cpu->attend(1, {q.data(), q_len, kQHeads, kDim}, {a.data(), q_len, kQHeads, kDim}, 0.125f);
    gpu->attend(1, {q.data(), q_len, kQHeads, kDim}, {b.data(), q_len, kQHeads, kDim}, 0.125f);
    return {a, b};
  }
};

TEST(CudaBackend, DenseEqualsCpuDenseOverFp16Rows) {
  SKIP_WITHOUT_GPU();
  Pair p(false);
  p.fill(300, 1);
  ASSERT_FALSE(testing::Test::HasFatalFailure());
  for (std::int64_t n : {1, 7}) {  // the fused decode kernel, then MultiQueryAttention
    const auto q = tokens(n, kQHeads, 3);
    // The CPU reference sees the rows as the device stores them (FP16), so only the FP16 rounding of the
    // output (2^-11 relative at most per element) and FP32 summation order remain: 1e-3 is 2× the former.
    DenseKvCache ref(2, kKvHeads, kDim);
    const auto k16 = rounded_to_half(p.k), v16 = rounded_to_half(p.v), q16 = rounded_to_half(q);
    ref.append(1, {k16.data(), 300, kKvHeads, kDim}, {v16.data(), 300, kKvHeads, kDim});
    std::vector<float> want(q.size(), std::nanf("")), got(q.size(), std::nanf(""));
    ref.attend(1, {q16.data(), n, kQHeads, kDim}, {want.data(), n, kQHeads, kDim}, 0.125f);
    p.gpu->attend(1, {q.data(), n, kQHeads, kDim}, {got.data(), n, kQHeads, kDim}, 0.125f);
    EXPECT_LT(relative_error(got, want), 1e-3) << "q_len " << n;
  }
  EXPECT_EQ(p.gpu->bytes().stored, p.cpu->bytes().stored);  // both count FP16 K and V
  EXPECT_EQ(p.gpu->bytes().cold_tokens, 0);
  p.gpu->clear();
  EXPECT_EQ(p.gpu->length(0), 0);
}

TEST(CudaBackend, SpectralFollowsTheCpuPolicyAndAttendsWithinCompressionError) {
  SKIP_WITHOUT_GPU();
  Pair p(true);
  const std::int64_t len = 300;  // 4 sinks, 4 cold blocks of 64, a tail of 40
  p.fill(len, 11);
  ASSERT_FALSE(testing::Test::HasFatalFailure());
  const KvBytes cpu = p.cpu->bytes(), gpu = p.gpu->bytes();
  EXPECT_GT(gpu.cold_tokens, 0);
  EXPECT_EQ(gpu.cold_tokens, cpu.cold_tokens);
  EXPECT_EQ(gpu.stored, cpu.stored);  // the same cold layout, the dense tiers counted as FP16 on both
  DenseKvCache dense(2, kKvHeads, kDim);
  dense.append(1, {p.k.data(), len, kKvHeads, kDim}, {p.v.data(), len, kKvHeads, kDim});
  for (std::int64_t n : {1, 7}) {
    const auto [on_cpu, on_gpu] = p.attend(n, 13);
    const auto q = tokens(n, kQHeads, 13);
    std::vector<float> exact(q.size(), std::nanf(""));
    dense.attend(1, {q.data(), n, kQHeads, kDim}, {exact.data(), n, kQHeads, kDim}, 0.125f);
    // The two backends compress independently (CPU: exact SVD of the FP32 rows; GPU: subspace iteration
    // on the FP16 rows, truncation error ≤ 1.01× the optimum), so each output is within its own
    // compression error e of the dense output, and |gpu − cpu| ≤ e_gpu + e_cpu. Bound: e_gpu up to 1.5×
    // e_cpu, plus 5e-3 for FP16 storage (2^-11 per row element, amplified by the softmax) —
    // 2.5·e_cpu + 5e-3.
    const double e_cpu = relative_error(on_cpu, exact);
    EXPECT_GT(e_cpu, 1e-4);  // the cache really is compressed
    EXPECT_LT(relative_error(on_gpu, on_cpu), 2.5 * e_cpu + 5e-3) << "q_len " << n << ", e_cpu " << e_cpu;
  }
  p.gpu->clear();
  EXPECT_EQ(p.gpu->length(1), 0);
  EXPECT_EQ(p.gpu->bytes().cold_tokens, 0);
}

TEST(CudaBackend, AutoChoosesCudaAndRefusesCpuOnlyFeatures) {
  SKIP_WITHOUT_GPU();
  CacheRequest r = request(true);
  EXPECT_EQ(choose_backend("auto", {r}).backend, Backend::kCuda);
  EXPECT_EQ(choose_backend("cpu", {r}).backend, Backend::kCpu);
  r.outliers = 4;
  EXPECT_EQ(choose_backend("auto", {r}).backend, Backend::kCpu);
  EXPECT_THROW(choose_backend("cuda", {r}), InvalidArgument);
  r.outliers = 0;
  r.config.default_ranks = {24, 32};  // the kernels take ranks 8, 16, 32 and 64
  const BackendChoice c = choose_backend("auto", {r});
  EXPECT_EQ(c.backend, Backend::kCpu);
  EXPECT_NE(c.reason.find("ranks 24/32"), std::string::npos) << c.reason;
  EXPECT_THROW(make_cache(Backend::kCuda, r), InvalidArgument);
}

// --- the real model ------------------------------------------------------------------------------------------

std::string env_or(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return v && *v ? v : fallback;
}

/// Strict-mode perplexity of the first window, dense and spectral (library defaults: ranks 16/32, block
/// 512, hot 64, 16 sinks; the device cache's default subspace-iteration compression), CPU against CUDA.
TEST(CudaBackendRealModel, FirstWindowPerplexityAgreesWithTheCpuBackend) {
  SKIP_WITHOUT_GPU();
  const std::string model_path = env_or("SPECTRALKV_LLAMA_MODEL", SPECTRALKV_LLAMA_MODEL_DEFAULT);
  const std::string text_path = env_or("SPECTRALKV_LLAMA_TEXT", SPECTRALKV_LLAMA_TEXT_DEFAULT);
  if (!std::filesystem::exists(model_path)) GTEST_SKIP() << "model file absent: run scripts/fetch_model.sh";
  if (!std::filesystem::exists(text_path)) GTEST_SKIP() << "text absent: run scripts/fetch_text.sh";
  flush_denormals_to_zero();
  const GgufFile f = GgufFile::open(model_path);
  const Tokenizer tokenizer = Tokenizer::from_gguf(f);
  const LlamaModel model(f);
  std::ifstream in(text_path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  const std::vector<std::int32_t> text = tokenizer.encode(ss.str());
  const LlamaConfig& mc = model.config();

  PerplexityOptions opt;
  opt.context = 1024;  // one cold block of 512 per layer (16 sinks + 512 + a tail of 496)
  opt.bos = tokenizer.bos();
  opt.fidelity = false;
  std::vector<ArmResult> arms(2);
  arms[1].spectral = true;
  arms[1].config.num_layers = mc.num_layers;
  arms[1].config.num_q_heads = mc.num_q_heads;
  arms[1].config.num_kv_heads = mc.num_kv_heads;
  arms[1].config.head_dim = mc.head_dim;
  opt.backend = Backend::kCpu;
  const std::vector<ArmResult> cpu = evaluate_perplexity(model, text, arms, opt);
  opt.backend = Backend::kCuda;
  const std::vector<ArmResult> gpu = evaluate_perplexity(model, text, arms, opt);

  const double dense_rel = gpu[0].perplexity() / cpu[0].perplexity() - 1.0;
  const double spectral_rel = gpu[1].perplexity() / cpu[1].perplexity() - 1.0;
  std::cout << "[ perplexity ] 1024-token window: dense cpu " << cpu[0].perplexity() << " cuda "
            << gpu[0].perplexity() << " (" << dense_rel << "); spectral cpu " << cpu[1].perplexity() << " cuda "
            << gpu[1].perplexity() << " (" << spectral_rel << "); spectral vs dense cpu "
            << cpu[1].perplexity() / cpu[0].perplexity() - 1.0 << " cuda "
            << gpu[1].perplexity() / gpu[0].perplexity() - 1.0 << "\n";
  RecordProperty("dense_relative_difference", std::to_string(dense_rel));
  RecordProperty("spectral_relative_difference", std::to_string(spectral_rel));

  ASSERT_EQ(gpu[1].scored, cpu[1].scored);
  EXPECT_EQ(gpu[1].bytes.cold_tokens, static_cast<std::int64_t>(mc.num_layers) * 512);  // it really compressed
  EXPECT_EQ(gpu[0].bytes.cold_tokens, 0);
  // Dense: the device rounds K, V, q and the attention output to FP16 (2^-11 relative). Emulating exactly
  // that rounding around the CPU caches moves this window's perplexity by 4.7e-5 relative (51.107824 ->
  // 51.110224; spectral arm: 4.6e-5); the kernels add their own summation order. 5e-4 is 10× the
  // emulated effect and far below any real fault (a wrong position or tier costs whole percents).
  // Measured on an H200 with two versions of the kernels: 51.1078 -> 51.1129 and 51.1115 (1.0e-4, 7.2e-5).
  EXPECT_LT(std::abs(dense_rel), 5e-4);
  // Spectral: the same FP16 rounding plus two independent compressions (exact SVD on the CPU, subspace
  // iteration on the GPU, each within 1% of the optimal truncation error but not the same basis).
  // Equally good compressions differ, per window, by the chance variation docs/QUALITY.md reports
  // between configurations (a few tenths of a percent of perplexity). 1% is about three times that and
  // half the compression effect itself in this window (+2.18% on the CPU): a device cache that
  // compressed wrongly, or not at all, lands outside. Measured on an H200 with two versions of the kernels:
  // 52.2235 -> 52.2884 and 52.3243 (1.2e-3, 1.9e-3; compression effect +2.18% on the CPU, +2.30% and
  // +2.37% on the GPU).
  EXPECT_LT(std::abs(spectral_rel), 1e-2);
}

}  // namespace
}  // namespace spectralkv::llama
