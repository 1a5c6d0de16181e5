#pragma once
// SpectralCache<T>: the KV cache of all layers of a model, for a batch of sequences of independent
// lengths, CPU backend (the reference every GPU path is tested against).
//
// One cache serves all layers rather than one cache per layer: sequences join and leave once for the
// whole model, one call site owns the pools, and the GPU backend can batch the compression of every
// block that filled across layers, heads and sequences into one launch.
//
// Tiers of each (sequence, layer), oldest first: up to `sink_tokens` dense sink tokens; cold blocks
// of `block_size` tokens compressed to the ColdBlockLayout, in a per-layer pool and listed in the
// sequence's block table; the dense tail. When the tail reaches hot_tokens + block_size tokens its
// oldest block_size tokens become one cold block, so the newest hot_tokens always stay dense.
//
// Error model: every public call validates all of its arguments before it changes anything; a call
// that throws (InvalidArgument and subclasses, CapacityError, std::bad_alloc) leaves the cache as it was.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <set>
#include <utility>
#include <vector>

#include "spectralkv/attention.hpp"
#include "spectralkv/compress.hpp"
#include "spectralkv/config.hpp"
#include "spectralkv/cpu/svd.hpp"
#include "spectralkv/error.hpp"
#include "spectralkv/layout.cuh"
#include "spectralkv/memory_stats.hpp"
#include "spectralkv/numeric.hpp"
#include "spectralkv/tensor.hpp"

namespace spectralkv {

struct CacheOptions {
  /// Cold blocks each layer's pool may hold; 0 lets the pool grow as needed. Exceeding it is a
  /// CapacityError raised before anything changes.
  std::int64_t max_blocks_per_layer = 0;
};

template <class T>
class SpectralCache {
  static_assert(kIsStorageType<T>, "SpectralCache<T>: T must be float, Half or BFloat16");

 public:
  /// Raw state of one sequence in one layer, for upload to the CUDA backend and for tests.
  /// Dense tiers are [len][num_kv_heads][head_dim] of T; `blocks` is the block table, oldest first.
  struct LayerState {
    const T* sink_k;
    const T* sink_v;
    std::int64_t sink_len;
    const std::int32_t* blocks;
    std::int64_t num_blocks;
    const T* tail_k;
    const T* tail_v;
    std::int64_t tail_len;
  };

  /// \throws InvalidArgument naming the first bad field of `config` or `options`.
  explicit SpectralCache(CacheConfig config, CacheOptions options = {})
      : config_(std::move(config)), options_(options) {
    config_.validate();
    detail::require(options_.max_blocks_per_layer >= 0, "SpectralCache", "options.max_blocks_per_layer",
                    options_.max_blocks_per_layer, "must be non-negative (0: unbounded)");
    detail::require(options_.max_blocks_per_layer < (std::int64_t{1} << 31), "SpectralCache",
                    "options.max_blocks_per_layer", options_.max_blocks_per_layer, "block ids are int32");
    for (int l = 0; l < config_.num_layers; ++l) {
      const LayerRanks r = config_.ranks(l);
      layouts_.push_back(ColdBlockLayout::make(config_.block_size, config_.head_dim, config_.num_kv_heads, r.key,
                                               r.value, config_.mean_center));
    }
    pools_.resize(static_cast<std::size_t>(config_.num_layers));
  }

  const CacheConfig& config() const { return config_; }
  const CacheOptions& options() const { return options_; }
  const ColdBlockLayout& layout(int layer) const {
    check_layer("SpectralCache::layout", layer);
    return layouts_[static_cast<std::size_t>(layer)];
  }

  // --- sequences --------------------------------------------------------------------------------------

  /// \throws SequenceError if `id` is already present.
  void add_sequence(SequenceId id) {
    detail::require<SequenceError>(!contains(id), "SpectralCache::add_sequence", "id", id, "sequence already present");
    seqs_.emplace(id, std::vector<SeqLayer>(static_cast<std::size_t>(config_.num_layers)));
  }

  /// Removes the sequence and returns its cold blocks to the pools at once.
  /// \throws SequenceError if `id` is unknown.
  void remove_sequence(SequenceId id) {
    auto it = find("SpectralCache::remove_sequence", id);
    for (std::size_t l = 0; l < it->second.size(); ++l) {
      Pool& pool = pools_[l];
      // Capacity for every block id was reserved when the pool grew, so these cannot allocate.
      for (std::int32_t b : it->second[l].blocks) pool.free_ids.push_back(b);
      pool.in_use -= static_cast<std::int64_t>(it->second[l].blocks.size());
    }
    seqs_.erase(it);
  }

  bool contains(SequenceId id) const { return seqs_.count(id) != 0; }

  std::vector<SequenceId> sequences() const {
    std::vector<SequenceId> ids;
    for (const auto& kv : seqs_) ids.push_back(kv.first);
    return ids;
  }

  /// Tokens of sequence `id` in `layer`, all tiers.
  std::int64_t length(SequenceId id, int layer) const {
    check_layer("SpectralCache::length", layer);
    return length_of(at(id, layer));
  }

  /// How many tokens can be appended to (id, layer) before a cold block forms. A chunk of at most this
  /// many tokens appended and then attended sees exactly what token-by-token decoding would see; so does
  /// a chunk whose first token forms a block (when this returns 0) and whose other tokens form none.
  std::int64_t tokens_until_compression(SequenceId id, int layer) const {
    check_layer("SpectralCache::tokens_until_compression", layer);
    const SeqLayer& s = at(id, layer);
    return (config_.sink_tokens - tokens_of(s.sink_k)) + (config_.compress_threshold() - 1 - tokens_of(s.tail_k));
  }

  // --- append -----------------------------------------------------------------------------------------

  /// Appends tokens of several sequences to one layer and compresses every block they complete.
  /// \param layer   in [0, num_layers)
  /// \param ids     distinct sequences present in the cache
  /// \param counts  tokens per sequence (>= 0), same length as ids
  /// \param k, v    [sum(counts)][num_kv_heads][head_dim], post-RoPE keys and values, the tokens of ids[0]
  ///                first, each sequence's tokens in position order; all finite
  /// \throws InvalidArgument, ShapeError, NonFiniteError, SequenceError, CapacityError (cache unchanged)
  void append(int layer, const std::vector<SequenceId>& ids, const std::vector<std::int64_t>& counts,
              TensorView<const T> k, TensorView<const T> v) {
    constexpr const char* kWhat = "SpectralCache::append";
    check_layer(kWhat, layer);
    check_ids(kWhat, ids);
    if (counts.size() != ids.size())
      detail::fail(kWhat, "counts.size()", counts.size(), detail::concat("must equal ids.size() = ", ids.size()));
    std::int64_t total = 0;
    for (std::size_t i = 0; i < counts.size(); ++i) {
      if (counts[i] < 0)
        detail::fail(kWhat, detail::concat("counts[", i, "]").c_str(), counts[i], "must be non-negative");
      if (counts[i] > std::numeric_limits<std::int64_t>::max() - total)
        detail::fail(kWhat, detail::concat("counts[", i, "]").c_str(), counts[i], "sum(counts) overflows int64");
      total += counts[i];
    }
    detail::require_shape(kWhat, "k", k, total, config_.num_kv_heads, config_.head_dim);
    detail::require_shape(kWhat, "v", v, total, config_.num_kv_heads, config_.head_dim);
    check_finite(kWhat, "k", k);
    check_finite(kWhat, "v", v);

    // Plan: the new dense tiers of every sequence, and how many blocks they complete.
    const std::size_t elems = token_elems();
    const ColdBlockLayout& lay = layouts_[static_cast<std::size_t>(layer)];
    struct Plan {
      SeqLayer* target;
      std::vector<T> sink_k, sink_v, tail_k, tail_v;
      std::int64_t new_blocks = 0;
    };
    std::vector<Plan> plans(ids.size());
    std::int64_t new_blocks = 0;
    std::int64_t offset = 0;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      SeqLayer& s = seqs_.find(ids[i])->second[static_cast<std::size_t>(layer)];
      Plan& p = plans[i];
      p.target = &s;
      p.sink_k = s.sink_k;
      p.sink_v = s.sink_v;
      const std::int64_t to_sink = std::min<std::int64_t>(counts[i], config_.sink_tokens - tokens_of(s.sink_k));
      const T* ks = k.token(offset);
      const T* vs = v.token(offset);
      p.sink_k.insert(p.sink_k.end(), ks, ks + to_sink * elems);
      p.sink_v.insert(p.sink_v.end(), vs, vs + to_sink * elems);
      const std::int64_t tail_len = tokens_of(s.tail_k) + counts[i] - to_sink;
      if (tail_len >= config_.compress_threshold()) {
        p.new_blocks = (tail_len - config_.hot_tokens) / config_.block_size;
      }
      p.tail_k.reserve(static_cast<std::size_t>(tail_len) * elems);
      p.tail_v.reserve(static_cast<std::size_t>(tail_len) * elems);
      p.tail_k = s.tail_k;
      p.tail_v = s.tail_v;
      p.tail_k.insert(p.tail_k.end(), ks + to_sink * elems, ks + counts[i] * elems);
      p.tail_v.insert(p.tail_v.end(), vs + to_sink * elems, vs + counts[i] * elems);
      new_blocks += p.new_blocks;
      offset += counts[i];
    }
    Pool& pool = pools_[static_cast<std::size_t>(layer)];
    if (options_.max_blocks_per_layer > 0 && pool.in_use + new_blocks > options_.max_blocks_per_layer) {
      throw CapacityError(detail::concat(kWhat, ": layer ", layer, " needs ", new_blocks, " new cold blocks but only ",
                                         options_.max_blocks_per_layer - pool.in_use, " of max_blocks_per_layer = ",
                                         options_.max_blocks_per_layer, " are free"));
    }

    // Compress into scratch slabs (may throw; nothing has changed yet).
    std::vector<std::vector<std::uint8_t>> slabs;
    slabs.reserve(static_cast<std::size_t>(new_blocks));
    for (Plan& p : plans) {
      for (std::int64_t b = 0; b < p.new_blocks; ++b) {
        slabs.push_back(compress_block(lay, p.tail_k.data() + b * config_.block_size * elems,
                                       p.tail_v.data() + b * config_.block_size * elems));
      }
      const auto drop = static_cast<std::ptrdiff_t>(p.new_blocks * config_.block_size * static_cast<std::int64_t>(elems));
      p.tail_k.erase(p.tail_k.begin(), p.tail_k.begin() + drop);
      p.tail_v.erase(p.tail_v.begin(), p.tail_v.begin() + drop);
    }

    // Reserve everything the commit needs, then commit without anything that can throw.
    reserve_blocks(pool, lay, new_blocks);
    for (Plan& p : plans) p.target->blocks.reserve(p.target->blocks.size() + static_cast<std::size_t>(p.new_blocks));
    std::size_t slab = 0;
    for (Plan& p : plans) {
      for (std::int64_t b = 0; b < p.new_blocks; ++b, ++slab) {
        const std::int32_t id = pool.free_ids.back();
        pool.free_ids.pop_back();
        std::memcpy(pool.bytes.data() + static_cast<std::size_t>(id) * static_cast<std::size_t>(lay.block_bytes),
                    slabs[slab].data(), slabs[slab].size());
        p.target->blocks.push_back(id);
      }
      pool.in_use += p.new_blocks;
      p.target->sink_k.swap(p.sink_k);
      p.target->sink_v.swap(p.sink_v);
      p.target->tail_k.swap(p.tail_k);
      p.target->tail_v.swap(p.tail_v);
    }
  }

  /// Single-sequence form of append(); k, v: [tokens][num_kv_heads][head_dim].
  void append(int layer, SequenceId id, TensorView<const T> k, TensorView<const T> v) {
    append(layer, std::vector<SequenceId>{id}, std::vector<std::int64_t>{k.tokens}, k, v);
  }

  // --- attention --------------------------------------------------------------------------------------

  /// Attention, in the compressed space, of the newest q_lens[i] tokens of each sequence (append them
  /// first). Causal by absolute position: query i of n attends to positions <= length − n + i. One
  /// softmax over sinks, cold blocks and tail; query head h uses KV head h / group_size.
  /// \param q      [sum(q_lens)][num_q_heads][head_dim], Q = float, Half or BFloat16, finite
  /// \param out    [sum(q_lens)][num_q_heads][head_dim], FP32, written
  /// \param scale  logits are scale · q·k (1/sqrt(head_dim) for standard attention); finite
  /// \throws InvalidArgument (also for attention on an empty sequence), ShapeError, NonFiniteError, SequenceError
  template <class Q>
  void attend(int layer, const std::vector<SequenceId>& ids, const std::vector<std::int64_t>& q_lens,
              TensorView<const Q> q, TensorView<float> out, float scale) const {
    attend_impl<Q, false>("SpectralCache::attend", layer, ids, q_lens, q, out, scale);
  }
  template <class Q>
  void attend(int layer, SequenceId id, TensorView<const Q> q, TensorView<float> out, float scale) const {
    attend(layer, std::vector<SequenceId>{id}, std::vector<std::int64_t>{q.tokens}, q, out, scale);
  }

  /// The "before" path, for tests: rebuilds every cold block in FP32 and runs dense attention. Same
  /// arguments and result as attend() up to rounding.
  template <class Q>
  void attend_reconstructed(int layer, const std::vector<SequenceId>& ids, const std::vector<std::int64_t>& q_lens,
                            TensorView<const Q> q, TensorView<float> out, float scale) const {
    attend_impl<Q, true>("SpectralCache::attend_reconstructed", layer, ids, q_lens, q, out, scale);
  }

  /// Attention logits (scale · q·k over every token, position order) of one query token of sequence
  /// `id` against the whole cache: [num_q_heads][length]. For fidelity metrics.
  template <class Q>
  std::vector<std::vector<float>> logits(int layer, SequenceId id, TensorView<const Q> q, float scale) const {
    constexpr const char* kWhat = "SpectralCache::logits";
    const std::vector<SequenceId> ids{id};
    const std::vector<std::int64_t> q_lens{1};
    validate_attend(kWhat, layer, ids, q_lens, q, scale);
    std::vector<std::vector<float>> result(static_cast<std::size_t>(config_.num_q_heads));
    std::vector<float> qf(static_cast<std::size_t>(config_.head_dim)), o(qf.size());
    const SeqLayer& s = at(id, layer);
    for (int h = 0; h < config_.num_q_heads; ++h) {
      for (int d = 0; d < config_.head_dim; ++d) qf[static_cast<std::size_t>(d)] = to_float(q.at(0, h)[d]);
      attend_head(layer, s, h / config_.group_size(), qf.data(), scale, length_of(s) - 1, o.data(),
                  &result[static_cast<std::size_t>(h)]);
    }
    return result;
  }

  // --- state --------------------------------------------------------------------------------------------

  MemoryStats memory_stats() const {
    MemoryStats m;
    const std::int64_t tok_bytes = 2 * static_cast<std::int64_t>(token_elems()) * static_cast<std::int64_t>(sizeof(T));
    for (const auto& kv : seqs_) {
      for (std::size_t l = 0; l < kv.second.size(); ++l) {
        const SeqLayer& s = kv.second[l];
        const auto blocks = static_cast<std::int64_t>(s.blocks.size());
        m.sink_tokens += tokens_of(s.sink_k);
        m.tail_tokens += tokens_of(s.tail_k);
        m.cold_tokens += blocks * config_.block_size;
        m.cold_blocks += blocks;
        m.cold_bytes += blocks * layouts_[l].block_bytes;
      }
    }
    m.sink_bytes = m.sink_tokens * tok_bytes;
    m.tail_bytes = m.tail_tokens * tok_bytes;
    m.dense_equivalent_bytes = (m.sink_tokens + m.cold_tokens + m.tail_tokens) * tok_bytes;
    for (const Pool& p : pools_) m.pool_bytes += static_cast<std::int64_t>(p.bytes.size());
    return m;
  }

  LayerState state(SequenceId id, int layer) const {
    check_layer("SpectralCache::state", layer);
    const SeqLayer& s = at(id, layer);
    return {s.sink_k.data(), s.sink_v.data(), tokens_of(s.sink_k), s.blocks.data(),
            static_cast<std::int64_t>(s.blocks.size()), s.tail_k.data(), s.tail_v.data(), tokens_of(s.tail_k)};
  }

  /// Pool of `layer`: block b occupies [pool(layer) + b·block_bytes, + block_bytes).
  const std::uint8_t* pool(int layer) const {
    check_layer("SpectralCache::pool", layer);
    return pools_[static_cast<std::size_t>(layer)].bytes.data();
  }
  /// Blocks allocated in the pool of `layer`, in use or free.
  std::int64_t pool_blocks(int layer) const {
    check_layer("SpectralCache::pool_blocks", layer);
    return pools_[static_cast<std::size_t>(layer)].blocks;
  }
  /// Blocks of `layer` in use by some sequence.
  std::int64_t blocks_in_use(int layer) const {
    check_layer("SpectralCache::blocks_in_use", layer);
    return pools_[static_cast<std::size_t>(layer)].in_use;
  }

 private:
  struct SeqLayer {
    std::vector<T> sink_k, sink_v;  // [sink_len][Hkv][D]
    std::vector<std::int32_t> blocks;
    std::vector<T> tail_k, tail_v;  // [tail_len][Hkv][D]
  };
  struct Pool {
    std::vector<std::uint8_t> bytes;
    std::vector<std::int32_t> free_ids;  // capacity >= blocks, so returning ids never allocates
    std::int64_t blocks = 0;
    std::int64_t in_use = 0;
  };

  std::size_t token_elems() const {
    return static_cast<std::size_t>(config_.num_kv_heads) * static_cast<std::size_t>(config_.head_dim);
  }
  std::int64_t tokens_of(const std::vector<T>& tier) const {
    return static_cast<std::int64_t>(tier.size() / token_elems());
  }
  std::int64_t length_of(const SeqLayer& s) const {
    return tokens_of(s.sink_k) + static_cast<std::int64_t>(s.blocks.size()) * config_.block_size + tokens_of(s.tail_k);
  }

  // The checks of every call build their messages only when they fail.
  void check_layer(const char* what, int layer) const {
    if (layer < 0 || layer >= config_.num_layers)
      detail::fail(what, "layer", layer, detail::concat("must be in [0, num_layers = ", config_.num_layers, ")"));
  }
  typename std::map<SequenceId, std::vector<SeqLayer>>::iterator find(const char* what, SequenceId id) {
    auto it = seqs_.find(id);
    if (it == seqs_.end()) detail::fail<SequenceError>(what, "id", id, "unknown sequence");
    return it;
  }
  const SeqLayer& at(SequenceId id, int layer) const {
    auto it = seqs_.find(id);
    if (it == seqs_.end()) detail::fail<SequenceError>("SpectralCache", "id", id, "unknown sequence");
    return it->second[static_cast<std::size_t>(layer)];
  }
  void check_ids(const char* what, const std::vector<SequenceId>& ids) const {
    std::set<SequenceId> seen;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      if (!contains(ids[i]))
        detail::fail<SequenceError>(what, detail::concat("ids[", i, "]").c_str(), ids[i], "unknown sequence");
      if (!seen.insert(ids[i]).second)
        detail::fail<SequenceError>(what, detail::concat("ids[", i, "]").c_str(), ids[i], "sequence listed twice");
    }
  }
  template <class U>
  static void check_finite(const char* what, const char* name, const TensorView<const U>& t) {
    for (std::int64_t i = 0; i < t.size(); ++i) {
      const float x = to_float(t.data[i]);
      if (!std::isfinite(x)) {
        const std::int64_t d = i % t.head_dim, h = (i / t.head_dim) % t.heads, tok = i / (t.head_dim * t.heads);
        throw NonFiniteError(detail::concat(what, ": argument ", name, "[", tok, "][", h, "][", d, "] = ", x,
                                            " (K, V and Q must be finite)"));
      }
    }
  }

  /// Grows the pool so at least `n` ids are free; all allocation happens here, before any commit.
  void reserve_blocks(Pool& pool, const ColdBlockLayout& lay, std::int64_t n) {
    const auto have = static_cast<std::int64_t>(pool.free_ids.size());
    if (have >= n) return;
    const std::int64_t grow = std::max<std::int64_t>(n - have, std::max<std::int64_t>(pool.blocks / 2, 4));
    const std::int64_t cap = options_.max_blocks_per_layer > 0 ? options_.max_blocks_per_layer : (std::int64_t{1} << 31) - 1;
    const std::int64_t new_total = std::min(pool.blocks + grow, cap);
    if (new_total - pool.blocks + have < n) {
      throw CapacityError(detail::concat("SpectralCache::append: the pool cannot hold ", n, " more blocks"));
    }
    // New ids go below the old free ones so that the lowest ids are handed out first. Each allocation
    // may throw and leaves the pool's content as it was; the insert into reserved capacity cannot.
    std::vector<std::int32_t> fresh;
    for (std::int64_t b = new_total - 1; b >= pool.blocks; --b) fresh.push_back(static_cast<std::int32_t>(b));
    pool.free_ids.reserve(static_cast<std::size_t>(new_total));
    pool.bytes.resize(static_cast<std::size_t>(new_total) * static_cast<std::size_t>(lay.block_bytes));
    pool.free_ids.insert(pool.free_ids.begin(), fresh.begin(), fresh.end());
    pool.blocks = new_total;
  }

  /// Compresses one block (block_size tokens of all heads, [L][Hkv][D] at k and v) into a slab.
  std::vector<std::uint8_t> compress_block(const ColdBlockLayout& lay, const T* k, const T* v) const {
    std::vector<std::uint8_t> slab(static_cast<std::size_t>(lay.block_bytes), 0);
    const auto stride = static_cast<std::int64_t>(token_elems());
    for (int h = 0; h < config_.num_kv_heads; ++h) {
      std::uint8_t* head = slab.data() + static_cast<std::size_t>(h) * static_cast<std::size_t>(lay.head_bytes);
      const std::int64_t off = static_cast<std::int64_t>(h) * config_.head_dim;
      store_factors(k + off, stride,
                    cpu::truncated_svd(k + off, stride, lay.block_size, lay.head_dim, lay.rank_k, lay.has_mean), lay,
                    Part::kKey, head);
      store_factors(v + off, stride,
                    cpu::truncated_svd(v + off, stride, lay.block_size, lay.head_dim, lay.rank_v, lay.has_mean), lay,
                    Part::kValue, head);
    }
    return slab;
  }

  template <class Q>
  void validate_attend(const char* what, int layer, const std::vector<SequenceId>& ids,
                       const std::vector<std::int64_t>& q_lens, const TensorView<const Q>& q, float scale) const {
    check_layer(what, layer);
    check_ids(what, ids);
    if (q_lens.size() != ids.size())
      detail::fail(what, "q_lens.size()", q_lens.size(), detail::concat("must equal ids.size() = ", ids.size()));
    std::int64_t total = 0;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const std::int64_t len = length_of(at(ids[i], layer));
      if (len == 0) {
        detail::fail(what, detail::concat("ids[", i, "]").c_str(), ids[i],
                     detail::concat("attention on an empty sequence (no tokens in layer ", layer, ")"));
      }
      if (q_lens[i] < 1 || q_lens[i] > len)
        detail::fail(what, detail::concat("q_lens[", i, "]").c_str(), q_lens[i],
                     detail::concat("must be in [1, length = ", len, "]"));
      total += q_lens[i];
    }
    detail::require_shape(what, "q", q, total, config_.num_q_heads, config_.head_dim);
    check_finite(what, "q", q);
    detail::require(std::isfinite(scale), what, "scale", scale, "must be finite");
  }

  template <class Q, bool kReconstruct>
  void attend_impl(const char* what, int layer, const std::vector<SequenceId>& ids,
                   const std::vector<std::int64_t>& q_lens, TensorView<const Q> q, TensorView<float> out,
                   float scale) const {
    validate_attend(what, layer, ids, q_lens, q, scale);
    detail::require_shape(what, "out", out, q.tokens, config_.num_q_heads, config_.head_dim);
    std::vector<float> qf(static_cast<std::size_t>(config_.head_dim));
    std::int64_t row = 0;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      const SeqLayer& s = at(ids[i], layer);
      const std::int64_t len = length_of(s);
      for (std::int64_t j = 0; j < q_lens[i]; ++j, ++row) {
        const std::int64_t limit = len - q_lens[i] + j;
        for (int h = 0; h < config_.num_q_heads; ++h) {
          for (int d = 0; d < config_.head_dim; ++d) qf[static_cast<std::size_t>(d)] = to_float(q.at(row, h)[d]);
          if constexpr (kReconstruct) {
            attend_head_reconstructed(layer, s, h / config_.group_size(), qf.data(), scale, limit, out.at(row, h));
          } else {
            attend_head(layer, s, h / config_.group_size(), qf.data(), scale, limit, out.at(row, h), nullptr);
          }
        }
      }
    }
  }

  void attend_head(int layer, const SeqLayer& s, int kvh, const float* q, float scale, std::int64_t limit, float* out,
                   std::vector<float>* logits) const {
    const ColdBlockLayout& lay = layouts_[static_cast<std::size_t>(layer)];
    const auto stride = static_cast<std::int64_t>(token_elems());
    const std::int64_t off = static_cast<std::int64_t>(kvh) * config_.head_dim;
    const std::int64_t sink_len = tokens_of(s.sink_k);
    const std::vector<DenseRun<T>> sinks{{s.sink_k.data() + off, s.sink_v.data() + off, stride, sink_len, 0}};
    std::vector<CompressedRun<StoredFactorView, StoredFactorView>> blocks;
    const std::uint8_t* base = pools_[static_cast<std::size_t>(layer)].bytes.data();
    for (std::size_t b = 0; b < s.blocks.size(); ++b) {
      const std::uint8_t* head = base + static_cast<std::int64_t>(s.blocks[b]) * lay.block_bytes + kvh * lay.head_bytes;
      blocks.push_back({StoredFactorView(lay, Part::kKey, head), StoredFactorView(lay, Part::kValue, head),
                        sink_len + static_cast<std::int64_t>(b) * config_.block_size});
    }
    const std::int64_t tail_first = sink_len + static_cast<std::int64_t>(s.blocks.size()) * config_.block_size;
    const std::vector<DenseRun<T>> tail{{s.tail_k.data() + off, s.tail_v.data() + off, stride, tokens_of(s.tail_k), tail_first}};
    attend_one(sinks, blocks, tail, q, config_.head_dim, scale, limit, out, logits);
  }

  void attend_head_reconstructed(int layer, const SeqLayer& s, int kvh, const float* q, float scale,
                                 std::int64_t limit, float* out) const {
    const ColdBlockLayout& lay = layouts_[static_cast<std::size_t>(layer)];
    const auto d_model = static_cast<std::size_t>(config_.head_dim);
    std::vector<float> k, v;  // [length][D] of this head, cold blocks rebuilt
    auto add_dense = [&](const std::vector<T>& kt, const std::vector<T>& vt) {
      for (std::int64_t t = 0; t < tokens_of(kt); ++t) {
        const std::size_t src = static_cast<std::size_t>(t) * token_elems() + static_cast<std::size_t>(kvh) * d_model;
        for (std::size_t d = 0; d < d_model; ++d) {
          k.push_back(to_float(kt[src + d]));
          v.push_back(to_float(vt[src + d]));
        }
      }
    };
    add_dense(s.sink_k, s.sink_v);
    const std::uint8_t* base = pools_[static_cast<std::size_t>(layer)].bytes.data();
    for (std::int32_t id : s.blocks) {
      const std::uint8_t* head = base + static_cast<std::int64_t>(id) * lay.block_bytes + kvh * lay.head_bytes;
      const std::vector<float> kb = reconstruct(StoredFactorView(lay, Part::kKey, head));
      const std::vector<float> vb = reconstruct(StoredFactorView(lay, Part::kValue, head));
      k.insert(k.end(), kb.begin(), kb.end());
      v.insert(v.end(), vb.begin(), vb.end());
    }
    add_dense(s.tail_k, s.tail_v);
    dense_attend_one(k.data(), v.data(), static_cast<std::int64_t>(d_model), limit, q, config_.head_dim, scale, out);
  }

  CacheConfig config_;
  CacheOptions options_;
  std::vector<ColdBlockLayout> layouts_;
  std::vector<Pool> pools_;
  std::map<SequenceId, std::vector<SeqLayer>> seqs_;
};

}  // namespace spectralkv
