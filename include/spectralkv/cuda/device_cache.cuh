#pragma once
// DeviceSpectralCache<T>: the SpectralCache of the CUDA backend. Same tiers, policy and positions as
// the CPU SpectralCache<T> (cache.hpp); K, V, Q and outputs live on the device, and so does all state.
//
// Device state, all allocated up front through the Allocator hook (capacity given in the options):
//  - per layer, a pool of `max_blocks_per_layer` cold blocks in the ColdBlockLayout; sequences hold
//    block tables (as in paged attention), so sequences join and leave without copying;
//  - per layer and sequence slot, a dense sink buffer and a dense staging buffer of
//    hot_tokens + block_size + max_append_tokens rows that holds the tail and the blocks waiting for
//    compression.
//
// Compression runs on the cache's own stream. When a block fills, its rows stay in the staging buffer
// and are attended densely ("pending") until the batched compression kernel has written its cold form;
// then the block is "retired": the caller's stream waits on the compression's event (on the device, the
// host never blocks) and attention reads the cold block from then on. So attention is always correct,
// and a decode step never waits for an SVD it does not need. In CompressionMode::kAsync the blocks
// that fill during one step are compressed in one launch after the append of the last layer (batched
// across layers, heads and sequences), and retired once finished; in kSynchronous every append
// compresses and retires at once, which makes every output equal to the CPU reference's.
//
// Calls take a stream; the calls of one cache must be ordered (one stream, or the caller's events).
// K and V are not checked for NaN/Inf on the device (that would cost a host synchronisation per
// step); everything the host can check is checked before anything changes, as on the CPU.

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <tuple>
#include <type_traits>
#include <vector>

#include "spectralkv/config.hpp"
#include "spectralkv/cuda/allocator.cuh"
#include "spectralkv/cuda/compress.cuh"
#include "spectralkv/cuda/decode_attention.cuh"
#include "spectralkv/cuda/error.cuh"
#include "spectralkv/cuda/multi_query_attention.cuh"
#include "spectralkv/error.hpp"
#include "spectralkv/layout.cuh"
#include "spectralkv/memory_stats.hpp"
#include "spectralkv/numeric.hpp"
#include "spectralkv/tensor.hpp"

namespace spectralkv::cuda {

enum class CompressionMode {
  kAsync,        ///< compress on the cache's stream, batched per step; attend densely until done
  kSynchronous,  ///< compress and retire inside every append (outputs equal the CPU reference)
};

struct DeviceCacheOptions {
  int max_sequences = 8;                  ///< sequences held at once
  std::int64_t max_blocks_per_layer = 0;  ///< pool capacity per layer (> 0)
  std::int64_t max_append_tokens = 4096;  ///< most tokens one append gives, or one attend asks of, a sequence
  int max_compress_jobs = 1024;           ///< matrices per compression launch (sizes its workspace)
  CompressionMode compression = CompressionMode::kAsync;
  CompressAlgorithm algorithm = CompressAlgorithm::kSubspaceIteration;
  Allocator allocator = Allocator::stream_ordered();
  cudaStream_t stream = nullptr;  ///< stream of the allocations in the constructor and destructor
};

namespace detail {
/// Copies row i of src_k / src_v (row_bytes each) to dst_k[i] / dst_v[i], for rows rows. Device arrays.
void scatter_rows(const void* src_k, const void* src_v, void* const* dst_k, void* const* dst_v, int rows,
                  int row_bytes, cudaStream_t stream);
/// Copies `bytes` (rounded up to 16; both buffers 16-byte aligned and that long) from `src` (device or
/// mapped host memory) to `dst` (device memory).
void copy_metadata(void* dst, const void* src, std::size_t bytes, cudaStream_t stream);
}  // namespace detail

template <class T>
class DeviceSpectralCache {
  static_assert(std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>,
                "DeviceSpectralCache<T>: T must be Half or BFloat16");
  static constexpr DataType kType = std::is_same_v<T, Half> ? DataType::kHalf : DataType::kBFloat16;

 public:
  /// \throws InvalidArgument naming the bad field of `config` or `options` (the kernels need head_dim
  /// 64 or 128 and ranks 8, 16, 32 or 64); CudaError if an allocation fails.
  DeviceSpectralCache(CacheConfig config, DeviceCacheOptions options)
      : config_(std::move(config)), options_(std::move(options)) {
    constexpr const char* kWhat = "DeviceSpectralCache";
    config_.validate();
    ::spectralkv::detail::require(config_.head_dim == 64 || config_.head_dim == 128, kWhat, "config.head_dim",
                                  config_.head_dim, "the CUDA kernels support 64 and 128");
    ::spectralkv::detail::require(options_.max_sequences > 0 && options_.max_sequences <= 1024, kWhat,
                                  "options.max_sequences", options_.max_sequences, "must be in [1, 1024]");
    ::spectralkv::detail::require(options_.max_blocks_per_layer > 0 && options_.max_blocks_per_layer < (1LL << 31),
                                  kWhat, "options.max_blocks_per_layer", options_.max_blocks_per_layer,
                                  "must be in [1, 2^31)");
    // The rows of one call (at most max_sequences · max_append_tokens) are counted in 32 bits on the device.
    constexpr std::int64_t kIntMax = std::numeric_limits<int>::max();
    ::spectralkv::detail::require(
        options_.max_append_tokens > 0 && options_.max_append_tokens <= kIntMax / options_.max_sequences, kWhat,
        "options.max_append_tokens", options_.max_append_tokens,
        ::spectralkv::detail::concat("must be in [1, ", kIntMax / options_.max_sequences,
                                     "]: max_sequences · max_append_tokens rows must fit 32 bits"));
    ::spectralkv::detail::require(options_.max_compress_jobs > 0, kWhat, "options.max_compress_jobs",
                                  options_.max_compress_jobs, "must be positive");
    ::spectralkv::detail::require(static_cast<bool>(options_.allocator.allocate) &&
                                      static_cast<bool>(options_.allocator.deallocate),
                                  kWhat, "options.allocator", "(empty)", "both functions are required");
    int max_rank = 0;
    for (int l = 0; l < config_.num_layers; ++l) {
      const LayerRanks r = config_.ranks(l);
      auto rank_ok = [](int x) { return x == 8 || x == 16 || x == 32 || x == 64; };
      const std::string where = ::spectralkv::detail::concat("config.ranks(", l, ")");
      ::spectralkv::detail::require(rank_ok(r.key), kWhat, (where + ".key").c_str(), r.key, "must be 8, 16, 32 or 64");
      ::spectralkv::detail::require(rank_ok(r.value), kWhat, (where + ".value").c_str(), r.value,
                                    "must be 8, 16, 32 or 64");
      max_rank = std::max({max_rank, r.key, r.value});
      layouts_.push_back(ColdBlockLayout::make(config_.block_size, config_.head_dim, config_.num_kv_heads, r.key,
                                               r.value, config_.mean_center));
    }
    capacity_rows_ = config_.hot_tokens + config_.block_size + options_.max_append_tokens;
    row_elems_ = static_cast<std::int64_t>(config_.num_kv_heads) * config_.head_dim;
    {
      // Sizes of the dense buffers (max_sequences rows of each kind), checked before they are computed in 64 bits.
      const std::int64_t max_rows = (std::int64_t{1} << 62) / (row_elems_ * static_cast<std::int64_t>(sizeof(T))) /
                                    options_.max_sequences;
      ::spectralkv::detail::require(capacity_rows_ <= max_rows, kWhat, "options.max_append_tokens",
                                    options_.max_append_tokens,
                                    "the staging rows of max_sequences sequences exceed 2^62 bytes");
      ::spectralkv::detail::require(config_.sink_tokens <= max_rows, kWhat, "config.sink_tokens", config_.sink_tokens,
                                    "the sink rows of max_sequences sequences exceed 2^62 bytes");
    }

    CompressProblem problem;
    problem.element = std::is_same_v<T, Half> ? ElementType::kHalf : ElementType::kBFloat16;
    problem.rows = config_.block_size;
    problem.head_dim = config_.head_dim;
    problem.max_jobs = options_.max_compress_jobs;
    problem.max_rank = max_rank;
    problem.algorithm = options_.algorithm;
    BatchedCompressor::can_implement(problem);

    try {
      check(cudaStreamCreateWithFlags(&compress_stream_, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
      compressor_ = std::make_unique<BatchedCompressor>(problem);
      allocate_all();
    } catch (...) {
      release_all();
      throw;
    }
    for (int s = options_.max_sequences - 1; s >= 0; --s) free_slots_.push_back(s);
    slots_.resize(static_cast<std::size_t>(options_.max_sequences));
    for (auto& slot : slots_) slot.layers.resize(static_cast<std::size_t>(config_.num_layers));
    free_blocks_.resize(static_cast<std::size_t>(config_.num_layers));
    for (auto& f : free_blocks_)
      for (std::int64_t b = options_.max_blocks_per_layer - 1; b >= 0; --b) f.push_back(static_cast<std::int32_t>(b));
  }

  ~DeviceSpectralCache() { release_all(); }
  DeviceSpectralCache(const DeviceSpectralCache&) = delete;
  DeviceSpectralCache& operator=(const DeviceSpectralCache&) = delete;

  const CacheConfig& config() const { return config_; }
  const ColdBlockLayout& layout(int layer) const {
    check_layer("DeviceSpectralCache::layout", layer);
    return layouts_[static_cast<std::size_t>(layer)];
  }

  // --- sequences --------------------------------------------------------------------------------------

  /// \throws SequenceError if present, CapacityError if all max_sequences slots are taken.
  void add_sequence(SequenceId id) {
    ::spectralkv::detail::require<SequenceError>(!contains(id), "DeviceSpectralCache::add_sequence", "id", id,
                                                 "sequence already present");
    if (free_slots_.empty()) {
      throw CapacityError(::spectralkv::detail::concat("DeviceSpectralCache::add_sequence: argument id = ", id,
                                                       " (all max_sequences = ", options_.max_sequences,
                                                       " slots are taken)"));
    }
    const int slot = free_slots_.back();
    free_slots_.pop_back();
    for (auto& l : slots_[static_cast<std::size_t>(slot)].layers) l = SlotLayer{};
    slot_of_.emplace(id, slot);
  }

  /// Removes the sequence; its cold blocks (and those still being compressed) return to the pools at
  /// once. The slot's buffers are reused only after the compression stream has finished reading them.
  void remove_sequence(SequenceId id) {
    const int slot = slot_of("DeviceSpectralCache::remove_sequence", id);
    Slot& s = slots_[static_cast<std::size_t>(slot)];
    for (std::size_t l = 0; l < s.layers.size(); ++l) {
      SlotLayer& sl = s.layers[l];
      for (std::int32_t b : sl.blocks) free_blocks_[l].push_back(b);
      for (const Pending& p : sl.pending) {
        free_blocks_[l].push_back(p.block);
        if (p.batch >= 0) {  // its reference keeps the event from being re-recorded until the slot waits on it
          s.reuse_after.push_back(batches_[static_cast<std::size_t>(p.batch)].done);
          s.held_batches.push_back(p.batch);
        }
      }
      sl = SlotLayer{};
    }
    // Staged (not yet launched) jobs of this slot are dropped: nobody will read those blocks.
    staged_.erase(std::remove_if(staged_.begin(), staged_.end(), [slot](const Staged& j) { return j.slot == slot; }),
                  staged_.end());
    slot_of_.erase(id);
    free_slots_.push_back(slot);
  }

  bool contains(SequenceId id) const { return slot_of_.count(id) != 0; }
  std::vector<SequenceId> sequences() const {
    std::vector<SequenceId> ids;
    for (const auto& kv : slot_of_) ids.push_back(kv.first);
    return ids;
  }
  std::int64_t length(SequenceId id, int layer) const {
    check_layer("DeviceSpectralCache::length", layer);
    return tokens_held(at(id, layer));
  }
  /// Tokens that can be appended to (id, layer) before one forms a block (the append that reaches the
  /// threshold compresses it): the same policy and value as SpectralCache::tokens_until_compression. A
  /// block whose compression is still in flight already counts as cold.
  std::int64_t tokens_until_compression(SequenceId id, int layer) const {
    check_layer("DeviceSpectralCache::tokens_until_compression", layer);
    const SlotLayer& sl = at(id, layer);
    return (config_.sink_tokens - sl.sink_len) + (config_.compress_threshold() - 1 - tail_len(sl));
  }
  /// Blocks of `layer` taken from the pool (compressed or being compressed).
  std::int64_t blocks_in_use(int layer) const {
    check_layer("DeviceSpectralCache::blocks_in_use", layer);
    return options_.max_blocks_per_layer - static_cast<std::int64_t>(free_blocks_[static_cast<std::size_t>(layer)].size());
  }
  /// Blocks of `layer` that are full but still attended densely (compression not retired yet).
  std::int64_t pending_blocks(int layer) const {
    check_layer("DeviceSpectralCache::pending_blocks", layer);
    std::int64_t n = 0;
    for (const auto& kv : slot_of_) n += static_cast<std::int64_t>(slots_[static_cast<std::size_t>(kv.second)].layers[static_cast<std::size_t>(layer)].pending.size());
    return n;
  }

  // --- append -----------------------------------------------------------------------------------------

  /// Appends tokens of several sequences to one layer (device tensors, [sum(counts)][kv_heads][head_dim],
  /// packed in the order of ids), and schedules the compression of every block they complete.
  /// \throws InvalidArgument, ShapeError, SequenceError, CapacityError before anything changes.
  void append(int layer, const std::vector<SequenceId>& ids, const std::vector<std::int64_t>& counts,
              TensorView<const T> k, TensorView<const T> v, cudaStream_t stream) {
    constexpr const char* kWhat = "DeviceSpectralCache::append";
    check_layer(kWhat, layer);
    const std::vector<int> slots = check_ids(kWhat, ids);
    if (counts.size() != ids.size())
      ::spectralkv::detail::fail(kWhat, "counts.size()", counts.size(),
                                 ::spectralkv::detail::concat("must equal ids.size() = ", ids.size()));
    std::int64_t total = 0, new_blocks = 0;
    const auto lu = static_cast<std::size_t>(layer);
    for (std::size_t i = 0; i < ids.size(); ++i) {
      if (counts[i] < 0 || counts[i] > options_.max_append_tokens) {
        ::spectralkv::detail::fail(kWhat, ::spectralkv::detail::concat("counts[", i, "]").c_str(), counts[i],
                                   ::spectralkv::detail::concat("must be in [0, max_append_tokens = ",
                                                                options_.max_append_tokens, "]"));
      }
      total += counts[i];
      const SlotLayer& sl = slots_[static_cast<std::size_t>(slots[i])].layers[lu];
      const std::int64_t to_sink = std::min<std::int64_t>(counts[i], config_.sink_tokens - sl.sink_len);
      const std::int64_t tail = tail_len(sl) + counts[i] - to_sink;
      if (tail >= config_.compress_threshold()) new_blocks += (tail - config_.hot_tokens) / config_.block_size;
    }
    ::spectralkv::detail::require_shape(kWhat, "k", k, total, config_.num_kv_heads, config_.head_dim);
    ::spectralkv::detail::require_shape(kWhat, "v", v, total, config_.num_kv_heads, config_.head_dim);
    // The rows are copied in 16-byte pieces (a row is head_dim 64 or 128 elements: whole pieces).
    ::spectralkv::detail::require(total == 0 || reinterpret_cast<std::uintptr_t>(k.data) % 16 == 0, kWhat, "k",
                                  static_cast<const void*>(k.data), "device data must be 16-byte aligned");
    ::spectralkv::detail::require(total == 0 || reinterpret_cast<std::uintptr_t>(v.data) % 16 == 0, kWhat, "v",
                                  static_cast<const void*>(v.data), "device data must be 16-byte aligned");
    if (new_blocks > static_cast<std::int64_t>(free_blocks_[lu].size())) {
      throw CapacityError(::spectralkv::detail::concat(kWhat, ": layer ", layer, " needs ", new_blocks,
                                                       " new cold blocks but only ", free_blocks_[lu].size(),
                                                       " of max_blocks_per_layer = ", options_.max_blocks_per_layer,
                                                       " are free"));
    }
    if (total == 0) return;

    for (int slot : slots) wait_for_reuse(slot, stream);
    retire_finished(slots, layer, stream);
    // Make room in staging buffers that would overflow: retire their pending blocks (a device-side
    // wait) and move the live rows to the front.
    for (std::size_t i = 0; i < ids.size(); ++i) {
      SlotLayer& sl = slots_[static_cast<std::size_t>(slots[i])].layers[lu];
      if (sl.dense_off + sl.dense_len + counts[i] > capacity_rows_) {
        launch_staged(stream);
        retire_all(slots[i], layer, stream);
        compact(slots[i], layer, stream);
      }
    }
    // Destination of every row, then one scatter launch.
    std::vector<void*> dst(2 * static_cast<std::size_t>(total));
    std::int64_t row = 0;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      SlotLayer& sl = slots_[static_cast<std::size_t>(slots[i])].layers[lu];
      for (std::int64_t t = 0; t < counts[i]; ++t, ++row) {
        T* kd;
        T* vd;
        if (sl.sink_len < config_.sink_tokens) {
          kd = sink_row(sink_k_, slots[i], layer, sl.sink_len);
          vd = sink_row(sink_v_, slots[i], layer, sl.sink_len);
          ++sl.sink_len;
        } else {
          kd = stage_row(stage_k_, slots[i], layer, sl.dense_off + sl.dense_len);
          vd = stage_row(stage_v_, slots[i], layer, sl.dense_off + sl.dense_len);
          ++sl.dense_len;
        }
        dst[static_cast<std::size_t>(row)] = kd;
        dst[static_cast<std::size_t>(total + row)] = vd;
      }
    }
    // Each CTA of the scatter reads its row's two destinations once: for a decode step's few rows straight
    // from the mapped ring (one small read across the bus per row), for a prefill's many from a bulk copy.
    void** const dev_dst =
        std::get<0>(total <= kMappedAppendRows ? stage_metadata(dst) : upload_metadata(stream, dst));
    MetadataRelease release(*this, stream);
    detail::scatter_rows(k.data, v.data, dev_dst, dev_dst + total, static_cast<int>(total),
                         static_cast<int>(row_elems_ * static_cast<std::int64_t>(sizeof(T))), stream);
    release.now();
    // Schedule the blocks that filled.
    for (std::size_t i = 0; i < ids.size(); ++i) {
      SlotLayer& sl = slots_[static_cast<std::size_t>(slots[i])].layers[lu];
      while (tail_len(sl) >= config_.compress_threshold()) {
        const std::int32_t block = free_blocks_[lu].back();
        free_blocks_[lu].pop_back();
        const std::int64_t first_row = sl.dense_off + static_cast<std::int64_t>(sl.pending.size()) * config_.block_size;
        sl.pending.push_back({block, -1});
        staged_.push_back({slots[i], layer, block, first_row});
      }
    }
    if (options_.compression == CompressionMode::kSynchronous) {
      launch_staged(stream);
      for (int slot : slots) retire_all(slot, layer, stream);
    } else if (layer == config_.num_layers - 1) {
      launch_staged(stream);
    }
  }

  void append(int layer, SequenceId id, TensorView<const T> k, TensorView<const T> v, cudaStream_t stream) {
    append(layer, std::vector<SequenceId>{id}, std::vector<std::int64_t>{k.tokens}, k, v, stream);
  }

  /// Launches every staged compression, makes `stream` wait for all compressions and retires them.
  void flush(cudaStream_t stream) {
    launch_staged(stream);
    for (const auto& kv : slot_of_)
      for (int l = 0; l < config_.num_layers; ++l) retire_all(kv.second, l, stream);
  }

  // --- attention --------------------------------------------------------------------------------------

  /// Attention of the newest q_lens[i] tokens of each sequence (append them first), causal by absolute
  /// position, one softmax over sinks, cold blocks and the dense rows (tail and pending blocks).
  /// q, out: device tensors [sum(q_lens)][num_q_heads][head_dim] of T. All q_lens == 1 runs the fused
  /// split-KV decode kernel; otherwise the unfused MultiQueryAttention kernel. Each q_lens[i] is at most
  /// options.max_append_tokens (a longer prefill is attended in chunks, as it is appended).
  /// \throws InvalidArgument, ShapeError, SequenceError before anything is enqueued.
  void attend(int layer, const std::vector<SequenceId>& ids, const std::vector<std::int64_t>& q_lens,
              TensorView<const T> q, TensorView<T> out, float scale, cudaStream_t stream) {
    constexpr const char* kWhat = "DeviceSpectralCache::attend";
    check_layer(kWhat, layer);
    const std::vector<int> slots = check_ids(kWhat, ids);
    if (q_lens.size() != ids.size())
      ::spectralkv::detail::fail(kWhat, "q_lens.size()", q_lens.size(),
                                 ::spectralkv::detail::concat("must equal ids.size() = ", ids.size()));
    std::int64_t total = 0;
    bool decode = true;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const std::int64_t len =
          tokens_held(slots_[static_cast<std::size_t>(slots[i])].layers[static_cast<std::size_t>(layer)]);
      if (len == 0) {
        ::spectralkv::detail::fail(kWhat, ::spectralkv::detail::concat("ids[", i, "]").c_str(), ids[i],
                                   ::spectralkv::detail::concat("attention on an empty sequence (no tokens in layer ",
                                                                layer, ")"));
      }
      // At most max_append_tokens: what the per-call metadata and the 32-bit row counts are sized for.
      const std::int64_t most = std::min(len, options_.max_append_tokens);
      if (q_lens[i] < 1 || q_lens[i] > most) {
        ::spectralkv::detail::fail(kWhat, ::spectralkv::detail::concat("q_lens[", i, "]").c_str(), q_lens[i],
                                   ::spectralkv::detail::concat("must be in [1, min(length = ", len, ", max_append_tokens = ",
                                                                options_.max_append_tokens, ")]"));
      }
      total += q_lens[i];
      decode = decode && q_lens[i] == 1;
    }
    ::spectralkv::detail::require_shape(kWhat, "q", q, total, config_.num_q_heads, config_.head_dim);
    ::spectralkv::detail::require_shape(kWhat, "out", out, total, config_.num_q_heads, config_.head_dim);
    ::spectralkv::detail::require(std::isfinite(scale), kWhat, "scale", scale, "must be finite");
    // The decode kernel reads q and writes out in pairs of elements.
    ::spectralkv::detail::require(total == 0 || reinterpret_cast<std::uintptr_t>(q.data) % 4 == 0, kWhat, "q",
                                  static_cast<const void*>(q.data), "device data must be 4-byte aligned");
    ::spectralkv::detail::require(total == 0 || reinterpret_cast<std::uintptr_t>(out.data) % 4 == 0, kWhat, "out",
                                  static_cast<const void*>(out.data), "device data must be 4-byte aligned");
    if (ids.empty()) return;

    retire_finished(slots, layer, stream);
    const auto lu = static_cast<std::size_t>(layer);
    const auto batch = static_cast<std::int64_t>(ids.size());
    // One upload: [sink k ptrs, sink v ptrs, tail k ptrs, tail v ptrs] then int32
    // [sink lens, tail lens, block offsets (batch+1), q offsets (batch+1), row→sequence, block table].
    std::vector<const void*> ptrs(4 * static_cast<std::size_t>(batch));
    std::vector<std::int32_t> ints;
    ints.reserve(static_cast<std::size_t>(4 * batch + 2 + total) + 64);
    std::vector<std::int32_t> table;
    std::vector<std::int32_t> block_offsets{0}, q_offsets{0}, row_seq;
    for (std::int64_t b = 0; b < batch; ++b) {
      const SlotLayer& sl = slots_[static_cast<std::size_t>(slots[static_cast<std::size_t>(b)])].layers[lu];
      const int slot = slots[static_cast<std::size_t>(b)];
      ptrs[static_cast<std::size_t>(b)] = sink_row(sink_k_, slot, layer, 0);
      ptrs[static_cast<std::size_t>(batch + b)] = sink_row(sink_v_, slot, layer, 0);
      ptrs[static_cast<std::size_t>(2 * batch + b)] = stage_row(stage_k_, slot, layer, sl.dense_off);
      ptrs[static_cast<std::size_t>(3 * batch + b)] = stage_row(stage_v_, slot, layer, sl.dense_off);
      table.insert(table.end(), sl.blocks.begin(), sl.blocks.end());
      block_offsets.push_back(static_cast<std::int32_t>(table.size()));
      q_offsets.push_back(static_cast<std::int32_t>(q_offsets.back() + q_lens[static_cast<std::size_t>(b)]));
      for (std::int64_t j = 0; j < q_lens[static_cast<std::size_t>(b)]; ++j) row_seq.push_back(static_cast<std::int32_t>(b));
    }
    for (std::int64_t b = 0; b < batch; ++b)
      ints.push_back(static_cast<std::int32_t>(slots_[static_cast<std::size_t>(slots[static_cast<std::size_t>(b)])].layers[lu].sink_len));
    for (std::int64_t b = 0; b < batch; ++b)
      ints.push_back(static_cast<std::int32_t>(slots_[static_cast<std::size_t>(slots[static_cast<std::size_t>(b)])].layers[lu].dense_len));
    const std::size_t at_blocks = ints.size();
    ints.insert(ints.end(), block_offsets.begin(), block_offsets.end());
    const std::size_t at_q = ints.size();
    ints.insert(ints.end(), q_offsets.begin(), q_offsets.end());
    const std::size_t at_rows = ints.size();
    ints.insert(ints.end(), row_seq.begin(), row_seq.end());
    const std::size_t at_table = ints.size();
    ints.insert(ints.end(), table.begin(), table.end());
    const auto [dev_ptrs, dev_ints] = upload_metadata(stream, ptrs, ints);
    MetadataRelease release(*this, stream);

    DenseTier sink{dev_ptrs, dev_ptrs + batch, dev_ints};
    DenseTier tail{dev_ptrs + 2 * batch, dev_ptrs + 3 * batch, dev_ints + batch};
    if (decode) {
      DecodeAttentionParams p;
      p.dtype = kType;
      p.batch = static_cast<int>(batch);
      p.num_q_heads = config_.num_q_heads;
      p.layout = layouts_[lu];
      p.scale = scale;
      p.q = q.data;
      p.out = out.data;
      p.pool = pools_[lu];
      p.block_table = dev_ints + at_table;
      p.block_table_offsets = dev_ints + at_blocks;
      p.sink = sink;
      p.tail = tail;
      const std::size_t need = DecodeAttention::get_workspace_size(p);
      if (need > decode_workspace_bytes_) {
        throw CudaError(::spectralkv::detail::concat(kWhat, ": decode workspace of ", decode_workspace_bytes_,
                                                     " bytes is smaller than the ", need, " required"));
      }
      // The kernel leaves its merge counters zero for the next call of the same shape, but another shape
      // (batch, ranks) lays the workspace out differently, so a change of shape re-zeroes it.
      const std::int64_t key = (static_cast<std::int64_t>(batch) << 32) | (layouts_[lu].rank_k << 16) | (layouts_[lu].rank_v << 1) |
                               (layouts_[lu].has_mean ? 1 : 0);
      if (key != decode_workspace_key_) {
        DecodeAttention::initialize_workspace(p, decode_workspace_, stream);
        decode_workspace_key_ = key;
      }
      DecodeAttention::run(p, decode_workspace_, decode_workspace_bytes_, stream);
    } else {
      MultiQueryParams p;
      p.dtype = kType;
      p.batch = static_cast<int>(batch);
      p.num_q_heads = config_.num_q_heads;
      p.total_rows = static_cast<int>(total);
      p.layout = layouts_[lu];
      p.scale = scale;
      p.q = q.data;
      p.out = out.data;
      p.q_offsets = dev_ints + at_q;
      p.row_sequence = dev_ints + at_rows;
      p.pool = pools_[lu];
      p.block_table = dev_ints + at_table;
      p.block_table_offsets = dev_ints + at_blocks;
      p.sink = sink;
      p.tail = tail;
      MultiQueryAttention::run(p, stream);
    }
    release.now();
  }

  void attend(int layer, SequenceId id, TensorView<const T> q, TensorView<T> out, float scale, cudaStream_t stream) {
    attend(layer, std::vector<SequenceId>{id}, std::vector<std::int64_t>{q.tokens}, q, out, scale, stream);
  }

  // --- state --------------------------------------------------------------------------------------------

  /// Memory held, from the device layout. Pending blocks count twice (their pool block and their dense
  /// rows) until retired: that is what the device holds.
  MemoryStats memory_stats() const {
    MemoryStats m;
    const std::int64_t tok_bytes = 2 * row_elems_ * static_cast<std::int64_t>(sizeof(T));
    for (const auto& kv : slot_of_) {
      const Slot& s = slots_[static_cast<std::size_t>(kv.second)];
      for (std::size_t l = 0; l < s.layers.size(); ++l) {
        const SlotLayer& sl = s.layers[l];
        const auto cold = static_cast<std::int64_t>(sl.blocks.size());
        const auto pend = static_cast<std::int64_t>(sl.pending.size());
        m.sink_tokens += sl.sink_len;
        m.cold_tokens += cold * config_.block_size;
        m.tail_tokens += sl.dense_len;
        m.cold_blocks += cold + pend;
        m.cold_bytes += (cold + pend) * layouts_[l].block_bytes;
      }
    }
    m.sink_bytes = m.sink_tokens * tok_bytes;
    m.tail_bytes = m.tail_tokens * tok_bytes;
    m.dense_equivalent_bytes = (m.sink_tokens + m.cold_tokens + m.tail_tokens) * tok_bytes;
    for (const ColdBlockLayout& lay : layouts_) m.pool_bytes += options_.max_blocks_per_layer * lay.block_bytes;
    return m;
  }

  /// Host copy of one sequence's state in one layer, for tests and debugging: sink rows, the dense rows
  /// (pending blocks and tail, oldest first), the retired block ids and their bytes in the cold layout.
  /// Synchronises `stream`.
  struct HostLayerState {
    std::vector<T> sink_k, sink_v, dense_k, dense_v;  // [rows][num_kv_heads][head_dim]
    std::vector<std::int32_t> blocks;
    std::vector<std::uint8_t> block_bytes;  // blocks.size() slabs of layout(layer).block_bytes
  };
  HostLayerState download(SequenceId id, int layer, cudaStream_t stream) const {
    check_layer("DeviceSpectralCache::download", layer);
    const int slot = slot_of("DeviceSpectralCache::download", id);
    const SlotLayer& sl = slots_[static_cast<std::size_t>(slot)].layers[static_cast<std::size_t>(layer)];
    HostLayerState h;
    const auto rows = [&](std::vector<T>& dst, const T* src, std::int64_t n) {
      dst.resize(static_cast<std::size_t>(n * row_elems_));
      if (n > 0)
        check(cudaMemcpyAsync(dst.data(), src, dst.size() * sizeof(T), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
    };
    rows(h.sink_k, sink_row(sink_k_, slot, layer, 0), sl.sink_len);
    rows(h.sink_v, sink_row(sink_v_, slot, layer, 0), sl.sink_len);
    rows(h.dense_k, stage_row(stage_k_, slot, layer, sl.dense_off), sl.dense_len);
    rows(h.dense_v, stage_row(stage_v_, slot, layer, sl.dense_off), sl.dense_len);
    h.blocks = sl.blocks;
    const ColdBlockLayout& lay = layouts_[static_cast<std::size_t>(layer)];
    h.block_bytes.resize(h.blocks.size() * static_cast<std::size_t>(lay.block_bytes));
    for (std::size_t b = 0; b < h.blocks.size(); ++b) {
      check(cudaMemcpyAsync(h.block_bytes.data() + b * static_cast<std::size_t>(lay.block_bytes),
                            pools_[static_cast<std::size_t>(layer)] + static_cast<std::int64_t>(h.blocks[b]) * lay.block_bytes,
                            static_cast<std::size_t>(lay.block_bytes), cudaMemcpyDeviceToHost, stream), "cudaMemcpyAsync");
    }
    check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
    return h;
  }

  /// Device bytes the cache allocated (pools, dense buffers, workspaces, metadata).
  std::int64_t device_bytes() const { return static_cast<std::int64_t>(allocated_bytes_); }

 private:
  struct Pending {
    std::int32_t block;
    int batch;  // index into batches_, or -1 while staged (not launched)
  };
  struct SlotLayer {
    std::int64_t sink_len = 0;
    std::vector<std::int32_t> blocks;  // retired cold blocks, oldest first
    std::deque<Pending> pending;       // full blocks still attended densely, oldest first
    std::int64_t dense_off = 0;        // staging row of the oldest live dense token
    std::int64_t dense_len = 0;        // live dense rows: pending·block_size + tail
  };
  struct Slot {
    std::vector<SlotLayer> layers;
    std::vector<cudaEvent_t> reuse_after;  // compressions still reading this slot's rows
    std::vector<int> held_batches;
  };
  struct Staged {
    int slot;
    int layer;
    std::int32_t block;
    std::int64_t first_row;
  };
  struct Batch {
    cudaEvent_t done = nullptr;
    int refs = 0;
  };

  std::int64_t tail_len(const SlotLayer& sl) const {
    return sl.dense_len - static_cast<std::int64_t>(sl.pending.size()) * config_.block_size;
  }
  T* sink_row(const std::vector<T*>& base, int slot, int layer, std::int64_t row) const {
    return base[layer] + (static_cast<std::int64_t>(slot) * config_.sink_tokens + row) * row_elems_;
  }
  T* stage_row(const std::vector<T*>& base, int slot, int layer, std::int64_t row) const {
    return base[layer] + (static_cast<std::int64_t>(slot) * capacity_rows_ + row) * row_elems_;
  }

  void check_layer(const char* what, int layer) const {
    if (layer < 0 || layer >= config_.num_layers)
      ::spectralkv::detail::fail(what, "layer", layer,
                                 ::spectralkv::detail::concat("must be in [0, num_layers = ", config_.num_layers, ")"));
  }
  std::int64_t tokens_held(const SlotLayer& sl) const {
    return sl.sink_len + static_cast<std::int64_t>(sl.blocks.size()) * config_.block_size + sl.dense_len;
  }
  int slot_of(const char* what, SequenceId id) const {
    auto it = slot_of_.find(id);
    if (it == slot_of_.end()) ::spectralkv::detail::fail<SequenceError>(what, "id", id, "unknown sequence");
    return it->second;
  }
  const SlotLayer& at(SequenceId id, int layer) const {
    return slots_[static_cast<std::size_t>(slot_of("DeviceSpectralCache", id))].layers[static_cast<std::size_t>(layer)];
  }
  /// The slots of `ids`: each known, none listed twice. Called per step, so it builds no message unless a
  /// check fails.
  std::vector<int> check_ids(const char* what, const std::vector<SequenceId>& ids) const {
    std::vector<int> slots(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const auto it = slot_of_.find(ids[i]);
      if (it == slot_of_.end())
        ::spectralkv::detail::fail<SequenceError>(what, ::spectralkv::detail::concat("ids[", i, "]").c_str(), ids[i],
                                                  "unknown sequence");
      slots[i] = it->second;
    }
    // Distinct ids have distinct slots.
    std::vector<int> sorted = slots;
    std::sort(sorted.begin(), sorted.end());
    if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
      std::set<SequenceId> seen;
      for (std::size_t i = 0; i < ids.size(); ++i) {
        if (!seen.insert(ids[i]).second)
          ::spectralkv::detail::fail<SequenceError>(what, ::spectralkv::detail::concat("ids[", i, "]").c_str(), ids[i],
                                                    "sequence listed twice");
      }
    }
    return slots;
  }

  // --- compression batches ----------------------------------------------------------------------------

  int new_batch() {
    for (std::size_t i = 0; i < batches_.size(); ++i)
      if (batches_[i].refs == 0) return static_cast<int>(i);
    Batch b;
    check(cudaEventCreateWithFlags(&b.done, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    batches_.push_back(b);
    return static_cast<int>(batches_.size() - 1);
  }
  void retain(int batch) { ++batches_[static_cast<std::size_t>(batch)].refs; }
  void release(int batch) { --batches_[static_cast<std::size_t>(batch)].refs; }

  /// Compresses every staged block: the compression stream waits for `stream` (which wrote the rows),
  /// runs the batched kernel in launches of at most max_compress_jobs matrices, and records one event.
  void launch_staged(cudaStream_t stream) {
    if (staged_.empty()) return;
    check(cudaEventRecord(rows_ready_, stream), "cudaEventRecord");
    check(cudaStreamWaitEvent(compress_stream_, rows_ready_, 0), "cudaStreamWaitEvent");
    std::vector<CompressJob> jobs;
    jobs.reserve(staged_.size() * 2 * static_cast<std::size_t>(config_.num_kv_heads));
    for (const Staged& s : staged_) {
      const ColdBlockLayout& lay = layouts_[static_cast<std::size_t>(s.layer)];
      std::uint8_t* slab = pools_[static_cast<std::size_t>(s.layer)] + static_cast<std::int64_t>(s.block) * lay.block_bytes;
      for (int h = 0; h < config_.num_kv_heads; ++h) {
        const std::int64_t off = static_cast<std::int64_t>(h) * config_.head_dim;
        const T* xk = stage_row(stage_k_, s.slot, s.layer, s.first_row) + off;
        const T* xv = stage_row(stage_v_, s.slot, s.layer, s.first_row) + off;
        jobs.push_back(make_cold_block_job(lay, slab + h * lay.head_bytes, false, xk, row_elems_));
        jobs.push_back(make_cold_block_job(lay, slab + h * lay.head_bytes, true, xv, row_elems_));
      }
    }
    for (std::size_t at = 0; at < jobs.size(); at += static_cast<std::size_t>(options_.max_compress_jobs)) {
      const int n = static_cast<int>(std::min<std::size_t>(jobs.size() - at, static_cast<std::size_t>(options_.max_compress_jobs)));
      // The pinned staging array may be rewritten only once the previous copy out of it has run.
      check(cudaEventSynchronize(jobs_copied_), "cudaEventSynchronize");
      std::memcpy(job_staging_, jobs.data() + at, static_cast<std::size_t>(n) * sizeof(CompressJob));
      check(cudaMemcpyAsync(device_jobs_, job_staging_, static_cast<std::size_t>(n) * sizeof(CompressJob),
                            cudaMemcpyHostToDevice, compress_stream_), "cudaMemcpyAsync(compression jobs)");
      check(cudaEventRecord(jobs_copied_, compress_stream_), "cudaEventRecord");
      compressor_->run(device_jobs_, n, compress_workspace_, compress_workspace_bytes_, compress_stream_);
    }
    const int batch = new_batch();
    check(cudaEventRecord(batches_[static_cast<std::size_t>(batch)].done, compress_stream_), "cudaEventRecord");
    for (const Staged& s : staged_) {
      for (Pending& p : slots_[static_cast<std::size_t>(s.slot)].layers[static_cast<std::size_t>(s.layer)].pending) {
        if (p.block == s.block && p.batch < 0) {
          p.batch = batch;
          retain(batch);
        }
      }
    }
    staged_.clear();
  }

  void retire_front(SlotLayer& sl, cudaStream_t stream) {
    const Pending p = sl.pending.front();
    check(cudaStreamWaitEvent(stream, batches_[static_cast<std::size_t>(p.batch)].done, 0), "cudaStreamWaitEvent");
    release(p.batch);
    sl.blocks.push_back(p.block);
    sl.pending.pop_front();
    sl.dense_off += config_.block_size;
    sl.dense_len -= config_.block_size;
  }

  /// Retires, oldest first, the pending blocks whose compression has finished (no waiting).
  void retire_finished(const std::vector<int>& slots, int layer, cudaStream_t stream) {
    for (int slot : slots) {
      SlotLayer& sl = slots_[static_cast<std::size_t>(slot)].layers[static_cast<std::size_t>(layer)];
      while (!sl.pending.empty() && sl.pending.front().batch >= 0) {
        const cudaError_t st = cudaEventQuery(batches_[static_cast<std::size_t>(sl.pending.front().batch)].done);
        if (st == cudaErrorNotReady) break;
        check(st, "cudaEventQuery");
        retire_front(sl, stream);
      }
    }
  }

  /// Retires every launched pending block of (slot, layer); `stream` waits on the device.
  void retire_all(int slot, int layer, cudaStream_t stream) {
    SlotLayer& sl = slots_[static_cast<std::size_t>(slot)].layers[static_cast<std::size_t>(layer)];
    while (!sl.pending.empty() && sl.pending.front().batch >= 0) retire_front(sl, stream);
  }

  /// Moves the live dense rows of (slot, layer) to the start of its staging buffer, through the scratch
  /// buffer since the two ranges may overlap. Only called with no pending block left.
  void compact(int slot, int layer, cudaStream_t stream) {
    SlotLayer& sl = slots_[static_cast<std::size_t>(slot)].layers[static_cast<std::size_t>(layer)];
    if (sl.dense_off == 0) return;
    const std::size_t bytes = static_cast<std::size_t>(sl.dense_len * row_elems_) * sizeof(T);
    for (const std::vector<T*>* base : {&stage_k_, &stage_v_}) {
      if (bytes > 0) {
        check(cudaMemcpyAsync(scratch_, stage_row(*base, slot, layer, sl.dense_off), bytes, cudaMemcpyDeviceToDevice, stream),
              "cudaMemcpyAsync(compact)");
        check(cudaMemcpyAsync(stage_row(*base, slot, layer, 0), scratch_, bytes, cudaMemcpyDeviceToDevice, stream),
              "cudaMemcpyAsync(compact)");
      }
    }
    sl.dense_off = 0;
  }

  /// A slot whose previous sequence still had compressions in flight: its rows are rewritten only
  /// after they finish.
  void wait_for_reuse(int slot, cudaStream_t stream) {
    Slot& s = slots_[static_cast<std::size_t>(slot)];
    for (cudaEvent_t e : s.reuse_after) check(cudaStreamWaitEvent(stream, e, 0), "cudaStreamWaitEvent");
    for (int b : s.held_batches) release(b);
    s.reuse_after.clear();
    s.held_batches.clear();
  }

  // --- per-call metadata --------------------------------------------------------------------------------

  /// Writes the vectors, one after another at 8-byte aligned offsets, into the next region of the pinned
  /// metadata ring and returns their addresses as the device sees that region: mapped host memory, read
  /// by the kernel across the bus. The caller enqueues the kernels that read the region, under a
  /// MetadataRelease. A region is rewritten only kMetaRegions calls later and after the event recorded at
  /// its release, so no kernel can still be reading it.
  template <class... U>
  std::tuple<U*...> stage_metadata(const std::vector<U>&... data) {
    std::size_t offsets[sizeof...(U)];
    std::size_t bytes = 0, i = 0;
    ((offsets[i++] = bytes, bytes += (data.size() * sizeof(U) + 7) / 8 * 8), ...);
    if (bytes > meta_region_bytes_) {
      throw CudaError(::spectralkv::detail::concat("DeviceSpectralCache: ", bytes, " bytes of call metadata exceed the ",
                                                   meta_region_bytes_, "-byte region"));
    }
    meta_current_ = meta_next_;
    meta_next_ = (meta_next_ + 1) % kMetaRegions;
    meta_current_bytes_ = bytes;
    std::uint8_t* host = meta_host_ + meta_current_ * meta_region_bytes_;
    std::uint8_t* mapped = meta_mapped_ + meta_current_ * meta_region_bytes_;
    check(cudaEventSynchronize(meta_released_[meta_current_]), "cudaEventSynchronize");
    i = 0;
    ((data.empty() ? void() : void(std::memcpy(host + offsets[i], data.data(), data.size() * sizeof(U))), ++i), ...);
    i = 0;
    return std::tuple<U*...>{reinterpret_cast<U*>(mapped + offsets[i++])...};
  }

  /// stage_metadata, then one kernel copies the region to device memory (released, as the region is, behind
  /// the kernels that read the copy: nothing in between, so that the attention kernel, a programmatic
  /// dependent, can launch while the copy runs). For metadata that every CTA of the attention
  /// kernels reads. A kernel rather than cudaMemcpyAsync, because a copy-engine transfer between two
  /// kernels of the stream made an attention call ~6 µs slower.
  template <class... U>
  std::tuple<U*...> upload_metadata(cudaStream_t stream, const std::vector<U>&... data) {
    const std::tuple<U*...> mapped = stage_metadata(data...);
    const std::uint8_t* const from = meta_mapped_ + meta_current_ * meta_region_bytes_;
    std::uint8_t* const to = meta_dev_ + meta_current_ * meta_region_bytes_;
    detail::copy_metadata(to, from, meta_current_bytes_, stream);
    return std::apply(
        [&](auto*... p) {
          return std::tuple<U*...>{reinterpret_cast<U*>(to + (reinterpret_cast<const std::uint8_t*>(p) - from))...};
        },
        mapped);
  }

  /// Records the release of the staged region behind the kernels that read it: `now()` once they are enqueued,
  /// or the destructor when the call throws first (kernels that read the region may already be enqueued).
  class MetadataRelease {
   public:
    MetadataRelease(DeviceSpectralCache& cache, cudaStream_t stream) : cache_(cache), stream_(stream) {}
    MetadataRelease(const MetadataRelease&) = delete;
    MetadataRelease& operator=(const MetadataRelease&) = delete;
    void now() {
      done_ = true;
      check(cudaEventRecord(event(), stream_), "cudaEventRecord(metadata released)");
    }
    ~MetadataRelease() {
      if (!done_) cudaEventRecord(event(), stream_);  // already unwinding: an error here has no one to go to
    }

   private:
    cudaEvent_t event() const { return cache_.meta_released_[cache_.meta_current_]; }
    DeviceSpectralCache& cache_;
    cudaStream_t stream_;
    bool done_ = false;
  };

  // --- allocation -----------------------------------------------------------------------------------------

  void* device_alloc(std::size_t bytes) {
    void* p = options_.allocator.allocate(bytes, options_.stream);
    if (p == nullptr || reinterpret_cast<std::uintptr_t>(p) % 256 != 0) {
      if (p != nullptr) options_.allocator.deallocate(p, options_.stream);
      throw CudaError(::spectralkv::detail::concat("DeviceSpectralCache: options.allocator returned ", p, " for ",
                                                   bytes, " bytes (a 256-byte aligned device pointer is required)"));
    }
    allocations_.push_back(p);
    allocated_bytes_ += bytes;
    return p;
  }

  void allocate_all() {
    const auto layers = static_cast<std::size_t>(config_.num_layers);
    const std::int64_t seqs = options_.max_sequences;
    const std::size_t row_bytes = static_cast<std::size_t>(row_elems_) * sizeof(T);
    for (std::size_t l = 0; l < layers; ++l) {
      pools_.push_back(static_cast<std::uint8_t*>(
          device_alloc(static_cast<std::size_t>(options_.max_blocks_per_layer * layouts_[l].block_bytes))));
      const std::size_t sink_bytes = std::max<std::size_t>(static_cast<std::size_t>(seqs * config_.sink_tokens) * row_bytes, 256);
      sink_k_.push_back(static_cast<T*>(device_alloc(sink_bytes)));
      sink_v_.push_back(static_cast<T*>(device_alloc(sink_bytes)));
      const std::size_t stage_bytes = static_cast<std::size_t>(seqs * capacity_rows_) * row_bytes;
      stage_k_.push_back(static_cast<T*>(device_alloc(stage_bytes)));
      stage_v_.push_back(static_cast<T*>(device_alloc(stage_bytes)));
    }
    scratch_ = device_alloc(static_cast<std::size_t>(capacity_rows_) * row_bytes);

    // Decode workspace: the largest any layer needs at the largest batch.
    for (std::size_t l = 0; l < layers; ++l) {
      DecodeAttentionParams p;
      p.dtype = kType;
      p.batch = options_.max_sequences;
      p.num_q_heads = config_.num_q_heads;
      p.layout = layouts_[l];
      p.scale = 1.0f;
      p.q = p.out = reinterpret_cast<void*>(256);  // shape-only query; never dereferenced
      decode_workspace_bytes_ = std::max(decode_workspace_bytes_, DecodeAttention::get_workspace_size(p));
    }
    decode_workspace_ = device_alloc(std::max<std::size_t>(decode_workspace_bytes_, 256));
    check(cudaMemsetAsync(decode_workspace_, 0, std::max<std::size_t>(decode_workspace_bytes_, 256), options_.stream),
          "cudaMemsetAsync(decode workspace)");

    compress_workspace_bytes_ = compressor_->get_workspace_size();
    compress_workspace_ = device_alloc(std::max<std::size_t>(compress_workspace_bytes_, 256));
    device_jobs_ = static_cast<CompressJob*>(device_alloc(static_cast<std::size_t>(options_.max_compress_jobs) * sizeof(CompressJob)));
    check(cudaMallocHost(&job_staging_, static_cast<std::size_t>(options_.max_compress_jobs) * sizeof(CompressJob)),
          "cudaMallocHost");

    // Metadata of one call: row destinations of an append, or the tables of an attend.
    const std::size_t append_bytes = 2 * sizeof(void*) * static_cast<std::size_t>(seqs * options_.max_append_tokens);
    const std::size_t attend_bytes = sizeof(std::int32_t) * static_cast<std::size_t>(
        4 * seqs + 4 + seqs * options_.max_append_tokens + options_.max_blocks_per_layer) + 4 * sizeof(void*) * static_cast<std::size_t>(seqs) + 8;
    meta_region_bytes_ = (std::max(append_bytes, attend_bytes) + 255) / 256 * 256;
    meta_dev_ = static_cast<std::uint8_t*>(device_alloc(kMetaRegions * meta_region_bytes_));
    check(cudaHostAlloc(reinterpret_cast<void**>(&meta_host_), kMetaRegions * meta_region_bytes_, cudaHostAllocMapped),
          "cudaHostAlloc");
    check(cudaHostGetDevicePointer(reinterpret_cast<void**>(&meta_mapped_), meta_host_, 0), "cudaHostGetDevicePointer");
    for (cudaEvent_t& e : meta_released_) check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    for (cudaEvent_t* e : {&rows_ready_, &jobs_copied_}) {
      check(cudaEventCreateWithFlags(e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    }
    check(cudaStreamSynchronize(options_.stream), "cudaStreamSynchronize");
  }

  void release_all() noexcept {
    if (compress_stream_) cudaStreamSynchronize(compress_stream_);
    cudaStreamSynchronize(options_.stream);
    for (void* p : allocations_) options_.allocator.deallocate(p, options_.stream);
    allocations_.clear();
    cudaStreamSynchronize(options_.stream);
    if (job_staging_) cudaFreeHost(job_staging_);
    if (meta_host_) cudaFreeHost(meta_host_);
    job_staging_ = nullptr;
    meta_host_ = nullptr;
    meta_mapped_ = nullptr;
    for (cudaEvent_t& e : meta_released_) {
      if (e) cudaEventDestroy(e);
      e = nullptr;
    }
    for (cudaEvent_t* e : {&rows_ready_, &jobs_copied_}) {
      if (*e) cudaEventDestroy(*e);
      *e = nullptr;
    }
    for (Batch& b : batches_)
      if (b.done) cudaEventDestroy(b.done);
    batches_.clear();
    compressor_.reset();
    if (compress_stream_) cudaStreamDestroy(compress_stream_);
    compress_stream_ = nullptr;
  }

  CacheConfig config_;
  DeviceCacheOptions options_;
  std::vector<ColdBlockLayout> layouts_;
  std::int64_t capacity_rows_ = 0;
  std::int64_t row_elems_ = 0;

  std::vector<Slot> slots_;
  std::vector<int> free_slots_;
  std::map<SequenceId, int> slot_of_;
  std::vector<std::vector<std::int32_t>> free_blocks_;
  std::vector<Staged> staged_;
  std::vector<Batch> batches_;

  cudaStream_t compress_stream_ = nullptr;
  std::unique_ptr<BatchedCompressor> compressor_;
  std::vector<void*> allocations_;
  std::size_t allocated_bytes_ = 0;
  std::vector<std::uint8_t*> pools_;
  std::vector<T*> sink_k_, sink_v_, stage_k_, stage_v_;
  void* scratch_ = nullptr;
  void* decode_workspace_ = nullptr;
  std::size_t decode_workspace_bytes_ = 0;
  std::int64_t decode_workspace_key_ = -1;  // shape the workspace's counters are laid out for
  void* compress_workspace_ = nullptr;
  std::size_t compress_workspace_bytes_ = 0;
  CompressJob* device_jobs_ = nullptr;
  CompressJob* job_staging_ = nullptr;
  std::uint8_t* meta_dev_ = nullptr;
  std::uint8_t* meta_host_ = nullptr;    // pinned ring, written by the host
  std::uint8_t* meta_mapped_ = nullptr;  // the same ring as the device addresses it
  static constexpr std::size_t kMetaRegions = 8;
  static constexpr std::int64_t kMappedAppendRows = 64;
  std::size_t meta_region_bytes_ = 0;
  std::size_t meta_next_ = 0;
  std::size_t meta_current_ = 0;        // region of the last stage_metadata
  std::size_t meta_current_bytes_ = 0;  // bytes staged there
  cudaEvent_t meta_released_[kMetaRegions] = {};
  cudaEvent_t rows_ready_ = nullptr;
  cudaEvent_t jobs_copied_ = nullptr;
};

}  // namespace spectralkv::cuda
