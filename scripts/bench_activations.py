"""A LoRA training pass of completion_logprobs with MLX_REASONER_FAST_EXP on and off, in turns.

Usage: python scripts/bench_activations.py real|toy ROUNDS
"""

from mlx_reasoner import backend  # noqa: I001

backend.start()  # first: the fast BLAS must load before anything imports mlx

import os
import sys
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import qwen2

from mlx_reasoner.logprobs import completion_logprobs, pack_groups
from mlx_reasoner.model import attach_lora, lora_config

shape = sys.argv[1]
if shape == "real":  # 0.5B width, 2 blocks, small vocab so the blocks dominate
    a = dict(
        hidden_size=896,
        num_hidden_layers=2,
        intermediate_size=4864,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=1024,
    )
    rows, plen, clen = 8, 100, 256
else:  # the bench model
    a = dict(
        hidden_size=256,
        num_hidden_layers=4,
        intermediate_size=640,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    )
    rows, plen, clen = 4, 113, 64
mx.random.seed(0)
m = qwen2.Model(
    qwen2.ModelArgs(
        model_type="qwen2", rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1e6, **a
    )
)
attach_lora(m, lora_config(-1, 8))
mx.eval(m.parameters())
rng = np.random.default_rng(0)
prompt = rng.integers(0, a["vocab_size"], plen).tolist()
comps = [rng.integers(0, a["vocab_size"], clen).tolist() for _ in range(rows)]
batch = pack_groups([prompt], [0] * rows, comps, rng.normal(size=rows))
w = batch.mask * batch.advantages[:, None]
vg = nn.value_and_grad(m, lambda model: (completion_logprobs(model, batch) * w).sum())


def once():
    t = time.perf_counter()
    v, g = vg(m)
    mx.eval(v, g)
    return time.perf_counter() - t


res = {"1": [], "0": []}
for r in range(int(sys.argv[2])):
    for setting in ("1", "0"):
        os.environ["MLX_REASONER_FAST_EXP"] = setting
        once() if r == 0 else None
        res[setting].append(once())
on, off = np.median(res["1"]), np.median(res["0"])
print(
    f"{shape}: fast exp on {on*1e3:.0f} ms, off {off*1e3:.0f} ms, on/off {on/off:.2f};",
    "per-round ratios",
    [round(x / y, 2) for x, y in zip(res["1"], res["0"])],
)
