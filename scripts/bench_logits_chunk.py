"""Peak memory and time of a 0.5B-width block's LoRA gradient through completion_logprobs at the
real vocabulary, per chunk size.

Usage: python scripts/bench_logits_chunk.py CHUNK [CHUNK ...]
"""

from real_width import grpo_batch, lora_model  # noqa: I001  (first: fast BLAS before mlx)

import sys
import time

import mlx.core as mx
import mlx.nn as nn

from mlx_reasoner.logprobs import completion_logprobs

m = lora_model(1)
batch, w = grpo_batch(110)
for chunk in [int(c) for c in sys.argv[1:]]:
    vg = nn.value_and_grad(
        m, lambda model, c=chunk: (completion_logprobs(model, batch, chunk_size=c) * w).sum()
    )
    mx.eval(vg(m))
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t = time.perf_counter()
    mx.eval(vg(m))
    dt = time.perf_counter() - t
    print(
        f"chunk {chunk}: +{(mx.get_peak_memory()-base)/1e9:.2f} GB",
        f"over {base/1e9:.2f} GB, {dt:.1f} s",
        flush=True,
    )
