"""Shared pytest fixtures: a tiny random Qwen2 model directory, built once per session, offline;
and, where ``../shared/real`` is present, the real Qwen2.5 tokenizer and GSM8K with a small model
on the real vocabulary."""

from mlx_reasoner import backend

backend.start()  # noqa: E402, I001  (first: loads the fast BLAS before anything imports mlx)

from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_map

from mlx_reasoner.checkpoints import save_adapters
from mlx_reasoner.model import adapter_weights, attach_lora, lora_config
from mlx_reasoner.showcase.shapes import build_shaped_model
from mlx_reasoner.showcase.tiny import build_tiny_model


def pytest_collection_modifyitems(config, items):
    """With the engine switched off, its own checks have nothing to check: skip them, saying so."""
    if backend.engine_enabled():
        return
    skip = pytest.mark.skip(reason=f"checks the engine, and {backend.ENGINE_SWITCH} turns it off")
    for item in items:
        if "engine" in item.keywords:
            item.add_marker(skip)


# The real Qwen2.5 tokenizer, GSM8K and configs, next to the project (absent on users' machines).
REAL_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "real"


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


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """``../shared/real``: the real Qwen2.5 tokenizer and GSM8K; tests skip where it is absent."""
    if not REAL_DIR.is_dir():
        pytest.skip(
            "../shared/real (the real Qwen2.5 tokenizer and GSM8K) is not here: these tests need it"
        )
    return REAL_DIR.resolve()


@pytest.fixture(scope="session")
def real_vocab_model_dir(real_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random body on the real 151,936-token vocabulary, with the real Qwen2.5 tokenizer."""
    return build_shaped_model(
        tmp_path_factory.mktemp("real_vocab_model"),
        "vocab-test",
        tokenizer_dir=real_dir / "qwen2.5-tokenizer",
        dtype="float32",
    )


@pytest.fixture
def real_vocab_model(real_vocab_model_dir: Path):
    """A fresh ``(model, tokenizer)`` pair on the real vocabulary, per test."""
    return mlx_lm.load(str(real_vocab_model_dir))


@pytest.fixture(scope="session")
def real_tokenizer(real_vocab_model_dir: Path):
    """The real Qwen2.5 tokenizer as ``mlx_lm.load`` gives it (shared: do not mutate)."""
    return mlx_lm.load(str(real_vocab_model_dir))[1]


@pytest.fixture(scope="session")
def tiny_run_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real short GRPO run of the tiny model on task:letter-count: 4 steps of 2 prompts x 4
    completions, held-out evaluation and adapters every 2 steps. Shared: copy it to change it."""
    import io

    from rich.console import Console

    from mlx_reasoner.config import TrainConfig
    from mlx_reasoner.run import run_train

    config = TrainConfig(
        model=str(tiny_model_dir),
        dataset="task:letter-count",
        steps=4,
        batch_size=2,
        group_size=4,
        max_completion_tokens=12,
        eval_every=2,
        eval_limit=4,
        save_every=2,
        sample_every=0,
        run_dir=str(tmp_path_factory.mktemp("tiny_run") / "run"),
    )
    return run_train(config, console=Console(file=io.StringIO()), live=False)
