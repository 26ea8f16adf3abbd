"""LoRA gradient of completion_logprobs at the Qwen2.5-0.5B width with N blocks: time and peak.

Usage: python scripts/bench_training_pass.py BLOCKS   (8 completions of 256 tokens, 72-token prompt)
"""

from real_width import grpo_batch, lora_model  # noqa: I001  (first: fast BLAS before mlx)

import resource
import sys
import time

import mlx.core as mx
import mlx.nn as nn

from mlx_reasoner.logprobs import completion_logprobs

blocks = int(sys.argv[1])
model = lora_model(blocks)
batch, weights = grpo_batch(72)
gradient = nn.value_and_grad(model, lambda m: (completion_logprobs(m, batch) * weights).sum())
mx.eval(gradient(model))  # warm-up
mx.reset_peak_memory()
base = mx.get_active_memory()
start = time.perf_counter()
mx.eval(gradient(model))
seconds = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kilobytes on Linux
print(
    f"{blocks} blocks: {seconds:.1f} s, peak +{(mx.get_peak_memory() - base) / 1e9:.2f} GB over "
    f"{base / 1e9:.2f} GB, max RSS {rss:.2f} GB"
)
