"""Time the pieces of one vocabulary-projection chunk at Qwen2.5's vocabulary (float32, one stream).

Usage: python scripts/probe_head_chunk.py [ROWS] [POSITIONS]   (default 4 32)
"""

from mlx_reasoner import backend  # noqa: I001

backend.start()  # first: the fast BLAS must load before anything imports mlx

import sys
import time

import mlx.core as mx

rows, positions = (int(a) for a in (sys.argv[1:3] or (4, 32)))
vocab, hidden = 151936, 896
weight = mx.random.normal((vocab, hidden)) * 0.02  # [V, H], the tied head
states = mx.random.normal((rows, positions, hidden))  # [B, c, H]
mx.eval(weight, states)
logits = states @ weight.T  # [B, c, V]
mx.eval(logits)


def best(name, fn, repeats=3):
    mx.eval(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - start)
    per = min(times) / logits.size * 1e9
    print(f"{name:>12}: {min(times) * 1e3:7.1f} ms  ({per:.2f} ns per logit)", flush=True)


print(f"[{rows}, {positions}, {vocab}] float32, {mx.default_device()}")
best("product", lambda: states @ weight.T)
best("exp", lambda: mx.exp(logits))
best("logsumexp", lambda: mx.logsumexp(logits, axis=-1))
best("max", lambda: logits.max(axis=-1))
best("sum", lambda: logits.sum(axis=-1))
