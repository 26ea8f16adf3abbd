"""mlx-lm's LoRA layer on 2-D rows with one ``mx.addmm``: fewer graph nodes at a decode step."""

import contextlib

import mlx.core as mx
import mlx.nn as nn

from ..model import modules_replaced


class AddmmLoRA(nn.Module):
    """A LoRA layer's forward on 2-D rows, its low-rank term added by one ``mx.addmm``.

    mlx-lm's ``LoRALinear`` computes ``linear(x) + scale * ((x A) B)`` on ``[B, L, D]`` inputs;
    every matmul of a 3-D input by a 2-D weight adds a flatten and an unflatten to the graph,
    and the scaled add is a node of its own. At a decode step (a few rows, where each node's
    fixed cost is most of its time) this does the same on the rows as one ``[B * L, D]``
    matrix, with ``addmm(linear(x), x A, B, alpha=scale)``: three nodes fewer per layer. It
    shares the wrapped layer's arrays, so adapter updates reach it. Inputs whose dtypes differ
    from the adapter's take the wrapped layer's own forward.
    """

    def __init__(self, lora: nn.Module):
        super().__init__()
        self.lora = lora

    def __call__(self, x: mx.array) -> mx.array:
        lora = self.lora
        if not (x.dtype == lora.lora_a.dtype == lora.lora_b.dtype):
            return lora(x)
        rows = x.reshape(-1, x.shape[-1])
        base = lora.linear(rows)
        if base.dtype != x.dtype:
            return lora(x)
        low_rank = lora.dropout(rows) @ lora.lora_a
        out = mx.addmm(base, low_rank, lora.lora_b, alpha=lora.scale)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def lora_as_addmm(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Run every mlx-lm ``LoRALinear`` of ``model`` as ``AddmmLoRA`` (same numbers to float
    rounding, fewer graph nodes), then put the layers back; the rollout's compiled decode
    step runs inside it."""
    from mlx_lm.tuner.lora import LoRALinear

    return modules_replaced(model, lambda m: type(m) is LoRALinear, AddmmLoRA)
