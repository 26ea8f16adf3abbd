"""LoRA gradient of completion_logprobs, compiled and not, at the 0.5B width (real vocabulary).

Usage: python scripts/bench_compile.py BLOCKS compiled plain [...]
"""

from real_width import grpo_batch, lora_model  # noqa: I001  (first: fast BLAS before mlx)

import sys
import time

import mlx.core as mx
import mlx.nn as nn

from mlx_reasoner.logprobs import completion_logprobs

layers = int(sys.argv[1])
m = lora_model(layers)
batch, w = grpo_batch(110)
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
