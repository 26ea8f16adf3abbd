"""Exp-free SwiGLU and attention for MLX's CPU backend on x86-64, swapped in while we run a model.

The Linux x86-64 ``mlx[cpu]`` wheel evaluates ``exp`` one float at a time, with each step of its
polynomial a call into libm's ``fmaf``: about 9 ns per element for ``exp`` and ``softmax`` and
14 ns for ``sigmoid``, against about 3 ns for ``power``, which goes through libm's ``powf``. The
sigmoid inside a SwiGLU MLP and the softmax inside attention are where a training pass spends
those: one per MLP unit and one per attended key, for every token, in the forward, reference and
backward passes. On that backend this module swaps two of mlx-lm's functions for the same
functions written with ``power``:

- ``swiglu``: ``gate * x / (1 + e^-gate)``, equal to ``silu(gate) * x`` to float32 rounding,
  gradients included;
- ``scaled_dot_product_attention``: scores, mask, a max-shifted softmax from ``power``, values,
  equal to ``mx.fast.scaled_dot_product_attention`` to float32 rounding.

Both have hand-written gradients that keep no more than mlx-lm's functions do (the sigmoid is
recomputed from the gate; the softmax's gradient needs only its output), so peak memory does not
grow. Together they cut the bench's training pass by about a fifth (docs/performance.md).
The swap holds only while ``fast_activations(model)`` is open (the rollout and every
log-probability pass open it), only for float32, only in the mlx-lm module that defines the
model, and only for names that module takes from mlx-lm. ``MLX_REASONER_FAST_EXP=0`` turns it
off; ``config.json`` and the bench record the choice under ``versions.activations``. macOS
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

from .blas import OFF_VALUES

ENV_SWITCH = "MLX_REASONER_FAST_EXP"


def fast_activations_apply() -> bool:
    """Whether the swap applies here: MLX computing on an x86-64 CPU, not switched off."""
    return (
        os.environ.get(ENV_SWITCH, "").strip().lower() not in OFF_VALUES
        and platform.machine().lower() in ("x86_64", "amd64")
        and mx.default_device() == mx.cpu
    )


def _sigmoid(x: mx.array) -> mx.array:
    return 1.0 / (1.0 + mx.power(math.e, -x))  # e^-x = inf gives 0, as it should


@mx.custom_function
@partial(mx.compile, shapeless=True)
def _swiglu_float32(gate: mx.array, x: mx.array) -> mx.array:
    return gate * _sigmoid(gate) * x


@_swiglu_float32.vjp
def _swiglu_float32_vjp(primals, cotangent, output):
    # The sigmoid is recomputed from the gate, so the backward pass keeps nothing but the
    # inputs (which the projections' own gradients keep anyway).
    gate, x = primals
    sigmoid = _sigmoid(gate)
    slope = sigmoid * (1.0 + gate * (1.0 - sigmoid))  # d silu / d gate
    return cotangent * x * slope, cotangent * gate * sigmoid


def swiglu_via_power(gate: mx.array, x: mx.array) -> mx.array:
    """``silu(gate) * x`` with the sigmoid's exponential computed by ``power`` (float32)."""
    if gate.dtype != mx.float32:  # half precision keeps mlx-lm's own
        from mlx_lm.models.activations import swiglu

        return swiglu(gate, x)
    return _swiglu_float32(gate, x)


def attention_via_power(queries, keys, values, cache, scale, mask, sinks=None):
    """mlx-lm's ``scaled_dot_product_attention`` with the softmax's exponential from ``power``.

    Float32, with no attention sinks and no quantized cache; anything else, and masks of a
    shape other than ``[L, S]`` or ``[B, 1 or heads, L, S]``, goes to mlx-lm's own function.
    """
    from mlx_lm.models.base import scaled_dot_product_attention

    if (
        queries.dtype != mx.float32
        or sinks is not None
        or hasattr(cache, "bits")
        or (isinstance(mask, mx.array) and mask.ndim not in (2, 4))
    ):
        return scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks)
    batch, heads, length, _ = queries.shape
    kv_heads, width = keys.shape[1], keys.shape[2]
    repeats = heads // kv_heads
    # Query heads that share a key/value head are one axis: [B, kv heads, repeats, L, D].
    grouped = (queries * scale).reshape(batch, kv_heads, repeats, length, -1)
    scores = grouped @ mx.expand_dims(keys, 2).swapaxes(-1, -2)  # [B, kv, rep, L, S]
    if isinstance(mask, str):  # "causal": the last L of S positions, each sees its past
        mask = mx.arange(width - length, width)[:, None] >= mx.arange(width)[None]
    if mask is not None:
        if mask.ndim == 4:
            mask = (
                mx.expand_dims(mask, 2)
                if mask.shape[1] == 1
                else mask.reshape(mask.shape[0], kv_heads, repeats, *mask.shape[2:])
            )
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    weights = softmax_via_power(scores)
    return (weights @ mx.expand_dims(values, 2)).reshape(batch, heads, length, -1)


@mx.custom_function
def softmax_via_power(x: mx.array) -> mx.array:
    """Softmax over the last axis, from ``power``; its gradient needs only its output (as
    ``mx.softmax``'s does), so the backward pass keeps one array per attention, not three."""
    weights = mx.power(math.e, x - mx.max(x, axis=-1, keepdims=True))
    return weights / mx.sum(weights, axis=-1, keepdims=True)


@softmax_via_power.vjp
def _softmax_via_power_vjp(primals, cotangent, output):
    return output * (cotangent - mx.sum(cotangent * output, axis=-1, keepdims=True))


def _swaps() -> dict[str, tuple[object, object]]:
    """Module attribute -> (mlx-lm's function, the replacement)."""
    from mlx_lm.models.activations import swiglu
    from mlx_lm.models.base import scaled_dot_product_attention

    return {
        "swiglu": (swiglu, swiglu_via_power),
        "scaled_dot_product_attention": (scaled_dot_product_attention, attention_via_power),
    }


def _model_module(model):
    return sys.modules.get(type(model).__module__)


@contextlib.contextmanager
def fast_activations(model) -> Iterator[None]:
    """Run ``model`` with the functions above in place of mlx-lm's (see the module's text).

    Each name is swapped only where the model's module holds mlx-lm's own function, so an
    enclosing call's swap, or a model's own variant, is left as it is.
    """
    module = _model_module(model)
    swapped = {}
    if module is not None and fast_activations_apply():
        for name, (original, replacement) in _swaps().items():
            if getattr(module, name, None) is original:
                setattr(module, name, replacement)
                swapped[name] = original
    try:
        yield
    finally:
        for name, original in swapped.items():
            setattr(module, name, original)
