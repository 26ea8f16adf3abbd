"""A faster SwiGLU for MLX's CPU backend on x86-64, swapped in while this package runs a model.

The Linux x86-64 ``mlx[cpu]`` wheel evaluates ``exp`` one float at a time, with each step of its
polynomial a call into libm's ``fmaf``: about 9 ns per element for ``exp`` and 14 ns for
``sigmoid``, against about 3 ns for ``power``, which goes through libm's ``powf``. The SiLU inside
a SwiGLU MLP is the largest ``exp`` consumer of a training pass (a sigmoid over the MLP's width
for every token, in the forward, reference and backward passes). On that backend this module
swaps mlx-lm's ``swiglu`` for the same function written with ``power``,
``gate / (1 + e^-gate) * x``, equal to ``silu(gate) * x`` to float32 rounding, gradients
included. It cut the bench's 1 x 4 x 64 training pass by about an eighth (docs/performance.md).

The swap holds only while ``fast_activations(model)`` is open (the rollout and every
log-probability pass open it), only for float32, only in the mlx-lm module that defines the
model, and only when that module uses mlx-lm's own ``swiglu``. ``MLX_REASONER_FAST_EXP=0`` turns
it off; ``config.json`` and the bench record the choice under ``versions.swiglu``. macOS
(Accelerate's vectorised ``exp``), GPUs and ARM CPUs are left alone.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import sys
from collections.abc import Iterator
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from .blas import OFF_VALUES

ENV_SWITCH = "MLX_REASONER_FAST_EXP"


def fast_activations_apply() -> bool:
    """Whether the swap applies here: MLX computing on an x86-64 CPU, not switched off."""
    return (
        os.environ.get(ENV_SWITCH, "").strip().lower() not in OFF_VALUES
        and platform.machine().lower() in ("x86_64", "amd64")
        and mx.default_device() == mx.cpu
    )


@partial(mx.compile, shapeless=True)
def swiglu_via_power(gate: mx.array, x: mx.array) -> mx.array:
    """``silu(gate) * x`` with the sigmoid's exponential computed by ``power`` (float32)."""
    if gate.dtype != mx.float32:  # decided when traced; half precision keeps mlx's own
        return nn.silu(gate) * x
    # e^-gate is capped at e^40 so that (1 + e^-gate)^2 in the gradient stays finite; below
    # gate = -40 the sigmoid is under 5e-18 either way.
    return gate / (1.0 + mx.power(math.e, mx.minimum(-gate, 40.0))) * x


def _model_module(model):
    return sys.modules.get(type(model).__module__)


@contextlib.contextmanager
def fast_activations(model) -> Iterator[None]:
    """Run ``model`` with ``swiglu_via_power`` in place of mlx-lm's ``swiglu`` (see above)."""
    from mlx_lm.models.activations import swiglu

    module = _model_module(model)
    if (
        module is None
        or getattr(module, "swiglu", None) is not swiglu
        or not fast_activations_apply()
    ):
        yield  # not applicable, or already swapped by an enclosing call
        return
    module.swiglu = swiglu_via_power
    try:
        yield
    finally:
        module.swiglu = swiglu
