"""Peak memory and time of a 0.5B-width block's LoRA gradient through completion_logprobs at the
real vocabulary, per chunk size.

Usage: python scripts/bench_logits_chunk.py CHUNK [CHUNK ...]
"""

import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import qwen2

from mlx_reasoner.loss import completion_logprobs, pack_groups
from mlx_reasoner.model import attach_lora, lora_config

mx.random.seed(0)
m = qwen2.Model(
    qwen2.ModelArgs(
        model_type="qwen2",
        hidden_size=896,
        num_hidden_layers=1,
        intermediate_size=4864,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
)
attach_lora(m, lora_config(-1, 8))
mx.eval(m.parameters())
rng = np.random.default_rng(0)
rows = 8
batch = pack_groups(
    [[int(t) for t in rng.integers(0, 1000, 110)]],
    [0] * rows,
    [[int(t) for t in rng.integers(0, 1000, 256)] for _ in range(rows)],
    rng.normal(size=rows),
)
w = batch.mask * batch.advantages[:, None]
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
