// spectralkv_llama: a compact Llama-architecture inference program over GGUF files (FP32 matmuls on the
// CPU) that shows how an engine plugs SpectralKV's cache in, and measures what compression costs in
// quality. The cache and its attention run on the CPU or, in a build with CUDA and with a GPU present,
// on the GPU (backend.hpp).
//
//   spectralkv_llama inventory  --model M
//   spectralkv_llama generate   --model M --prompt TEXT [--tokens N] [--chat] [--cache dense|spectral] [cache flags]
//   spectralkv_llama perplexity --model M --text F [--ctx N] [--windows N] [--bos ID] [cache flags]
//                               [--arm SPEC]... [--dense-only] [--no-fidelity] [--json]
//   cache flags: --backend auto|cpu|cuda --rank-k R --rank-v R --block L --hot H --sinks S --mean-center
//                --attend fast|library
//   (--attend: spectral attention by this program's FP32 GEMMs over the cache's cold layout, or by the
//   library's reference SpectralCache::attend; same cache, same algebra, equal up to FP32 rounding)
//   SPEC: comma-separated k=R,v=R,block=L,hot=H,sinks=S,mc=0|1,out=M,bits=B,lead=N,bbits=P (unset: the
//         cache flags); bits=B,lead=N,bbits=P: experimental, coefficient columns past the first N as
//         B-bit codes, basis rows as P-bit codes (emulated on the library's store, CPU only);
//         out=M (or --outliers M): experimental, M exact smallest-|k| tokens per cold block and KV head;
//         each --arm adds one spectral cache, all run in lockstep against one dense reference.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "backend.hpp"
#include "gguf.hpp"
#include "kv_cache.hpp"
#include "model.hpp"
#include "perplexity.hpp"
#include "tokenizer.hpp"

namespace {

using namespace spectralkv;
using namespace spectralkv::llama;

class UsageError : public Error {
 public:
  using Error::Error;
};

constexpr const char* kUsage =
    "usage: spectralkv_llama inventory  --model M\n"
    "       spectralkv_llama generate   --model M --prompt TEXT [--tokens N] [--chat] [--cache dense|spectral]\n"
    "       spectralkv_llama perplexity --model M --text F [--ctx 2048] [--windows 1] [--bos ID] [--arm SPEC]...\n"
    "                                   [--dense-only] [--no-fidelity] [--json]\n"
    "cache flags: --rank-k 16 --rank-v 32 --block 512 --hot 64 --sinks 16 --mean-center --attend fast|library\n"
    "             --outliers M (experimental: M exact smallest-|k| tokens per cold block and KV head)\n"
    "             --backend auto|cpu|cuda: where the KV cache, attention and compression run (the matmuls\n"
    "             always run on the CPU). cuda: cuda::DeviceSpectralCache<Half> (FP16 K/V; needs a CUDA build\n"
    "             and a GPU; dense arms hold every token as a dense FP16 sink; no per-layer fidelity;\n"
    "             --attend and --outliers are CPU-only). auto (default): cuda when possible, else cpu\n"
    "SPEC: k=R,v=R,block=L,hot=H,sinks=S,mc=0|1,out=M,bits=B,lead=N,bbits=P (one spectral arm per --arm;\n"
    "      out: experimental outliers; bits, lead, bbits: experimental B-bit codes for the coefficient\n"
    "      columns past the first N and P-bit basis rows, emulated on the library's store, CPU only)\n";

/// --name value pairs and bare --flags; repeated names keep every value.
struct Args {
  std::map<std::string, std::vector<std::string>> values;
  std::map<std::string, bool> flags;

  Args(int argc, char** argv, int first, const std::vector<std::string>& flag_names) {
    for (int i = first; i < argc; ++i) {
      const std::string a = argv[i];
      if (a.rfind("--", 0) != 0) throw UsageError("unexpected argument '" + a + "'");
      const std::string name = a.substr(2);
      if (std::find(flag_names.begin(), flag_names.end(), name) != flag_names.end()) {
        flags[name] = true;
      } else if (i + 1 < argc) {
        values[name].push_back(argv[++i]);
      } else {
        throw UsageError("option --" + name + " needs a value");
      }
    }
  }
  bool flag(const std::string& n) const { return flags.count(n) != 0; }
  std::string str(const std::string& n, const std::string& fallback = "") const {
    const auto it = values.find(n);
    return it == values.end() ? fallback : it->second.back();
  }
  std::string required(const std::string& n) const {
    const auto it = values.find(n);
    if (it == values.end()) throw UsageError("missing --" + n);
    return it->second.back();
  }
  std::int64_t integer(const std::string& n, std::int64_t fallback) const {
    const auto it = values.find(n);
    return it == values.end() ? fallback : parse_int("--" + n, it->second.back());
  }
  static std::int64_t parse_int(const std::string& what, const std::string& s) {
    char* end = nullptr;
    const long long v = std::strtoll(s.c_str(), &end, 10);
    if (s.empty() || *end != '\0') throw UsageError(what + " = '" + s + "' is not an integer");
    return v;
  }
};

/// The cache flags (the default spectral arm) on top of the model's shape.
CacheConfig cache_config(const Args& args, const LlamaConfig& m) {
  CacheConfig c;
  c.num_layers = m.num_layers;
  c.num_q_heads = m.num_q_heads;
  c.num_kv_heads = m.num_kv_heads;
  c.head_dim = m.head_dim;
  const CacheConfig defaults;  // the library's defaults unless a flag says otherwise
  c.default_ranks.key = static_cast<int>(args.integer("rank-k", defaults.default_ranks.key));
  c.default_ranks.value = static_cast<int>(args.integer("rank-v", defaults.default_ranks.value));
  c.block_size = static_cast<int>(args.integer("block", defaults.block_size));
  c.hot_tokens = static_cast<int>(args.integer("hot", defaults.hot_tokens));
  c.sink_tokens = static_cast<int>(args.integer("sinks", defaults.sink_tokens));
  c.mean_center = args.flag("mean-center");
  c.validate();
  return c;
}

AttendPath attend_path(const Args& args) {
  const std::string a = args.str("attend", "fast");
  if (a != "fast" && a != "library") throw UsageError("--attend must be fast or library, not '" + a + "'");
  return a == "fast" ? AttendPath::kFast : AttendPath::kLibrary;
}

CacheConfig parse_arm(const std::string& spec, CacheConfig c, int& outliers, NarrowCodes& codes) {
  std::stringstream ss(spec);
  std::string field;
  while (std::getline(ss, field, ',')) {
    const auto eq = field.find('=');
    if (eq == std::string::npos) throw UsageError("--arm field '" + field + "' is not name=value");
    const std::string k = field.substr(0, eq);
    const int v = static_cast<int>(Args::parse_int("--arm " + k, field.substr(eq + 1)));
    if (k == "k") c.default_ranks.key = v;
    else if (k == "v") c.default_ranks.value = v;
    else if (k == "block") c.block_size = v;
    else if (k == "hot") c.hot_tokens = v;
    else if (k == "sinks") c.sink_tokens = v;
    else if (k == "mc") c.mean_center = v != 0;
    else if (k == "out") outliers = v;
    else if (k == "bits") codes.bits = v;
    else if (k == "lead") codes.lead = v;
    else if (k == "bbits") codes.basis_bits = v;
    else throw UsageError("--arm: unknown field '" + k + "' (k, v, block, hot, sinks, mc, out, bits, lead, bbits)");
  }
  if (codes.bits < 2 || codes.bits > 8) throw UsageError(detail::concat("--arm bits must be in [2, 8], not ", codes.bits));
  if (codes.lead < 0) throw UsageError(detail::concat("--arm lead must be >= 0, not ", codes.lead));
  if (codes.basis_bits < 2 || codes.basis_bits > 16)
    throw UsageError(detail::concat("--arm bbits must be in [2, 16], not ", codes.basis_bits));
  c.validate();
  return c;
}

std::string arm_name(const CacheConfig& c, int outliers, NarrowCodes codes) {
  return detail::concat("k", c.default_ranks.key, "v", c.default_ranks.value, "_b", c.block_size, "_h", c.hot_tokens,
                        "_s", c.sink_tokens, c.mean_center ? "_mc" : "", outliers ? detail::concat("_o", outliers) : "",
                        codes.bits < 8 ? detail::concat("_q", codes.bits, codes.lead ? detail::concat("l", codes.lead) : "") : "",
                        codes.basis_bits < 16 ? detail::concat("_bb", codes.basis_bits) : "");
}

LlamaModel load_model(const std::string& path, std::unique_ptr<Tokenizer>& tokenizer) {
  const auto t0 = std::chrono::steady_clock::now();
  const GgufFile f = GgufFile::open(path);
  tokenizer = std::make_unique<Tokenizer>(Tokenizer::from_gguf(f));
  LlamaModel model(f);
  std::fprintf(stderr, "loaded %s: %d layers, d_model %d, heads %d/%d, vocab %d (%.1f s)\n", path.c_str(),
               model.config().num_layers, model.config().d_model, model.config().num_q_heads,
               model.config().num_kv_heads, model.config().vocab,
               std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return model;
}

// --- inventory ------------------------------------------------------------------------------------------

std::string show(const GgufValue& v) {
  if (const auto* i = std::get_if<std::int64_t>(&v.data)) return std::to_string(*i);
  if (const auto* u = std::get_if<std::uint64_t>(&v.data)) return std::to_string(*u);
  if (const auto* d = std::get_if<double>(&v.data)) return detail::concat(*d);
  if (const auto* b = std::get_if<bool>(&v.data)) return *b ? "true" : "false";
  if (const auto* s = std::get_if<std::string>(&v.data)) {
    std::string t = s->substr(0, 80);
    for (char& c : t) c = c == '\n' ? ' ' : c;
    return "\"" + t + (s->size() > 80 ? "...\"" : "\"");
  }
  const auto& items = std::get<std::vector<GgufValue>>(v.data);
  std::string out = detail::concat("[", value_type_name(v.element_type), " x ", items.size(), "] ");
  for (std::size_t i = 0; i < items.size() && i < 4; ++i) out += (i ? ", " : "") + show(items[i]);
  return out + (items.size() > 4 ? ", ..." : "");
}

int cmd_inventory(const Args& args) {
  const GgufFile f = GgufFile::open(args.required("model"));
  std::printf("GGUF v%u, alignment %llu, data at byte %llu, %zu metadata keys, %zu tensors\n\n", f.version(),
              static_cast<unsigned long long>(f.alignment()), static_cast<unsigned long long>(f.data_offset()),
              f.metadata().size(), f.tensors().size());
  for (const auto& [key, value] : f.metadata()) {
    std::printf("  %-42s %-8s %s\n", key.c_str(), value_type_name(value.type), show(value).c_str());
  }
  std::map<std::string, std::pair<std::int64_t, std::int64_t>> by_type;
  std::int64_t params = 0, bytes = 0;
  std::printf("\n  %-28s %-6s %-16s %s\n", "tensor", "type", "ne", "bytes");
  for (const GgufTensorInfo& t : f.tensors()) {
    std::printf("  %-28s %-6s %-16s %lld\n", t.name.c_str(), type_traits(t.type).name, t.shape().c_str(),
                static_cast<long long>(t.bytes()));
    by_type[type_traits(t.type).name].first += 1;
    by_type[type_traits(t.type).name].second += t.elements();
    params += t.elements();
    bytes += t.bytes();
  }
  std::printf("\n%lld parameters in %lld bytes;", static_cast<long long>(params), static_cast<long long>(bytes));
  for (const auto& [type, count] : by_type) {
    std::printf(" %s: %lld tensors, %lld params;", type.c_str(), static_cast<long long>(count.first),
                static_cast<long long>(count.second));
  }
  std::printf("\n");
  return 0;
}

// --- generate -------------------------------------------------------------------------------------------

constexpr std::int64_t kPrefillChunk = 256;

/// --backend, checked here so that a typo is a usage error.
std::string backend_flag(const Args& args) {
  const std::string b = args.str("backend", "auto");
  if (b != "auto" && b != "cpu" && b != "cuda") throw UsageError("--backend must be auto, cpu or cuda, not '" + b + "'");
  return b;
}

void log_backend(const BackendChoice& b) {
  std::fprintf(stderr, "backend: %s (%s)\n", backend_name(b.backend), b.reason.c_str());
}

/// Appends `tokens` to the cache in strict chunks (see perplexity.hpp) and returns the last logits.
void prefill(const LlamaModel& model, const std::vector<std::int32_t>& tokens, KvCache& cache, RowMatrix& logits) {
  for (std::size_t pos = 0; pos < tokens.size();) {
    const std::int64_t n = strict_chunk(cache, model.config().num_layers,
                                        static_cast<std::int64_t>(tokens.size() - pos), kPrefillChunk);
    model.forward(tokens.data() + pos, n, cache, logits, false);
    pos += static_cast<std::size_t>(n);
  }
}

int cmd_generate(const Args& args) {
  std::unique_ptr<Tokenizer> tok;
  const LlamaModel model = load_model(args.required("model"), tok);
  std::string prompt = args.required("prompt");
  if (args.flag("chat")) prompt = "<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n";
  std::vector<std::int32_t> ids = tok->encode(prompt, /*parse_special=*/true);
  if (ids.empty() || ids.front() != tok->bos()) ids.insert(ids.begin(), tok->bos());
  const std::string kind = args.str("cache", "dense");
  if (kind != "dense" && kind != "spectral") throw UsageError("--cache must be dense or spectral, not '" + kind + "'");
  CacheRequest request;
  request.spectral = kind == "spectral";
  request.config = cache_config(args, model.config());
  request.capacity = model.config().context;
  request.max_chunk = kPrefillChunk;
  request.attend = attend_path(args);
  request.outliers = static_cast<int>(args.integer("outliers", 0));
  // Generation needs no strict compression: on the GPU a block that fills is compressed asynchronously,
  // as an engine would, and attended densely until that has finished.
  const BackendChoice backend = choose_backend(backend_flag(args), {request});
  log_backend(backend);
  const std::unique_ptr<KvCache> cache = make_cache(backend.backend, request);
  const std::int64_t budget = std::min<std::int64_t>(args.integer("tokens", 64),
                                                     model.config().context - static_cast<std::int64_t>(ids.size()));
  const auto t0 = std::chrono::steady_clock::now();
  RowMatrix logits;
  prefill(model, ids, *cache, logits);
  std::int64_t produced = 0;
  for (; produced < budget; ++produced) {
    Eigen::Index next = 0;
    logits.row(0).maxCoeff(&next);
    const auto id = static_cast<std::int32_t>(next);
    if (tok->is_control(id)) break;
    std::fputs(tok->decode(id).c_str(), stdout);
    std::fflush(stdout);
    model.forward(&id, 1, *cache, logits, false);
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const KvBytes b = cache->bytes();
  std::fprintf(stderr, "\n[%zu prompt + %lld generated tokens in %.2f s; KV %.2f MB (dense FP16 %.2f MB, %.2fx)]\n",
               ids.size(), static_cast<long long>(produced), s, b.stored / 1e6, b.dense_fp16 / 1e6, b.ratio());
  return 0;
}

// --- perplexity -----------------------------------------------------------------------------------------

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UsageError("cannot read --text " + path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) out += c == '"' ? "\\\"" : c == '\\' ? "\\\\" : std::string(1, c);
  return out;
}

int cmd_perplexity(const Args& args) {
  std::unique_ptr<Tokenizer> tok;
  const LlamaModel model = load_model(args.required("model"), tok);
  const std::string text_path = args.required("text");
  const std::vector<std::int32_t> text = tok->encode(read_file(text_path));
  PerplexityOptions opt;
  opt.context = args.integer("ctx", 2048);
  opt.windows = args.integer("windows", 1);
  opt.bos = static_cast<std::int32_t>(args.integer("bos", tok->bos()));
  opt.fidelity = !args.flag("no-fidelity");
  opt.attend = attend_path(args);
  if (opt.windows < 1) throw UsageError("--windows must be >= 1");
  const CacheConfig base = cache_config(args, model.config());
  std::vector<ArmResult> arms(1);
  arms[0].name = "dense";
  auto add_arm = [&](const CacheConfig& c, int outliers, NarrowCodes codes) {
    ArmResult a;
    a.name = arm_name(c, outliers, codes);
    a.spectral = true;
    a.config = c;
    a.outliers = outliers;
    a.codes = codes;
    arms.push_back(a);
  };
  const int base_outliers = static_cast<int>(args.integer("outliers", 0));
  const auto specs = args.values.find("arm");
  if (specs == args.values.end()) {
    if (!args.flag("dense-only")) add_arm(base, base_outliers, NarrowCodes{});
  } else {
    for (const std::string& s : specs->second) {
      int outliers = base_outliers;
      NarrowCodes codes;
      const CacheConfig c = parse_arm(s, base, outliers, codes);
      add_arm(c, outliers, codes);
    }
  }
  std::vector<CacheRequest> requests;
  for (const ArmResult& a : arms) requests.push_back(arm_request(a, model.config(), opt));
  const BackendChoice backend = choose_backend(backend_flag(args), requests);
  log_backend(backend);
  opt.backend = backend.backend;
  if (opt.backend == Backend::kCuda && opt.fidelity && arms.size() > 1) {
    std::fprintf(stderr, "note: per-layer fidelity is measured by the CPU backend only (--backend cpu)\n");
  }
  const std::int64_t windows = std::min<std::int64_t>(opt.windows, static_cast<std::int64_t>(text.size()) / (opt.context - 1));
  std::fprintf(stderr, "%s: %zu tokens; %lld window(s) of %lld tokens, %zu arm(s)\n", text_path.c_str(), text.size(),
               static_cast<long long>(windows), static_cast<long long>(opt.context), arms.size());
  const auto t0 = std::chrono::steady_clock::now();
  opt.progress = [&](std::int64_t w, std::int64_t done, std::int64_t total) {
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double frac = static_cast<double>(w * total + done) / static_cast<double>(windows * total);
    const int bar = static_cast<int>(frac * 30);
    std::fprintf(stderr, "\r[%.*s%*s] window %lld/%lld  %5lld/%lld tokens  %6.1f s%s",
                 bar, "==============================", 30 - bar, "", static_cast<long long>(w + 1),
                 static_cast<long long>(windows), static_cast<long long>(done), static_cast<long long>(total), s,
                 frac >= 1.0 ? "\n" : "");
  };
  arms = evaluate_perplexity(model, text, arms, opt);
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const double ppl_dense = arms[0].perplexity();

  if (args.flag("json")) {
    std::printf("{\n  \"model\": \"%s\",\n  \"text\": \"%s\",\n  \"context\": %lld,\n  \"windows\": %lld,\n"
                "  \"bos\": %d,\n  \"backend\": \"%s\",\n  \"scored_tokens\": %lld,\n  \"wall_seconds\": %.2f,\n"
                "  \"arms\": [\n",
                json_escape(args.required("model")).c_str(), json_escape(text_path).c_str(),
                static_cast<long long>(opt.context), static_cast<long long>(windows), opt.bos,
                backend_name(opt.backend), static_cast<long long>(arms[0].scored), wall);
    for (std::size_t a = 0; a < arms.size(); ++a) {
      const ArmResult& r = arms[a];
      std::printf("    {\"name\": \"%s\", \"spectral\": %s, \"perplexity\": %.6f, \"delta_ppl_pct\": %.4f, "
                  "\"mean_kl\": %.6g, \"top1_agreement\": %.6f, \"kv_bytes\": %lld, \"kv_bytes_dense_fp16\": %lld, "
                  "\"compression\": %.4f, \"cold_tokens\": %lld, \"seconds\": %.2f",
                  r.name.c_str(), r.spectral ? "true" : "false", r.perplexity(),
                  100.0 * (r.perplexity() / ppl_dense - 1.0), r.kl / r.scored,
                  r.spectral ? static_cast<double>(r.top1_agree) / r.scored : 1.0,
                  static_cast<long long>(r.bytes.stored),
                  static_cast<long long>(r.bytes.dense_fp16), r.bytes.ratio(),
                  static_cast<long long>(r.bytes.cold_tokens), r.seconds);
      if (r.spectral) {
        const CacheConfig& c = r.config;
        std::printf(",\n     \"config\": {\"rank_k\": %d, \"rank_v\": %d, \"block\": %d, \"hot\": %d, \"sinks\": %d, "
                    "\"mean_center\": %s, \"outliers\": %d, \"coeff_bits\": %d, \"int8_lead_columns\": %d, \"basis_bits\": %d}",
                    c.default_ranks.key, c.default_ranks.value, c.block_size, c.hot_tokens, c.sink_tokens,
                    c.mean_center ? "true" : "false", r.outliers, r.codes.bits, r.codes.lead, r.codes.basis_bits);
        if (!r.fidelity.empty()) {
          std::printf(",\n     \"layer_attention_rel_error\": [");
          for (std::size_t l = 0; l < r.fidelity.size(); ++l) std::printf("%s%.5f", l ? ", " : "", r.fidelity[l].relative_error());
          std::printf("],\n     \"layer_score_corr\": [");
          for (std::size_t l = 0; l < r.fidelity.size(); ++l) std::printf("%s%.5f", l ? ", " : "", r.fidelity[l].score_corr());
          std::printf("]");
        }
      }
      std::printf("}%s\n", a + 1 < arms.size() ? "," : "");
    }
    std::printf("  ]\n}\n");
    return 0;
  }
  std::printf("context %lld, %lld window(s), %lld scored tokens, BOS id %d, backend %s, wall %.1f s\n",
              static_cast<long long>(opt.context), static_cast<long long>(windows),
              static_cast<long long>(arms[0].scored), opt.bos, backend_name(opt.backend), wall);
  std::printf("%-26s %10s %8s %10s %7s %10s %10s %7s %8s\n", "arm", "ppl", "dppl%", "mean KL", "top1", "KV MB",
              "dense MB", "ratio", "time s");
  for (const ArmResult& r : arms) {
    std::printf("%-26s %10.4f %+8.3f %10.3g %7.4f %10.2f %10.2f %7.2f %8.1f\n", r.name.c_str(), r.perplexity(),
                100.0 * (r.perplexity() / ppl_dense - 1.0), r.kl / r.scored,
                r.spectral ? static_cast<double>(r.top1_agree) / r.scored : 1.0, r.bytes.stored / 1e6, r.bytes.dense_fp16 / 1e6,
                r.bytes.ratio(), r.seconds);
  }
  for (const ArmResult& r : arms) {
    if (r.fidelity.empty()) continue;
    std::printf("\n%s per layer: attention-output relative error | logit Pearson over compressed positions\n",
                r.name.c_str());
    for (std::size_t l = 0; l < r.fidelity.size(); ++l) {
      std::printf("  layer %2zu  %.5f  %.5f\n", l, r.fidelity[l].relative_error(), r.fidelity[l].score_corr());
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::fputs(kUsage, stderr);
    return 2;
  }
  const std::string cmd = argv[1];
  flush_denormals_to_zero();
  try {
    if (cmd == "inventory") return cmd_inventory(Args(argc, argv, 2, {}));
    if (cmd == "generate") return cmd_generate(Args(argc, argv, 2, {"chat", "mean-center"}));
    if (cmd == "perplexity") {
      return cmd_perplexity(Args(argc, argv, 2, {"json", "mean-center", "no-fidelity", "dense-only"}));
    }
    std::fprintf(stderr, "unknown command '%s'\n%s", cmd.c_str(), kUsage);
    return 2;
  } catch (const UsageError& e) {
    std::fprintf(stderr, "error: %s\n%s", e.what(), kUsage);
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
