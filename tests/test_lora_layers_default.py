"""``--lora-layers``: the default adapts every block of a model under 16 blocks; an explicit
number above the model's depth is a one-line error before anything is loaded."""

import json

import mlx_lm
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlx_reasoner import model as model_module
from mlx_reasoner.cli import main
from mlx_reasoner.config import DEFAULT_LORA_LAYERS, SFTConfig, TrainConfig
from mlx_reasoner.memory import ModelShape, preflight

# The smallest run of each command on the tiny model; --lora-layers is left to the test.
SHORT_RUN = {
    "train": ["--steps", "1", "--batch-size", "1", "--group-size", "2"],
    "sft": ["--steps", "1", "--batch-size", "2"],
}
COMMON = ["--dataset", "task:letter-count", "--max-completion-tokens", "4", "--save-every", "0"]


def invoke(command, model_dir, run_dir, *extra):
    args = [command, "--model", str(model_dir), *COMMON, *SHORT_RUN[command]]
    return CliRunner().invoke(main, [*args, "--run-dir", str(run_dir), *map(str, extra)])


def adapted_block_indices(model) -> set[int]:
    """Indices of the blocks holding LoRA weights."""
    return {
        index
        for index, block in enumerate(model.layers)
        if any(name.endswith("lora_a") for name, _ in tree_flatten(block.parameters()))
    }


def test_the_tiny_model_is_shallower_than_the_default(tiny_model_dir):
    assert ModelShape.from_folder(tiny_model_dir).num_layers < DEFAULT_LORA_LAYERS
    assert TrainConfig().lora_layers is None and SFTConfig().lora_layers is None


@pytest.mark.parametrize("command", ["train", "sft"])
def test_the_default_adapts_every_block_of_a_small_model(command, tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = invoke(command, tiny_model_dir, run_dir)
    assert result.exit_code == 0, result.output

    shape = ModelShape.from_folder(tiny_model_dir)
    blocks = shape.num_layers
    assert f"on {blocks} blocks" in result.output
    # mlx-lm's format: the saved adapter_config.json holds the number of blocks adapted.
    adapter_config = json.loads((run_dir / "adapter_config.json").read_text())
    assert adapter_config["num_layers"] == blocks
    config = json.loads((run_dir / "config.json").read_text())
    assert config["lora_layers"] is None and config["lora"]["num_layers"] == blocks
    model, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(run_dir))
    assert adapted_block_indices(model) == set(range(blocks))

    # The memory estimate counts the same blocks and the same adapter parameters.
    assert shape.adapted_blocks(None) == blocks
    rank = adapter_config["lora_parameters"]["rank"]
    assert shape.lora_parameters(None, rank) == config["trainable_parameters"]


def test_the_train_preflight_estimates_the_default_on_every_block(tiny_model_dir):
    estimate = preflight(TrainConfig(model=str(tiny_model_dir)), "system prompt")
    shape = ModelShape.from_folder(tiny_model_dir)
    assert estimate.shape.adapted_blocks(estimate.options.lora_layers) == shape.num_layers


@pytest.mark.parametrize("command", ["train", "sft"])
def test_an_explicit_number_above_the_depth_is_a_one_line_error(
    command, tiny_model_dir, tmp_path, monkeypatch
):
    # The slow-BLAS notice, where the BLAS is slow, is tested in test_slow_blas_notice.py.
    monkeypatch.setattr("mlx_reasoner.ui.show_slow_blas_notice", lambda command: False)

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --lora-layers was checked")

    monkeypatch.setattr(model_module, "load_model", no_loading)
    blocks = ModelShape.from_folder(tiny_model_dir).num_layers
    run_dir = tmp_path / "run"
    result = invoke(command, tiny_model_dir, run_dir, "--lora-layers", DEFAULT_LORA_LAYERS)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [
        f"error: --lora-layers {DEFAULT_LORA_LAYERS} is more than the model's {blocks} blocks; "
        f"use at most {blocks}, -1 for all, or leave it out (all blocks, up to "
        f"{DEFAULT_LORA_LAYERS})"
    ]
    assert not run_dir.exists()


def test_an_explicit_number_from_a_config_file_is_refused_too(tiny_model_dir, tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("lora_layers: 16\n")
    result = CliRunner().invoke(
        main,
        ["sft", "--model", str(tiny_model_dir), "--config", str(config_file)]
        + ["--run-dir", str(tmp_path / "run")],
    )
    assert result.exit_code == 1 and "error: --lora-layers 16 is more than" in result.output
    assert "Traceback" not in result.output


def test_the_help_says_what_the_default_is_and_what_too_many_does():
    result = CliRunner().invoke(main, ["train", "--help"], terminal_width=200)
    assert result.exit_code == 0
    help_text = " ".join(result.output.split())
    assert "or every block of a model with fewer" in help_text
    assert "above the model's blocks is an error" in help_text
