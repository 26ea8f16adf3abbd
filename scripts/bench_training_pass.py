"""LoRA gradient of completion_logprobs at the Qwen2.5-0.5B width with N blocks: time and peak.

Usage: python scripts/bench_training_pass.py BLOCKS   (8 completions of 256 tokens, 72-token prompt)
"""

import resource
import sys
import time

import mlx_reasoner  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import qwen2

from mlx_reasoner.loss import completion_logprobs, pack_groups
from mlx_reasoner.model import attach_lora, lora_config

blocks = int(sys.argv[1])
mx.random.seed(0)
model = qwen2.Model(
    qwen2.ModelArgs(
        model_type="qwen2",
        hidden_size=896,
        num_hidden_layers=blocks,
        intermediate_size=4864,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
)
model.freeze()
attach_lora(model, lora_config(-1, 8))
mx.eval(model.parameters())
rng = np.random.default_rng(0)
rows = 8
batch = pack_groups(
    [[int(t) for t in rng.integers(0, 1000, 72)]],
    [0] * rows,
    [[int(t) for t in rng.integers(0, 1000, 256)] for _ in range(rows)],
    rng.normal(size=rows),
)
weights = batch.mask * batch.advantages[:, None]
gradient = nn.value_and_grad(model, lambda m: (completion_logprobs(m, batch) * weights).sum())
mx.eval(gradient(model))  # warm-up
mx.reset_peak_memory()
base = mx.get_active_memory()
start = time.perf_counter()
mx.eval(gradient(model))
seconds = time.perf_counter() - start
print(
    f"{blocks} blocks: {seconds:.1f} s, peak +{(mx.get_peak_memory() - base) / 1e9:.2f} GB over "
    f"{base / 1e9:.2f} GB, max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB"
)
