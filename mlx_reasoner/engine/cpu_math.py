"""Faster SwiGLU and attention for MLX's x86-64 CPU backend, and RoPE shared across blocks.

The Linux ``mlx[cpu]`` wheel evaluates ``exp`` one float at a time through libm, and the
sigmoid of a SwiGLU MLP and the softmax of attention are where a training pass spends it.
While ``fast_activations(model)`` is open, those two mlx-lm functions are swapped, in the
module that defines the model, for the same functions on a faster exponential (``_exp``):

- ``exp_polynomial`` for large arrays: range reduction, a minimax polynomial and a bit cast,
  all adds and multiplies that the backend's fused kernels vectorise;
- ``power(e, x)`` for small ones (a decode step's), one fused node instead of three.

``swiglu`` and ``scaled_dot_product_attention`` agree with mlx-lm's to float32 rounding,
gradients included, and keep no more for the backward pass. The loss's log-sum-exp over the
vocabulary keeps ``mx.logsumexp`` (the polynomial lost there). Only float32, only on x86-64
CPUs; ``MLX_REASONER_FAST_EXP=0`` turns it off. ``shared_rope`` lets the compiled decode
compute each step's RoPE angles once for all blocks (bit-equal results). Figures:
docs/performance.md.
"""

from __future__ import annotations

import contextlib
import math
import platform
import sys
from collections.abc import Iterator

import mlx.core as mx
import mlx.nn as nn

from ..backend import switched_off
from ..model import modules_replaced
from .blas import blas_info

ENV_SWITCH = "MLX_REASONER_FAST_EXP"


def _on_x86_cpu() -> bool:
    """Whether MLX computes on an x86-64 CPU (where this module's swaps are measured)."""
    return platform.machine().lower() in ("x86_64", "amd64") and mx.default_device() == mx.cpu


def fast_activations_apply() -> bool:
    """Whether the swap applies here: MLX computing on an x86-64 CPU, not switched off."""
    return not switched_off(ENV_SWITCH) and _on_x86_cpu()


# Arrays of at least this many elements take ``exp_polynomial``; smaller ones (a decode step's)
# take ``power``, which is one fused node where the polynomial is three (the bit cast splits it).
POLYNOMIAL_MIN_SIZE = 16384

# e^x = 2^n e^r with n = round(x / ln 2) and r = x - n ln 2, |r| <= ln 2 / 2; ln 2 is split in
# two (the first part exact in a float32 product with n) so that r keeps its low bits.
_LOG2E = 1.4426950408889634
_LN2_HIGH = 0.693359375
_LN2_LOW = -2.12194440e-4
_ROUND = 12582912.0  # 1.5 * 2^23: adding then subtracting it rounds a float32 to an integer
# e^r ~ 1 + r + r^2 (c0 + c1 r + ... + c5 r^5): a degree-7 minimax fit on |r| <= ln 2 / 2.
_EXP_COEFFICIENTS = (
    5.0000001201e-1,
    1.6666665459e-1,
    4.1665795894e-2,
    8.3334519073e-3,
    1.3981999507e-3,
    1.9875691500e-4,
)
_EXP_LOW, _EXP_HIGH = -87.3, 88.0  # 2^n stays a normal float32: -126 <= n <= 127


@mx.compile  # one fused pass (three kernels) even where the caller is not compiled
def exp_polynomial(x: mx.array) -> mx.array:
    """``e^x`` in float32 from adds, multiplies and one bit cast (no libm call), which the CPU
    backend's fused kernels run several floats at a time. Within a few float32 roundings of
    ``mx.exp``; 0 below -87.3 (where ``exp`` reaches the subnormals), e^88 above 88, NaN kept.
    """
    clipped = mx.clip(x, _EXP_LOW, _EXP_HIGH)
    n = (clipped * _LOG2E + _ROUND) - _ROUND
    r = (clipped - n * _LN2_HIGH) - n * _LN2_LOW
    poly = _EXP_COEFFICIENTS[-1]
    for c in reversed(_EXP_COEFFICIENTS[:-1]):
        poly = poly * r + c
    poly = 1.0 + r + r * r * poly
    two_to_n = ((n.astype(mx.int32) + 127) << 23).view(mx.float32)
    return mx.where(x < _EXP_LOW, 0.0, poly * two_to_n)


def _power_exp(x: mx.array) -> mx.array:
    return mx.power(math.e, x)


def _exp(x: mx.array) -> mx.array:
    """The faster exponential for an array of this size (see ``POLYNOMIAL_MIN_SIZE``)."""
    return exp_polynomial(x) if x.size >= POLYNOMIAL_MIN_SIZE else _power_exp(x)


def _sigmoid(x: mx.array, exp=_exp) -> mx.array:
    return 1.0 / (1.0 + exp(-x))  # e^-x = inf gives 0, as it should


def swiglu_values(gate: mx.array, x: mx.array) -> mx.array:
    """``silu(gate) * x`` on ``_exp``, with no custom gradient (for code that is never
    differentiated, such as the rollout's fused decode step, where the wrapper is one more
    graph node)."""
    return gate * _sigmoid(gate) * x


def _make_swiglu(exp, shapeless: bool):
    """``silu(gate) * x`` on ``exp``, compiled, with a hand-written gradient."""

    def sigmoid(x):
        return _sigmoid(x, exp)

    swiglu = mx.custom_function(
        mx.compile(lambda gate, x: gate * sigmoid(gate) * x, shapeless=shapeless)
    )

    @swiglu.vjp
    def swiglu_vjp(primals, cotangent, output):
        # The sigmoid is recomputed from the gate, so the backward pass keeps nothing but the
        # inputs (which the projections' own gradients keep anyway).
        gate, x = primals
        s = sigmoid(gate)
        slope = s * (1.0 + gate * (1.0 - s))  # d silu / d gate
        return cotangent * x * slope, cotangent * gate * s

    return swiglu


# Two compiled functions, because a shapeless trace must not depend on the size it saw first;
# the polynomial's bit cast cannot be traced shapeless, so it is traced once per shape.
_SWIGLU_POWER = _make_swiglu(_power_exp, shapeless=True)
_SWIGLU_POLYNOMIAL = _make_swiglu(exp_polynomial, shapeless=False)


def cpu_swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """``silu(gate) * x`` with the sigmoid's exponential from ``_exp`` (float32)."""
    if gate.dtype != mx.float32:  # half precision keeps mlx-lm's own
        from mlx_lm.models.activations import swiglu

        return swiglu(gate, x)
    large = gate.size >= POLYNOMIAL_MIN_SIZE
    return (_SWIGLU_POLYNOMIAL if large else _SWIGLU_POWER)(gate, x)


def cpu_attention(queries, keys, values, cache, scale, mask, sinks=None):
    """mlx-lm's ``scaled_dot_product_attention`` with the softmax's exponential from ``_exp``.

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
    # The query heads that share a key/value head are stacked as rows of one matrix,
    # [B, kv heads, repeats * L, D], so each key/value head is one matrix product (the CPU
    # backend runs a batched product as one BLAS call per batch entry): repeats times fewer
    # calls than a [B, kv, repeats, L, D] layout, and no broadcast of the keys and values.
    grouped = (queries * scale).reshape(batch, kv_heads, repeats * length, -1)
    scores = grouped @ keys.swapaxes(-1, -2)  # [B, kv, rep * L, S]
    if isinstance(mask, str):  # "causal": the last L of S positions, each sees its past
        mask = mx.arange(width - length, width)[:, None] >= mx.arange(width)[None]
    if mask is not None:
        # Masks are per (L, S); on the [B, kv, rep, L, S] view of the scores they broadcast.
        scores = scores.reshape(batch, kv_heads, repeats, length, width)
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
        scores = scores.reshape(batch, kv_heads, repeats * length, width)
    weights = cpu_softmax(scores)
    return (weights @ values).reshape(batch, heads, length, -1)


def softmax_values(x: mx.array) -> mx.array:
    """Softmax over the last axis, from ``_exp``, with no custom gradient (see
    ``swiglu_values``)."""
    weights = _exp(x - mx.max(x, axis=-1, keepdims=True))
    return weights / mx.sum(weights, axis=-1, keepdims=True)


@mx.custom_function
def cpu_softmax(x: mx.array) -> mx.array:
    """Softmax over the last axis, from ``_exp``; its gradient needs only its output (as
    ``mx.softmax``'s does), so the backward pass keeps one array per attention, not three."""
    return softmax_values(x)


@cpu_softmax.vjp
def _cpu_softmax_vjp(primals, cotangent, output):
    return output * (cotangent - mx.sum(cotangent * output, axis=-1, keepdims=True))


class RopeAngles:
    """The cosines and sines of the last positions asked for, kept for the next layer.

    Every block of a decode step rotates its queries and keys by the same angles (the rows'
    positions are the same for all of them), and the step passes one ``offset`` array to all
    blocks; so the angles are computed once per step instead of twice per block.
    """

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, offset: mx.array, length: int, dims: int, base: float, scale: float, dtype):
        key = (offset, length, dims, base, scale, dtype)
        if self.key is None or self.key[0] is not offset or self.key[1:] != key[1:]:
            # The same operations as mx.fast.rope's own CPU path, so the numbers are its own.
            half = dims // 2
            positions = (mx.arange(length, dtype=mx.float32) + offset[:, None, None]) * scale
            inverse = mx.exp(mx.arange(0, -half, -1, dtype=mx.float32) * (math.log(base) / half))
            theta = positions[..., None] * inverse  # [rows, 1, length, half]
            self.key = key
            self.value = (mx.cos(theta).astype(dtype), mx.sin(theta).astype(dtype))
        return self.value


class SharedRoPE(nn.Module):
    """``nn.RoPE`` with its angles from a ``RopeAngles`` shared by every block.

    Only for the inputs a decode step gives (``[rows, heads, length, dim]``, one offset per
    row, the default frequencies, not the traditional layout); anything else goes to the
    wrapped layer. Gives ``mx.fast.rope``'s CPU results exactly (``tests/test_cpu_math.py``).
    """

    def __init__(self, rope: nn.Module, angles: RopeAngles):
        super().__init__()
        self.rope = rope
        self._angles = angles

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        rope = self.rope
        if (
            rope.traditional
            or x.ndim != 4
            or not isinstance(offset, mx.array)
            or offset.ndim != 1
            or offset.shape[0] != x.shape[0]
        ):
            return rope(x, offset=offset)
        dims, half = rope.dims, rope.dims // 2
        cos, sin = self._angles.get(offset, x.shape[2], dims, rope.base, rope.scale, x.dtype)
        first, second = x[..., :half], x[..., half:dims]
        parts = [first * cos - second * sin, first * sin + second * cos]
        if dims < x.shape[-1]:
            parts.append(x[..., dims:])
        return mx.concatenate(parts, axis=-1)


def shared_rope(model) -> contextlib.AbstractContextManager:
    """Run ``model``'s ``nn.RoPE`` layers as ``SharedRoPE``s, on the CPU only (where
    ``mx.fast.rope`` is a composition of ordinary operations; elsewhere it is one kernel and
    is left alone). The rollout's compiled decode step runs inside it."""
    if mx.default_device() != mx.cpu:
        return contextlib.nullcontext(model)
    angles = RopeAngles()
    return modules_replaced(model, lambda m: type(m) is nn.RoPE, lambda m: SharedRoPE(m, angles))


# OpenBLAS on x86-64 multiplies small matrices (M * N * K up to this) without packing them into
# blocks first, except when the first operand is transposed and the product has more than
# SMALL_TN_OUTPUT elements (or K is under 32). ``x @ W.T``, as ``nn.Linear`` computes it, is
# that case: at a decode step's few rows, a 640 x 256 weight is packed (copied) at every call.
SMALL_GEMM_WORK = 1_000_000
SMALL_TN_OUTPUT = 1200


def packed_when_transposed(out_features: int, in_features: int, rows: int) -> bool:
    """Whether OpenBLAS packs ``x @ W.T`` for these sizes but would not pack ``x @ W_t``."""
    small = out_features * rows * in_features <= SMALL_GEMM_WORK
    return small and (out_features * rows > SMALL_TN_OUTPUT or in_features < 32)


def row_major(view: mx.array) -> mx.array:
    """A row-major copy of ``view`` (a transposed matrix, say), with the same numbers.

    MLX's CPU ``copy`` of a transposed matrix reads it one element at a time; a multiplication
    by one takes the faster strided path of its elementwise kernels and gives every float back
    exactly.
    """
    return view * mx.array(1, view.dtype)


class _RowMajorLinear(nn.Module):
    """``nn.Linear`` with its weight held transposed (``[in, out]``), for ``x @ W_t``."""

    def __init__(self, linear: nn.Module):
        super().__init__()
        self.weight_t = row_major(linear.weight.T)
        if "bias" in linear:
            self.bias = linear.bias

    @property
    def weight(self) -> mx.array:
        """The weight as ``nn.Linear`` holds it (a view), for code that reads it."""
        return self.weight_t.T

    def __call__(self, x: mx.array) -> mx.array:
        if "bias" in self:
            return mx.addmm(self.bias, x, self.weight_t)
        return x @ self.weight_t


class _RowMajorHead(nn.Module):
    """A tied embedding whose ``as_linear`` (the output layer) uses a transposed copy; the
    token lookup still reads the embedding itself."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding
        self.weight_t = row_major(embedding.weight.T)

    @property
    def weight(self) -> mx.array:
        return self.embedding.weight

    def __call__(self, x: mx.array) -> mx.array:
        return self.embedding(x)

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self.weight_t


def small_weights_apply() -> bool:
    """Whether ``small_weights_transposed`` applies here: MLX computing on an x86-64 CPU with
    OpenBLAS (``blas.py``) for its matmuls."""
    info = blas_info()
    return _on_x86_cpu() and info.enabled and "openblas" in info.name.lower()


def small_weights_transposed(model, rows: int) -> contextlib.AbstractContextManager:
    """Run ``model`` with transposed copies of the weights that OpenBLAS would pack at every
    call for ``rows`` input rows (``packed_when_transposed``), then drop the copies.

    Only with OpenBLAS on an x86-64 CPU, and only for weights small enough for its unpacked
    kernels (at most ``SMALL_GEMM_WORK / rows`` elements each, so at most a few MB in all;
    a 3B model has none). The rollout's compiled decode step runs inside it: at the bench
    model's 4 rows it skips nine weight copies per step (docs/performance.md). The numbers
    are the same products, summed in another order (float32 rounding).
    """
    if not small_weights_apply():
        return contextlib.nullcontext(model)
    tied_head = "lm_head" not in model

    def select(m: nn.Module) -> bool:
        if type(m) is nn.Linear or (tied_head and type(m) is nn.Embedding):
            return m.weight.ndim == 2 and packed_when_transposed(*m.weight.shape, rows)
        return False

    def replace(m: nn.Module) -> nn.Module:
        # Left lazy: the first decode step evaluates the copies with everything else.
        return _RowMajorLinear(m) if type(m) is nn.Linear else _RowMajorHead(m)

    return modules_replaced(model, select, replace)


def _swaps() -> dict[str, tuple[object, object]]:
    """Module attribute -> (mlx-lm's function, the replacement)."""
    from mlx_lm.models.activations import swiglu
    from mlx_lm.models.base import scaled_dot_product_attention

    return {
        "swiglu": (swiglu, cpu_swiglu),
        "scaled_dot_product_attention": (scaled_dot_product_attention, cpu_attention),
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
