"""LoRA gradient of completion_logprobs, compiled and not, at the 0.5B width (real vocabulary).

Usage: python scripts/bench_compile.py BLOCKS compiled plain [...]
"""

import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import qwen2

from mlx_reasoner.loss import completion_logprobs, pack_groups
from mlx_reasoner.model import attach_lora, lora_config

layers = int(sys.argv[1])
mx.random.seed(0)
m = qwen2.Model(
    qwen2.ModelArgs(
        model_type="qwen2",
        hidden_size=896,
        num_hidden_layers=layers,
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
vg = nn.value_and_grad(m, lambda model: (completion_logprobs(model, batch) * w).sum())
state = [m.state]
fns = {"compiled": mx.compile(lambda: vg(m), inputs=state, outputs=state), "plain": lambda: vg(m)}
for name in sys.argv[2:]:
    f = fns[name]
    mx.eval(f())
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    t = time.perf_counter()
    mx.eval(f())
    dt = time.perf_counter() - t
    print(
        f"{layers} blocks, {name}: +{(mx.get_peak_memory()-base)/1e9:.2f} GB",
        f"over {base/1e9:.2f} GB, {dt:.1f} s",
        flush=True,
    )
