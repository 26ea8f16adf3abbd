"""Never lose a run: checkpoints, resume, signals, bad steps, existing folders."""

import json
import os
import signal
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_reasoner.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from mlx_reasoner.cli import main
from mlx_reasoner.config import TrainConfig
from mlx_reasoner.trainer import StepHooks, StopTraining

# A reward that sends this process SIGINT once, during the step it is told, as a user's
# Ctrl-C would; the marker file makes it fire only once across runs.
STOPPING_REWARD = """
import os, signal

def length_share(completions, answers, **kwargs):
    marker = os.environ["STOP_MARKER"]
    calls = int(os.environ.get("STOP_CALLS", "0")) + 1
    os.environ["STOP_CALLS"] = str(calls)
    if calls == int(os.environ["STOP_AT_CALL"]) and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGINT)
    return [min(len(c), 40) / 40 for c in completions]
"""


@pytest.fixture
def stopping_reward(tmp_path, monkeypatch):
    path = tmp_path / "stopping_reward.py"
    path.write_text(STOPPING_REWARD)
    monkeypatch.setenv("STOP_AT_CALL", "3")
    monkeypatch.delenv("STOP_CALLS", raising=False)
    return path


def train_args(model_dir, reward_file, run_dir, steps=6):
    return [
        "train",
        "--model",
        str(model_dir),
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
        "--lora-layers",
        "-1",
        "--learning-rate",
        "5e-3",
        "--warmup-steps",
        "1",
        "--reward-file",
        str(reward_file),
        "--reward",
        "length_share",
        "--beta",
        "0.04",
        "--save-every",
        "2",
        "--sample-every",
        "0",
        "--run-dir",
        str(run_dir),
    ]


def read_metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


COMPARED = ("loss", "reward_mean", "reward_std", "kl", "grad_norm", "completion_tokens_mean")


@pytest.mark.slow
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(
    tiny_model_dir, stopping_reward, tmp_path, monkeypatch
):
    runner = CliRunner()
    monkeypatch.setenv("STOP_MARKER", str(stopping_reward))  # exists: never fires
    straight = tmp_path / "straight"
    result = runner.invoke(main, train_args(tiny_model_dir, stopping_reward, straight))
    assert result.exit_code == 0, result.output

    monkeypatch.setenv("STOP_MARKER", str(tmp_path / "fired"))
    monkeypatch.delenv("STOP_CALLS")
    broken = tmp_path / "broken"
    result = runner.invoke(main, train_args(tiny_model_dir, stopping_reward, broken))
    assert result.exit_code == 130, result.output
    assert f"Resume with: mlx-reasoner train --resume {broken}" in result.output
    assert [m["step"] for m in read_metrics(broken)] == [1, 2, 3]
    assert latest_checkpoint(broken).name == "step_0000003"

    result = runner.invoke(main, ["train", "--resume", str(broken)])
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output
    resumed, reference = read_metrics(broken), read_metrics(straight)
    assert [m["step"] for m in resumed] == list(range(1, 7))
    for got, want in zip(resumed, reference):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (got["step"], key)
    a = mx.load(str(straight / "adapters.safetensors"))
    b = mx.load(str(broken / "adapters.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert np.allclose(np.array(a[name]), np.array(b[name]), atol=1e-6), name
    rollouts = [json.loads(x) for x in (broken / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rollouts] == [s for s in range(1, 7) for _ in range(6)]


def test_keep_checkpoints_prunes_the_oldest(tmp_path):
    weights = {"w": mx.zeros((4,))}
    for step in range(1, 6):
        save_checkpoint(
            tmp_path,
            step,
            weights,
            {"num_layers": 1},
            {"step": mx.array(step)},
            {"data": {}},
            keep=2,
        )
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_0000004", "step_0000005"]
    _, optimizer_state, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 5 and optimizer_state["step"].item() == 5


KILL_WRITER = """
import sys
import mlx.core as mx
from mlx_reasoner.checkpoints import save_checkpoint
run_dir = sys.argv[1]
big = {f"w{i}": mx.random.normal((256, 256)) for i in range(24)}
step = 0
while True:
    step += 1
    save_checkpoint(run_dir, step, big, {"num_layers": 1}, {"step": mx.array(step)},
                    {"data": {"position": step}}, keep=2)
    print(step, flush=True)
"""


@pytest.mark.parametrize("delay", [0.05, 0.2, 0.45])
def test_kill_9_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, delay):
    writer = subprocess.Popen(
        [sys.executable, "-c", KILL_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        writer.stdout.readline()  # one checkpoint is complete
        time.sleep(delay)
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.wait()
    latest = latest_checkpoint(tmp_path)
    adapters, optimizer_state, state = load_checkpoint(latest)
    assert len(adapters) == 24 and all(v.shape == (256, 256) for v in adapters.values())
    assert state["data"]["position"] == state["step"] == optimizer_state["step"].item()


def test_real_sigint_saves_a_checkpoint_and_prints_the_resume_command(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlx_reasoner.cli",
            "train",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            "task:letter-count",
            "--steps",
            "500",
            "--batch-size",
            "1",
            "--group-size",
            "2",
            "--max-completion-tokens",
            "4",
            "--lora-layers",
            "1",
            "--save-every",
            "0",
            "--report-every",
            "400",  # not due before the stop: the stop itself writes the report
            "--run-dir",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, out + err
    assert "stopped by SIGINT" in err and f"--resume {run_dir}" in err
    assert "Traceback" not in err
    step = load_checkpoint(latest_checkpoint(run_dir))[2]["step"]
    assert step >= 2 and read_metrics(run_dir)[-1]["step"] == step
    assert (
        f"step {step} of 500 (still going, or stopped early)"
        in (run_dir / "report.html").read_text()
    )


class RecordingDisplay:
    def __init__(self):
        self.messages = []

    def phase(self, name):
        pass

    def update(self, metrics):
        pass

    def message(self, text):
        self.messages.append(text)


def test_too_many_bad_steps_in_a_row_stop_with_a_checkpoint():
    saved = []
    config = TrainConfig(steps=10, max_bad_steps=3, save_every=0)
    hooks = StepHooks(config, RecordingDisplay(), on_save=saved.append)
    hooks.finish(1, {}, [], skipped=True)
    hooks.finish(2, {}, [], skipped=False)  # a good step resets the count
    hooks.finish(3, {}, [], skipped=True)
    hooks.finish(4, {}, [], skipped=True)
    with pytest.raises(StopTraining, match="--max-bad-steps 3") as info:
        hooks.finish(5, {}, [], skipped=True)
    assert info.value.step == 5 and saved == [5]


def test_existing_run_needs_resume_new_name_or_overwrite(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "train",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        "task:arithmetic",
        "--steps",
        "1",
        "--batch-size",
        "1",
        "--group-size",
        "2",
        "--max-completion-tokens",
        "2",
        "--lora-layers",
        "1",
        "--run-dir",
        str(run_dir),
    ]
    runner = CliRunner()
    assert runner.invoke(main, args).exit_code == 0
    first = (run_dir / "config.json").read_text()
    refused = runner.invoke(main, args)
    assert (
        refused.exit_code == 1 and "--resume" in refused.output and "--overwrite" in refused.output
    )
    assert (run_dir / "config.json").read_text() == first
    replaced = runner.invoke(main, [*args, "--overwrite", "--seed", "3"])
    assert replaced.exit_code == 0, replaced.output
    assert json.loads((run_dir / "config.json").read_text())["seed"] == 3


def test_resume_without_checkpoint_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"steps": 3}))
    result = CliRunner().invoke(main, ["train", "--resume", str(tmp_path)])
    assert result.exit_code == 1 and "no complete checkpoint" in result.output


def test_a_step_mostly_cut_at_the_length_limit_is_said_once():
    display = RecordingDisplay()
    config = TrainConfig(steps=10, save_every=0, max_completion_tokens=32)
    hooks = StepHooks(config, display)
    hooks.finish(1, {"truncated_fraction": 0.25}, [], skipped=False)
    assert display.messages == []
    hooks.finish(2, {"truncated_fraction": 0.75}, [], skipped=False)
    hooks.finish(3, {"truncated_fraction": 1.0}, [], skipped=False)
    assert len(display.messages) == 1
    assert "75% of the completions were cut at --max-completion-tokens 32" in display.messages[0]
