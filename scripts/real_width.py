"""Shared set-up of the training-pass scripts: a LoRA model at the Qwen2.5-0.5B width and a
GRPO micro-batch of one prompt with its group of completions (random tokens).

Imported by the scripts beside it (``python scripts/NAME.py`` puts this folder on the path).
It imports ``mlx_reasoner`` before mlx, so the scripts measure the fast BLAS.
"""

from mlx_reasoner import backend  # noqa: I001

backend.start()  # first: the fast BLAS must load before anything imports mlx
import mlx.core as mx
import numpy as np
from mlx_lm.models import qwen2

from mlx_reasoner.logprobs import PackedBatch, pack_groups
from mlx_reasoner.model import attach_lora, lora_config
from mlx_reasoner.showcase.shapes import model_args


def lora_model(num_layers: int, rank: int = 8) -> qwen2.Model:
    """Random weights in the 0.5B shape cut to ``num_layers`` blocks, LoRA on every block."""
    mx.random.seed(0)
    model = qwen2.Model(model_args("0.5B", num_layers))
    attach_lora(model, lora_config(-1, rank))
    mx.eval(model.parameters())
    return model


def grpo_batch(
    prompt_tokens: int, rows: int = 8, completion_tokens: int = 256
) -> tuple[PackedBatch, mx.array]:
    """One prompt and ``rows`` completions in the shared-prompt layout, and the per-token
    weights (advantage where the mask is on) that stand in for the GRPO loss."""
    rng = np.random.default_rng(0)
    batch = pack_groups(
        [[int(t) for t in rng.integers(0, 1000, prompt_tokens)]],
        [0] * rows,
        [[int(t) for t in rng.integers(0, 1000, completion_tokens)] for _ in range(rows)],
        rng.normal(size=rows),
    )
    return batch, batch.mask * batch.advantages[:, None]
