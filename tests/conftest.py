"""Shared pytest fixtures: a tiny random Qwen2 model directory, built once per session, offline."""

from pathlib import Path

import mlx_lm
import pytest

from mlx_reasoner.tiny import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory with default tiny sizes that ``mlx_lm.load`` accepts."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture
def tiny_model(tiny_model_dir: Path):
    """A fresh ``(model, tokenizer)`` pair per test, so tests may mutate the model."""
    return mlx_lm.load(str(tiny_model_dir))
