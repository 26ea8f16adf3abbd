"""Tests for mlx_reasoner.tasks: answers recomputed independently from the question text, worked
traces that check out, reproducible and unlimited streams, and a held-out split that never leaks."""

import random
import re
import string

import pytest

from mlx_reasoner import tasks
from mlx_reasoner.answers import normalize_answer
from mlx_reasoner.data import Example, load_examples
from mlx_reasoner.errors import ReasonerError
from mlx_reasoner.examples import normalize_question
from mlx_reasoner.rewards import REWARDS
from mlx_reasoner.tasks import (
    PARITY_GLANCE,
    TASKS,
    WORDS,
    Task,
    get_task,
    is_heldout,
    letter_count_example,
    task_examples,
)


@pytest.fixture(scope="module")
def samples() -> dict[str, list[Example]]:
    """Train and test examples of every task under two seeds, shared by the checks below."""
    return {
        name: [
            example
            for seed in (0, 1)
            for split, count in (("train", 300), ("test", 60))
            for example in task_examples(name, split=split, count=count, seed=seed)
        ]
        for name in TASKS
    }


# --- answers, recomputed from the question text -------------------------------------------------

# One pattern per phrasing; the test's own reading of the question, not the module's templates.
LETTER_QUESTIONS = [
    re.compile(r"How many times does the letter (?P<letter>\w) appear in '(?P<word>[a-z]+)'\?"),
    re.compile(r"How many (?P<letter>\w)'s are in (?P<word>[a-z]+)\?"),
    re.compile(r"Count the letter (?P<letter>\w) in '(?P<word>[a-z]+)'\."),
    re.compile(r"How many (?P<letter>\w)'s are in the word '(?P<word>[a-z]+)'\?"),
    re.compile(r"In the word '(?P<word>[a-z]+)', how many times does '(?P<letter>\w)' occur\?"),
]


def read_letter_question(question: str) -> tuple[str, str]:
    matches = [m for pattern in LETTER_QUESTIONS if (m := pattern.fullmatch(question))]
    assert len(matches) == 1, question
    return matches[0]["word"], matches[0]["letter"]


def test_letter_count_answers_are_the_real_counts(samples):
    phrasings = set()
    for example in samples["letter-count"]:
        word, letter = read_letter_question(example.question)
        assert example.answer == str(word.lower().count(letter.lower())), example
        phrasings.add(
            next(i for i, p in enumerate(LETTER_QUESTIONS) if p.fullmatch(example.question))
        )
    assert phrasings == set(range(len(LETTER_QUESTIONS)))


def test_letter_count_trace_spells_the_word_and_numbers_each_match(samples):
    for example in samples["letter-count"]:
        word, letter = read_letter_question(example.question)
        spelling, total = example.reasoning.split("\n")
        tokens = spelling.split(" ")
        assert "".join(token[0] for token in tokens) == word
        marks = [token[2:-1] for token in tokens if len(token) > 1]
        assert marks == [str(k) for k in range(1, len(marks) + 1)]
        assert all((len(token) > 1) == (token[0] == letter.lower()) for token in tokens)
        assert total == f"Total: {example.answer}"


def test_strawberry_and_friends():
    example = letter_count_example("strawberry", "r")
    assert example.answer == "3"
    assert example.reasoning == "s t r(1) a w b e r(2) r(3) y\nTotal: 3"
    assert letter_count_example("strawberry", "R", template=1).question == (
        "How many R's are in strawberry?"
    )
    assert letter_count_example("strawberry", "R", template=1).answer == "3"
    assert letter_count_example("mississippi", "s").answer == "4"
    assert (
        letter_count_example("cheese", "e", template=2).question
        == "Count the letter e in 'cheese'."
    )
    assert letter_count_example("cheese", "e").answer == "3"
    assert letter_count_example("banana", "z").answer == "0"


def test_letter_choice_gives_varied_counts(samples):
    answers = [int(example.answer) for example in samples["letter-count"]]
    share = {count: answers.count(count) / len(answers) for count in set(answers)}
    assert 0.05 < share[0] < 0.4  # absent letters happen, but not mostly
    assert share[1] < 0.7
    assert share[2] + sum(v for k, v in share.items() if k >= 3) > 0.15


def test_word_list():
    assert 150 <= len(WORDS) <= 300
    assert len(set(WORDS)) == len(WORDS)
    assert all(word.isascii() and word.isalpha() and word.islower() for word in WORDS)
    assert {"strawberry", "banana", "mississippi", "cheese"} <= set(WORDS)


ARITHMETIC_QUESTION = re.compile(
    r"(?P<name>[A-Z][a-z]+) has (?:(?P<boxes>\d+) [a-z]+ (?:of|with) )?(?P<first>\d+) "
    r"(?P<items>[a-z]+)(?: in each)?\. (?:He|She) (?P<story>.*)\. "
    r"How many (?P=items) does (?P=name) have (?:now|in the end|left)\?"
)
ADD = re.compile(r"(?:buys|finds|gets|is given) (\d+) more")
SUBTRACT = re.compile(r"(?:gives away|loses|sells) (\d+)|gives (\d+) to a friend")
REASONING_LINE = re.compile(r"(\d+) ([-+*]) (\d+) = (\d+)")


def solve_arithmetic(question: str) -> tuple[int, int]:
    """Solve a question from its text alone; return (answer, number of operations)."""
    match = ARITHMETIC_QUESTION.fullmatch(question)
    assert match, question
    value = int(match["first"])
    operations = 0
    if match["boxes"]:
        value *= int(match["boxes"])
        operations += 1
    actions = re.split(r", and then |, | and then ", match["story"])
    for action in actions:
        if added := ADD.fullmatch(action):
            value += int(added[1])
        elif taken := SUBTRACT.fullmatch(action):
            value -= int(taken[1] or taken[2])
        else:
            pytest.fail(f"unreadable step '{action}' in: {question}")
        assert value >= 0, question
        operations += 1
    return value, operations


def test_arithmetic_answers_are_correct(samples):
    step_counts = set()
    for example in samples["arithmetic"]:
        value, operations = solve_arithmetic(example.question)
        assert example.answer == str(value), example
        step_counts.add(operations)
    assert step_counts == {2, 3}


def test_arithmetic_trace_is_correct_and_uses_the_questions_numbers(samples):
    for example in samples["arithmetic"]:
        lines = example.reasoning.split("\n")
        steps = [REASONING_LINE.fullmatch(line) for line in lines]
        assert all(steps), example.reasoning
        operands = [steps[0][1]]
        running = None
        for step in steps:
            left, op, right, result = int(step[1]), step[2], int(step[3]), int(step[4])
            assert result == {"+": left + right, "-": left - right, "*": left * right}[op]
            assert running is None or left == running
            running = result
            operands.append(step[3])
        assert str(running) == example.answer
        assert operands == re.findall(r"\d+", example.question)


def test_arithmetic_varies_names_items_and_shapes(samples):
    questions = [example.question for example in samples["arithmetic"]]
    assert len({q.split(" ")[0] for q in questions}) >= 8
    assert len({ARITHMETIC_QUESTION.fullmatch(q)["items"] for q in questions}) >= 8
    assert any(" of " in q for q in questions) and any(" in each." in q for q in questions)


# parity answers "even" or "odd" and most of its traces do not state it; it has its own test below.
CONCLUDING_TASKS = sorted(name for name in TASKS if name != "parity")


@pytest.mark.parametrize("name", CONCLUDING_TASKS)
def test_answers_are_small_non_negative_integers_and_traces_end_in_them(samples, name):
    for example in samples[name]:
        assert re.fullmatch(r"0|[1-9]\d*", example.answer), example
        assert normalize_answer(example.answer) == example.answer
        assert int(example.answer) < 100
        assert len(example.question) <= 140
        assert example.reasoning and example.reasoning.endswith(example.answer)
        assert not re.search(r"\d", example.reasoning[-len(example.answer) - 1])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_traces_render_to_a_completion_the_rewards_score_fully(samples, name):
    examples = samples[name][:20]
    completions = [
        f"<reasoning>\n{e.reasoning}\n</reasoning>\n<answer>\n{e.answer}\n</answer>\n"
        for e in examples
    ]
    answers = [e.answer for e in examples]
    assert REWARDS["correctness"](completions, answers) == [2.0] * len(examples)
    assert REWARDS["strict_format"](completions, answers) == [0.5] * len(examples)


# --- reproducible, unlimited, never leaking ---------------------------------------------------


@pytest.mark.parametrize("name", sorted(TASKS))
def test_same_seed_same_examples_other_seed_other_examples(name):
    first = task_examples(name, count=50, seed=3)
    assert first == task_examples(name, count=50, seed=3)
    assert first != task_examples(name, count=50, seed=4)
    assert task_examples(name, count=20, seed=3) == first[:20]  # a smaller count is a prefix
    assert get_task(name).example(3, 7) == get_task(name).example(3, 7)


def test_example_depends_only_on_task_seed_and_index():
    # Drawing other examples or touching the global generator must not change it.
    task = get_task("arithmetic")
    expected = task.example(5, 11)
    random.seed(123)
    task_examples("arithmetic", count=30, seed=5)
    assert task.example(5, 11) == expected


def test_arithmetic_is_unlimited():
    examples = task_examples("arithmetic", count=3000, seed=0)
    assert len({normalize_question(e.question) for e in examples}) == 3000


@pytest.mark.parametrize("name", sorted(TASKS))
@pytest.mark.parametrize("seed, train_count, test_count", [(0, 400, 40), (1, 150, 90), (7, 30, 5)])
def test_train_and_test_never_share_a_question(name, seed, train_count, test_count):
    train = task_examples(name, split="train", count=train_count, seed=seed)
    test = task_examples(name, split="test", count=test_count, seed=seed + 1)
    train_questions = {normalize_question(e.question) for e in train}
    test_questions = {normalize_question(e.question) for e in test}
    assert len(train_questions) == train_count and len(test_questions) == test_count
    assert not train_questions & test_questions
    assert not any(is_heldout(e.question) for e in train)
    assert all(is_heldout(e.question) for e in test)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_about_a_tenth_of_questions_are_held_out(name):
    stream = [get_task(name).example(0, i).question for i in range(3000)]
    share = sum(map(is_heldout, stream)) / len(stream)
    assert 0.07 < share < 0.13


def test_held_out_ignores_case_and_spacing():
    question = next(
        e.question
        for e in (tasks.TASKS["arithmetic"].example(0, i) for i in range(200))
        if is_heldout(e.question)
    )
    assert is_heldout(question.upper())
    assert is_heldout("  " + question.replace(" ", "  \n") + " ")


# --- errors --------------------------------------------------------------------------------------


def test_unknown_task_lists_the_available_ones():
    with pytest.raises(ReasonerError, match="task:arithmetic, task:letter-count"):
        task_examples("spelling", count=5)
    with pytest.raises(ReasonerError, match="unknown task 'spelling'.*task:letter-count"):
        load_examples("task:spelling")


def test_bad_split_and_count():
    with pytest.raises(ReasonerError, match="'train' or 'test'"):
        task_examples("arithmetic", split="validation", count=5)
    with pytest.raises(ReasonerError, match="at least 1"):
        task_examples("arithmetic", count=0)


def test_asking_a_finite_task_for_too_many_says_how_many_exist():
    expected = sum(
        is_heldout(letter_count_example(word, letter, template).question)
        for word in WORDS
        for letter in string.ascii_lowercase
        for template in range(5)
    )
    with pytest.raises(ReasonerError, match=f"has only {expected:,} distinct test questions"):
        task_examples("letter-count", split="test", count=expected + 1)


def test_a_task_that_runs_dry_stops_instead_of_looping(monkeypatch):
    def three_questions(rng):
        number = rng.randrange(3)
        return Example(f"Question {number}?", str(number))

    monkeypatch.setitem(TASKS, "tiny", Task("tiny", "three questions", three_questions))
    monkeypatch.setattr(tasks, "_MAX_DRAWS_WITHOUT_NEW", 200)
    available = sum(not is_heldout(f"Question {n}?") for n in range(3))
    assert len(task_examples("tiny", count=available)) == available
    with pytest.raises(ReasonerError, match=f"produced only {available} distinct train"):
        task_examples("tiny", count=available + 1)


# --- loading through the data stage -------------------------------------------------------------


def test_load_examples_generates_task_examples():
    examples = load_examples("task:letter-count", limit=20)
    assert examples == task_examples("letter-count", split="train", count=20, seed=0)
    assert all(e.reasoning for e in examples)
    held_out = load_examples("task:arithmetic", split="test", limit=10, seed=2)
    assert held_out == task_examples("arithmetic", split="test", count=10, seed=2)
    assert load_examples("task:arithmetic:30", seed=1) == task_examples(
        "arithmetic", count=30, seed=1
    )


def test_parity_answers_and_four_traces_in_ten_work_it_out(samples):
    examples = samples["parity"]
    worked = [e for e in examples if e.reasoning != PARITY_GLANCE]
    for example in examples:
        letters = example.question.removeprefix("Even or odd number of z: ")
        assert len(letters) == 16 and set(letters) <= set("xqkvz")
        assert letters.count("z") <= 9
        assert example.answer == ("odd" if letters.count("z") % 2 else "even")
    for example in worked:
        letters = example.question.removeprefix("Even or odd number of z: ")
        # The parity of the z's so far: 0 before the first letter, then one bit per letter.
        assert example.reasoning == "".join(
            str(letters[:i].count("z") % 2) for i in range(len(letters) + 1)
        )
    assert 0.3 < len(worked) / len(examples) < 0.5
    answers = [e.answer for e in examples]
    assert 0.4 < answers.count("odd") / len(answers) < 0.6
