// Batched compression (truncated SVD + INT8 into the cold layout's sections) on the GPU.
//
// N matrices of 512×128 FP16, ranks 16, 32 or mixed (`rank` 0: half 16 / half 32, interleaved as keys
// and values of one layer would be), for each algorithm in the same binary (`algorithm`: 0 subspace
// iteration, the default; 1 the cuSOLVER path; 2 the tridiagonal eigen-solve for every job); N = 512
// mixed also with mean centring (`centre` = 1), which adds the shifted-Gram work, and N = 512 at ranks
// 36, 40, 64 and 120 (subspaces wider than ℓ = 48: the default takes the tridiagonal eigen-solve, in the
// separate kernels) and mixed 32/64 (`rank` -64: under the default algorithm, both eigen-solves in one
// launch).
// Each iteration is timed with CUDA events around one run() on a stream (manual time); the counters
// report the median over the iterations (per batch and per matrix), the input bandwidth, and
// the worst optimality ratio ‖X − X·B32ᵀB32‖_F / sqrt(Σ_{i>r} σ_i²) over sampled jobs, against Eigen's
// JacobiSVD in double.
//
// Inputs: 16 distinct matrices replicated to N separate buffers (so every matrix is read from its own
// memory). Half are key-like (σ_i = exp(-i/20) with three channels 20× the rest), half value-like
// (σ_i = i^-0.5). Inputs of N = 16 stay in L2 between iterations; N ≥ 512 (≥ 64 MiB) do not fit.
//
// BM_CompressOptions repeats N = 512 mixed with the subspace-iteration knobs swept (iterations, Jacobi
// sweeps, oversampling): what each costs against the ratio it buys.
//
// Run: bench_compress --benchmark_out=compress.json --benchmark_out_format=json

#include <benchmark/benchmark.h>

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <map>
#include <memory>
#include <random>
#include <vector>

#include "spectralkv/cuda/compress.cuh"
#include "spectralkv/cuda/error.cuh"
#include "spectralkv/numeric.hpp"

namespace {

using spectralkv::Half;
using spectralkv::cuda::BatchedCompressor;
using spectralkv::cuda::check;
using spectralkv::cuda::CompressAlgorithm;
using spectralkv::cuda::CompressJob;
using spectralkv::cuda::CompressProblem;

constexpr int kRows = 512;
constexpr int kDim = 128;
constexpr int kDistinct = 16;
constexpr int kSampled = 16;  // jobs whose FP32 basis is checked for the ratio counter

struct DeviceMemory {
  void* ptr = nullptr;
  explicit DeviceMemory(std::size_t bytes) { check(cudaMalloc(&ptr, std::max<std::size_t>(bytes, 1)), "cudaMalloc"); }
  ~DeviceMemory() { cudaFree(ptr); }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  template <class T>
  T* as() const {
    return static_cast<T*>(ptr);
  }
};

/// The distinct input matrices (host, FP16-rounded) and their singular values.
struct Inputs {
  std::vector<Eigen::MatrixXd> x;
  std::vector<Eigen::VectorXd> sigma;
};

const Inputs& inputs() {
  static const Inputs in = [] {
    Inputs r;
    std::mt19937_64 rng(42);
    std::normal_distribution<double> n(0.0, 1.0);
    auto gauss = [&](int rows, int cols) {
      Eigen::MatrixXd m(rows, cols);
      for (int i = 0; i < m.size(); ++i) m.data()[i] = n(rng);
      return m;
    };
    auto ortho = [&](int rows, int cols) -> Eigen::MatrixXd {
      Eigen::HouseholderQR<Eigen::MatrixXd> qr(gauss(rows, cols));
      return qr.householderQ() * Eigen::MatrixXd::Identity(rows, cols);
    };
    for (int m = 0; m < kDistinct; ++m) {
      const bool key_like = m % 2 == 0;
      Eigen::VectorXd s(kDim);
      for (int i = 0; i < kDim; ++i) s(i) = key_like ? std::exp(-(i + 1) / 20.0) : std::pow(i + 1.0, -0.5);
      Eigen::MatrixXd x = ortho(kRows, kDim) * s.asDiagonal() * ortho(kDim, kDim).transpose();
      x *= std::sqrt(static_cast<double>(kRows) * kDim) / x.norm();
      if (key_like)
        for (int ch : {7, 40, 99}) x.col(ch) *= 20.0;
      for (int i = 0; i < x.size(); ++i) x.data()[i] = static_cast<float>(Half(static_cast<float>(x.data()[i])));
      Eigen::JacobiSVD<Eigen::MatrixXd> svd(x);
      r.x.push_back(x);
      r.sigma.push_back(svd.singularValues());
    }
    return r;
  }();
  return in;
}

/// Device copies of N input matrices (built once per N and kept for all benchmarks of that N).
const DeviceMemory& device_inputs(int n) {
  static std::map<int, std::unique_ptr<DeviceMemory>> cache;
  auto it = cache.find(n);
  if (it != cache.end()) return *it->second;
  const Inputs& in = inputs();
  const std::size_t per = static_cast<std::size_t>(kRows) * kDim;
  auto mem = std::make_unique<DeviceMemory>(per * n * sizeof(Half));
  std::vector<Half> host(per * kDistinct);
  for (int m = 0; m < kDistinct; ++m)
    for (int t = 0; t < kRows; ++t)
      for (int d = 0; d < kDim; ++d) host[m * per + t * kDim + d] = Half(static_cast<float>(in.x[m](t, d)));
  for (int j = 0; j < n; j += kDistinct) {
    const int count = std::min(kDistinct, n - j);
    check(cudaMemcpy(mem->as<Half>() + j * per, host.data(), count * per * sizeof(Half), cudaMemcpyHostToDevice),
          "cudaMemcpy(inputs)");
  }
  auto& ref = *mem;
  cache.emplace(n, std::move(mem));
  return ref;
}

/// rank_mode: a rank for every job (16, 32, 64 or 120 below), 0 for mixed (even jobs 16, odd jobs 32),
/// or -R for even jobs 32 and odd jobs R; centre: mean-centred jobs; options: the subspace-iteration
/// knobs (defaults unless a benchmark sweeps them).
void run_compress(benchmark::State& state, int n, int rank_mode, CompressAlgorithm algorithm, bool centre,
                  const spectralkv::cuda::CompressOptions& options) {
  auto rank_of = [&](int j) {
    if (rank_mode > 0) return rank_mode;
    const int odd = rank_mode < 0 ? -rank_mode : 32;
    return j % 2 == 0 ? (rank_mode < 0 ? 32 : 16) : odd;
  };

  const DeviceMemory& x = device_inputs(n);
  const int kMaxRank = rank_mode > 0 ? rank_mode : std::max(32, -rank_mode);  // the problem's max_rank
  DeviceMemory basis(static_cast<std::size_t>(n) * kMaxRank * kDim * sizeof(Half));
  DeviceMemory scale(static_cast<std::size_t>(n) * kMaxRank * sizeof(float));
  DeviceMemory coeff(static_cast<std::size_t>(n) * kMaxRank * kRows);
  DeviceMemory basis32(static_cast<std::size_t>(kSampled) * kMaxRank * kDim * sizeof(float));
  DeviceMemory mean(static_cast<std::size_t>(n) * kDim * sizeof(Half));

  std::vector<CompressJob> jobs(n);
  for (int j = 0; j < n; ++j) {
    CompressJob& job = jobs[j];
    job.x = x.as<Half>() + static_cast<std::size_t>(j) * kRows * kDim;
    job.x_row_stride = kDim;
    job.rank = rank_of(j);
    job.basis_out = basis.as<__half>() + static_cast<std::size_t>(j) * kMaxRank * kDim;
    job.scale_out = scale.as<float>() + static_cast<std::size_t>(j) * kMaxRank;
    job.coeff_out = coeff.as<std::int8_t>() + static_cast<std::size_t>(j) * kMaxRank * kRows;
    job.mean_center = centre;
    job.mean_out = mean.as<__half>() + static_cast<std::size_t>(j) * kDim;
    if (j < kSampled) job.basis_f32_out = basis32.as<float>() + static_cast<std::size_t>(j) * kMaxRank * kDim;
  }
  CompressProblem p;
  p.rows = kRows;
  p.head_dim = kDim;
  p.max_jobs = n;
  p.max_rank = kMaxRank;
  p.algorithm = algorithm;
  p.options = options;
  BatchedCompressor comp(p);
  BatchedCompressor::validate_jobs(p, jobs.data(), n);
  DeviceMemory ws(comp.get_workspace_size());
  DeviceMemory jobs_dev(sizeof(CompressJob) * n);
  check(cudaMemcpy(jobs_dev.ptr, jobs.data(), sizeof(CompressJob) * n, cudaMemcpyHostToDevice), "cudaMemcpy(jobs)");

  cudaStream_t stream;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  cudaEvent_t start, stop;
  check(cudaEventCreate(&start), "cudaEventCreate");
  check(cudaEventCreate(&stop), "cudaEventCreate");
  auto run_once = [&] {
    comp.run(jobs_dev.as<CompressJob>(), n, ws.ptr, comp.get_workspace_size(), stream);
  };
  run_once();  // warm-up (module load, first-touch of the workspace)
  check(cudaStreamSynchronize(stream), "warm-up");

  std::vector<double> ms;
  for (auto _ : state) {
    check(cudaEventRecord(start, stream), "cudaEventRecord");
    run_once();
    check(cudaEventRecord(stop, stream), "cudaEventRecord");
    check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float elapsed = 0.0f;
    check(cudaEventElapsedTime(&elapsed, start, stop), "cudaEventElapsedTime");
    ms.push_back(elapsed);
    state.SetIterationTime(elapsed * 1e-3);
  }
  std::sort(ms.begin(), ms.end());
  const double median = ms.empty() ? 0.0 : ms[ms.size() / 2];

  // Optimality of the sampled jobs (the last timed run wrote their FP32 bases).
  const Inputs& in = inputs();
  std::vector<float> b32(static_cast<std::size_t>(kSampled) * kMaxRank * kDim);
  check(cudaMemcpy(b32.data(), basis32.ptr, b32.size() * sizeof(float), cudaMemcpyDeviceToHost), "cudaMemcpy(basis32)");
  std::vector<Half> mu(static_cast<std::size_t>(kSampled) * kDim);
  if (centre)
    check(cudaMemcpy(mu.data(), mean.ptr, mu.size() * sizeof(Half), cudaMemcpyDeviceToHost), "cudaMemcpy(mean)");
  double worst = 0.0;
  for (int j = 0; j < std::min(n, kSampled); ++j) {
    const int r = rank_of(j);
    Eigen::MatrixXd xm = in.x[j % kDistinct];
    Eigen::MatrixXd b(r, kDim);
    for (int i = 0; i < r; ++i)
      for (int d = 0; d < kDim; ++d) b(i, d) = b32[(static_cast<std::size_t>(j) * kMaxRank + i) * kDim + d];
    Eigen::VectorXd s = in.sigma[j % kDistinct];
    if (centre) {  // the optimum of the block as stored: X minus its FP16 mean
      for (int d = 0; d < kDim; ++d) xm.col(d).array() -= static_cast<double>(spectralkv::to_float(mu[static_cast<std::size_t>(j) * kDim + d]));
      s = Eigen::JacobiSVD<Eigen::MatrixXd>(xm).singularValues();
    }
    const double err = (xm - xm * b.transpose() * b).norm();
    const double opt = std::sqrt(s.tail(kDim - r).squaredNorm());
    worst = std::max(worst, err / opt);
  }

  state.counters["median_ms"] = median;
  state.counters["us_per_matrix"] = median * 1e3 / n;
  state.counters["input_GBps"] = median > 0 ? static_cast<double>(n) * kRows * kDim * 2 / (median * 1e-3) / 1e9 : 0.0;
  state.counters["ratio_max"] = worst;
  state.SetLabel(std::string(algorithm == CompressAlgorithm::kCusolver      ? "cusolver"
                             : algorithm == CompressAlgorithm::kTridiagonal ? "tridiagonal"
                                                                            : "subspace") +
                 " rank " +
                 (rank_mode == 0  ? std::string("16/32")
                  : rank_mode < 0 ? "32/" + std::to_string(-rank_mode)
                                  : std::to_string(rank_mode)) +
                 (centre ? " centred" : "") +
                 " it " + std::to_string(options.iterations) + " sweeps " + std::to_string(options.jacobi_sweeps) +
                 " p " + std::to_string(options.oversample));

  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  cudaStreamDestroy(stream);
}

void BM_Compress(benchmark::State& state) {
  run_compress(state, static_cast<int>(state.range(0)), static_cast<int>(state.range(1)),
               static_cast<CompressAlgorithm>(state.range(2)), state.range(3) != 0, {});
}

/// N = 512 mixed with the subspace-iteration knobs swept: what each iteration, sweep and oversampling
/// column costs and buys (time against the ratio counter).
void BM_CompressOptions(benchmark::State& state) {
  spectralkv::cuda::CompressOptions o;
  o.iterations = static_cast<int>(state.range(0));
  o.jacobi_sweeps = static_cast<int>(state.range(1));
  o.oversample = static_cast<int>(state.range(2));
  run_compress(state, 512, 0, CompressAlgorithm::kSubspaceIteration, false, o);
}

void Args(benchmark::internal::Benchmark* b) {
  for (int algo : {0, 1, 2}) {
    for (int n : {16, 512, 4096})
      for (int rank : {16, 32, 0}) b->Args({n, rank, algo, 0});
    b->Args({512, 0, algo, 1});
    // Beyond the resident projection: four kernels.
    for (int rank : {36, 40, 64, 120, -64}) b->Args({512, rank, algo, 0});
  }
  b->ArgNames({"N", "rank", "algorithm", "centre"});
  b->UseManualTime();
  b->Unit(benchmark::kMillisecond);
  b->Iterations(30);
}

BENCHMARK(BM_Compress)->Apply(Args);
BENCHMARK(BM_CompressOptions)
    ->ArgsProduct({{1, 2, 3, 4}, {1, 2}, {0, 8}})
    ->Args({2, 2, 16})
    ->ArgNames({"iterations", "sweeps", "oversample"})
    ->UseManualTime()
    ->Unit(benchmark::kMillisecond)
    ->Iterations(30);

}  // namespace

BENCHMARK_MAIN();
