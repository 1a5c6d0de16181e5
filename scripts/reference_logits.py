#!/usr/bin/env python3
"""Independent FP64 oracle for the dense forward pass of examples/llama (spectralkv_llama).

Reads the GGUF file with its own parser (NumPy only), dequantises F32/F16/Q8_0/Q4_0/Q4_1, tokenises a
fixed prompt with its own byte-level BPE (vocabulary and merges from the file; character classes from
unicodedata), runs the Llama forward pass in float64 and writes, per position, the top-k logits and
the log-sum-exp, plus the token ids, to a small JSON file that the C++ regression test compares with.

It also records the FP64 dense perplexity of the first window of the development text (BOS followed by
the first --ppl-ctx − 1 tokens of data/devil.txt), with the text's token count and an FNV-1a digest of
its ids so that the test knows it holds the same text.

Usage: scripts/reference_logits.py [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]
                                   [--out tests/llama/reference_logits.json] [--top-k 5]
                                   [--text data/devil.txt] [--ppl-ctx 1024]
       scripts/reference_logits.py --tokenize FILE   (print the token count and a digest of the ids)
"""

import argparse
import hashlib
import json
import struct
import sys
import unicodedata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# A fixed prompt that exercises the tokenizer: digits (split one by one), contractions, runs of
# spaces, newlines, punctuation and non-ASCII letters and punctuation (through the byte map).
PROMPT = (
    "ABSURDITY, n.  A statement or belief manifestly inconsistent with one's own opinion.\n\n"
    "ACADEME, n.  An ancient school where morality and philosophy were taught. "
    "It's said that in 1881 the café's “cynic” owner—Mr. Bierce—wrote 3,000 definitions;"
    " they'll last   forever."
)

# --------------------------------------------------------------------------------------------------
# GGUF

VALUE_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
# ggml type -> (name, elements per block, bytes per block)
TENSOR_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 8: ("Q8_0", 32, 34)}


class Gguf:
    def __init__(self, path):
        self.buf = Path(path).read_bytes()
        self.pos = 0
        if self.buf[:4] != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        self.pos = 4
        version, n_tensors, n_kv = self._read("<I"), self._read("<Q"), self._read("<Q")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version}")
        self.meta = {}
        for _ in range(n_kv):
            key = self._string()
            self.meta[key] = self._value(self._read("<I"))
        self.tensors = {}
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._read("<Q") for _ in range(self._read("<I"))]
            ttype, offset = self._read("<I"), self._read("<Q")
            self.tensors[name] = (dims, ttype, offset)
        align = int(self.meta.get("general.alignment", 32))
        self.data = (self.pos + align - 1) // align * align

    def _read(self, fmt):
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def _string(self):
        n = self._read("<Q")
        s = self.buf[self.pos:self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def _value(self, vtype):
        if vtype in VALUE_FORMATS:
            return self._read(VALUE_FORMATS[vtype])
        if vtype == 8:
            return self._string()
        if vtype == 9:
            etype, count = self._read("<I"), self._read("<Q")
            return [self._value(etype) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype}")

    def tensor(self, name):
        """Dequantised tensor as float64, shape (ne[-1], ..., ne[0]) (row-major, ne[0] fastest)."""
        dims, ttype, offset = self.tensors[name]
        tname, block, block_bytes = TENSOR_TYPES[ttype]
        n = int(np.prod(dims))
        start = self.data + offset
        raw = np.frombuffer(self.buf, dtype=np.uint8, count=n // block * block_bytes, offset=start)
        if tname == "F32":
            x = raw.view("<f4").astype(np.float64)
        elif tname == "F16":
            x = raw.view("<f2").astype(np.float64)
        else:
            b = raw.reshape(-1, block_bytes)
            d = b[:, 0:2].copy().view("<f2").astype(np.float64)  # (blocks, 1)
            if tname == "Q8_0":
                x = d * b[:, 2:].view(np.int8).astype(np.float64)
            else:
                q = b[:, 4:] if tname == "Q4_1" else b[:, 2:]
                nib = np.concatenate([q & 0x0F, q >> 4], axis=1).astype(np.float64)  # low nibbles first
                if tname == "Q4_1":
                    m = b[:, 2:4].copy().view("<f2").astype(np.float64)
                    x = d * nib + m
                else:
                    x = d * (nib - 8.0)
            x = x.reshape(-1)
        return x.reshape(list(reversed(dims)))


# --------------------------------------------------------------------------------------------------
# Tokenizer (byte-level BPE; pre-tokeniser "smollm": digits isolated, then the GPT-2 pattern)


def bytes_to_unicode():
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def char_class(ch):
    if ch.isspace():
        return "S"
    cat = unicodedata.category(ch)
    return "L" if cat.startswith("L") else "N" if cat.startswith("N") else "O"


def gpt2_split(s):
    """'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+"""
    out, i, n = [], 0, len(s)
    cls = [char_class(c) for c in s]
    while i < n:
        if s[i] == "'":
            for c in ("re", "ve", "ll", "s", "t", "m", "d"):
                if s.startswith(c, i + 1):
                    out.append(s[i:i + 1 + len(c)])
                    i += 1 + len(c)
                    break
            else:
                c = None
            if c is not None:
                continue
        j = i + 1 if (s[i] == " " and i + 1 < n and cls[i + 1] != "S") else i
        if cls[j] != "S":
            k = j
            while k < n and cls[k] == cls[j]:
                k += 1
            out.append(s[i:k])
            i = k
            continue
        k = i
        while k < n and cls[k] == "S":
            k += 1
        if k < n and k - i > 1:
            k -= 1  # leave one space to prefix the next word
        out.append(s[i:k])
        i = k
    return out


class Bpe:
    def __init__(self, gguf):
        self.vocab = {t: i for i, t in enumerate(gguf.meta["tokenizer.ggml.tokens"])}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(gguf.meta["tokenizer.ggml.merges"])}
        self.byte_map = bytes_to_unicode()
        self.cache = {}
        assert gguf.meta["tokenizer.ggml.pre"] == "smollm"

    def pieces(self, text):
        out, seg = [], ""
        for ch in text:
            if unicodedata.category(ch).startswith("N"):
                out += gpt2_split(seg) + [ch]
                seg = ""
            else:
                seg += ch
        return out + gpt2_split(seg)

    def word(self, piece):
        if piece in self.cache:
            return self.cache[piece]
        sym = [self.byte_map[b] for b in piece.encode("utf-8")]
        while len(sym) > 1:
            pairs = [(self.ranks.get((a, b), None), i) for i, (a, b) in enumerate(zip(sym, sym[1:]))]
            pairs = [p for p in pairs if p[0] is not None]
            if not pairs:
                break
            rank, _ = min(pairs)
            a, b = next((x, y) for x, y in zip(sym, sym[1:]) if self.ranks.get((x, y)) == rank)
            merged, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and sym[i] == a and sym[i + 1] == b:
                    merged.append(a + b)
                    i += 2
                else:
                    merged.append(sym[i])
                    i += 1
            sym = merged
        ids = [self.vocab[s] for s in sym]
        self.cache[piece] = ids
        return ids

    def encode(self, text):
        return [i for p in self.pieces(text) for i in self.word(p)]


# --------------------------------------------------------------------------------------------------
# Forward pass, float64


def forward(g, tokens):
    m = g.meta
    n_layers, n_heads = m["llama.block_count"], m["llama.attention.head_count"]
    n_kv, eps, theta = m["llama.attention.head_count_kv"], m["llama.attention.layer_norm_rms_epsilon"], m["llama.rope.freq_base"]
    emb = g.tensor("token_embd.weight")  # (vocab, d)
    d = emb.shape[1]
    hd = d // n_heads
    n = len(tokens)
    pos = np.arange(n, dtype=np.float64)[:, None]
    ang = pos * theta ** (-2.0 * np.arange(hd // 2) / hd)  # (n, hd/2)
    cos, sin = np.cos(ang), np.sin(ang)

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def rope(x):  # x: (n, heads, hd), rotate adjacent pairs (2i, 2i+1)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos[:, None, :] - b * sin[:, None, :]
        out[..., 1::2] = a * sin[:, None, :] + b * cos[:, None, :]
        return out

    x = emb[np.array(tokens)]
    mask = np.triu(np.full((n, n), -np.inf), k=1)
    for l in range(n_layers):
        t = lambda name: g.tensor(f"blk.{l}.{name}.weight")  # noqa: E731
        h = rms(x, t("attn_norm"))
        q = rope((h @ t("attn_q").T).reshape(n, n_heads, hd))
        k = rope((h @ t("attn_k").T).reshape(n, n_kv, hd))
        v = (h @ t("attn_v").T).reshape(n, n_kv, hd)
        group = n_heads // n_kv
        att = np.empty((n, n_heads, hd))
        for hh in range(n_heads):
            s = q[:, hh] @ k[:, hh // group].T / np.sqrt(hd) + mask
            p = np.exp(s - s.max(axis=1, keepdims=True))
            att[:, hh] = (p / p.sum(axis=1, keepdims=True)) @ v[:, hh // group]
        x = x + att.reshape(n, d) @ t("attn_output").T
        h = rms(x, t("ffn_norm"))
        gate, up = h @ t("ffn_gate").T, h @ t("ffn_up").T
        x = x + (gate / (1.0 + np.exp(-gate)) * up) @ t("ffn_down").T
    head = g.tensor("output.weight") if "output.weight" in g.tensors else emb
    return rms(x, g.tensor("output_norm.weight")) @ head.T


def fnv1a64(ids):
    """FNV-1a (64-bit) over the ids as little-endian int32 bytes."""
    h = 0xCBF29CE484222325
    for byte in np.array(ids, dtype="<i4").tobytes():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def log_softmax_at(logits, targets):
    mx = logits.max(axis=1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(logits - mx).sum(axis=1))
    return logits[np.arange(len(targets)), targets] - lse


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default=str(ROOT / "tests" / "llama" / "reference_logits.json"))
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--text", default=str(ROOT / "data" / "devil.txt"))
    ap.add_argument("--ppl-ctx", type=int, default=1024)
    ap.add_argument("--tokenize", metavar="FILE", help="only tokenise FILE and print count and sha256 of the ids")
    args = ap.parse_args()

    g = Gguf(args.model)
    bpe = Bpe(g)
    if args.tokenize:
        ids = bpe.encode(Path(args.tokenize).read_text(encoding="utf-8"))
        digest = hashlib.sha256(np.array(ids, dtype="<i4").tobytes()).hexdigest()
        print(f"{len(ids)} tokens, sha256 of int32 ids {digest}, first {ids[:16]}")
        return 0

    bos = int(g.meta["tokenizer.ggml.bos_token_id"])
    tokens = [bos] + bpe.encode(PROMPT)
    logits = forward(g, tokens)
    top = np.argsort(-logits, axis=1)[:, : args.top_k]
    mx = logits.max(axis=1, keepdims=True)
    lse = (mx[:, 0] + np.log(np.exp(logits - mx).sum(axis=1)))
    result = {
        "model_sha256": hashlib.sha256(g.buf).hexdigest(),
        "prompt": PROMPT,
        "bos": bos,
        "tokens": tokens,
        "top_k": args.top_k,
        "positions": [
            {"ids": top[i].tolist(), "logits": [round(float(logits[i, j]), 6) for j in top[i]],
             "logsumexp": round(float(lse[i]), 6)}
            for i in range(len(tokens))
        ],
    }
    text = Path(args.text)
    if text.exists():
        ids = bpe.encode(text.read_text(encoding="utf-8"))
        window = [bos] + ids[: args.ppl_ctx - 1]
        nll = -log_softmax_at(forward(g, window)[:-1], np.array(window[1:]))
        result["perplexity"] = {
            "text": text.name, "text_tokens": len(ids), "text_fnv1a64": fnv1a64(ids), "context": args.ppl_ctx,
            "bos": bos, "scored": len(nll), "value": round(float(np.exp(nll.mean())), 6),
        }
        print(f"FP64 dense perplexity of {text.name}, first window of {args.ppl_ctx}: {np.exp(nll.mean()):.6f}")
    else:
        print(f"{text} not found: no perplexity reference (run scripts/fetch_text.sh)")
    Path(args.out).write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{args.out}: {len(tokens)} positions, top-{args.top_k}; greedy next tokens "
          f"{[int(top[i, 0]) for i in range(len(tokens))][-5:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
