"""The slow-BLAS notice: ``train``, ``sft``, ``demo`` and ``bench`` say up front, before any
work, that MLX runs on the reference BLAS, what it costs and the command that fixes it."""

import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from mlx_reasoner.cli import main
from mlx_reasoner.engine import blas
from mlx_reasoner.engine.blas import REFERENCE_NAME, BlasInfo
from mlx_reasoner.errors import ReasonerError

WORK_MARKER = "<the command's work begins>"

# Each command, the arguments it needs, and the function that does its work.
COMMANDS = {
    "train": ([], "mlx_reasoner.run.run_train"),
    "sft": ([], "mlx_reasoner.run.run_sft"),
    "demo": ([], "mlx_reasoner.showcase.demo.run_demo"),
    "bench": (["--steps", "2"], "mlx_reasoner.showcase.bench.run_bench"),
}


def set_blas(monkeypatch, enabled: bool) -> None:
    """Make this process report a fast or a slow BLAS, as a Linux machine would."""
    info = BlasInfo(REFERENCE_NAME, reason="cmeel-openblas: gone", fix="pip install it")
    if enabled:
        info = BlasInfo("openblas (test)", enabled=True)
    monkeypatch.setattr(blas, "_state", info)
    monkeypatch.setattr(blas.sys, "platform", "linux")


def run_with_fake_work(monkeypatch, command: str):
    """Invoke ``command`` with its work replaced by a marker line, then a stop."""
    args, work = COMMANDS[command]

    def fake_work(*args, **kwargs):
        print(WORK_MARKER)
        raise ReasonerError("stopped by the test")

    monkeypatch.setattr(work, fake_work)
    return CliRunner().invoke(main, [command, *args], terminal_width=120)


@pytest.mark.engine
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_slow_blas_is_announced_before_any_work(command, monkeypatch):
    set_blas(monkeypatch, enabled=False)
    result = run_with_fake_work(monkeypatch, command)
    assert result.exit_code == 1, result.output
    output = result.output
    assert WORK_MARKER in output and "Slow BLAS" in output
    notice_end = output.index("Fix: pip install it")
    assert output.index("Slow BLAS") < notice_end < output.index(WORK_MARKER)
    assert blas.SLOW_BLAS_COST[command] in " ".join(output.replace("│", " ").split())
    # On stderr, so that what a command prints on stdout stays as it was.
    assert "Slow BLAS" in result.stderr and "Slow BLAS" not in result.stdout


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_fast_blas_gets_no_notice(command, monkeypatch):
    set_blas(monkeypatch, enabled=True)
    result = run_with_fake_work(monkeypatch, command)
    assert WORK_MARKER in result.output
    assert "Slow BLAS" not in result.output and "Fix:" not in result.output


def test_print_config_and_option_errors_come_without_the_notice(monkeypatch):
    set_blas(monkeypatch, enabled=False)
    result = CliRunner().invoke(main, ["train", "--print-config"])
    assert result.exit_code == 0 and "Slow BLAS" not in result.output
    result = CliRunner().invoke(main, ["train", "--group-size", "1"])
    assert result.exit_code == 1 and "Slow BLAS" not in result.output


@pytest.mark.engine
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="macOS uses Accelerate")
def test_a_real_run_on_the_reference_blas_shows_the_notice_first(tiny_model_dir, tmp_path):
    """``MLX_REASONER_FAST_BLAS=0`` in a fresh process: the notice, then the run and its
    one-line BLAS description in the header."""
    env = {**os.environ, blas.ENV_VAR: "0", "COLUMNS": "120"}
    done = subprocess.run(
        [sys.executable, "-m", "mlx_reasoner.cli", "sft", "--model", str(tiny_model_dir)]
        + ["--dataset", "task:letter-count", "--steps", "1", "--batch-size", "2"]
        + ["--save-every", "0", "--run-dir", str(tmp_path / "run")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout
    output = done.stdout
    assert "Slow BLAS" in output and f"Fix: unset {blas.ENV_VAR}" in output
    header = output.index("mlx-reasoner sft")
    assert output.index("Slow BLAS") < header
    assert REFERENCE_NAME in output[header:]  # the header's BLAS line is still there


@pytest.mark.engine
@pytest.mark.parametrize("enabled", [True, False], ids=["fast", "slow"])
def test_the_demos_time_budget_says_when_the_blas_is_slow(enabled, monkeypatch, tmp_path):
    from rich.console import Console

    from mlx_reasoner.showcase import demo, tiny

    set_blas(monkeypatch, enabled)

    def stop(*args, **kwargs):
        raise ReasonerError("stopped by the test")

    monkeypatch.setattr(tiny, "build_tiny_model", stop)  # right after the header
    console = Console(record=True, width=200)
    with pytest.raises(ReasonerError, match="stopped by the test"):
        demo.run_demo(tmp_path / "demo", console=console)
    header = console.export_text()
    assert "Budget: about 1 minute on 2 CPU cores" in header
    assert ("far longer on the slow BLAS" in header) is not enabled
