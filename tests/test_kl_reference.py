"""The KL reference is the policy training started from: the base plus the ``--adapter-path``
adapters, held as a frozen copy of the adapters only (``--kl-reference base``: the bare base)."""

import json
import shutil

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_map

from mlx_reasoner.cli import main
from mlx_reasoner.model import adapter_weights, load_adapters, reference_policy
from mlx_reasoner.run import STARTING_ADAPTERS

TOKENS = mx.array([[1, 5, 9, 30, 7, 2]])


def fresh_model(model_dir):
    # Not the tiny_model fixture: eval_adapter has attached its own adapters to that one.
    return mlx_lm.load(str(model_dir))[0]


def test_reference_policy_holds_the_starting_adapters(tiny_model_dir, eval_adapter):
    model = fresh_model(tiny_model_dir)
    load_adapters(model, str(eval_adapter))
    starting = adapter_weights(model)
    at_start = model(TOKENS)
    with reference_policy(model) as base_model:
        base = base_model(TOKENS)
    assert mx.abs(at_start - base).max().item() > 1e-2  # the adapters matter here

    # Training moves the live adapters; the reference stays where training started.
    model.update(tree_map(lambda p: p + 0.1, model.trainable_parameters()))
    assert mx.abs(model(TOKENS) - at_start).max().item() > 1e-2
    with reference_policy(model, starting) as reference:
        np.testing.assert_allclose(np.array(reference(TOKENS)), np.array(at_start), atol=1e-5)
    with reference_policy(model, None) as bare:
        np.testing.assert_allclose(np.array(bare(TOKENS)), np.array(base), atol=1e-6)
    # The live adapters are back, and the reference shares the base weights.
    assert mx.abs(model(TOKENS) - at_start).max().item() > 1e-2
    assert not [k for k in starting if "lora" not in k]


def test_starting_adapters_of_another_layout_are_refused(tiny_model_dir, eval_adapter):
    model = fresh_model(tiny_model_dir)
    load_adapters(model, str(eval_adapter))
    starting = {k: v for k, v in adapter_weights(model).items() if ".layers.0." not in k}
    with (
        pytest.raises(Exception, match="another adapter layout"),
        reference_policy(model, starting),
    ):
        pass


def train_args(model_dir, adapters, run_dir, reference, steps=1):
    return [
        "train",
        "--model",
        str(model_dir),
        "--adapter-path",
        str(adapters),
        "--kl-reference",
        reference,
        "--dataset",
        "task:arithmetic",
        "--steps",
        str(steps),
        "--batch-size",
        "2",
        "--group-size",
        "3",
        "--max-completion-tokens",
        "6",
        "--beta",
        "0.04",
        "--learning-rate",
        "5e-3",
        "--warmup-steps",
        "1",
        "--save-every",
        "2",
        "--sample-every",
        "0",
        "--run-dir",
        str(run_dir),
    ]


def read_metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_first_step_kl_is_zero_against_the_start_and_not_against_the_base(
    tiny_model_dir, eval_adapter, tmp_path
):
    runner = CliRunner()
    start, base = tmp_path / "start", tmp_path / "base"
    for run_dir, reference in ((start, "start"), (base, "base")):
        result = runner.invoke(main, train_args(tiny_model_dir, eval_adapter, run_dir, reference))
        assert result.exit_code == 0, result.output
    # Before the first update the policy is the starting policy: no divergence from it.
    kl_start, kl_base = read_metrics(start)[0]["kl"], read_metrics(base)[0]["kl"]
    assert kl_start < 1e-5
    assert kl_base > 1e-3
    kept = mx.load(str(start / STARTING_ADAPTERS))
    given = mx.load(str(eval_adapter / "adapters.safetensors"))
    assert kept.keys() == given.keys()
    for name in given:
        assert mx.array_equal(kept[name], given[name]), name
    assert not (base / STARTING_ADAPTERS).exists()


@pytest.mark.slow
def test_a_resumed_run_keeps_the_same_reference(tiny_model_dir, eval_adapter, tmp_path):
    runner = CliRunner()
    run_dir = tmp_path / "run"
    result = runner.invoke(main, train_args(tiny_model_dir, eval_adapter, run_dir, "start", 4))
    assert result.exit_code == 0, result.output
    straight = read_metrics(run_dir)
    # Go back to the step-2 checkpoint and move the original adapters away: the resumed
    # steps must still compare with the policy the run started from.
    shutil.rmtree(run_dir / "checkpoints" / "step_0000004")
    moved = tmp_path / "moved"
    eval_adapter.rename(moved)
    result = runner.invoke(main, ["train", "--resume", str(run_dir)])
    assert result.exit_code == 0, result.output
    resumed = read_metrics(run_dir)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert min(m["kl"] for m in straight[2:]) > 0
    for got, want in zip(resumed[2:], straight[2:]):
        assert got["kl"] == pytest.approx(want["kl"], rel=1e-5, abs=1e-9), got["step"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5, abs=1e-7), got["step"]
