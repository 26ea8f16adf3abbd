"""Shared pytest fixtures: a tiny random Qwen2 model directory, built once per session, offline."""

import mlx_reasoner  # noqa: F401, I001  (first: loads the fast BLAS before mlx)

from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_map

from mlx_reasoner.checkpoints import save_adapters
from mlx_reasoner.model import adapter_weights, attach_lora, lora_config
from mlx_reasoner.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory with default tiny sizes that ``mlx_lm.load`` accepts."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture
def tiny_model(tiny_model_dir: Path):
    """A fresh ``(model, tokenizer)`` pair per test, so tests may mutate the model."""
    return mlx_lm.load(str(tiny_model_dir))


@pytest.fixture
def eval_adapter(tiny_model, tiny_model_dir, tmp_path):
    """LoRA adapters for the tiny model, moved away from zero so they change its output."""
    model, _ = tiny_model
    config = lora_config(2, 4)
    attach_lora(model, config)
    mx.random.seed(0)
    model.update(
        tree_map(lambda p: p + 0.3 * mx.random.normal(p.shape), model.trainable_parameters())
    )
    folder = tmp_path / "adapters"
    folder.mkdir()
    save_adapters(folder, adapter_weights(model), {**config, "model": str(tiny_model_dir)})
    return folder
