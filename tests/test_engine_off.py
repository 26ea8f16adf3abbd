"""The engine is optional: with it switched off the pipeline runs on stock MLX and mlx-lm alone,
and still learns; importing the package loads nothing."""

import json
import platform
import subprocess
import sys

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest

from mlx_reasoner import backend
from mlx_reasoner.config import IMPORTANCE_LEVELS, LOSS_TYPES
from mlx_reasoner.logprobs import completion_logprobs, pack_sequences
from mlx_reasoner.model import attach_lora, lora_config
from mlx_reasoner.objective import AGGREGATORS
from mlx_reasoner.objective import IMPORTANCE_LEVELS as RATIO_FUNCTIONS
from mlx_reasoner.rollout import generate_groups


@pytest.fixture
def engine_off(monkeypatch):
    monkeypatch.setenv(backend.ENGINE_SWITCH, "0")
    assert not backend.engine_enabled()


LOADED = (
    "import json, sys, mlx_reasoner, mlx_reasoner.cli, mlx_reasoner.config\n"
    "{start}\n"
    "maps = open('/proc/self/maps').read() if sys.platform.startswith('linux') else ''\n"
    "print(json.dumps({{'mlx': [m for m in sys.modules if m.split('.')[0] == 'mlx'],"
    " 'engine': [m for m in sys.modules if m.startswith('mlx_reasoner.engine')],"
    " 'ours': [n for n in ('scipy_openblas32', 'cmeel', 'blas_alias') if n in maps]}}))"
)


def loaded(start: str) -> dict:
    code = LOADED.format(start=start)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_importing_the_package_and_its_cli_loads_neither_mlx_nor_our_blas():
    # numpy's own OpenBLAS may load (config uses numpy); ours are the engine's BLAS libraries.
    assert loaded("") == {"mlx": [], "engine": [], "ours": []}
    started = loaded("from mlx_reasoner import backend; backend.start()")
    assert started["mlx"] == []
    if not backend.engine_enabled():  # (the child inherits the switch) nothing of the engine
        assert started["engine"] == [] and started["ours"] == []
        return
    assert "mlx_reasoner.engine.blas" in started["engine"]
    if sys.platform.startswith("linux") and platform.machine() == "x86_64":
        assert started["ours"], "backend.start() should load one of the engine's BLAS libraries"


def test_the_option_names_are_the_objectives_lookups():
    assert set(LOSS_TYPES) == set(AGGREGATORS)
    assert set(IMPORTANCE_LEVELS) == set(RATIO_FUNCTIONS)


def test_with_the_engine_off_every_door_gives_the_stock_path(tiny_model, engine_off):
    model, tokenizer = tiny_model
    assert backend.row_split(5) == [(mx.default_stream(mx.default_device()), slice(0, 5))]
    assert backend.compiled_decoder(model, [[1, 2, 3]], None) is None
    assert not backend.uses_compiled_decode()
    described = backend.describe()
    assert described["engine"].startswith("off") and described["activations"] == "mlx-lm"
    prompt = tokenizer.encode("How many r are in strawberry?")
    rollouts = generate_groups(model, tokenizer, [prompt], 2, 6)
    assert rollouts.decoder == "BatchGenerator"


def test_log_probs_agree_with_the_engine_on_and_off(tiny_model, monkeypatch):
    model, _ = tiny_model
    attach_lora(model, lora_config(-1, 4))
    batch = pack_sequences([[1, 5, 9], [2, 4]], [[7, 3, 8], [6, 6]], np.zeros(2))
    on = completion_logprobs(model, batch)
    monkeypatch.setenv(backend.ENGINE_SWITCH, "0")
    off = completion_logprobs(model, batch)
    mask = np.array(batch.mask) > 0
    # The same float32 sums in another order (activations, streams): a few roundings per block.
    gap = np.abs(np.array(on) - np.array(off))[mask].max()
    assert gap < 64 * np.finfo(np.float32).eps * len(model.layers)


@pytest.mark.slow
def test_with_the_engine_off_grpo_still_learns(tiny_model, tiny_model_dir, engine_off):
    """The same learning check as tests/test_train.py's, on stock MLX and mlx-lm alone."""
    from test_train import split_params, train_digit_share

    histories = []
    for seed, (model, tokenizer) in enumerate([tiny_model, mlx_lm.load(str(tiny_model_dir))]):
        mx.random.seed(seed)
        attach_lora(model, lora_config(-1, 8))
        base_before = split_params(model)[1]
        histories.append(train_digit_share(model, tokenizer, seed))
        base_after = split_params(model)[1]
        assert all(np.array_equal(base_before[k], base_after[k]) for k in base_before)
    rewards = np.mean([[m["reward_mean"] for m in h] for h in histories], axis=0)
    start, end = np.mean(rewards[:5]), np.mean(rewards[-5:])
    assert start < 0.15
    assert end > start + 0.25, f"reward did not rise: {start:.3f} -> {end:.3f}"
