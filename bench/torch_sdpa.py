#!/usr/bin/env python3
"""Times torch.nn.functional.scaled_dot_product_attention on the decode shapes of bench_decode.

One query token per sequence, GQA 32 query / 8 KV heads, head_dim 128, FP16, enable_gqa=True.
For each (B, T): 5 warm-up calls, then 30 timed calls, each preceded by a read of a 512 MB buffer that
evicts the L2 (and keeps the GPU busy while the host enqueues the call, so Python overhead stays outside
the events); CUDA events around the call; the median is reported. Bytes = K + V + q + out.
--flush write fills the buffer instead (the L2 is then left full of dirty lines, whose write-back the
timed call pays for), as bench_decode does with SPECTRALKV_FLUSH=write.

Usage: torch_sdpa.py --out FILE.json [--flush read|write]
"""

import argparse
import datetime
import json
import statistics

import torch
import torch.nn.functional as F

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
BATCHES = (1, 8, 32)
LENGTHS = (4096, 16384, 65536, 131072)
WARMUP, REPEATS = 5, 30
FLUSH_BYTES = 512 << 20


def time_shape(batch, length, flush, write_flush):
    gen = torch.Generator(device="cuda").manual_seed(batch * 1000003 + length)
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.float16, generator=gen)
    k = torch.randn(batch, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.float16, generator=gen)
    v = torch.randn(batch, KV_HEADS, length, HEAD_DIM, device="cuda", dtype=torch.float16, generator=gen)
    for _ in range(WARMUP):
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    start = torch.cuda.Event(enable_timing=True)
    stop = torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(REPEATS):
        if write_flush:
            flush.fill_(i & 0xFF)
        else:
            flush.sum(dtype=torch.int64)
        start.record()
        F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
    median_us = statistics.median(times)
    nbytes = 2 * k.numel() * k.element_size() + 2 * q.numel() * q.element_size()
    del q, k, v
    torch.cuda.empty_cache()
    return {
        "B": batch,
        "T": length,
        "median_us": median_us,
        "min_us": min(times),
        "max_us": max(times),
        "bytes": nbytes,
        "GBps": nbytes / (median_us * 1e-6) / 1e9,
        "repeats": REPEATS,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--flush", choices=("read", "write"), default="read")
    args = parser.parse_args()
    flush = torch.ones(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    rows = []
    for batch in BATCHES:
        for length in LENGTHS:
            row = time_shape(batch, length, flush, args.flush == "write")
            rows.append(row)
            print(f"sdpa B={batch:3d} T={length:7d}: {row['median_us']:9.1f} us  {row['GBps']:7.0f} GB/s", flush=True)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "method": "scaled_dot_product_attention(enable_gqa=True), fp16, median of 30 after 5 warm-up, L2 flushed "
        f"by a 512 MB {args.flush}",
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
