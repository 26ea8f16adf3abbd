"""The rollout's decode step for Qwen2- and Llama-style models, written out on 2-D rows.

A decode step of a small model is a few hundred tiny operations, and on the CPU backend each
graph node has a fixed cost larger than most of them compute. ``fused_step`` computes the same
step as mlx-lm's modules as one function over ``[rows, features]`` matrices, in about half as
many nodes:

- the query, key and value projections as one product, their weights joined once per rollout
  while the joined copies stay small (``JOIN_LIMIT_BYTES``), their LoRA terms as one more;
- in float32, each adapter's update added into the rollout's copy of its weight
  (``MERGE_LIMIT_BYTES``), so an adapted projection is one product, not three;
- with OpenBLAS, the small weights laid out so that it does not pack them at every call
  (transposed copies, and column blocks for products just over its small-product bound, cut
  where the step uses the parts apart: queries and keys / values, and the MLP's blocks run
  through SwiGLU and the down projection one by one, so nothing is joined again);
- RoPE once over the queries and keys together, with the angles computed once per step;
- in float32, each block's residual adds inside its output projections' ``addmm``;
- on the CPU, attention with the query heads of a key/value head as rows of one matrix and
  ``cpu_math``'s exponential; elsewhere ``mx.fast.scaled_dot_product_attention``;
- no reshapes between blocks, and no custom-gradient wrappers (nothing is differentiated).

It applies only to the module layouts it was written for (``fused_plan``): mlx-lm's ``qwen2``
and ``llama`` models, their linear layers plain ``nn.Linear`` or mlx-lm ``LoRALinear``s over
them, with no dropout, one process. Anything else (quantized weights, other blocks, DoRA, a
pipeline) takes the module-swap decode. The rollout checks the step once per model layout
against a full forward pass (``compiled_decode.compiled_decode_supported``).
``MLX_REASONER_FUSED_DECODE=0`` turns it off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..backend import switched_off
from . import cpu_math
from .kv_buffers import visible_columns, write_columns

ENV_SWITCH = "MLX_REASONER_FUSED_DECODE"

# The joined query/key/value weights are a copy, made afresh at each rollout (the base may be
# trained too). They are joined only while all of them together stay under this size: that
# covers models up to about 0.5B parameters, where the per-node cost matters; a 3B model's
# step is bound by reading its weights, and keeps its three products.
JOIN_LIMIT_BYTES = 64 * 2**20

# OpenBLAS (x86-64) packs both operands of any product over its small-product bound
# (``cpu_math.SMALL_GEMM_WORK``, M * N * K), whatever their layout. At 8 decode rows the bench
# model's MLP, joined q/k/v and output products are just over it, and packing the weight costs
# more than the product. Such a weight is held as up to this many column blocks, each product
# under the bound, and the outputs joined; a weight that needs more is left to OpenBLAS.
MAX_COLUMN_BLOCKS = 4

# In float32, an adapter's update is added into a copy of its base weight for the rollout
# (``W + scale (A B)^T``, as ``mlx_lm.fuse`` does), which takes two of the three products of
# every adapted projection out of the step, while those copies stay under this size. Half
# precision keeps the low-rank products: rounding the sum would drop most of a young adapter.
MERGE_LIMIT_BYTES = 64 * 2**20


def fused_decode_apply() -> bool:
    """Whether the fused step may be used: MLX computing on the CPU (the only device it was
    measured on) and ``MLX_REASONER_FUSED_DECODE`` not off."""
    return not switched_off(ENV_SWITCH) and mx.default_device() == mx.cpu


@dataclass(frozen=True)
class _Projection:
    """What a projection's step code needs to know beyond its arrays."""

    bias: bool
    blocks: tuple[int, ...] | None  # the weight's column blocks' widths, or one array
    lora_scale: float | None  # None: no adapter; 1.0 where the scales are folded into B
    lora_cast: bool  # the adapter's dtype differs from the base's: mlx-lm's cast-and-add
    # The weight's row blocks' heights, where the input arrives as that many column blocks
    # (the MLP's down projection after blocked gate and up projections), or None.
    in_blocks: tuple[int, ...] | None = None


@dataclass(frozen=True)
class _Plan:
    """The static part of a fused step: a new plan is a new trace."""

    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    joined: bool  # one query/key/value product
    layers: tuple  # per block: (norm eps, post norm eps, {name: _Projection})
    norm_eps: float
    tied: bool
    head: _Projection | None  # the untied output layer
    head_blocks: tuple[int, ...] | None  # the tied output layer's column blocks
    fast_exp: bool  # cpu_math's exponential (float32 on an x86-64 CPU)
    fold_residual: bool  # float32: residual adds inside the addmm (half precision rounds twice)
    shared_angles: bool  # nn.RoPE on the CPU: the angles once per step
    fast_attention: bool  # mx.fast.scaled_dot_product_attention: one kernel off the CPU


def _model_modules():
    from mlx_lm.models import llama, qwen2

    return (qwen2, llama)


def _parts(m: nn.Module):
    """``(base nn.Linear, LoRA layer or None)`` for a projection the fused step can run."""
    from mlx_lm.tuner.lora import LoRALinear

    if type(m) is nn.Linear:
        return m, None
    if type(m) is LoRALinear and type(m.linear) is nn.Linear:
        dropout = m.dropout
        if isinstance(dropout, nn.Dropout) and getattr(dropout, "_p_1", 1.0) != 1.0:
            return None  # a dropout mask per projection: the module decode keeps that
        return m.linear, m
    return None


def _supported_layout(model: nn.Module) -> bool:
    modules = _model_modules()
    module = next((mod for mod in modules if type(model) is mod.Model), None)
    if module is None or not isinstance(getattr(model, "model", None), nn.Module):
        return False
    inner = model.model
    if getattr(inner, "pipeline_size", 1) != 1:
        return False
    if type(inner.embed_tokens) is not nn.Embedding or type(inner.norm) is not nn.RMSNorm:
        return False
    tied = bool(getattr(model.args, "tie_word_embeddings", False))
    if tied == ("lm_head" in model) or (not tied and _parts(model.lm_head) is None):
        return False
    for layer in inner.layers:
        if type(layer) is not module.TransformerBlock or getattr(layer, "use_sliding", False):
            return False
        attn, mlp = layer.self_attn, layer.mlp
        if type(attn) is not module.Attention or type(mlp) is not module.MLP:
            return False
        if type(layer.input_layernorm) is not nn.RMSNorm:
            return False
        if type(layer.post_attention_layernorm) is not nn.RMSNorm:
            return False
        names = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        if any(_parts(m) is None for m in names + (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            return False
    return True


def _column_blocks(rows: int, in_features: int, out_features: int) -> tuple[int, ...] | None:
    """Column widths that keep each block's product under OpenBLAS's small-product bound, for a
    product over it (None: one block does, or more than ``MAX_COLUMN_BLOCKS`` would be needed)."""
    bound = cpu_math.SMALL_GEMM_WORK
    if rows * in_features * out_features <= bound:
        return None
    for count in range(2, MAX_COLUMN_BLOCKS + 1):
        width = -(-out_features // count)
        if rows * in_features * width <= bound:
            return (width,) * (count - 1) + (out_features - width * (count - 1),)
    return None


def _qk_v_blocks(rows: int, in_features: int, outs: list[int]) -> tuple[int, int] | None:
    """The joined query/key/value weight's column blocks where its product is over OpenBLAS's
    small-product bound: queries and keys in one, values in the other, where each is under
    it. The step then takes both blocks as they are, with no join and no split (None: one
    product is under the bound, or a side is not; ``_column_blocks`` decides)."""
    bound = cpu_math.SMALL_GEMM_WORK
    split, total = outs[0] + outs[1], sum(outs)
    if rows * in_features * total <= bound or rows * in_features * split > bound:
        return None
    return split, total - split


def _laid_out(
    weight: mx.array,
    rows: int,
    transposed_copies: bool,
    copied=False,
    update=None,
    widths: tuple[int, ...] | None = None,
    in_blocks: tuple[int, ...] | None = None,
):
    """``weight.T`` (``[in, out]``, from ``[out, in]``) as the step multiplies by it, plus
    ``update`` (``[in, out]``) if given, and the widths of its column blocks (or None).

    ``widths`` sets the column blocks instead of ``_column_blocks``; ``in_blocks`` asks for row
    blocks of those heights instead (a tuple of ``[height, out]`` copies, no column blocks).

    With OpenBLAS (``transposed_copies``): contiguous column blocks where the product is over
    its small-product bound (``_column_blocks``), one contiguous array where it would pack the
    view at every call (``cpu_math.packed_when_transposed``), where the weight is a copy
    anyway (``copied``) or where an update is added; the view itself elsewhere. Elsewhere: the
    view, or the sum. Each copy is ``cpu_math.row_major``'s (MLX's own transposed copy is three
    times slower on the CPU), and an update is added to the copy (a sum with a transposed
    operand is as slow as the copy).
    """
    out_features, in_features = weight.shape

    def piece(start: int, stop: int) -> mx.array:  # [in, stop - start], row-major
        copy = cpu_math.row_major(weight[start:stop].T)
        return copy if update is None else copy + update[:, start:stop]

    def row_piece(start: int, stop: int) -> mx.array:  # [stop - start, out], row-major
        copy = cpu_math.row_major(weight[:, start:stop].T)
        return copy if update is None else copy + update[start:stop]

    if in_blocks is not None:
        bounds = [sum(in_blocks[:i]) for i in range(len(in_blocks) + 1)]
        return tuple(row_piece(a, b) for a, b in zip(bounds, bounds[1:])), None
    if transposed_copies:
        widths = widths or _column_blocks(rows, in_features, out_features)
        if widths is not None:
            bounds = [sum(widths[:i]) for i in range(len(widths) + 1)]
            return tuple(piece(a, b) for a, b in zip(bounds, bounds[1:])), widths
        packed = cpu_math.packed_when_transposed(out_features, in_features, rows)
        if copied or packed or update is not None:
            return piece(0, out_features), None
    if update is not None:
        return weight.T + update, None
    return weight.T, None


def _rows_of(bias: mx.array, rows: int) -> mx.array:
    """``bias`` broadcast to ``[rows, out]`` before the step, so that each ``addmm`` takes it
    as it is (inside the step the broadcast is a graph node of its own)."""
    return mx.broadcast_to(bias, (rows, bias.shape[0]))


def _update(lora: nn.Module) -> mx.array:
    """An adapter's update to its weight, ``scale (A B)``, laid out ``[in, out]``."""
    return lora.scale * (lora.lora_a @ lora.lora_b)


def _projection(
    m: nn.Module, rows: int, transposed_copies: bool, merge: bool, in_blocks=None
) -> tuple[_Projection, dict]:
    """``in_blocks``: lay the weight out as row blocks (``_laid_out``); only for a projection
    with no adapter term left (no adapter, or ``merge``)."""
    base, lora = _parts(m)
    arrays = {}
    update = _update(lora) if merge and lora is not None else None
    arrays["w"], blocks = _laid_out(
        base.weight, rows, transposed_copies, update=update, in_blocks=in_blocks
    )
    if "bias" in base:
        arrays["b"] = _rows_of(base.bias, rows)
    if lora is None or update is not None:
        return _Projection("bias" in base, blocks, None, False, in_blocks), arrays
    arrays["a"], arrays["lb"] = lora.lora_a, lora.lora_b
    cast = not (lora.lora_a.dtype == lora.lora_b.dtype == base.weight.dtype)
    return _Projection("bias" in base, blocks, float(lora.scale), cast), arrays


def _joined_qkv(
    attn: nn.Module, rows: int, transposed_copies: bool, merge: bool
) -> tuple[_Projection, dict]:
    """The query, key and value projections as one: weights side by side (``[in, q + k + v]``),
    and the adapters' ``A``s side by side with their ``B``s on a block diagonal (or, with
    ``merge``, the product of the two added into the weights)."""
    members = [_parts(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    weights = [base.weight for base, _ in members]  # each [out, in]
    dtype = weights[0].dtype
    arrays = {}
    has_bias = any("bias" in base for base, _ in members)
    if has_bias:
        bias = mx.concatenate(
            [
                base.bias if "bias" in base else mx.zeros(w.shape[0], dtype)
                for (base, _), w in zip(members, weights)
            ]
        )
        arrays["b"] = _rows_of(bias, rows)
    joined = mx.concatenate(weights, axis=0)  # [q + k + v, in]
    outs = [w.shape[0] for w in weights]
    split = _qk_v_blocks(rows, joined.shape[1], outs)
    adapted = [(i, lora) for i, (_, lora) in enumerate(members) if lora is not None]
    if not adapted:
        arrays["w"], blocks = _laid_out(joined, rows, transposed_copies, True, widths=split)
        return _Projection(has_bias, blocks, None, False), arrays
    total = sum(outs)
    # One scale (the usual case) stays addmm's alpha, as in the module decode; several are
    # folded into their B blocks.
    scales = {float(lora.scale) for _, lora in adapted}
    alpha = scales.pop() if len(scales) == 1 else None
    b_rows = []
    for i, lora in adapted:
        b = lora.lora_b if alpha is not None else lora.lora_b * lora.scale  # [rank, out_i]
        before, after = sum(outs[:i]), total - sum(outs[: i + 1])
        rank = b.shape[0]
        pieces = [mx.zeros((rank, before), b.dtype), b, mx.zeros((rank, after), b.dtype)]
        b_rows.append(mx.concatenate(pieces, axis=1))
    lora_a = mx.concatenate([lora.lora_a for _, lora in adapted], axis=1)
    lora_b = mx.concatenate(b_rows, axis=0)  # [sum of ranks, q + k + v]
    alpha = 1.0 if alpha is None else alpha
    if merge:
        update = alpha * (lora_a @ lora_b)  # [in, q + k + v]
        arrays["w"], blocks = _laid_out(
            joined, rows, transposed_copies, update=update, widths=split
        )
        return _Projection(has_bias, blocks, None, False), arrays
    arrays["w"], blocks = _laid_out(joined, rows, transposed_copies, copied=True)
    arrays["a"], arrays["lb"] = lora_a, lora_b
    cast = any(not (lora.lora_a.dtype == lora.lora_b.dtype == dtype) for _, lora in adapted)
    return _Projection(has_bias, blocks, alpha, cast), arrays


def _joined_bytes(model: nn.Module) -> int:
    total = 0
    for layer in model.model.layers:
        attn = layer.self_attn
        for m in (attn.q_proj, attn.k_proj, attn.v_proj):
            weight = _parts(m)[0].weight
            total += weight.size * weight.dtype.size
    return total


def _merge_adapters(model: nn.Module) -> bool:
    """Whether the adapters' updates go into copies of their weights (``MERGE_LIMIT_BYTES``)."""
    total = 0
    for _, m in model.named_modules():
        parts = _parts(m) if isinstance(m, nn.Module) else None
        if parts is None or parts[1] is None:
            continue
        base, lora = parts
        if not (base.weight.dtype == lora.lora_a.dtype == lora.lora_b.dtype == mx.float32):
            return False
        total += base.weight.size * base.weight.dtype.size
    return total <= MERGE_LIMIT_BYTES


def _down_row_blocks(mlp: nn.Module, specs: dict, rows: int, merge: bool, dtype) -> tuple | None:
    """Row blocks for the down projection matching the gate and up projections' column
    blocks, so that the step runs SwiGLU on each block and adds the blocks' down products up,
    with no join of the activations and no split of the residual. Only in float32 (the
    residual folded into the first ``addmm``), with no adapter term left on the three, and
    where each down product stays under OpenBLAS's small-product bound."""
    gate, up = specs["gate"], specs["up"]
    blocks = gate.blocks
    if blocks is None or up.blocks != blocks or dtype != mx.float32:
        return None
    if gate.lora_scale is not None or up.lora_scale is not None:
        return None
    base, lora = _parts(mlp.down_proj)
    if lora is not None and not merge:
        return None
    out_features = base.weight.shape[0]
    if rows * max(blocks) * out_features > cpu_math.SMALL_GEMM_WORK:
        return None
    return blocks


def fused_plan(model: nn.Module, rows: int) -> tuple[_Plan, dict] | None:
    """The fused step's plan and arrays for ``model`` at ``rows`` rows, or None where the
    model's layout is not one the step was written for (see the module's text).

    The arrays are lazy: views of the model's weights and, where noted above, copies, which
    the first step evaluates and which go when the rollout lets go of them.
    """
    if not fused_decode_apply() or not _supported_layout(model):
        return None
    inner = model.model
    first = inner.layers[0].self_attn
    q_out = _parts(first.q_proj)[0].weight.shape[0]
    heads, kv_heads = first.n_heads, first.n_kv_heads
    if heads % kv_heads or q_out % heads:
        return None
    head_dim = q_out // heads
    transposed_copies = cpu_math.small_weights_apply()
    joined = _joined_bytes(model) <= JOIN_LIMIT_BYTES
    merge = _merge_adapters(model)
    dtype = inner.embed_tokens.weight.dtype
    layers, layer_arrays = [], []
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if (attn.n_heads, attn.n_kv_heads, attn.scale) != (heads, kv_heads, first.scale):
            return None
        specs, arrays = {}, {}
        names = {"o": attn.o_proj, "gate": mlp.gate_proj, "up": mlp.up_proj}
        if joined:
            specs["qkv"], arrays["qkv"] = _joined_qkv(attn, rows, transposed_copies, merge)
        else:
            names.update(q=attn.q_proj, k=attn.k_proj, v=attn.v_proj)
        for name, m in names.items():
            specs[name], arrays[name] = _projection(m, rows, transposed_copies, merge)
        in_blocks = _down_row_blocks(mlp, specs, rows, merge, dtype)
        specs["down"], arrays["down"] = _projection(
            mlp.down_proj, rows, transposed_copies, merge, in_blocks=in_blocks
        )
        arrays["norm"] = layer.input_layernorm.weight
        arrays["post_norm"] = layer.post_attention_layernorm.weight
        eps = (layer.input_layernorm.eps, layer.post_attention_layernorm.eps)
        layers.append((*eps, tuple(sorted(specs.items()))))
        layer_arrays.append(arrays)
    tied = "lm_head" not in model
    embedding = inner.embed_tokens.weight  # [vocab, dim]
    params = {"embed": embedding, "norm": inner.norm.weight, "layers": layer_arrays}
    head = head_blocks = None
    if tied:
        params["head"], head_blocks = _laid_out(embedding, rows, transposed_copies)
    else:
        head, params["head"] = _projection(model.lm_head, rows, transposed_copies, merge)
    rope = first.rope
    plan = _Plan(
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        scale=float(first.scale),
        joined=joined,
        layers=tuple(layers),
        norm_eps=inner.norm.eps,
        tied=tied,
        head=head,
        head_blocks=head_blocks,
        fast_exp=dtype == mx.float32 and cpu_math.fast_activations_apply(),
        fold_residual=dtype == mx.float32,
        shared_angles=type(rope) is nn.RoPE and mx.default_device() == mx.cpu,
        fast_attention=_fast_attention(),
    )
    return plan, params


def _product(x: mx.array, weight, add=None, join: bool = True):
    """``x @ weight (+ add)``, for ``weight`` one array or a tuple of column blocks; ``add`` is
    a bias (``[out]``) or a residual (``[rows, out]``). Column blocks' outputs are joined, or
    with ``join=False`` returned as a list."""
    if not isinstance(weight, tuple):
        return x @ weight if add is None else mx.addmm(add, x, weight)
    parts, start = [], 0
    for block in weight:
        end = start + block.shape[1]
        parts.append(x @ block if add is None else mx.addmm(add[..., start:end], x, block))
        start = end
    return mx.concatenate(parts, axis=-1) if join else parts


def _summed_product(blocks: list, spec: _Projection, arrays: dict, residual) -> mx.array:
    """``concat(blocks) @ W (+ bias) + residual`` for a weight held as row blocks matching
    ``blocks`` (``spec.in_blocks``): one ``addmm`` per block, each adding to the last."""
    add = residual if not spec.bias else residual + arrays["b"]
    for x, piece in zip(blocks, arrays["w"]):
        add = mx.addmm(add, x, piece)
    return add


def _fast_attention() -> bool:
    """Whether attention is ``mx.fast.scaled_dot_product_attention``: off the CPU, where it is
    one kernel (on the CPU it is a composition of operations, and the step's own has fewer)."""
    return mx.default_device() != mx.cpu


def _project(x: mx.array, spec: _Projection, arrays: dict, residual=None) -> mx.array:
    """``x W^T (+ bias) (+ residual) + scale (x A) B`` on rows ``x`` ([rows, in])."""
    add = arrays.get("b") if spec.bias else None
    if residual is not None:
        add = residual if add is None else residual + add
    y = _product(x, arrays["w"], add)
    if spec.lora_scale is None:
        return y
    low = x @ arrays["a"]  # [rows, rank]
    if spec.lora_cast:  # mlx-lm's LoRALinear: the low-rank term in its dtype, then cast
        return y + (spec.lora_scale * (low @ arrays["lb"])).astype(y.dtype)
    return mx.addmm(y, low, arrays["lb"], alpha=spec.lora_scale)


def _softmax(scores: mx.array, fast_exp: bool) -> mx.array:
    if not fast_exp:
        return mx.softmax(scores, axis=-1, precise=True)
    return cpu_math.softmax_values(scores)


def _swiglu(gate: mx.array, x: mx.array, fast_exp: bool) -> mx.array:
    if not fast_exp:
        from mlx_lm.models.activations import swiglu

        return swiglu(gate, x)
    return cpu_math.swiglu_values(gate, x)


def fused_step(plan: _Plan, ropes: list, sampler: Callable) -> Callable:
    """The decode step ``(params, tokens, previous, keys, values, write, start) -> (next
    tokens, log-probabilities, keys, values, this step's columns)`` of
    ``compiled_decode._decode_step_fn``, for ``fused_plan``'s plan and arrays; ``ropes`` are the
    blocks' RoPE modules."""
    heads, kv_heads, head_dim = plan.heads, plan.kv_heads, plan.head_dim
    repeats = heads // kv_heads
    angles = cpu_math.RopeAngles()
    if plan.shared_angles:
        ropes = [cpu_math.SharedRoPE(rope, angles) for rope in ropes]

    def add_residual(x, inputs, spec, arrays):
        if plan.fold_residual:
            return _project(inputs, spec, arrays, residual=x)
        return x + _project(inputs, spec, arrays)  # as mlx-lm rounds it

    def step(params, tokens, previous, keys, values, write, start):
        rows = tokens.shape[0]
        width = keys[0].shape[2]
        visible, positions = visible_columns(width, write, start)  # [rows, S], [rows]
        dtype = params["embed"].dtype
        hidden_mask = mx.where(visible, 0.0, mx.finfo(dtype).min).astype(dtype)[:, None, None]
        # The mask as each block's score product adds it (one broadcast for all blocks).
        score_mask = mx.broadcast_to(hidden_mask, (rows, kv_heads, repeats, width))
        x = params["embed"][tokens]  # [rows, dim]
        new_keys, new_values, current = [], [], []
        for i, (eps, post_eps, specs) in enumerate(plan.layers):
            specs, arrays, rope = dict(specs), params["layers"][i], ropes[i]
            h = mx.fast.rms_norm(x, arrays["norm"], eps)
            if plan.joined:
                split = (heads + kv_heads) * head_dim
                spec = specs["qkv"]
                blocks = spec.blocks or ()
                if spec.lora_scale is None and len(blocks) == 2 and blocks[0] == split:
                    # _qk_v_blocks: the blocks are the queries and keys, and the values
                    qk, v = _product(h, arrays["qkv"]["w"], arrays["qkv"].get("b"), join=False)
                else:
                    qkv = _project(h, spec, arrays["qkv"])  # [rows, (H + 2 KV) * D]
                    qk, v = qkv[:, :split], qkv[:, split:]
                qk = qk.reshape(rows, heads + kv_heads, 1, head_dim)
                qk = rope(qk, offset=positions)  # one RoPE over queries and keys
                q, k = qk[:, :heads], qk[:, heads:]
            else:
                q = _project(h, specs["q"], arrays["q"]).reshape(rows, heads, 1, head_dim)
                k = _project(h, specs["k"], arrays["k"]).reshape(rows, kv_heads, 1, head_dim)
                q, k = rope(q, offset=positions), rope(k, offset=positions)
                v = _project(h, specs["v"], arrays["v"])
            v = v.reshape(rows, kv_heads, 1, head_dim)
            previous_keys, previous_values = previous[i]
            layer_keys = write_columns(keys[i], previous_keys, k, write)  # [rows, KV, S, D]
            layer_values = write_columns(values[i], previous_values, v, write)
            new_keys.append(layer_keys)
            new_values.append(layer_values)
            current.append((k, v))
            if plan.fast_attention:
                attended = mx.fast.scaled_dot_product_attention(
                    q, layer_keys, layer_values, scale=plan.scale, mask=hidden_mask
                )  # [rows, H, 1, D]
            else:
                # The query heads that share a key/value head are rows of one matrix.
                grouped = q.reshape(rows, kv_heads, repeats, head_dim) * plan.scale
                # [rows, KV, rep, S] scores, the mask added
                scores = mx.addmm(score_mask, grouped, layer_keys.swapaxes(-1, -2))
                attended = _softmax(scores, plan.fast_exp) @ layer_values  # [rows, KV, rep, D]
            x = add_residual(x, attended.reshape(rows, -1), specs["o"], arrays["o"])
            h = mx.fast.rms_norm(x, arrays["post_norm"], post_eps)
            if specs["down"].in_blocks is not None:
                # _down_row_blocks: SwiGLU on each column block, the down products summed
                gates = _product(h, arrays["gate"]["w"], arrays["gate"].get("b"), join=False)
                ups = _product(h, arrays["up"]["w"], arrays["up"].get("b"), join=False)
                acts = [_swiglu(g, u, plan.fast_exp) for g, u in zip(gates, ups)]
                x = _summed_product(acts, specs["down"], arrays["down"], residual=x)
            else:
                gate = _project(h, specs["gate"], arrays["gate"])
                up = _project(h, specs["up"], arrays["up"])
                act = _swiglu(gate, up, plan.fast_exp)
                x = add_residual(x, act, specs["down"], arrays["down"])
        x = mx.fast.rms_norm(x, params["norm"], plan.norm_eps)
        if plan.tied:
            logits = _product(x, params["head"])
        else:
            logits = _project(x, plan.head, params["head"])
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs).astype(mx.uint32), logprobs, new_keys, new_values, current

    return step


def block_ropes(model: nn.Module) -> list:
    """Each block's RoPE module, in order (for ``fused_step``)."""
    return [layer.self_attn.rope for layer in model.model.layers]
