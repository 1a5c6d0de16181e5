#pragma once
// Byte-level BPE tokenizer (tokenizer.ggml.model = "gpt2") built from a GGUF file's own vocabulary
// and merges.
//
// Encoding, in order:
//  1. special tokens (control tokens such as <|im_start|>) are cut out of the text when asked to;
//  2. pre-tokenisation: pre = "smollm" (and the other StarCoder-style pre-tokenisers) first isolates
//     every digit, then every remaining piece is split by the GPT-2 pattern
//       's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
//     (pre = "gpt2" skips the digit step);
//  3. each piece's bytes are mapped to printable code points by GPT-2's byte-to-unicode table;
//  4. adjacent symbols are merged by merge rank (lowest first) until no ranked pair is left, and the
//     symbols are looked up in the vocabulary.
//
// The character classes \p{L}, \p{N} and \s are exact for ASCII. Other code points are classified
// by a few ranges (letters by default; Unicode spaces, general punctuation and symbol blocks as such)
// — enough for prose; the bytes themselves always survive through the byte map, so any input encodes
// and decodes back to itself.

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "gguf.hpp"

namespace spectralkv::llama {

class TokenizerError : public Error {
 public:
  using Error::Error;
};

class Tokenizer {
 public:
  /// \param tokens       the vocabulary, id = index, in byte-mapped form
  /// \param merges       "left right" pairs, rank = index
  /// \param token_types  per token (3 = control: matched literally as a special token); may be empty
  /// \param pre          pre-tokeniser name from tokenizer.ggml.pre
  Tokenizer(std::vector<std::string> tokens, const std::vector<std::string>& merges,
            const std::vector<std::int64_t>& token_types, std::string pre, std::int32_t bos, std::int32_t eos)
      : tokens_(std::move(tokens)), pre_(std::move(pre)), bos_(bos), eos_(eos) {
    for (std::size_t i = 0; i < tokens_.size(); ++i) ids_.emplace(tokens_[i], static_cast<std::int32_t>(i));
    for (std::size_t r = 0; r < merges.size(); ++r) {
      const std::size_t space = merges[r].find(' ', 1);  // the left part is never empty
      if (space == std::string::npos) {
        throw TokenizerError("tokenizer: merge " + std::to_string(r) + " '" + merges[r] + "' has no space");
      }
      ranks_.emplace(merges[r], static_cast<int>(r));
    }
    control_.assign(tokens_.size(), false);
    for (std::size_t i = 0; i < token_types.size() && i < tokens_.size(); ++i) {
      if (token_types[i] == kControl) specials_.push_back(static_cast<std::int32_t>(i));
      control_[i] = token_types[i] == kControl;
    }
    // Longest first, so that a special token that is a prefix of another never wins.
    std::sort(specials_.begin(), specials_.end(),
              [this](std::int32_t a, std::int32_t b) { return tokens_[a].size() > tokens_[b].size(); });
    build_byte_map();
    if (bos_ < 0 || bos_ >= vocab_size() || eos_ < 0 || eos_ >= vocab_size()) {
      throw TokenizerError("tokenizer: bos/eos id outside the vocabulary");
    }
  }

  /// \throws GgufError if the file lacks the tokenizer keys; TokenizerError if it is not byte-level BPE.
  static Tokenizer from_gguf(const GgufFile& f) {
    const std::string model = f.get_string("tokenizer.ggml.model");
    if (model != "gpt2") throw TokenizerError("tokenizer: tokenizer.ggml.model = '" + model + "' (only gpt2 BPE)");
    std::vector<std::int64_t> types;
    if (f.has("tokenizer.ggml.token_type")) types = f.get_ints("tokenizer.ggml.token_type");
    return Tokenizer(f.get_strings("tokenizer.ggml.tokens"), f.get_strings("tokenizer.ggml.merges"), types,
                     f.get_string("tokenizer.ggml.pre", "gpt2"),
                     static_cast<std::int32_t>(f.get_int("tokenizer.ggml.bos_token_id")),
                     static_cast<std::int32_t>(f.get_int("tokenizer.ggml.eos_token_id")));
  }

  std::int32_t vocab_size() const { return static_cast<std::int32_t>(tokens_.size()); }
  std::int32_t bos() const { return bos_; }
  std::int32_t eos() const { return eos_; }
  const std::string& token(std::int32_t id) const { return tokens_.at(static_cast<std::size_t>(id)); }
  /// Control tokens (<|endoftext|>, <|im_end|>, ...) end a generation.
  bool is_control(std::int32_t id) const { return static_cast<std::size_t>(id) < control_.size() && control_[id]; }

  /// \param parse_special  cut control tokens (e.g. "<|im_start|>") out of the text as single ids;
  ///                       false treats them as plain text (what perplexity on raw text wants)
  std::vector<std::int32_t> encode(std::string_view text, bool parse_special = false) const {
    std::vector<std::int32_t> out;
    std::size_t start = 0;
    while (start < text.size()) {
      std::size_t at = text.size();
      std::int32_t special = -1;
      if (parse_special) {
        for (std::int32_t id : specials_) {
          const std::size_t p = text.find(tokens_[id], start);
          if (p < at) at = p, special = id;
        }
      }
      encode_plain(text.substr(start, at - start), out);
      if (special < 0) break;
      out.push_back(special);
      start = at + tokens_[special].size();
    }
    return out;
  }

  /// The bytes of one token (control tokens as their literal text).
  std::string decode(std::int32_t id) const {
    const std::string& t = token(id);
    std::string bytes;
    for (std::size_t i = 0; i < t.size();) {
      const std::size_t n = utf8_length(static_cast<unsigned char>(t[i]));
      const auto it = byte_of_.find(t.substr(i, n));
      if (it == byte_of_.end()) return t;  // not byte-mapped: a control/user token, printed as is
      bytes.push_back(static_cast<char>(it->second));
      i += n;
    }
    return bytes;
  }
  std::string decode(const std::vector<std::int32_t>& ids) const {
    std::string s;
    for (std::int32_t id : ids) s += decode(id);
    return s;
  }

  /// Pre-tokenisation alone (step 2), exposed for tests: the pieces, as raw bytes.
  std::vector<std::string_view> pretokenize(std::string_view text) const {
    std::vector<std::string_view> pieces;
    const bool split_digits = pre_ != "gpt2";
    std::size_t seg = 0;
    for (std::size_t i = 0; i <= text.size();) {
      if (i < text.size() && !(split_digits && is_ascii_digit(text[i]))) {
        i = std::min(i + utf8_length(static_cast<unsigned char>(text[i])), text.size());  // a cut-off sequence ends here
        continue;
      }
      split_gpt2(text.substr(seg, i - seg), pieces);
      if (i == text.size()) break;
      pieces.push_back(text.substr(i, 1));  // an isolated digit
      seg = ++i;
    }
    return pieces;
  }

 private:
  static constexpr std::int64_t kControl = 3;
  enum class Cls { kLetter, kNumber, kSpace, kOther };

  static bool is_ascii_digit(char c) { return c >= '0' && c <= '9'; }
  static std::size_t utf8_length(unsigned char lead) {
    return lead < 0x80 ? 1 : (lead >> 5) == 0x6 ? 2 : (lead >> 4) == 0xE ? 3 : (lead >> 3) == 0x1E ? 4 : 1;
  }

  /// Decodes the code point at s[i] (invalid UTF-8: the single byte, classified as "other").
  static std::pair<std::uint32_t, std::size_t> code_point(std::string_view s, std::size_t i) {
    const auto lead = static_cast<unsigned char>(s[i]);
    const std::size_t n = utf8_length(lead);
    if (n == 1 || i + n > s.size()) return {lead < 0x80 ? lead : 0xFFFD, 1};
    std::uint32_t cp = lead & (0x7F >> n);
    for (std::size_t k = 1; k < n; ++k) {
      const auto c = static_cast<unsigned char>(s[i + k]);
      if ((c & 0xC0) != 0x80) return {0xFFFD, 1};
      cp = (cp << 6) | (c & 0x3F);
    }
    return {cp, n};
  }

  static Cls classify(std::uint32_t c) {
    if (c < 0x80) {
      if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) return Cls::kLetter;
      if (c >= '0' && c <= '9') return Cls::kNumber;
      if (c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1C && c <= 0x1F)) return Cls::kSpace;
      return Cls::kOther;
    }
    if (c == 0x85 || c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
        c == 0x202F || c == 0x205F || c == 0x3000) {
      return Cls::kSpace;
    }
    if (c == 0xB2 || c == 0xB3 || c == 0xB9 || (c >= 0xBC && c <= 0xBE)) return Cls::kNumber;
    if (c == 0xAA || c == 0xB5 || c == 0xBA) return Cls::kLetter;
    if (c < 0xC0 || c == 0xD7 || c == 0xF7 || (c >= 0x2000 && c <= 0x2BFF) || (c >= 0x3000 && c <= 0x303F) ||
        c == 0xFFFD || (c >= 0x1F000 && c <= 0x1FAFF)) {
      return Cls::kOther;  // Latin-1 symbols, general punctuation, arrows, maths, emoji, ...
    }
    return Cls::kLetter;
  }

  /// The GPT-2 pattern over one digit-free segment (hand-written; see the header comment).
  static void split_gpt2(std::string_view s, std::vector<std::string_view>& pieces) {
    std::vector<Cls> cls;
    std::vector<std::size_t> at;  // byte offset of each code point, plus the end
    for (std::size_t i = 0; i < s.size();) {
      const auto [cp, n] = code_point(s, i);
      cls.push_back(classify(cp));
      at.push_back(i);
      i += n;
    }
    at.push_back(s.size());
    const std::size_t n = cls.size();
    auto run = [&](std::size_t i, Cls c) {
      while (i < n && cls[i] == c) ++i;
      return i;
    };
    for (std::size_t i = 0; i < n;) {
      std::size_t j = i;
      if (s[at[i]] == '\'' && i + 1 < n) {
        const std::string_view rest = s.substr(at[i + 1], 2);
        if (rest.substr(0, 2) == "re" || rest.substr(0, 2) == "ve" || rest.substr(0, 2) == "ll") {
          j = i + 3;
        } else if (!rest.empty() && (rest[0] == 's' || rest[0] == 't' || rest[0] == 'm' || rest[0] == 'd')) {
          j = i + 2;
        }
      }
      if (j == i) {
        const bool space_prefix = s[at[i]] == ' ' && i + 1 < n && cls[i + 1] != Cls::kSpace;
        const std::size_t k = space_prefix ? i + 1 : i;
        if (cls[k] != Cls::kSpace) {
          j = run(k, cls[k]);  // ' ?\p{L}+', ' ?\p{N}+' or ' ?[^\s\p{L}\p{N}]+'
        } else {
          const std::size_t end = run(i, Cls::kSpace);
          // '\s+(?!\S)' backs off one code point when non-space follows; '\s+' takes a lone one.
          j = (end == n || end - i == 1) ? end : end - 1;
        }
      }
      pieces.push_back(s.substr(at[i], at[j] - at[i]));
      i = j;
    }
  }

  void encode_plain(std::string_view text, std::vector<std::int32_t>& out) const {
    for (std::string_view piece : pretokenize(text)) {
      auto cached = cache_.find(std::string(piece));
      if (cached == cache_.end()) cached = cache_.emplace(std::string(piece), bpe(piece)).first;
      out.insert(out.end(), cached->second.begin(), cached->second.end());
    }
  }

  /// Merges one pre-tokenised piece by rank.
  std::vector<std::int32_t> bpe(std::string_view piece) const {
    std::vector<std::string> sym;
    for (unsigned char b : piece) sym.push_back(unicode_of_[b]);
    while (sym.size() > 1) {
      int best = -1;
      std::size_t where = 0;
      for (std::size_t i = 0; i + 1 < sym.size(); ++i) {
        const auto it = ranks_.find(sym[i] + " " + sym[i + 1]);
        if (it != ranks_.end() && (best < 0 || it->second < best)) best = it->second, where = i;
      }
      if (best < 0) break;
      // Merge every occurrence of the best pair, left to right (GPT-2's rule).
      const std::string left = sym[where], right = sym[where + 1];
      std::vector<std::string> next;
      for (std::size_t i = 0; i < sym.size(); ++i) {
        if (i + 1 < sym.size() && sym[i] == left && sym[i + 1] == right) {
          next.push_back(left + right);
          ++i;
        } else {
          next.push_back(sym[i]);
        }
      }
      sym.swap(next);
    }
    std::vector<std::int32_t> ids;
    for (const std::string& s : sym) {
      const auto it = ids_.find(s);
      if (it != ids_.end()) {
        ids.push_back(it->second);
        continue;
      }
      for (std::size_t i = 0; i < s.size();) {  // not in the vocabulary: fall back to single bytes
        const std::size_t n = utf8_length(static_cast<unsigned char>(s[i]));
        const auto b = ids_.find(s.substr(i, n));
        if (b == ids_.end()) throw TokenizerError("tokenizer: the vocabulary lacks byte symbol '" + s.substr(i, n) + "'");
        ids.push_back(b->second);
        i += n;
      }
    }
    return ids;
  }

  /// GPT-2's byte-to-unicode table: printable Latin-1 bytes map to themselves, the other 68 bytes to
  /// U+0100 onwards in byte order, so every byte becomes one printable code point.
  void build_byte_map() {
    auto utf8 = [](std::uint32_t cp) {
      std::string s;
      if (cp < 0x80) {
        s.push_back(static_cast<char>(cp));
      } else {
        s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
        s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
      }
      return s;
    };
    std::uint32_t next = 256;
    for (std::uint32_t b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      unicode_of_[b] = utf8(printable ? b : next++);
      byte_of_.emplace(unicode_of_[b], static_cast<std::uint8_t>(b));
    }
  }

  std::vector<std::string> tokens_;
  std::unordered_map<std::string, std::int32_t> ids_;
  std::unordered_map<std::string, int> ranks_;
  std::vector<std::int32_t> specials_;
  std::vector<bool> control_;
  std::string pre_;
  std::int32_t bos_, eos_;
  std::string unicode_of_[256];
  std::unordered_map<std::string, std::uint8_t> byte_of_;
  mutable std::unordered_map<std::string, std::vector<std::int32_t>> cache_;
};

}  // namespace spectralkv::llama
