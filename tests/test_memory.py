"""The memory estimate: exact arithmetic where it can be exact, the direction of every option, the
one-line refusal and its suggestion, ``train``'s pre-flight, and a measured peak beside it."""

import dataclasses
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen2

from mlx_reasoner import memory
from mlx_reasoner.cli import main
from mlx_reasoner.config import TrainConfig
from mlx_reasoner.errors import ReasonerError
from mlx_reasoner.memory import (
    GB,
    ModelShape,
    StepOptions,
    check_fits,
    estimate_step,
    prompt_tokens_estimate,
    step_options,
)
from mlx_reasoner.prompts import load_system_prompt

QWEN25_3B = ModelShape(
    hidden_size=2048,
    num_layers=36,
    num_heads=16,
    num_kv_heads=2,
    head_dim=128,
    intermediate_size=11008,
    vocab_size=151936,
    dtype_bytes=2,
    tied_embeddings=True,
    attention_bias=True,
)


def qwen2_model(tied=True, **sizes):
    args = dict(
        model_type="qwen2",
        hidden_size=64,
        num_hidden_layers=3,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        vocab_size=256,
        tie_word_embeddings=tied,
    )
    return qwen2.Model(qwen2.ModelArgs(**{**args, **sizes}))


def parameter_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


# --- exact arithmetic ----------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_weight_bytes_are_exact_for_qwen2(tied, dtype):
    model = qwen2_model(tied)
    model.set_dtype(dtype)
    assert ModelShape.from_model(model).weight_bytes() == parameter_bytes(model)


def test_weight_bytes_are_exact_for_llama_without_biases_and_a_quantized_model():
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=1,
        rms_norm_eps=1e-6,
        vocab_size=320,
        tie_word_embeddings=False,
    )
    model = llama.Model(args)
    model.set_dtype(mx.float16)
    assert ModelShape.from_model(model).weight_bytes() == parameter_bytes(model)

    nn.quantize(model, group_size=32, bits=4)
    shape = ModelShape.from_model(model)
    assert (shape.quant_bits, shape.quant_group_size, shape.dtype_bytes) == (4, 32, 2)
    assert shape.weight_bytes() == parameter_bytes(model)


def test_the_3b_shape_by_hand():
    # Embedding 151936 x 2048; per block q/o 2048^2 each, k/v 2048 x 256 each, MLP 3 x 2048 x
    # 11008, biases 2048 + 2 x 256, norms 2 x 2048; one final norm.
    block = 2 * 2048**2 + 2 * 2048 * 256 + 3 * 2048 * 11008 + (2048 + 512) + 2 * 2048
    elements = 151936 * 2048 + 36 * block + 2048
    assert QWEN25_3B.weight_bytes() == 2 * elements == 6_171_877_376


def test_a_folder_gives_the_shape_of_the_loaded_model(tiny_model_dir, tiny_model):
    model, _ = tiny_model
    from_folder = ModelShape.from_folder(tiny_model_dir)
    assert from_folder == ModelShape.from_model(model)
    assert from_folder.weight_bytes() == parameter_bytes(model)


def test_kv_cache_bytes_by_hand():
    shape = dataclasses.replace(QWEN25_3B, num_layers=3)
    options = StepOptions(batch_size=2, group_size=4, prompt_tokens=100, max_completion_tokens=60)
    # The compiled decode's last column is 100 + 60 - 2 = 158: buffers 192 wide. Each set holds
    # keys and values of 3 layers x 8 rows x 2 heads x 128 dims in bfloat16.
    one_set = 3 * 2 * 8 * 192 * 256 * 2
    # mlx-lm's prefill caches: one per prompt, 256 columns each.
    prefill = 2 * 3 * 2 * 256 * 256 * 2
    assert memory.kv_set_bytes(shape, options) == one_set
    expected = int(memory.DECODE_KV_SETS * one_set) + prefill
    assert estimate_step(shape, options).kv_cache == expected


def test_one_kv_set_matches_the_decode_buffers(tiny_model):
    from mlx_reasoner.engine.compiled_decode import _fixed_buffers
    from mlx_reasoner.model import prefill_prompt

    model, _ = tiny_model
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    sets, _, _ = _fixed_buffers([prefill_prompt(model, p) for p in prompts], group_size=3)
    buffers = sum(a.nbytes for keys, values in sets[:1] for a in keys + values)
    options = StepOptions(
        batch_size=2, group_size=3, prompt_tokens=7, max_completion_tokens=20, compiled_decode=True
    )
    assert buffers == memory.kv_set_bytes(ModelShape.from_model(model), options)


def test_training_tokens_follow_the_layout():
    options = StepOptions(
        batch_size=2, group_size=8, prompt_tokens=201, max_completion_tokens=250, micro_batch_size=4
    )
    # Shared prompts: one prompt (200 tokens before its last) and four 256-wide completion rows.
    assert memory.training_tokens(options) == 208 + 4 * 256
    # Packed (and always with checkpointing): each row carries its prompt, 451 -> 464 wide.
    assert memory.training_tokens(dataclasses.replace(options, grad_checkpoint=True)) == 4 * 464
    # A micro-batch that straddles two groups holds both prompts.
    straddle = dataclasses.replace(options, group_size=6, micro_batch_size=4)
    assert memory.prompts_per_micro_batch(straddle) == 2


# --- direction ------------------------------------------------------------------------------

GROWING = {
    "batch_size": (1, 4),
    "group_size": (8, 16),  # below the micro-batch size, more prompts share a micro-batch
    "prompt_tokens": (50, 400),
    "max_completion_tokens": (64, 512),
    "micro_batch_size": (1, 8),
    "lora_layers": (4, -1),
    "lora_rank": (4, 64),
}


@pytest.mark.parametrize("name", sorted(GROWING))
def test_more_of_any_option_never_needs_less(name):
    small, large = GROWING[name]
    base = StepOptions()
    low = estimate_step(QWEN25_3B, dataclasses.replace(base, **{name: small}))
    high = estimate_step(QWEN25_3B, dataclasses.replace(base, **{name: large}))
    parts = ("weights", "kv_cache", "activations", "logits", "adapters")
    assert all(getattr(high, part) >= getattr(low, part) for part in parts)
    assert sum(getattr(high, p) for p in parts) > sum(getattr(low, p) for p in parts)
    assert high.peak >= low.peak and high.rollout >= low.rollout


@pytest.mark.parametrize(
    "change, phase",
    [
        ({"grad_checkpoint": True}, "training"),
        ({"share_prompts": True}, "training"),
        ({"compiled_decode": False}, "rollout"),  # one growing cache, not two sets of buffers
    ],
)
def test_the_memory_saving_switches_save(change, phase):
    base = StepOptions(share_prompts=False, compiled_decode=True)
    saving = estimate_step(QWEN25_3B, dataclasses.replace(base, **change))
    assert getattr(saving, phase) < getattr(estimate_step(QWEN25_3B, base), phase)


def test_the_split_adds_up_to_the_peak():
    estimate = estimate_step(QWEN25_3B, StepOptions())
    split = estimate.split()
    assert split["peak"] == max(split["rollout"], split["training"])
    parts = split["weights"] + split["activations"] + split["logits"] + split["adapters"]
    assert split["training"] == pytest.approx(parts)


# --- the refusal ----------------------------------------------------------------------------


def flags_to_options(message: str, options: StepOptions) -> StepOptions:
    """Apply the flags after 'use' in a refusal to ``options``."""
    suggested = re.search(r"; use (.*?) \(about", message).group(1)
    changes = {}
    for flag, value in re.findall(r"--([a-z-]+)(?: (\d+))?", suggested):
        name = flag.replace("-", "_")
        changes[name] = True if value == "" else int(value)
    return dataclasses.replace(options, **changes)


@pytest.mark.parametrize("limit_gb", [12.0, 9.0, 7.8])
def test_the_refusal_is_one_line_and_its_suggestion_fits(limit_gb):
    options = StepOptions(max_completion_tokens=512, micro_batch_size=8)
    estimate = estimate_step(QWEN25_3B, options)
    assert estimate.peak > limit_gb * GB
    with pytest.raises(ReasonerError) as raised:
        check_fits(estimate, limit_gb * GB, "--memory-limit-gb")
    message = str(raised.value)
    assert "\n" not in message
    assert f"{estimate.peak / GB:.1f} GB" in message and f"{limit_gb:.1f} GB" in message
    fixed = flags_to_options(message, options)
    assert fixed != options
    assert estimate_step(QWEN25_3B, fixed).peak <= limit_gb * GB


def test_the_least_costly_change_comes_first():
    estimate = estimate_step(QWEN25_3B, StepOptions(micro_batch_size=8))
    limit = estimate_step(QWEN25_3B, StepOptions(micro_batch_size=4)).peak
    with pytest.raises(ReasonerError, match=r"use --micro-batch-size 4 \(about"):
        check_fits(estimate, limit)


def test_weights_over_the_limit_ask_for_another_model():
    estimate = estimate_step(QWEN25_3B, StepOptions())
    with pytest.raises(ReasonerError, match="the weights alone are 6.2 GB; use a smaller or"):
        check_fits(estimate, 5 * GB)


def test_a_step_that_fits_passes():
    estimate = estimate_step(QWEN25_3B, StepOptions())
    check_fits(estimate, estimate.peak)


def test_prompt_estimate_covers_gsm8k():
    # GSM8K's longest prompt with the default system prompt is 247 Qwen2.5 tokens.
    assert prompt_tokens_estimate(load_system_prompt()) >= 247


# --- train's pre-flight ---------------------------------------------------------------------


def train_args(model_dir, run_dir, *extra):
    args = ["train", "--model", model_dir, "--dataset", "task:letter-count", "--steps", 1]
    args += ["--batch-size", 1, "--group-size", 2, "--max-completion-tokens", 8]
    return [*map(str, args), "--run-dir", str(run_dir), *map(str, extra)]


def tiny_estimate(model_dir, **changes):
    config = TrainConfig(
        model=str(model_dir),
        batch_size=1,
        group_size=2,
        max_completion_tokens=8,
        **changes,
    )
    prompt = prompt_tokens_estimate(load_system_prompt())
    shape = ModelShape.from_folder(model_dir)
    return estimate_step(shape, step_options(config, prompt, shape))


def test_train_refuses_before_creating_the_run_folder(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    needed = tiny_estimate(tiny_model_dir, micro_batch_size=4)
    fits = tiny_estimate(tiny_model_dir, micro_batch_size=1)
    limit_gb = (needed.peak + fits.peak) / 2 / GB
    assert fits.peak < limit_gb * GB < needed.peak
    result = CliRunner().invoke(
        main,
        train_args(
            tiny_model_dir,
            run_dir,
            "--micro-batch-size",
            "4",
            "--memory-limit-gb",
            f"{limit_gb:.9f}",
        ),
    )
    assert result.exit_code == 1
    assert "over the" in result.output and "(--memory-limit-gb)" in result.output
    assert "--micro-batch-size" in result.output
    assert "Traceback" not in result.output
    assert not run_dir.exists()


def test_train_refuses_a_model_too_big_for_the_limit(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        main, train_args(tiny_model_dir, run_dir, "--memory-limit-gb", 0.0001)
    )
    assert result.exit_code == 1 and "the weights alone are" in result.output
    assert not run_dir.exists()


def test_preflight_skips_what_it_cannot_read(tmp_path):
    config = TrainConfig(model=str(tmp_path / "nowhere"))
    assert memory.preflight(config, "") is None


# --- against a measured peak ----------------------------------------------------------------


def measured_training_peak(model, options: StepOptions) -> float:
    from mlx_reasoner.rollout import Rollouts
    from mlx_reasoner.trainer import (
        GradientComputer,
        make_optimizer,
        policy_update,
        use_shared_prompts,
    )

    rng = np.random.default_rng(0)
    rows = options.micro_batch_size
    prompt = rng.integers(3, 500, options.prompt_tokens).tolist()
    completions = [rng.integers(3, 500, options.max_completion_tokens).tolist()] * rows
    rollouts = Rollouts(
        options.group_size, [prompt] * rows, completions, ["length"] * rows, [""] * rows
    )
    config = TrainConfig(
        batch_size=1,
        group_size=options.group_size,
        max_completion_tokens=options.max_completion_tokens,
        micro_batch_size=rows,
    )
    optimizer = make_optimizer(config)
    grads = GradientComputer.for_config(model, config, use_shared_prompts(model, config))
    advantages = np.linspace(-1, 1, rows).astype(np.float32)
    mx.clear_cache()
    mx.reset_peak_memory()
    policy_update(model, optimizer, grads, rollouts, advantages, config)
    return mx.get_peak_memory()


def test_the_estimate_is_near_a_measured_peak():
    """A small bfloat16 model whose vocabulary and MLP are wide enough that the modelled parts
    are most of its memory, as at real shapes."""
    from mlx_reasoner.model import attach_lora, lora_config

    model = qwen2_model(
        hidden_size=256, num_hidden_layers=2, intermediate_size=1024, vocab_size=8192
    )
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    attach_lora(model, lora_config(-1, 8))
    options = StepOptions(
        batch_size=1,
        group_size=4,
        prompt_tokens=48,
        max_completion_tokens=96,
        micro_batch_size=4,
        lora_layers=-1,
        compiled_decode=True,
        compiled_training=memory.compiles_training_pass(ModelShape.from_model(model)),
    )
    estimate = estimate_step(ModelShape.from_model(model), options)
    measured = measured_training_peak(model, options)
    # The bounds come from what the estimate leaves out or takes at its most (training_bounds).
    low, high = memory.training_bounds(estimate)
    assert low <= measured <= high


# --- the limit ------------------------------------------------------------------------------


def test_the_limit_is_the_option_or_the_device(monkeypatch):
    assert memory.memory_limit(TrainConfig(memory_limit_gb=3.5)) == (3.5e9, "--memory-limit-gb")
    ram, what = memory.memory_limit(TrainConfig())
    assert ram > 1e9 and what == "this machine's RAM"

    # On Metal: the GPU's recommended working set, as mlx-lm's generate uses it.
    info = {"max_recommended_working_set_size": 11_453_251_584, "memory_size": 17_179_869_184}
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    monkeypatch.setattr(mx, "device_info", lambda: info)
    assert memory.device_memory() == (11_453_251_584, "the GPU's recommended working set")


def test_the_training_pass_is_compiled_as_the_trainer_decides(monkeypatch):
    # On the CPU only small models' passes are compiled (trainer.compile_training_pass).
    tiny = dataclasses.replace(QWEN25_3B, num_layers=1, hidden_size=64, vocab_size=512)
    assert memory.compiles_training_pass(tiny) and not memory.compiles_training_pass(QWEN25_3B)
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    assert memory.compiles_training_pass(QWEN25_3B)


def test_no_memory_check_skips_the_refusal_and_the_refusal_names_it(tiny_model_dir):
    config = TrainConfig(model=str(tiny_model_dir), memory_limit_gb=0.0001)
    with pytest.raises(ReasonerError, match="--no-memory-check runs it anyway"):
        memory.preflight(config, "")
    config.memory_check = False
    assert memory.preflight(config, "") is None
