// The byte-level BPE tokenizer on a tiny hand-made vocabulary: pre-tokenisation (digits, contractions,
// spaces, newlines, punctuation, non-ASCII letters), merges applied by rank, byte-exact round trips of
// arbitrary bytes, special tokens, and loading from a GGUF file.

#include <gtest/gtest.h>

#include <filesystem>
#include <string>
#include <vector>

#include "gguf_writer.hpp"
#include "tokenizer.hpp"

namespace spectralkv::llama {
namespace {

/// GPT-2's byte-to-unicode map, written independently of the tokenizer: bytes '!'..'~', 0xA1..0xAC and
/// 0xAE..0xFF stand for themselves, the other 68 take U+0100.. in byte order. Returned as UTF-8.
std::vector<std::string> byte_symbols() {
  std::vector<std::string> out(256);
  unsigned next = 0x100;
  for (unsigned b = 0; b < 256; ++b) {
    const bool self = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    const unsigned cp = self ? b : next++;
    if (cp < 0x80) {
      out[b] = std::string(1, static_cast<char>(cp));
    } else {
      out[b] = {static_cast<char>(0xC0 | (cp >> 6)), static_cast<char>(0x80 | (cp & 0x3F))};
    }
  }
  return out;
}

struct TinyVocab {
  std::vector<std::string> tokens;
  std::vector<std::string> merges;
  std::vector<std::int64_t> types;
  std::int32_t id(const std::string& t) const {
    for (std::size_t i = 0; i < tokens.size(); ++i) {
      if (tokens[i] == t) return static_cast<std::int32_t>(i);
    }
    ADD_FAILURE() << "no token " << t;
    return -1;
  }
};

/// ids 0, 1: control tokens; then the 256 byte symbols; then merged tokens. "Ġ" is the space byte.
TinyVocab tiny_vocab() {
  TinyVocab v;
  v.tokens = {"<|endoftext|>", "<|im_start|>"};
  for (const auto& s : byte_symbols()) v.tokens.push_back(s);
  v.merges = {"b c", "a b", "a bc", "Ġ a", "Ġ abc", "h i"};
  for (const char* t : {"bc", "ab", "abc", "Ġa", "Ġabc", "hi"}) v.tokens.push_back(t);
  v.types.assign(v.tokens.size(), 1);
  v.types[0] = v.types[1] = 3;
  return v;
}

Tokenizer make(const TinyVocab& v, const std::string& pre = "smollm") {
  return Tokenizer(v.tokens, v.merges, v.types, pre, 1, 0);
}

std::vector<std::string> pieces(const Tokenizer& t, const std::string& text) {
  std::vector<std::string> out;
  for (auto p : t.pretokenize(text)) out.emplace_back(p);
  return out;
}

using Strings = std::vector<std::string>;

TEST(Tokenizer, PretokenisesLikeTheGpt2PatternWithIsolatedDigits) {
  const Tokenizer t = make(tiny_vocab());
  EXPECT_EQ(pieces(t, "Hello world"), (Strings{"Hello", " world"}));
  EXPECT_EQ(pieces(t, "in 1881, they"), (Strings{"in", " ", "1", "8", "8", "1", ",", " they"}));
  EXPECT_EQ(pieces(t, "3.14"), (Strings{"3", ".", "1", "4"}));
  // Contractions are case-sensitive: "'M" is punctuation then a word.
  EXPECT_EQ(pieces(t, "it's they'll we're I'M"), (Strings{"it", "'s", " they", "'ll", " we", "'re", " I", "'", "M"}));
  // A run of spaces leaves its last space to the next word; a lone newline stands alone.
  EXPECT_EQ(pieces(t, "a  b"), (Strings{"a", " ", " b"}));
  EXPECT_EQ(pieces(t, "a   b"), (Strings{"a", "  ", " b"}));
  EXPECT_EQ(pieces(t, "a\n\nb"), (Strings{"a", "\n", "\n", "b"}));
  EXPECT_EQ(pieces(t, "a.\n  B"), (Strings{"a", ".", "\n ", " B"}));
  EXPECT_EQ(pieces(t, "end   \n"), (Strings{"end", "   \n"}));
  EXPECT_EQ(pieces(t, "hi "), (Strings{"hi", " "}));
  EXPECT_EQ(pieces(t, "wait... !!x"), (Strings{"wait", "...", " !!", "x"}));
  EXPECT_EQ(pieces(t, "\tx"), (Strings{"\t", "x"}));
  // Non-ASCII letters are letters, dashes and curly quotes are punctuation.
  EXPECT_EQ(pieces(t, "café—naïve “über”"), (Strings{"café", "—", "naïve", " “", "über", "”"}));
  // Without the digit step ("gpt2"), a number is one piece with its leading space.
  EXPECT_EQ(pieces(make(tiny_vocab(), "gpt2"), "in 1881"), (Strings{"in", " 1881"}));
}

TEST(Tokenizer, MergesByRankNotByPosition) {
  const TinyVocab v = tiny_vocab();
  const Tokenizer t = make(v);
  // "b c" (rank 0) must win over "a b" (rank 1) although "a b" comes first; then "a bc" (rank 2).
  EXPECT_EQ(t.encode("abc"), (std::vector<std::int32_t>{v.id("abc")}));
  // Every occurrence of the best pair merges.
  EXPECT_EQ(t.encode("abab"), (std::vector<std::int32_t>{v.id("ab"), v.id("ab")}));
  // The space joins the word through the byte map ("Ġ").
  EXPECT_EQ(t.encode(" abc"), (std::vector<std::int32_t>{v.id("Ġabc")}));
  EXPECT_EQ(t.encode("hi abc"), (std::vector<std::int32_t>{v.id("hi"), v.id("Ġabc")}));
  // Unmerged bytes come out as byte tokens: '\n' is U+010A.
  EXPECT_EQ(t.encode("a\n"), (std::vector<std::int32_t>{v.id("a"), v.id("\xC4\x8A")}));
}

TEST(Tokenizer, RoundTripsArbitraryBytes) {
  const Tokenizer t = make(tiny_vocab());
  const std::vector<std::string> texts = {
      "plain ascii, 42 digits!", "café — “quoted” naïve", std::string("nul\0byte", 8), "\xff\xfe invalid \xc3",
      "tabs\tand\r\nCRLF", "   leading and trailing   ", "emoji \xF0\x9F\x98\x80 4-byte"};
  for (const std::string& s : texts) {
    const auto ids = t.encode(s);
    EXPECT_EQ(t.decode(ids), s);
    for (auto id : ids) EXPECT_FALSE(t.is_control(id));
  }
  std::string all;
  for (int b = 0; b < 256; ++b) all.push_back(static_cast<char>(b));
  EXPECT_EQ(t.decode(t.encode(all)), all);
}

TEST(Tokenizer, SpecialTokensOnlyWhenAsked) {
  const TinyVocab v = tiny_vocab();
  const Tokenizer t = make(v);
  const auto with = t.encode("<|im_start|>abc<|endoftext|>", /*parse_special=*/true);
  EXPECT_EQ(with, (std::vector<std::int32_t>{1, v.id("abc"), 0}));
  EXPECT_TRUE(t.is_control(0));
  EXPECT_EQ(t.decode(with), "<|im_start|>abc<|endoftext|>");
  const auto without = t.encode("<|im_start|>abc");
  EXPECT_GT(without.size(), 3u);
  for (auto id : without) EXPECT_FALSE(t.is_control(id));
  EXPECT_EQ(t.decode(without), "<|im_start|>abc");
}

TEST(Tokenizer, LoadsFromGguf) {
  const TinyVocab v = tiny_vocab();
  std::vector<std::int32_t> types(v.types.begin(), v.types.end());
  test::GgufWriter w;
  w.str("tokenizer.ggml.model", "gpt2").str("tokenizer.ggml.pre", "smollm").strings("tokenizer.ggml.tokens", v.tokens)
      .strings("tokenizer.ggml.merges", v.merges).i32s("tokenizer.ggml.token_type", types)
      .u32("tokenizer.ggml.bos_token_id", 1).u8("tokenizer.ggml.eos_token_id", 0);
  const GgufFile f(w.bytes(), "tok.gguf");
  const Tokenizer t = Tokenizer::from_gguf(f);
  EXPECT_EQ(t.vocab_size(), static_cast<std::int32_t>(v.tokens.size()));
  EXPECT_EQ(t.bos(), 1);
  EXPECT_EQ(t.eos(), 0);
  EXPECT_EQ(t.encode("abc 12"), (std::vector<std::int32_t>{v.id("abc"), v.id("Ġ"), v.id("1"), v.id("2")}));

  test::GgufWriter sp;
  sp.str("tokenizer.ggml.model", "llama");
  EXPECT_THROW(Tokenizer::from_gguf(GgufFile(sp.bytes(), "sp.gguf")), TokenizerError);
  test::GgufWriter missing;
  missing.str("tokenizer.ggml.model", "gpt2");
  EXPECT_THROW(Tokenizer::from_gguf(GgufFile(missing.bytes(), "missing.gguf")), GgufMissingKey);
}

}  // namespace
}  // namespace spectralkv::llama
