"""The real GSM8K rows (``../shared/real/gsm8k``) through the project's data loading."""

import json
import re

import pytest

from mlx_reasoner.data import load_examples


@pytest.mark.parametrize(
    "split, rows, with_commas, negatives",
    # The counts the shared folder's README gives for OpenAI's own files.
    [("train", 7473, 79, ["-7", "-47", "-12"]), ("test", 1319, 14, ["-10", "-3"])],
)
def test_every_gold_answer_parses_to_an_integer(real_dir, split, rows, with_commas, negatives):
    path = real_dir / "gsm8k" / f"{split}.jsonl"
    raw = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    examples = load_examples(str(path))
    assert len(examples) == len(raw) == rows
    finals = [row["answer"].rsplit("####", 1)[1].strip() for row in raw]

    separated = [(f, ex.answer) for f, ex in zip(finals, examples) if "," in f]
    assert len(separated) == with_commas
    # "#### 1,080" is 1080: the commas go, every digit stays.
    assert all(answer == final.replace(",", "") for final, answer in separated)
    assert [ex.answer for ex in examples if ex.answer.startswith("-")] == negatives
    assert all(re.fullmatch(r"-?\d+", ex.answer) for ex in examples)
    assert [ex.question for ex in examples] == [row["question"] for row in raw]


def test_thousands_separators_in_the_test_split(real_dir):
    examples = load_examples(str(real_dir / "gsm8k" / "test.jsonl"))
    answers = {ex.answer for ex in examples}
    # Three of the 14 test answers written with separators (2,125, 114,200 and 276,000).
    assert {"2125", "114200", "276000"} <= answers
    assert not any("," in a for a in answers)


def test_worked_solutions_lose_the_calculator_notes_and_the_final_line(real_dir):
    path = real_dir / "gsm8k" / "train.jsonl"
    examples = load_examples(str(path), limit=200)
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert "<<48/2=24>>" in first["answer"]
    assert examples[0].reasoning.startswith("Natalia sold 48/2 = 24 clips in May.")
    for ex in examples:
        assert ex.reasoning and "####" not in ex.reasoning
        assert "<<" not in ex.reasoning and ">>" not in ex.reasoning
