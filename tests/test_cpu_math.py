"""cpu_math: mlx-lm's values and gradients, swapped in only where it applies."""

import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.activations import swiglu

from mlx_reasoner.engine import cpu_math
from mlx_reasoner.engine.cpu_math import cpu_swiglu, exp_polynomial, fast_activations

# Each exponential cpu_math chooses from: the polynomial for every size, or power for every size.
EXPONENTIALS = {"polynomial": 0, "power": 10**12}


@pytest.fixture(params=sorted(EXPONENTIALS))
def exponential(request, monkeypatch):
    monkeypatch.setattr(cpu_math, "POLYNOMIAL_MIN_SIZE", EXPONENTIALS[request.param])
    return request.param


def test_exp_polynomial_is_within_float32_rounding_of_exp():
    x = mx.concatenate([mx.linspace(-87.3, 88.0, 200001), mx.random.normal((10000,))])
    exact = np.exp(np.array(x, dtype=np.float64))
    ours = np.array(exp_polynomial(x), dtype=np.float64)
    theirs = np.array(mx.exp(x), dtype=np.float64)
    ours_error = np.max(np.abs(ours - exact) / exact)
    theirs_error = np.max(np.abs(theirs - exact) / exact)
    # Most of either error is the rounding of x itself, amplified by |x|; near 0 both are tight.
    assert ours_error <= 1.5 * theirs_error
    small = np.abs(np.array(x)) < 1
    assert np.max(np.abs(ours - exact)[small] / exact[small]) < 3e-7


def test_exp_polynomial_edges():
    x = mx.array([0.0, -mx.inf, -1000.0, -87.4, mx.inf, 1000.0, mx.nan])
    out = exp_polynomial(x).tolist()
    assert out[0] == 1.0
    assert out[1:4] == [0.0, 0.0, 0.0]  # below -87.3 (exp's subnormals and beyond): 0
    assert np.isfinite(out[4]) and out[4] == out[5] > 1e38  # above 88: held at e^88
    assert np.isnan(out[6])


def gates_and_inputs():
    mx.random.seed(0)
    gate = mx.concatenate([mx.linspace(-120, 120, 4001), 5 * mx.random.normal((4000,))])
    return gate, mx.random.normal(gate.shape)


def test_cpu_swiglu_matches_mlx_lm_values_and_gradients(exponential):
    gate, x = gates_and_inputs()
    assert mx.allclose(cpu_swiglu(gate, x), swiglu(gate, x), rtol=1e-5, atol=1e-5).item()
    ours = mx.grad(lambda g, u: cpu_swiglu(g, u).sum(), argnums=(0, 1))(gate, x)
    theirs = mx.grad(lambda g, u: swiglu(g, u).sum(), argnums=(0, 1))(gate, x)
    for a, b in zip(ours, theirs):
        assert mx.all(mx.isfinite(a)).item(), "no overflow in the gradient, even at -120"
        assert mx.allclose(a, b, rtol=1e-5, atol=1e-5).item()


def test_half_precision_keeps_mlx_lm_swiglu():
    gate, x = (a.astype(mx.bfloat16) for a in gates_and_inputs())
    assert mx.array_equal(cpu_swiglu(gate, x), swiglu(gate, x)).item()


def test_the_swap_lasts_only_while_the_context_is_open(tiny_model, monkeypatch):
    model, _ = tiny_model
    module = sys.modules[type(model).__module__]
    monkeypatch.setattr(cpu_math, "fast_activations_apply", lambda: True)
    from mlx_lm.models.base import scaled_dot_product_attention

    from mlx_reasoner.engine.cpu_math import cpu_attention

    with fast_activations(model):
        assert module.swiglu is cpu_swiglu
        assert module.scaled_dot_product_attention is cpu_attention
        with fast_activations(model):  # nested: still swapped, restored only by the outer one
            assert module.swiglu is cpu_swiglu
        assert module.swiglu is cpu_swiglu
    assert module.swiglu is swiglu
    assert module.scaled_dot_product_attention is scaled_dot_product_attention


@pytest.mark.parametrize("setting", ["0", "off"])
def test_the_environment_switch_turns_it_off(tiny_model, monkeypatch, setting):
    model, _ = tiny_model
    module = sys.modules[type(model).__module__]
    monkeypatch.setenv(cpu_math.ENV_SWITCH, setting)
    assert not cpu_math.fast_activations_apply()
    with fast_activations(model):
        assert module.swiglu is swiglu


def test_a_model_without_mlx_lm_swiglu_is_left_alone(tiny_model, monkeypatch):
    model, _ = tiny_model
    module = sys.modules[type(model).__module__]
    monkeypatch.setattr(cpu_math, "fast_activations_apply", lambda: True)

    def own_swiglu(gate, x):
        return gate * x

    monkeypatch.setattr(module, "swiglu", own_swiglu)
    with fast_activations(model):
        assert module.swiglu is own_swiglu


def test_the_model_gives_the_same_logits_with_and_without_the_swap(
    tiny_model, monkeypatch, exponential
):
    model, _ = tiny_model
    tokens = mx.array([[3, 5, 7, 11, 13, 17, 19, 23]])
    plain = model(tokens)
    monkeypatch.setattr(cpu_math, "fast_activations_apply", lambda: True)
    with fast_activations(model):
        swapped = model(tokens)
    assert mx.allclose(plain, swapped, rtol=1e-4, atol=1e-4).item()


def attention_inputs(heads=4, kv_heads=2, length=5, width=9):
    mx.random.seed(1)
    q = mx.random.normal((2, heads, length, 16))
    k = mx.random.normal((2, kv_heads, width, 16))
    v = mx.random.normal((2, kv_heads, width, 16))
    return q, k, v


def weighted_grads(fn, mask, cotangent, *inputs):
    """Gradients of ``sum(fn(...) * cotangent)`` with respect to queries, keys and values."""

    def loss(q, k, v):
        return (fn(q, k, v, None, 0.25, mask) * cotangent).sum()

    return mx.grad(loss, argnums=(0, 1, 2))(*inputs)


def some_masks(heads, length, width):
    keep = mx.random.uniform(shape=(2, 1, length, width)) > 0.4
    keep = keep | (mx.arange(width) == 0)  # no row is empty
    return {
        "none": None,
        "causal": "causal",
        "bool per batch": keep,
        "bool per head": mx.broadcast_to(keep, (2, heads, length, width)),
        "additive [L, S]": mx.random.normal((length, width)),
    }


@pytest.mark.parametrize(
    "heads, kv_heads, length, width", [(4, 2, 5, 9), (4, 4, 1, 7), (2, 1, 6, 6)]
)
def test_cpu_attention_matches_mlx_lm(heads, kv_heads, length, width, exponential):
    from mlx_lm.models.base import scaled_dot_product_attention as sdpa

    from mlx_reasoner.engine.cpu_math import cpu_attention

    q, k, v = attention_inputs(heads, kv_heads, length, width)
    for name, mask in some_masks(heads, length, width).items():
        ours = cpu_attention(q, k, v, None, 0.25, mask)
        theirs = sdpa(q, k, v, None, 0.25, mask)
        assert ours.shape == theirs.shape, name
        assert mx.allclose(ours, theirs, rtol=1e-5, atol=1e-5).item(), name

        cotangent = mx.random.normal(theirs.shape)
        grads = [weighted_grads(fn, mask, cotangent, q, k, v) for fn in (cpu_attention, sdpa)]
        for ours, theirs in zip(*grads):
            assert mx.allclose(ours, theirs, rtol=1e-4, atol=1e-4).item(), name


@pytest.mark.parametrize("dims, head_dim, length", [(16, 16, 1), (8, 16, 3)])
def test_shared_rope_gives_mx_fast_rope_exactly(dims, head_dim, length):
    import mlx.nn as nn

    from mlx_reasoner.engine.cpu_math import RopeAngles, SharedRoPE

    mx.random.seed(3)
    rope = nn.RoPE(dims, base=10000.0, scale=0.5)
    shared = SharedRoPE(rope, RopeAngles())
    offset = mx.array([0, 7, 130], dtype=mx.int32)
    for heads in (4, 2):  # queries, then keys: the second call reuses the angles
        x = mx.random.normal((3, heads, length, head_dim))
        assert mx.array_equal(shared(x, offset=offset), rope(x, offset=offset)).item()
    x = mx.random.normal((3, 2, length, head_dim))
    assert mx.array_equal(shared(x, offset=5), rope(x, offset=5)).item()  # scalar: rope's own


def test_shared_rope_swaps_only_plain_rope_and_puts_it_back(tiny_model):
    import mlx.nn as nn

    from mlx_reasoner.engine.cpu_math import shared_rope

    model, _ = tiny_model
    tokens = mx.array([[3, 5, 7, 11]])
    before = model(tokens)
    with shared_rope(model):
        kinds = {type(layer.self_attn.rope).__name__ for layer in model.layers}
        assert kinds == {"SharedRoPE"}
        assert mx.array_equal(model(tokens), before).item()  # no cache: rope's own path
    assert all(type(layer.self_attn.rope) is nn.RoPE for layer in model.layers)


@pytest.mark.parametrize(
    "out_features, in_features, rows, packed",
    [
        (640, 256, 4, True),  # the bench model's MLP at a 4-row decode step
        (512, 256, 4, True),  # its tied output layer
        (256, 256, 4, False),  # 1024 outputs: OpenBLAS's unpacked kernel takes it as it is
        (640, 256, 8, False),  # over a million multiply-adds: packed either way
        (11008, 2048, 1, False),  # a 3B model's MLP: packed either way
        (128, 16, 1, True),  # K under 32
    ],
)
def test_which_weights_openblas_packs_when_transposed(out_features, in_features, rows, packed):
    assert cpu_math.packed_when_transposed(out_features, in_features, rows) is packed


def test_small_weights_transposed_gives_the_same_logits_and_puts_the_layers_back(
    tiny_model, monkeypatch
):
    import mlx.nn as nn

    from mlx_reasoner.engine.cpu_math import small_weights_transposed

    monkeypatch.setattr(cpu_math, "small_weights_apply", lambda: True)
    model, _ = tiny_model
    tokens = mx.array([[3, 5, 7, 11]] * 3)  # 3 x 4 tokens: 12 rows for each layer
    before = model(tokens)
    originals = dict(model.named_modules())
    with small_weights_transposed(model, rows=12):
        swapped = {name: type(m).__name__ for name, m in model.named_modules()}
        assert swapped["model.embed_tokens"] == "_RowMajorHead"  # tied: the output layer
        mlp = model.layers[0].mlp
        shape = mlp.gate_proj.weight_t.shape
        assert shape == originals["model.layers.0.mlp.gate_proj"].weight.T.shape
        assert type(mlp.down_proj) is nn.Linear  # 64 x 12 outputs: not packed, left alone
        # Code that reads a layer's weight still finds it, as the original holds it.
        assert mx.array_equal(
            mlp.gate_proj.weight, originals["model.layers.0.mlp.gate_proj"].weight
        )
        assert model.model.embed_tokens.weight is originals["model.embed_tokens"].weight
        np.testing.assert_allclose(np.array(model(tokens)), np.array(before), atol=1e-5)
    assert {name: type(m) for name, m in model.named_modules()} == {
        name: type(m) for name, m in originals.items()
    }
    assert mx.array_equal(model(tokens), before).item()


def test_small_weights_transposed_needs_openblas_on_the_cpu(tiny_model, monkeypatch):
    import dataclasses

    from mlx_reasoner.engine import blas
    from mlx_reasoner.engine.cpu_math import small_weights_apply, small_weights_transposed

    model, _ = tiny_model
    reference = dataclasses.replace(blas.blas_info(), name=blas.REFERENCE_NAME, enabled=False)
    monkeypatch.setattr(cpu_math, "blas_info", lambda: reference)
    assert not small_weights_apply()
    layout = [(name, type(m)) for name, m in model.named_modules()]
    with small_weights_transposed(model, rows=48):
        assert [(name, type(m)) for name, m in model.named_modules()] == layout


def test_small_weights_transposed_takes_an_untied_head_and_leaves_the_embedding(monkeypatch):
    import mlx.nn as nn
    from mlx_lm.models import qwen2

    from mlx_reasoner.engine.cpu_math import small_weights_transposed

    monkeypatch.setattr(cpu_math, "small_weights_apply", lambda: True)
    mx.random.seed(1)
    args = qwen2.ModelArgs(
        model_type="qwen2",
        hidden_size=64,
        num_hidden_layers=1,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        vocab_size=200,
        tie_word_embeddings=False,
    )
    model = qwen2.Model(args)
    mx.eval(model.parameters())
    tokens = mx.array([[3, 5, 7, 11]] * 3)
    before = model(tokens)
    with small_weights_transposed(model, rows=12):  # 200 x 12 outputs: packed when transposed
        assert type(model.lm_head).__name__ == "_RowMajorLinear"
        assert type(model.model.embed_tokens) is nn.Embedding  # untied: only a lookup
        np.testing.assert_allclose(np.array(model(tokens)), np.array(before), atol=1e-5)
    assert type(model.lm_head) is nn.Linear


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
def test_row_major_copies_a_transposed_matrix_exactly(dtype):
    """The multiplication by one gives every value back: large, tiny, infinite, NaN, -0."""
    from mlx_reasoner.engine.cpu_math import row_major

    special = mx.array([[float("inf"), float("-inf"), float("nan"), -0.0, 1e-30, 3e4]])
    matrix = mx.concatenate([mx.random.normal((7, 6)) * 1e3, special]).astype(dtype)  # [8, 6]
    copy = row_major(matrix.T)
    assert copy.dtype == dtype and copy.shape == (6, 8)
    assert mx.array_equal(copy, matrix.T, equal_nan=True).item()
    expected = np.signbit(np.array(matrix.T.astype(mx.float32)))
    assert (np.signbit(np.array(copy.astype(mx.float32))) == expected).all()
