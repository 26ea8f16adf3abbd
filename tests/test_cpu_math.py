"""The CPU SwiGLU: same values and gradients as mlx-lm's, swapped in only where it applies."""

import sys

import mlx.core as mx
import pytest
from mlx_lm.models.activations import swiglu

from mlx_reasoner import cpu_math
from mlx_reasoner.cpu_math import fast_activations, swiglu_via_power


def gates_and_inputs():
    mx.random.seed(0)
    gate = mx.concatenate([mx.linspace(-120, 120, 4001), 5 * mx.random.normal((4000,))])
    return gate, mx.random.normal(gate.shape)


def test_swiglu_via_power_matches_mlx_lm_values_and_gradients():
    gate, x = gates_and_inputs()
    assert mx.allclose(swiglu_via_power(gate, x), swiglu(gate, x), rtol=1e-5, atol=1e-5).item()
    ours = mx.grad(lambda g, u: swiglu_via_power(g, u).sum(), argnums=(0, 1))(gate, x)
    theirs = mx.grad(lambda g, u: swiglu(g, u).sum(), argnums=(0, 1))(gate, x)
    for a, b in zip(ours, theirs):
        assert mx.all(mx.isfinite(a)).item(), "no overflow in the gradient, even at -120"
        assert mx.allclose(a, b, rtol=1e-5, atol=1e-5).item()


def test_half_precision_keeps_mlx_lm_swiglu():
    gate, x = (a.astype(mx.bfloat16) for a in gates_and_inputs())
    assert mx.array_equal(swiglu_via_power(gate, x), swiglu(gate, x)).item()


def test_the_swap_lasts_only_while_the_context_is_open(tiny_model, monkeypatch):
    model, _ = tiny_model
    module = sys.modules[type(model).__module__]
    monkeypatch.setattr(cpu_math, "fast_activations_apply", lambda: True)
    with fast_activations(model):
        assert module.swiglu is swiglu_via_power
        with fast_activations(model):  # nested: still swapped, restored only by the outer one
            assert module.swiglu is swiglu_via_power
        assert module.swiglu is swiglu_via_power
    assert module.swiglu is swiglu


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


def test_the_model_gives_the_same_logits_with_and_without_the_swap(tiny_model, monkeypatch):
    model, _ = tiny_model
    tokens = mx.array([[3, 5, 7, 11, 13, 17, 19, 23]])
    plain = model(tokens)
    monkeypatch.setattr(cpu_math, "fast_activations_apply", lambda: True)
    with fast_activations(model):
        swapped = model(tokens)
    assert mx.allclose(plain, swapped, rtol=1e-4, atol=1e-4).item()
