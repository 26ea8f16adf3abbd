"""Model handling: loading errors, LoRA attachment, adapters switched off, mlx-lm adapter format."""

import json
import sys

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_reasoner.checkpoints import save_adapters
from mlx_reasoner.engine.addmm_lora import lora_as_addmm
from mlx_reasoner.errors import ReasonerError
from mlx_reasoner.model import (
    adapter_weights,
    adapters_disabled,
    attach_lora,
    load_model,
    lora_config,
)

TOKENS = mx.array([[1, 5, 9, 30, 41, 7]])


def perturb_adapters(model, amount=0.05):
    """LoRA starts as a no-op (lora_b = 0); move it so the adapters change the output."""
    mx.random.seed(1)
    model.update(
        tree_map(lambda p: p + amount * mx.random.normal(p.shape), model.trainable_parameters())
    )


def reordering_tolerance(model, tokens, monkeypatch) -> float:
    """How far two float32 evaluations of ``model(tokens)`` that differ only in the order of their
    roundings may differ: a first-order bound from the dtype and the model's sizes, whatever BLAS.

    Each chained sum of at most K products (per block q/k/v, scores, weights x values, o, gate/up,
    down; then the head) is off by up to K * eps relative, RMSNorm keeps relative errors, and a
    softmax turns a score's absolute error (d_head * eps * |score|) into that relative error of
    its weight; the logits are off by the sum of these times their size. The scores are read
    from the attention's inputs (masked ones included: an upper bound).
    """
    module = sys.modules[type(model).__module__]
    attention = module.scaled_dot_product_attention
    largest_scores = []

    def recording(queries, keys, values, cache, scale, mask, *args, **kwargs):
        per_query = mx.repeat(keys, queries.shape[1] // keys.shape[1], axis=1)
        largest_scores.append(mx.abs(scale * queries @ per_query.swapaxes(-1, -2)).max().item())
        return attention(queries, keys, values, cache, scale, mask, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(module, "scaled_dot_product_attention", recording)
        out = model(tokens)
    sizes = model.args
    k = max(sizes.hidden_size, sizes.intermediate_size)
    d_head = sizes.hidden_size // sizes.num_attention_heads
    relative = (6 * sizes.num_hidden_layers + 1) * k + d_head * sum(largest_scores)
    return relative * mx.finfo(mx.float32).eps * mx.abs(out).max().item()


def test_attach_lora_freezes_base_and_targets_top_blocks(tiny_model):
    model, _ = tiny_model
    count = attach_lora(model, lora_config(1, 4))
    names = [name for name, _ in tree_flatten(model.trainable_parameters())]
    assert names and all(n.endswith(("lora_a", "lora_b")) for n in names)
    top = len(model.layers) - 1
    assert all(n.startswith(f"model.layers.{top}.") for n in names)
    # q, k, v, o, gate, up, down: every linear layer of the block.
    assert len(names) == 14
    assert count == sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def test_adapters_disabled_gives_the_base_model_output(tiny_model):
    model, _ = tiny_model
    base = model(TOKENS)
    attach_lora(model, lora_config(-1, 4))
    perturb_adapters(model)
    adapted = model(TOKENS)
    assert mx.abs(adapted - base).max().item() > 1e-3
    with adapters_disabled(model):
        off = model(TOKENS)
    assert mx.array_equal(off, base)
    # ... and the adapters are back afterwards.
    assert mx.array_equal(model(TOKENS), adapted)


def test_lora_as_addmm_gives_the_lora_output_and_shares_the_adapters(tiny_model, monkeypatch):
    from mlx_lm.tuner.lora import LoRALinear

    model, _ = tiny_model
    attach_lora(model, lora_config(-1, 4))
    perturb_adapters(model)
    adapted = model(TOKENS)
    tolerance = reordering_tolerance(model, TOKENS, monkeypatch)
    with lora_as_addmm(model):
        layers = [m for _, m in model.named_modules() if type(m) is LoRALinear]
        wrapped = [m for _, m in model.named_modules() if type(m).__name__ == "AddmmLoRA"]
        assert len(wrapped) == len(layers) == 7 * len(model.layers)
        assert type(model.layers[0].self_attn.q_proj).__name__ == "AddmmLoRA"
        assert mx.abs(model(TOKENS) - adapted).max().item() <= tolerance
        # The wrappers hold the same arrays: an update made now is seen, and kept after.
        perturb_adapters(model, amount=0.1)
        moved = model(TOKENS)
        assert mx.abs(moved - adapted).max().item() > 1e-3
    assert mx.abs(model(TOKENS) - moved).max().item() <= reordering_tolerance(
        model, TOKENS, monkeypatch
    )
    assert sum(type(m) is LoRALinear for _, m in model.named_modules()) == 7 * len(model.layers)


def test_too_many_lora_layers_is_a_clear_error(tiny_model):
    model, _ = tiny_model
    with pytest.raises(ReasonerError, match="--lora-layers 99"):
        attach_lora(model, lora_config(99, 4))


def test_saved_adapters_load_with_mlx_lm(tiny_model, tiny_model_dir, tmp_path):
    model, _ = tiny_model
    config = lora_config(2, 4)
    attach_lora(model, config)
    perturb_adapters(model)
    expected = model(TOKENS)
    save_adapters(tmp_path, adapter_weights(model), {**config, "model": str(tiny_model_dir)})
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fine_tune_type"] == "lora"
    reloaded, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(tmp_path))
    assert mx.allclose(reloaded(TOKENS), expected, atol=1e-5)


def test_load_model_errors_are_actionable(tmp_path):
    with pytest.raises(ReasonerError, match="model directory not found"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ReasonerError, match="no config.json"):
        load_model(str(tmp_path))


def test_hub_failure_says_to_pass_a_local_directory(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ReasonerError) as info:
        load_model("nobody-here/not-a-real-model-xyz")
    message = str(info.value)
    assert "local mlx-lm model directory" in message and "--model" in message
    assert "\n" not in message


def test_quantized_base_trains_as_qlora(tiny_model):
    """A quantized model gets LoRA on its quantized linears, and scoring still works."""
    import mlx.nn as nn
    import numpy as np

    from mlx_reasoner.logprobs import completion_logprobs, pack_sequences

    model, _ = tiny_model
    nn.quantize(model, group_size=32, bits=4)
    attach_lora(model, lora_config(-1, 4))
    assert isinstance(model.layers[0].self_attn.q_proj.linear, nn.QuantizedLinear)
    perturb_adapters(model)
    batch = pack_sequences([[1, 2, 3]], [[4, 5]], np.ones(1))

    def total(params):
        model.update(params)
        return completion_logprobs(model, batch).sum()

    value, grads = mx.value_and_grad(total)(model.trainable_parameters())
    assert np.isfinite(value.item())
    norms = [mx.abs(g).sum().item() for _, g in tree_flatten(grads)]
    assert all(np.isfinite(norms)) and sum(norms) > 0
