"""Tests for the training display: plain line-per-step mode, live mode, errors, formatting."""

import io

import pytest
from rich.console import Console

from mlx_reasoner import ui
from mlx_reasoner.ui import (
    TrainDisplay,
    format_metric,
    format_seconds,
    metric_rows,
    on_error,
    shorten,
    sparkline,
)

FULL_METRICS = {
    "step": 3,
    "loss": 0.0123,
    "reward_mean": 0.812,
    "reward_std": 0.402,
    "reward/correctness": 0.25,
    "reward/format": 0.9,
    "frac_reward_zero_std": 0.25,
    "kl": 0.0004,
    "clip_fraction": 0.0,
    "completion_tokens_mean": 54.2,
    "completion_tokens_max": 128,
    "truncated_fraction": 0.125,
    "tokens_per_s": 412.4,
    "time_generate": 1.23,
    "time_score": 0.01,
    "time_train": 0.8,
    "time_step": 2.0,
    "peak_memory_gb": 1.234,
    "learning_rate": 1e-5,
    "grad_norm": 0.53,
    "some_unknown_key": 99.0,
}

SAMPLE = {
    "step": 3,
    "question": "What is [bold]2+2[/bold]?",
    "answer": "4",
    "completion": "2 plus 2 :smile: is four.\n<answer>4</answer>",
    "rewards": [0.0, 1.0, 0.5],
    "index": 1,
}


def plain_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=False, width=200)


def live_console() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=120)


def test_plain_mode_prints_one_line_per_update():
    console = plain_console()
    with TrainDisplay(10, console=console) as display:
        assert not display.is_live
        display.phase("generating")  # ignored in plain mode
        for step in (1, 2, 3):
            display.update({**FULL_METRICS, "step": step})
    lines = console.file.getvalue().splitlines()

    assert [line.split(" | ")[0] for line in lines] == ["step 1/10", "step 2/10", "step 3/10"]
    first = lines[0]
    for expected in (
        "loss 0.0123",
        "reward 0.812 ± 0.402",
        "correctness 0.250",
        "format 0.900",
        "zero-std 25%",
        "kl 0.0004",
        "clip 0.0%",
        "len 54/128 (trunc 12%)",
        "rollout 412 tok/s",
        "gen 1.2s",
        "train 0.8s",
        "mem 1.23 GB",
        "lr 1e-05",
        # The first step's own time_step (2.0s) times the 9 steps left.
        "eta 18s",
    ):
        assert expected in first
    assert "some_unknown_key" not in first
    assert "generating" not in console.file.getvalue()
    assert "\x1b" not in console.file.getvalue()


def test_plain_mode_tolerates_missing_and_odd_keys():
    console = plain_console()
    with TrainDisplay(5, console=console) as display:
        display.update({})
        display.update({"loss": 0.5, "reward/format": None, "kl": "n/a"})
        display.update({"step": 4, "completion_tokens_max": 7, "reward_std": 0.1})
    # The ETA measures wall time between updates, so leave it out of the comparison.
    lines = [line.split(" | eta ")[0] for line in console.file.getvalue().splitlines()]

    # A missing step counts on from the previous one.
    assert lines[0] == "step 1/5"
    assert lines[1] == "step 2/5 | loss 0.5"
    assert lines[2] == "step 4/5 | reward ? ± 0.100 | len 7"


def test_plain_sample_block_mirrors_the_classic_log():
    console = plain_console()
    display = TrainDisplay(10, console=console)
    display.sample(SAMPLE)
    display.message("saved adapters to runs/x")
    output = console.file.getvalue()

    # Model text is printed verbatim: no markup parsing, no emoji codes replaced.
    assert "Question: What is [bold]2+2[/bold]?" in output
    assert "Gold Answer: 4" in output
    assert "Sample Response:\n2 plus 2 :smile: is four.\n<answer>4</answer>" in output
    assert "Sample Rewards: [0.000, 1.000*, 0.500]" in output
    assert output.rstrip().endswith("saved adapters to runs/x")
    assert "\x1b" not in output


def test_plain_header_is_aligned_key_value_lines():
    console = plain_console()
    TrainDisplay(10, console=console, title="run").header({"model": "tiny", "run dir": "runs/x"})
    assert console.file.getvalue().splitlines() == ["run", "model    tiny", "run dir  runs/x"]


def test_live_is_chosen_from_the_console():
    assert not TrainDisplay(1, console=plain_console()).is_live
    assert TrainDisplay(1, console=live_console()).is_live


def test_live_mode_renders_progress_metrics_and_samples():
    console = live_console()
    with TrainDisplay(10, console=console, live=True) as display:
        display.header({"model": "tiny-model"})
        for step in (1, 2, 3):
            display.phase("generating")
            display.update({**FULL_METRICS, "step": step, "reward_mean": 0.1 * step})
        display.sample({**SAMPLE, "completion": "x" * 3000})
        display.message("saved adapters to runs/x")
    output = console.file.getvalue()

    assert "\x1b" in output
    for expected in (
        "tiny-model",
        "3/10",
        "generating",
        "correctness",
        "0.300 ± 0.402",
        "▁▄█",
        "What is [bold]2+2[/bold]?",
        "1,800 characters omitted",
        "saved adapters to runs/x",
        "done",
    ):
        assert expected in output


def test_on_error_prints_message_and_exits_1():
    console = Console(file=io.StringIO(), width=200)
    with pytest.raises(SystemExit) as excinfo:
        on_error("model 'nope' not found; pass --model", console=console)
    assert excinfo.value.code == 1
    assert console.file.getvalue() == "error: model 'nope' not found; pass --model\n"


def test_on_error_debug_prints_the_traceback():
    console = Console(file=io.StringIO(), width=200)
    with pytest.raises(SystemExit):
        try:
            raise ValueError("boom")
        except ValueError:
            on_error("it broke", debug=True, console=console)
    output = console.file.getvalue()
    assert "error: it broke" in output
    assert "Traceback" in output and "boom" in output


def test_err_console_writes_to_stderr():
    assert ui.err_console.stderr
    assert not ui.console.stderr


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0.0s"),
        (0.04, "0.0s"),
        (1.23, "1.2s"),
        (9.96, "10s"),
        (42.4, "42s"),
        (59.6, "1m00s"),
        (80, "1m20s"),
        (3599, "59m59s"),
        (3725, "1h02m"),
        (90061, "1d01h"),
        (-0.001, "0.0s"),
        (float("nan"), "?"),
    ],
)
def test_format_seconds(seconds, expected):
    assert format_seconds(seconds) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0.012345, "0.0123"), (0.0004, "0.0004"), (1e-5, "1e-05"), (2.0, "2"), (None, "-")],
)
def test_format_metric(value, expected):
    assert format_metric(value) == expected


def test_sparkline_scales_between_min_and_max():
    assert sparkline(list(range(8))) == "▁▂▃▄▅▆▇█"
    assert sparkline([0.5, 0.5]) == "▄▄"
    assert sparkline([0.0, float("nan"), 1.0]) == "▁ █"
    assert sparkline([]) == ""


def test_shorten_keeps_head_and_tail():
    assert shorten("short", limit=10) == ("short", False)
    text, was_cut = shorten("a" * 100 + "b" * 100, limit=30)
    assert was_cut
    assert text.startswith("a" * 20) and text.endswith("b" * 10)
    assert "170 characters omitted" in text


def test_metric_rows_shows_every_reward_component():
    metrics = {f"reward/r{i}": float(i) for i in range(7)}
    labels = [label for row in metric_rows(metrics) for label, _ in row]
    assert labels == [f"r{i}" for i in range(7)]
