"""Evaluation: verdicts, summaries, and `mlx-reasoner eval` end to end on the tiny model."""

import json

import pytest
from click.testing import CliRunner

from mlx_reasoner import evaluate as evaluate_module
from mlx_reasoner.checkpoints import save_adapters
from mlx_reasoner.cli import main
from mlx_reasoner.data import Example
from mlx_reasoner.evaluate import SUMMARY_KEYS, evaluate, summarize
from mlx_reasoner.model import adapter_weights, attach_lora, lora_config
from mlx_reasoner.rollout import Rollouts

GOOD = "<reasoning>\n2 + 2 = 4\n</reasoning>\n<answer>\n4\n</answer>\n"
SLOPPY = "I think <reasoning>sum</reasoning> <answer>$4.00</answer>"
WRONG = "<reasoning>\nguess\n</reasoning>\n<answer>\n5\n</answer>\n"


def fake_generate(texts_by_call, reasons=None):
    """Stand-in for the rollout engine that returns fixed completion texts."""
    calls = iter(texts_by_call)

    def generate(model, tokenizer, prompts, group_size, max_tokens, sampler=None):
        texts = next(calls)
        assert len(texts) == len(prompts) * group_size
        return Rollouts(
            group_size=group_size,
            prompt_ids=[p for p in prompts for _ in range(group_size)],
            completion_ids=[[1] * (len(t) // 4 + 1) for t in texts],
            finish_reasons=reasons or ["stop"] * len(texts),
            texts=texts,
        )

    return generate


class FakeTokenizer:
    chat_template = None

    def encode(self, text):
        return [1, 2, 3]


def test_verdicts_use_the_same_rules_as_the_rewards(monkeypatch):
    monkeypatch.setattr(evaluate_module, "generate_groups", fake_generate([[GOOD, SLOPPY, WRONG]]))
    examples = [Example("What is 2 + 2?", "4")] * 3
    result = evaluate(None, FakeTokenizer(), examples, "sys", batch_size=3)
    verdicts = [(r["correct"], r["strict_format"], r["soft_format"]) for r in result.samples]
    assert verdicts == [(True, True, True), (True, False, True), (False, True, True)]
    assert result.samples[1]["extracted"] == "$4.00"
    assert result.summary["accuracy"] == pytest.approx(2 / 3)
    assert result.summary["strict_format_rate"] == pytest.approx(2 / 3)
    assert result.summary["soft_format_rate"] == 1.0
    assert result.summary["n"] == 3


def test_pass_at_k_counts_questions_solved_at_least_once(monkeypatch):
    texts = [GOOD, WRONG, WRONG, WRONG, WRONG, WRONG]  # question 1 solved once, question 2 never
    monkeypatch.setattr(evaluate_module, "generate_groups", fake_generate([texts]))
    examples = [Example("q1", "4"), Example("q2", "4")]
    summary = evaluate(None, FakeTokenizer(), examples, "", samples=3).summary
    assert summary["pass@3"] == 0.5
    assert summary["accuracy"] == pytest.approx(1 / 6)
    assert summary["n"] == 2 and summary["samples"] == 3


def answer(value: str) -> str:
    return f"<reasoning>\nthinking\n</reasoning>\n<answer>\n{value}\n</answer>\n"


def test_maj_at_k_votes_over_extracted_answers(monkeypatch):
    """Three questions, three samples each (gold 4): q1's majority (4, $4.00) is right though
    one sample is wrong; q2 is solved once but its majority (5, 5.0) is wrong; q3 has two
    empty answers, which do not vote, so its one right answer wins."""
    texts = [
        answer("4"), answer("5"), answer("$4.00"),
        answer("5"), answer("4"), answer("5.0"),
        "no tags", answer("4"), "",
    ]  # fmt: skip
    monkeypatch.setattr(evaluate_module, "generate_groups", fake_generate([texts]))
    examples = [Example(f"q{i}", "4") for i in range(3)]
    summary = evaluate(None, FakeTokenizer(), examples, "", samples=3).summary
    assert summary["maj@3"] == pytest.approx(2 / 3)
    assert summary["pass@3"] == 1.0
    assert summary["accuracy"] == pytest.approx(4 / 9)


def test_maj_at_k_sits_next_to_pass_at_k_in_the_table():
    from rich.console import Console

    from mlx_reasoner.ui import eval_table

    summary = {"n": 2, "accuracy": 0.25, "pass@4": 0.5, "maj@4": 0.5, "samples": 4}
    console = Console(width=80, record=True)
    console.print(eval_table({"model": summary}))
    lines = [line for line in console.export_text().splitlines() if "@4" in line]
    assert [line.split()[1] for line in lines] == ["pass@4", "maj@4"]
    assert all("50.0%" in line for line in lines)


def test_summary_of_hand_made_records():
    records = [
        {
            "index": 0,
            "correct": True,
            "strict_format": False,
            "soft_format": True,
            "completion_tokens": 10,
            "truncated": False,
        },
        {
            "index": 1,
            "correct": False,
            "strict_format": False,
            "soft_format": False,
            "completion_tokens": 30,
            "truncated": True,
        },
    ]
    summary = summarize(records, 1)
    assert summary == {
        "accuracy": 0.5,
        "strict_format_rate": 0.0,
        "soft_format_rate": 0.5,
        "mean_completion_tokens": 20.0,
        "truncated_rate": 0.5,
        "n": 2,
        "samples": 1,
    }


@pytest.fixture
def eval_file(tmp_path):
    path = tmp_path / "held_out.jsonl"
    rows = [{"question": f"What is {i} times 2?", "answer": str(2 * i)} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_cli_writes_summary_and_samples(tiny_model_dir, eval_file, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        main,
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(eval_file),
            "--max-completion-tokens",
            "6",
            "--output",
            str(out),
            "--limit",
            "4",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "strict format" in result.output
    summary = json.loads((out / "eval.json").read_text())
    assert set(SUMMARY_KEYS) | {"n"} <= summary.keys()
    assert summary["n"] == 4 and summary["samples"] == 1
    assert summary["truncated_rate"] == 1.0  # a random model does not stop within 6 tokens
    lines = [json.loads(x) for x in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(lines) == 4
    assert {"question", "completion", "extracted", "correct", "answer"} <= lines[0].keys()
    assert [x["answer"] for x in lines] == ["0", "2", "4", "6"]


def test_eval_compare_base_and_adapter(tiny_model_dir, eval_file, eval_adapter, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(
        main,
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--adapter-path",
            str(eval_adapter),
            "--dataset",
            str(eval_file),
            "--max-completion-tokens",
            "5",
            "--samples",
            "2",
            "--compare",
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "base" in result.output and "adapter" in result.output
    summary = json.loads((out / "eval.json").read_text())
    assert "pass@2" in summary and "pass@2" in summary["base"]
    assert "maj@2" in summary and "maj@2" in summary["base"] and "maj@2" in result.output
    assert summary["maj@2"] <= summary["pass@2"]
    assert summary["adapter_path"] == str(eval_adapter)
    lines = [json.loads(x) for x in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(lines) == 2 * 5 * 2
    base = [x["completion"] for x in lines if x["model"] == "base"]
    adapted = [x["completion"] for x in lines if x["model"] == "adapter"]
    assert base != adapted, "the adapters change what the model says"


def test_eval_same_seed_same_samples(tiny_model_dir, eval_file, tmp_path):
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = CliRunner().invoke(
            main,
            [
                "eval",
                "--model",
                str(tiny_model_dir),
                "--dataset",
                str(eval_file),
                "--max-completion-tokens",
                "5",
                "--samples",
                "3",
                "--seed",
                "7",
                "--output",
                str(out),
            ],
        )
        assert result.exit_code == 0, result.output
        outputs.append((out / "eval_samples.jsonl").read_text())
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--compare"], "--compare needs --adapter-path"),
        (["--samples", "0"], "--samples must be at least 1"),
        (["--limit", "0"], "--limit must be at least 1"),
    ],
)
def test_eval_bad_options(tiny_model_dir, eval_file, args, message):
    result = CliRunner().invoke(
        main, ["eval", "--model", str(tiny_model_dir), "--dataset", str(eval_file), *args]
    )
    assert result.exit_code == 1 and message in result.output
    assert "Traceback" not in result.output


def test_adapter_for_another_model_is_refused(tiny_model_dir, eval_file, tmp_path):
    from mlx_reasoner.showcase.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "wide", hidden_size=96)
    import mlx_lm

    model, _ = mlx_lm.load(str(other))
    attach_lora(model, lora_config(2, 4))
    folder = tmp_path / "wide-adapters"
    folder.mkdir()
    save_adapters(folder, adapter_weights(model), {**lora_config(2, 4), "model": str(other)})
    result = CliRunner().invoke(
        main,
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--adapter-path",
            str(folder),
            "--dataset",
            str(eval_file),
        ],
    )
    assert result.exit_code == 1 and "do not fit this model" in result.output
