"""The ``mlx-reasoner train`` command end to end on the tiny model, and its input errors."""

import json
import subprocess
import sys

import mlx.core as mx
import mlx_lm
import pytest
from click.testing import CliRunner

from mlx_reasoner.cli import main

METRIC_KEYS = {
    "step",
    "loss",
    "reward_mean",
    "reward_std",
    "kl",
    "clip_fraction",
    "completion_tokens_mean",
    "tokens_per_s",
    "peak_memory_gb",
    "time_generate",
    "time_score",
    "time_train",
    "frac_reward_zero_std",
    "truncated_fraction",
    "completion_tokens_max",
    "learning_rate",
}
BUILTIN_REWARDS = ["correctness", "integer", "strict_format", "soft_format", "xml_count"]


@pytest.fixture
def questions_file(tmp_path):
    path = tmp_path / "questions.jsonl"
    rows = [
        {"question": f"What is {i} plus {i}?", "answer": f"Double it.\n#### {2 * i}"}
        for i in range(6)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(*args):
    return CliRunner().invoke(main, ["train", *map(str, args)])


@pytest.mark.slow
def test_train_writes_a_complete_run_directory(tiny_model_dir, questions_file, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "--model",
        tiny_model_dir,
        "--dataset",
        questions_file,
        "--steps",
        3,
        "--batch-size",
        2,
        "--group-size",
        3,
        "--max-completion-tokens",
        8,
        "--lora-layers",
        2,
        "--lora-rank",
        4,
        "--save-every",
        2,
        "--sample-every",
        2,
        "--run-dir",
        run_dir,
    )
    assert result.exit_code == 0, result.output
    assert "step 3/3" in result.output and "Question:" in result.output

    config = json.loads((run_dir / "config.json").read_text())
    assert config["group_size"] == 3 and config["model"] == str(tiny_model_dir)
    assert [r["name"] for r in config["rewards"]] == BUILTIN_REWARDS

    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert METRIC_KEYS | {f"reward/{n}" for n in BUILTIN_REWARDS} <= m.keys()

    rollouts = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 3 * 2 * 3
    assert {"step", "prompt", "completion", "reward", "rewards", "advantage"} <= rollouts[0].keys()
    assert set(rollouts[0]["rewards"]) == set(BUILTIN_REWARDS)
    first_group = [r for r in rollouts[:3]]
    assert len({r["prompt"] for r in first_group}) == 1
    assert abs(sum(r["advantage"] for r in first_group)) < 1e-4

    adapter_config = json.loads((run_dir / "adapter_config.json").read_text())
    assert adapter_config["num_layers"] == 2 and adapter_config["step"] == 3
    model, _ = mlx_lm.load(str(tiny_model_dir), adapter_path=str(run_dir))
    assert model(mx.array([[1, 2, 3]])).shape[:2] == (1, 3)
    assert not list(run_dir.glob(".*tmp*")), "no temporary files left behind"

    fused = tmp_path / "fused"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm",
            "fuse",
            "--model",
            str(tiny_model_dir),
            "--adapter-path",
            str(run_dir),
            "--save-path",
            str(fused),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    fused_model, _ = mlx_lm.load(str(fused))
    tokens = mx.array([[1, 5, 9, 30]])
    assert mx.allclose(fused_model(tokens), model(tokens), atol=1e-4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--group-size", 1], "--group-size must be at least 2"),
        (["--batch-size", 0], "--batch-size must be at least 1"),
        (["--max-completion-tokens", -5], "--max-completion-tokens must be at least 1"),
        (["--temperature", 0], "--temperature must be > 0"),
        (["--reward", "nope"], "unknown reward"),
        (["--reward", "correctness:abc"], "correctness:abc"),
        (["--system-prompt", "no-such-prompt"], "unknown system prompt"),
    ],
)
def test_bad_options_fail_with_one_line(tiny_model_dir, questions_file, tmp_path, args, message):
    result = run_cli(
        "--model", tiny_model_dir, "--dataset", questions_file, "--run-dir", tmp_path / "run", *args
    )
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists(), "nothing is created for a rejected run"


def test_dataset_without_the_fields(tiny_model_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "q", "solution": "1"}) + "\n")
    result = run_cli("--model", tiny_model_dir, "--dataset", data, "--run-dir", tmp_path / "run")
    assert result.exit_code == 1
    assert "bad.jsonl" in result.output and "question" in result.output
    assert not (tmp_path / "run").exists()


def test_missing_model_directory(questions_file, tmp_path):
    result = run_cli(
        "--model", tmp_path / "nowhere", "--dataset", questions_file, "--run-dir", tmp_path / "run"
    )
    assert result.exit_code == 1 and "model directory not found" in result.output


def test_unwritable_run_directory(tiny_model_dir, questions_file, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_cli(
        "--model", tiny_model_dir, "--dataset", questions_file, "--run-dir", blocker / "run"
    )
    assert result.exit_code == 1 and "cannot write to run directory" in result.output


def test_existing_run_is_not_overwritten(tiny_model_dir, questions_file, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    result = run_cli("--model", tiny_model_dir, "--dataset", questions_file, "--run-dir", run_dir)
    assert result.exit_code == 1 and "already holds a run" in result.output
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_debug_shows_the_traceback(tiny_model_dir, questions_file, tmp_path):
    result = run_cli(
        "--model",
        tiny_model_dir,
        "--dataset",
        questions_file,
        "--group-size",
        1,
        "--run-dir",
        tmp_path / "run",
        "--debug",
    )
    assert result.exit_code == 1 and "Traceback" in result.output


def test_train_on_a_task_with_evaluation_during_training(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "--model",
        tiny_model_dir,
        "--dataset",
        "task:letter-count",
        "--steps",
        2,
        "--batch-size",
        1,
        "--group-size",
        2,
        "--max-completion-tokens",
        4,
        "--lora-layers",
        1,
        "--eval-every",
        1,
        "--eval-limit",
        3,
        "--run-dir",
        run_dir,
    )
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for m in metrics:
        assert m["eval/n"] == 3
        assert 0.0 <= m["eval/accuracy"] <= 1.0 and m["eval/truncated_rate"] == 1.0
    config = json.loads((run_dir / "config.json").read_text())
    assert config["num_eval_examples"] == 3


def test_local_file_held_out_part_is_never_trained_on(tiny_model_dir, tmp_path):
    data = tmp_path / "many.jsonl"
    rows = [{"question": f"Question number {i}?", "answer": str(i)} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    result = run_cli(
        "--model",
        tiny_model_dir,
        "--dataset",
        data,
        "--steps",
        6,
        "--batch-size",
        4,
        "--group-size",
        2,
        "--max-completion-tokens",
        2,
        "--lora-layers",
        1,
        "--eval-every",
        3,
        "--eval-fraction",
        0.25,
        "--run-dir",
        run_dir,
    )
    assert result.exit_code == 0, result.output
    config = json.loads((run_dir / "config.json").read_text())
    trained = {
        json.loads(line)["prompt"] for line in (run_dir / "rollouts.jsonl").read_text().splitlines()
    }
    from mlx_reasoner.data import load_examples, split_examples

    _, held_out = split_examples(load_examples(str(data)), 0.25, 0)
    assert config["num_eval_examples"] == len(held_out) > 0
    assert not trained & {ex.question for ex in held_out}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "eval/accuracy" in m] == [3, 6]


def test_all_blocks_are_recorded_as_a_count(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli(
        "--model",
        tiny_model_dir,
        "--dataset",
        "task:arithmetic",
        "--steps",
        1,
        "--batch-size",
        1,
        "--group-size",
        2,
        "--max-completion-tokens",
        2,
        "--lora-layers",
        -1,
        "--run-dir",
        run_dir,
    )
    assert result.exit_code == 0, result.output
    blocks = len(mlx_lm.load(str(tiny_model_dir))[0].layers)
    assert json.loads((run_dir / "adapter_config.json").read_text())["num_layers"] == blocks
    assert f"on {blocks} blocks" in result.output
