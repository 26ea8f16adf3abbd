"""The strawberry test: its questions, and the command's panels and JSON."""

import json
import re

from click.testing import CliRunner

from mlx_reasoner.cli import main
from mlx_reasoner.showcase.demo import score_line, strawberry_questions


def test_suite_starts_with_the_classic_and_counts_right():
    questions = strawberry_questions()
    assert questions[0].question == "How many R's are in strawberry?"
    assert questions[0].answer == "3"
    assert len(questions) == 8
    for q in questions:
        word = re.search(
            r"strawberry|banana|mississippi|cheese|raspberry|committee|bookkeeper", q.question
        ).group(0)
        letter = re.search(r"letter (\w)|many (\w)'s|'(\w)' occur", q.question)
        letter = next(g for g in letter.groups() if g).lower()
        assert q.answer == str(word.count(letter)), q.question


def test_score_line():
    results = {"base": [{"correct": True}, {"correct": False}], "trained": [{"correct": True}] * 2}
    assert score_line(results) == "base 1/2, trained 2/2"


def test_cli_json_and_panels(tiny_model_dir, eval_adapter):
    runner = CliRunner()
    result = runner.invoke(
        main,
        [
            "strawberry-test",
            "--model",
            str(tiny_model_dir),
            "--adapter-path",
            str(eval_adapter),
            "--max-completion-tokens",
            "6",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert set(payload) == {"base", "trained"}
    assert payload["base"]["total"] == 8 and len(payload["trained"]["results"]) == 8
    assert payload["base"]["results"] != payload["trained"]["results"]
    panels = runner.invoke(
        main,
        [
            "strawberry-test",
            "--model",
            str(tiny_model_dir),
            "--adapter-path",
            str(eval_adapter),
            "--max-completion-tokens",
            "6",
        ],
    )
    assert panels.exit_code == 0, panels.output
    assert "How many R's are in strawberry?" in panels.output
    assert re.search(r"score: base \d/8, trained \d/8", panels.output)


def test_cli_without_adapter_shows_the_base_only(tiny_model_dir):
    result = CliRunner().invoke(
        main,
        [
            "strawberry-test",
            "--model",
            str(tiny_model_dir),
            "--max-completion-tokens",
            "4",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert list(json.loads(result.output)) == ["base"]


def test_cli_bad_adapter_path(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(
        main, ["strawberry-test", "--model", str(tiny_model_dir), "--adapter-path", str(tmp_path)]
    )
    assert result.exit_code == 1 and "adapter_config.json" in result.output


def test_demo_folder_replaces_an_earlier_demo_but_nothing_else(tmp_path):
    import pytest

    from mlx_reasoner.errors import ReasonerError
    from mlx_reasoner.showcase.demo import DEMO_MARKER, prepare_demo_dir

    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ReasonerError, match="not a demo folder"):
        prepare_demo_dir(other)
    assert (other / "precious.txt").read_text() == "keep me"

    demo = tmp_path / "demo"
    prepare_demo_dir(demo)
    (demo / "summary.json").write_text("{}")
    prepare_demo_dir(demo)
    assert sorted(p.name for p in demo.iterdir()) == [DEMO_MARKER]
