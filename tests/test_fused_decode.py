"""fused_decode: the rollout's decode step written out on 2-D rows, against mlx-lm's modules."""

import re

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_map
from mlx_lm.models import llama, qwen2

from mlx_reasoner.engine import compiled_decode, cpu_math, fused_decode
from mlx_reasoner.model import attach_lora, lora_config, prefill_prompt

PROMPTS = [[3, 5, 7, 11, 13, 2, 9], [17, 19, 4], [6, 8, 10, 12]]


def small_model(kind="qwen2", tie=True, bias=True, seed=0, rope_scaling=None):
    mx.random.seed(seed)
    common = dict(
        hidden_size=64,
        num_hidden_layers=3,
        intermediate_size=96,
        num_attention_heads=8,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=96,
        tie_word_embeddings=tie,
    )
    if kind == "qwen2":
        model = qwen2.Model(qwen2.ModelArgs(model_type="qwen2", **common))
    else:
        args = llama.ModelArgs(
            model_type="llama",
            attention_bias=bias,
            mlp_bias=bias,
            rope_scaling=rope_scaling,
            **common,
        )
        model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def adapted(model, layers: int = -1, keys=None, scale: float = 0.1, dropout: float = 0.0):
    """LoRA on ``layers`` blocks (``keys``: which projections), moved away from zero."""
    config = lora_config(layers, 4, dropout=dropout)
    if keys is not None:
        config["lora_parameters"]["keys"] = keys
    attach_lora(model, config)
    mx.random.seed(1)
    model.update(
        tree_map(lambda p: p + scale * mx.random.normal(p.shape), model.trainable_parameters())
    )
    mx.eval(model.parameters())
    return model


def decode(model, fused: bool, group_size: int = 2, max_tokens: int = 6):
    """Greedy tokens and every step's log-probabilities from one compiled decode step."""
    caches = [prefill_prompt(model, p) for p in PROMPTS]
    logprobs = []
    tokens, reasons, name, _ = compiled_decode.decode_compiled(
        model, PROMPTS, caches, group_size, max_tokens, None, frozenset(), logprobs.append, fused
    )
    return tokens, mx.stack(logprobs, axis=1), name  # [rows, steps, vocab]


def full_forward_gap(model, tokens, logprobs, group_size: int) -> float:
    """The largest gap between a decode's log-probabilities and a full forward pass's."""
    gaps = []
    for row, completion in enumerate(tokens):
        prompt = PROMPTS[row // group_size]
        full = model(mx.array(prompt + completion)[None])[0, len(prompt) - 1 : -1]
        full = (full - mx.logsumexp(full, axis=-1, keepdims=True)).astype(mx.float32)
        gaps.append(mx.max(mx.abs(full - logprobs[row].astype(mx.float32))).item())
    return max(gaps)


def assert_same_decode(model, group_size: int = 2, slack: float = 2e-4):
    """The fused step gives the module step's tokens, and is as close to a full forward pass
    as the module step is, up to float32 rounding (``slack``; the largest, about 1e-4, from
    rounding each merged weight ``W + scale A B`` once, where these test adapters make the
    update larger than the weight). The rollout's own check allows 1e-3."""
    ours, ours_logprobs, name = decode(model, True, group_size)
    theirs, theirs_logprobs, other = decode(model, False, group_size)
    assert (name, other) == ("fused", "compiled")
    assert ours == theirs
    ours_gap = full_forward_gap(model, ours, ours_logprobs, group_size)
    theirs_gap = full_forward_gap(model, theirs, theirs_logprobs, group_size)
    assert ours_gap <= 2 * theirs_gap + slack, (ours_gap, theirs_gap)


@pytest.mark.parametrize(
    "kind, tie, bias",
    [("qwen2", True, True), ("qwen2", False, True), ("llama", False, False), ("llama", True, True)],
)
@pytest.mark.parametrize("lora", ["all", "some", "none"])
def test_the_fused_step_gives_the_module_steps_numbers(kind, tie, bias, lora):
    model = small_model(kind, tie, bias)
    if lora == "all":
        adapted(model)
    elif lora == "some":  # two of three blocks, and only some projections
        adapted(model, layers=2, keys=["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"])
    assert_same_decode(model)


def test_a_rope_of_another_kind_runs_as_its_own_module():
    """Llama 3's scaled RoPE is not nn.RoPE: the step calls the block's own module on the
    queries and keys, with each row's position, instead of sharing its angles."""
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    model = adapted(small_model("llama", tie=False, bias=False, rope_scaling=scaling))
    assert type(model.model.layers[0].self_attn.rope) is not nn.RoPE
    assert not fused_decode.fused_plan(model, 4)[0].shared_angles
    assert_same_decode(model)


# The small-product bound each OpenBLAS layout is tested under (6 rows of the small model):
# "blocks" puts every product over it, "split blocks" puts the joined query/key/value product
# over it but its queries-and-keys part under it.
BOUNDS = {"blocks": 6 * 64 * 40, "split blocks": 32_000}


@pytest.mark.parametrize("merged", [True, False])
@pytest.mark.parametrize("joined", [True, False])
@pytest.mark.parametrize("openblas", ["no", "copies", "blocks", "split blocks"])
def test_joined_or_apart_merged_or_not_and_each_weight_layout(
    monkeypatch, merged, joined, openblas
):
    """The adapters' updates added into copies of their weights or kept as low-rank products
    (MERGE_LIMIT_BYTES); the query/key/value product joined or three apart
    (JOIN_LIMIT_BYTES); and the weights as views, or, with OpenBLAS, transposed copies where it
    would pack them and column blocks where a product is over its small-product bound (lowered
    here so that the small model's products are over it), cut at the queries-and-keys / values
    boundary where that keeps both under it, and with the down projection in row blocks after
    blocked gate and up projections where no adapter term is left: the same numbers every way."""
    monkeypatch.setattr(fused_decode, "MERGE_LIMIT_BYTES", 2**30 if merged else 0)
    monkeypatch.setattr(fused_decode, "JOIN_LIMIT_BYTES", 2**30 if joined else 0)
    monkeypatch.setattr(cpu_math, "small_weights_apply", lambda: openblas != "no")
    blocks = openblas in BOUNDS
    if blocks:
        monkeypatch.setattr(cpu_math, "SMALL_GEMM_WORK", BOUNDS[openblas])
    model = adapted(small_model(tie=True))
    plan, params = fused_decode.fused_plan(model, 6)
    assert plan.joined == joined
    assert ("qkv" in params["layers"][0]) == joined
    blocked = [spec.blocks for _, _, specs in plan.layers for _, spec in specs]
    assert any(blocked) == blocks
    assert (plan.head_blocks is not None) == blocks
    specs = dict(plan.layers[0][2])
    down = specs["down"]
    assert (down.in_blocks is not None) == (blocks and merged)
    if down.in_blocks is not None:
        assert down.blocks is None and down.in_blocks == specs["gate"].blocks
        assert [w.shape[0] for w in params["layers"][0]["down"]["w"]] == list(down.in_blocks)
    if joined and openblas == "split blocks":  # 80 query and key columns, 16 value columns
        assert specs["qkv"].blocks == ((80, 16) if merged else (48, 48))
    adapter_terms = [spec.lora_scale for _, _, specs in plan.layers for _, spec in specs]
    assert all(scale is None for scale in adapter_terms) == merged
    assert_same_decode(model, group_size=2)


@pytest.mark.parametrize(
    "rows, in_features, out_features, widths",
    [
        (4, 256, 640, None),  # 655,360: under the bound, one product
        (8, 256, 640, (320, 320)),
        (8, 640, 256, (128, 128)),
        (16, 256, 640, (214, 214, 212)),
        (32, 256, 640, None),  # six blocks would be needed: left to OpenBLAS
    ],
)
def test_column_blocks_keep_each_product_under_openblas_small_bound(
    rows, in_features, out_features, widths
):
    got = fused_decode._column_blocks(rows, in_features, out_features)
    assert got == widths
    if got is not None:
        assert sum(got) == out_features
        assert all(rows * in_features * w <= cpu_math.SMALL_GEMM_WORK for w in got)


def test_mlx_fast_attention_as_off_the_cpu(monkeypatch):
    """Off the CPU the step's attention is mx.fast.scaled_dot_product_attention (one kernel
    there); its CPU fallback gives the same numbers here."""
    monkeypatch.setattr(fused_decode, "_fast_attention", lambda: True)
    model = adapted(small_model())
    assert fused_decode.fused_plan(model, 4)[0].fast_attention
    assert_same_decode(model)


def test_mlx_exponentials_where_the_fast_ones_are_off(monkeypatch):
    monkeypatch.setenv("MLX_REASONER_FAST_EXP", "0")
    model = adapted(small_model())
    assert not fused_decode.fused_plan(model, 4)[0].fast_exp
    assert_same_decode(model)


def test_adapters_in_another_dtype_are_cast_as_mlx_lm_casts_them():
    """A bfloat16 model with float32 adapters: mlx-lm adds the low-rank term in its own dtype
    and casts it, and rounds each residual add; the fused step does the same, so its numbers
    are a full forward pass's exactly (as the module step's are)."""
    model = small_model()
    model.set_dtype(mx.bfloat16)
    adapted(model, scale=0.05)
    model.update(tree_map(lambda p: p.astype(mx.float32), model.trainable_parameters()))
    plan, _ = fused_decode.fused_plan(model, 4)
    assert any(spec.lora_cast for _, _, specs in plan.layers for _, spec in specs), "not merged"
    assert_same_decode(model, slack=0.0)


def test_the_fused_step_follows_adapter_updates():
    """The arrays are prepared at each rollout, so an update reaches the next one."""
    model = adapted(small_model(), scale=0.0)
    before, _, _ = decode(model, True)
    model.update(tree_map(lambda p: p + 0.5, model.trainable_parameters()))
    after, _, _ = decode(model, True)
    assert after != before
    assert after == decode(model, False)[0]


def node_count(tmp_path, model, fused: bool) -> int:
    """Graph nodes of one compiled decode step of 4 rows, as the rollout compiles it."""
    caches = [prefill_prompt(model, PROMPTS[0])]
    sets, write, start = compiled_decode._fixed_buffers(caches, 4, sets=1)
    keys, values = sets[0]
    previous = compiled_decode.last_prompt_columns(keys, values, write)
    tokens = mx.array([PROMPTS[0][-1]] * 4, dtype=mx.uint32)
    args = (tokens, previous, keys, values, mx.array(write), start)
    if fused:
        plan, params = fused_decode.fused_plan(model, 4)
        step = compiled_decode._DECODERS.fused(
            compiled_decode._DECODERS.entry(model), model, plan, compiled_decode._greedy
        )
        mx.eval(step(params, *args))  # the first call traces; the second runs the compiled graph
        out = step(params, *args)
    else:
        from mlx_reasoner.engine.addmm_lora import lora_as_addmm

        with lora_as_addmm(model), cpu_math.shared_rope(model):
            step = compiled_decode._DECODERS.step(model, compiled_decode._greedy)
            mx.eval(step(*args))
            out = step(*args)
    path = tmp_path / f"step_{fused}.dot"
    mx.export_to_dot(str(path), out[0], out[1], *out[2], *out[3])  # tokens, log-probs, buffers
    return len(re.findall(r"label\s*=", path.read_text()))


def test_the_fused_step_has_far_fewer_graph_nodes(tmp_path):
    """What the step is for: each node has a fixed cost, and a small model's step is mostly
    that cost."""
    model = adapted(small_model())
    fused, modules = node_count(tmp_path, model, True), node_count(tmp_path, model, False)
    assert fused <= 0.7 * modules, (fused, modules)


def test_layouts_the_step_was_not_written_for_are_left_to_the_module_decode(monkeypatch):
    model = small_model()
    assert fused_decode.fused_plan(model, 4) is not None
    monkeypatch.setenv("MLX_REASONER_FUSED_DECODE", "0")
    assert fused_decode.fused_plan(model, 4) is None
    monkeypatch.delenv("MLX_REASONER_FUSED_DECODE")

    dropout = adapted(small_model(), dropout=0.1)
    assert fused_decode.fused_plan(dropout, 4) is None, "a dropout mask per projection"

    quantized = small_model()
    nn.quantize(quantized, group_size=32, bits=4)
    assert fused_decode.fused_plan(quantized, 4) is None

    class Wrapped(nn.Module):  # a model class of its own, even with the same blocks inside
        def __init__(self, inner):
            super().__init__()
            self.model = inner.model
            self.args = inner.args

    assert fused_decode.fused_plan(Wrapped(small_model()), 4) is None


def test_a_fused_step_that_fails_the_check_gives_way_to_the_module_decode(monkeypatch):
    """A fused step whose numbers are wrong is found out by compiled_decode_supported, and the
    rollout runs mlx-lm's modules instead."""
    real = fused_decode.fused_step

    def off_by_a_little(plan, ropes, sampler):
        step = real(plan, ropes, sampler)

        def wrong(params, *args):
            tokens, logprobs, *rest = step(params, *args)
            return (tokens, logprobs + 0.01, *rest)

        return wrong

    monkeypatch.setattr(compiled_decode, "fused_step", off_by_a_little)
    model = adapted(small_model())
    assert compiled_decode.compiled_decode_supported(model)
    assert compiled_decode._DECODERS.entry(model)["fused"] is False
    caches = [prefill_prompt(model, p) for p in PROMPTS]
    _, _, name, _ = compiled_decode.decode_compiled(model, PROMPTS, caches, 2, 3, None, frozenset())
    assert name == "compiled"
