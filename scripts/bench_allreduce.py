"""What a data-parallel step sends between ranks at the 3B default: the LoRA gradients (rank 8
on every linear layer of the top 16 of Qwen2.5-3B's 36 blocks) summed over the ranks, timed, and
the size of one rank's rollouts at the default 2 x 8 x 512.

Usage: mlx.launch -n 2 --backend ring -- python scripts/bench_allreduce.py
(or --hostfile hosts.json across machines).
"""

from mlx_reasoner import backend

backend.start()  # noqa: E402, I001  (first: loads the fast BLAS before anything imports mlx)

import json
import time

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import qwen2

from mlx_reasoner.distributed import current_world
from mlx_reasoner.model import attach_lora, lora_config
from mlx_reasoner.showcase.shapes import model_args

world = current_world()
model = qwen2.Model(model_args("3B"))  # lazy: the base weights are never allocated
attach_lora(model, lora_config(None, 8))
grads = tree_map(lambda p: mx.random.normal(p.shape), model.trainable_parameters())
mx.eval(grads)
flat = tree_flatten(grads)
times = []
for _ in range(6):
    world.gather(None, "lining up")
    start = time.perf_counter()
    world.sum_gradients(grads)
    times.append(time.perf_counter() - start)

completions, tokens, prompt_tokens = 8, 512, 150  # one rank's share: 1 prompt x 8 at 512 tokens
share = {
    "prompt_ids": [[151644] * prompt_tokens] * completions,
    "completion_ids": [[12345] * tokens] * completions,
    "finish_reasons": ["length"] * completions,
    "texts": ["x" * 4 * tokens] * completions,
    "logprobs": [[-1.2345678806304932] * tokens] * completions,
    "prompt_tokens": prompt_tokens,
    "seconds": 60.0,
    "total": [0.5] * completions,
    "components": {f"reward{i}": [0.1] * completions for i in range(5)},
}
if world.is_main:
    print(
        f"{world.size} ranks; {sum(v.size for _, v in flat):,} LoRA parameters in {len(flat)} "
        f"arrays, {sum(v.nbytes for _, v in flat):,} bytes of float32 gradient per update"
    )
    print("all-reduce seconds (the first warms up):", " ".join(f"{t:.3f}" for t in times))
    print(f"one rank's rollouts at the default step: {len(json.dumps(share)):,} bytes of JSON")
