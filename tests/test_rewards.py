"""The built-in GSM8K rewards and the rewards stage: loading, choosing, weighting, checking."""

import doctest
import math
import re
import textwrap

import numpy as np
import pytest

from mlx_reasoner.errors import ReasonerError
from mlx_reasoner.rewards import (
    DEFAULT_REWARDS,
    REWARDS,
    WeightedReward,
    load_reward_file,
    parse_reward_spec,
    resolve_rewards,
    score_completions,
)

correctness = REWARDS["correctness"]
integer = REWARDS["integer"]
strict_format = REWARDS["strict_format"]
soft_format = REWARDS["soft_format"]
xml_count = REWARDS["xml_count"]

# The ideal layout, with several lines of reasoning and a formatted number.
CLEAN = (
    "<reasoning>\nShe has 1,000 apples.\nShe buys 234 more.\n</reasoning>\n"
    "<answer>\n$1,234\n</answer>\n"
)
# Same, as the trainer usually sees it: the model stopped right after </answer>.
CLEAN_NO_NEWLINE = CLEAN[:-1]
ONE_LINE = "<reasoning>1000 + 234</reasoning> <answer>1234</answer>"
TRAILING = CLEAN + "Hope that helps!"  # 16 characters after "</answer>\n"
NO_TAGS = "The answer is 1234."
NO_ANSWER_TAG = "<reasoning>\n1000 + 234\n</reasoning>\n1234"
UNCLOSED = "<reasoning>\n1000 + 234\n</reasoning>\n<answer>\n1234"


def write(tmp_path, name, source):
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


# --- built-in rewards -------------------------------------------------------------------


def test_builtins_are_registered_in_default_order():
    # The defaults first, in order, then the shaping rewards, used only when named.
    assert list(REWARDS) == DEFAULT_REWARDS + ["overlong"]


@pytest.mark.parametrize("name", DEFAULT_REWARDS)
def test_builtin_docstring_examples(name):
    fn = REWARDS[name]
    tests = doctest.DocTestFinder().find(fn, name, globs=dict(fn.__globals__))
    assert tests and tests[0].examples, f"{name} needs a >>> example"
    runner = doctest.DocTestRunner()
    for test in tests:
        runner.run(test)
    assert runner.failures == 0


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        (CLEAN, "1234", 2.0),
        (CLEAN, "#### 1,234", 2.0),  # a whole GSM8K solution as gold
        (CLEAN_NO_NEWLINE, "1234", 2.0),
        (ONE_LINE, "1234", 2.0),
        (UNCLOSED, "1234", 2.0),  # cut off before </answer>: still its answer
        ("<answer>1234.00 dollars</answer>", "1234", 2.0),
        (CLEAN, "1235", 0.0),
        ("<answer>12.5</answer>", "125", 0.0),
        (NO_TAGS, "1234", 0.0),  # a number outside <answer> doesn't count
        (NO_ANSWER_TAG, "1234", 0.0),
        ("<answer></answer>", "0", 0.0),
    ],
)
def test_correctness(completion, gold, expected):
    assert correctness([completion], [gold]) == [expected]


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("-3", 0.5),
        ("1,000", 0.5),
        ("$1,234", 0.5),
        ("12.00", 0.5),
        ("12 apples", 0.5),
        ("12.5", 0.0),
        ("3/4", 0.0),
        ("twelve", 0.0),
        ("", 0.0),
    ],
)
def test_integer(answer, expected):
    assert integer([f"<answer>\n{answer}\n</answer>"], ["1"]) == [expected]


def test_integer_without_answer_tag():
    assert integer([NO_TAGS], ["1234"]) == [0.0]


@pytest.mark.parametrize(
    "completion, expected",
    [
        (CLEAN, 0.5),
        ("<reasoning>\n\n</reasoning>\n<answer>\n\n</answer>\n", 0.5),  # empty blocks
        # A chat model stops with "</answer><|im_end|>" and the stop token is stripped.
        (CLEAN_NO_NEWLINE, 0.5),
        (TRAILING, 0.0),
        (CLEAN_NO_NEWLINE + "Hope that helps!", 0.0),  # text right after </answer>
        (CLEAN + "\n", 0.0),  # a second newline is extra text too
        (CLEAN_NO_NEWLINE + " ", 0.0),
        (CLEAN + "<answer>\n5\n</answer>", 0.0),  # a second answer after the first
        (CLEAN + "x\n</answer>\n", 0.0),  # text, then a stray closing tag
        ("Sure!\n" + CLEAN, 0.0),  # anchored at the start
        ("\n" + CLEAN, 0.0),
        (ONE_LINE, 0.0),
        (NO_TAGS, 0.0),
        (UNCLOSED, 0.0),
    ],
)
def test_strict_format(completion, expected):
    assert strict_format([completion], ["1234"]) == [expected]


@pytest.mark.parametrize(
    "completion, expected",
    [
        (CLEAN, 0.5),
        (CLEAN_NO_NEWLINE, 0.5),
        (TRAILING, 0.5),
        (ONE_LINE, 0.5),
        ("Sure! <reasoning>x</reasoning>\n\n\t<answer>1</answer> bye", 0.5),
        ("<reasoning>x</reasoning> and then <answer>1</answer>", 0.0),  # text between
        ("<answer>1</answer><reasoning>x</reasoning>", 0.0),  # wrong order
        (NO_ANSWER_TAG, 0.0),
        (UNCLOSED, 0.0),
        (NO_TAGS, 0.0),
    ],
)
def test_soft_format(completion, expected):
    assert soft_format([completion], ["1234"]) == [expected]


@pytest.mark.parametrize(
    "completion, expected",
    [
        (CLEAN, 0.5),
        (CLEAN_NO_NEWLINE, 0.5),
        (CLEAN + "\n", 0.5 - 0.001),  # only one newline after </answer> is free
        (TRAILING, 0.5 - 0.016),
        (UNCLOSED, 0.375),  # three tags placed, nothing to penalise
        (NO_ANSWER_TAG, 0.25),
        (ONE_LINE, 0.0),  # tags present but not on their own lines
        (NO_TAGS, 0.0),
        (CLEAN + CLEAN, 0.0),  # every tag twice; only the tail after the last </answer> counts
        ("<answer>1</answer>" + "x" * 1000, -1.0),
    ],
)
def test_xml_count(completion, expected):
    (score,) = xml_count([completion], ["1234"])
    assert isinstance(score, float)
    assert score == pytest.approx(expected)


@pytest.mark.parametrize("name", DEFAULT_REWARDS)
def test_builtins_score_a_batch_and_ignore_extra_kwargs(name):
    completions = [CLEAN, NO_TAGS, ONE_LINE]
    scores = REWARDS[name](completions, ["1234"] * 3, questions=["q"] * 3, step=7)
    assert len(scores) == 3
    assert all(isinstance(score, float) for score in scores)


def test_builtin_helpers_are_not_registered():
    # gsm8k.py imports answers_match and friends and has _private helpers.
    assert not any(name.startswith("_") for name in REWARDS)
    assert "answers_match" not in REWARDS and "extract_xml_answer" not in REWARDS


# --- parse_reward_spec -------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("correctness", ("correctness", 1.0)),
        ("correctness:2", ("correctness", 2.0)),
        ("xml_count:0.5", ("xml_count", 0.5)),
        (" soft_format : 0.25 ", ("soft_format", 0.25)),
        ("integer:-1", ("integer", -1.0)),
        ("integer:0", ("integer", 0.0)),
        ("integer:1e-1", ("integer", 0.1)),
    ],
)
def test_parse_reward_spec(spec, expected):
    assert parse_reward_spec(spec) == expected


@pytest.mark.parametrize(
    "spec", ["correctness:abc", "correctness:", "correctness:nan", "x:inf", "x:1:2", ":2", ""]
)
def test_parse_reward_spec_rejects_bad_specs(spec):
    with pytest.raises(ReasonerError) as info:
        parse_reward_spec(spec)
    assert f"'{spec}'" in str(info.value)
    assert "\n" not in str(info.value)


# --- load_reward_file --------------------------------------------------------------------


def test_load_reward_file_registers_only_public_functions_defined_there(tmp_path):
    path = write(
        tmp_path,
        "my_rewards.py",
        """
        import os
        from os.path import join
        from mlx_reasoner.answers import normalize_answer

        THRESHOLD = 10

        def _private(completions, answers, **kwargs):
            return [0.0] * len(completions)

        class Scorer:
            def __call__(self, completions, answers, **kwargs):
                return [0.0] * len(completions)

        def brevity(completions, answers, **kwargs):
            return [1.0 if len(c) < THRESHOLD else 0.0 for c in completions]

        def echo(completions, answers, **kwargs):
            pairs = zip(completions, answers)
            return [float(normalize_answer(c) == normalize_answer(a)) for c, a in pairs]
        """,
    )
    functions = load_reward_file(path)
    assert list(functions) == ["brevity", "echo"]
    assert functions["brevity"](["short", "a long completion"], ["", ""]) == [1.0, 0.0]
    assert functions["echo"](["$1,000"], ["1000"]) == [1.0]


def test_load_reward_file_accepts_str_paths_and_same_named_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write(
        tmp_path / "a", "rewards.py", "def one(completions, answers, **kw):\n    return [1.0]\n"
    )
    second = write(
        tmp_path / "b", "rewards.py", "def two(completions, answers, **kw):\n    return [2.0]\n"
    )
    assert list(load_reward_file(str(first))) == ["one"]
    assert list(load_reward_file(second)) == ["two"]
    assert load_reward_file(first)["one"]([""], [""]) == [1.0]


def test_load_reward_file_supports_dataclasses(tmp_path):
    path = write(
        tmp_path,
        "dc.py",
        """
        from dataclasses import dataclass

        @dataclass
        class _Config:
            bonus: float = 0.5

        def bonus(completions, answers, **kwargs):
            return [_Config().bonus] * len(completions)
        """,
    )
    assert load_reward_file(path)["bonus"](["x"], ["y"]) == [0.5]


def test_load_reward_file_import_error_names_file_and_exception(tmp_path):
    path = write(tmp_path, "broken.py", "raise RuntimeError('no GPU\\nhere')\n")
    with pytest.raises(ReasonerError) as info:
        load_reward_file(path)
    message = str(info.value)
    assert "broken.py" in message and "RuntimeError: no GPU here" in message
    assert "\n" not in message


def test_load_reward_file_syntax_error(tmp_path):
    path = write(tmp_path, "typo.py", "def f(completions, answers:\n    return []\n")
    with pytest.raises(ReasonerError, match=r"typo\.py.*SyntaxError"):
        load_reward_file(path)


def test_load_reward_file_missing_import(tmp_path):
    path = write(tmp_path, "deps.py", "import no_such_package_xyz\n")
    with pytest.raises(ReasonerError, match=r"deps\.py.*ModuleNotFoundError.*no_such_package_xyz"):
        load_reward_file(path)


def test_load_reward_file_missing(tmp_path):
    with pytest.raises(ReasonerError, match=r"nope\.py does not exist"):
        load_reward_file(tmp_path / "nope.py")


@pytest.mark.parametrize("name", ["rewards.txt", "folder.py"])
def test_load_reward_file_not_python(tmp_path, name):
    if name.endswith(".py"):
        (tmp_path / name).mkdir()
    else:
        write(tmp_path, name, "def f(completions, answers): return []\n")
    with pytest.raises(ReasonerError, match="is not a .py file"):
        load_reward_file(tmp_path / name)


def test_load_reward_file_without_public_functions(tmp_path):
    path = write(
        tmp_path,
        "empty.py",
        "from os.path import join\n\ndef _helper(completions, answers):\n    return []\n",
    )
    with pytest.raises(ReasonerError, match=r"empty\.py defines no public top-level function"):
        load_reward_file(path)


# --- resolve_rewards ---------------------------------------------------------------------

CUSTOM = """
def brevity(completions, answers, **kwargs):
    return [0.25] * len(completions)

def correctness(completions, answers, **kwargs):
    return [9.0] * len(completions)
"""


def test_resolve_rewards_defaults():
    rewards = resolve_rewards()
    assert [r.name for r in rewards] == DEFAULT_REWARDS
    assert all(r.weight == 1.0 for r in rewards)
    assert all(r.fn is REWARDS[r.name] for r in rewards)


def test_resolve_rewards_explicit_specs_with_weights():
    rewards = resolve_rewards(["correctness:2", "xml_count:0.5"])
    assert rewards == [
        WeightedReward("correctness", REWARDS["correctness"], 2.0),
        WeightedReward("xml_count", REWARDS["xml_count"], 0.5),
    ]


def test_resolve_rewards_defaults_plus_file_functions_and_override(tmp_path):
    path = write(tmp_path, "custom.py", CUSTOM)
    rewards = resolve_rewards(reward_files=[path])
    assert [r.name for r in rewards] == DEFAULT_REWARDS + ["brevity"]
    by_name = {r.name: r for r in rewards}
    assert by_name["correctness"].fn([""], [""]) == [9.0]  # the file's version wins
    assert by_name["integer"].fn is REWARDS["integer"]
    assert REWARDS["correctness"]([""], ["1"]) == [0.0]  # the built-in is untouched


def test_resolve_rewards_specs_can_name_file_functions(tmp_path):
    path = write(tmp_path, "custom.py", CUSTOM)
    rewards = resolve_rewards(["brevity:4", "integer"], [str(path)])
    assert [(r.name, r.weight) for r in rewards] == [("brevity", 4.0), ("integer", 1.0)]


def test_resolve_rewards_unknown_name_lists_available(tmp_path):
    path = write(tmp_path, "custom.py", CUSTOM)
    with pytest.raises(ReasonerError) as info:
        resolve_rewards(["corectness"], [path])
    message = str(info.value)
    assert "unknown reward 'corectness'" in message
    for name in DEFAULT_REWARDS + ["brevity"]:
        assert name in message


def test_resolve_rewards_duplicate_spec():
    with pytest.raises(ReasonerError, match="'correctness' is given more than once"):
        resolve_rewards(["correctness", "correctness:2"])


def test_resolve_rewards_same_name_in_two_files(tmp_path):
    (tmp_path / "a").mkdir()
    first = write(tmp_path / "a", "one.py", CUSTOM)
    second = write(tmp_path, "two.py", CUSTOM)
    with pytest.raises(ReasonerError, match="'brevity' is defined in both"):
        resolve_rewards(reward_files=[first, second])


def test_resolve_rewards_bad_spec_and_bad_file(tmp_path):
    with pytest.raises(ReasonerError, match="correctness:x"):
        resolve_rewards(["correctness:x"])
    with pytest.raises(ReasonerError, match="does not exist"):
        resolve_rewards(reward_files=[tmp_path / "missing.py"])


# --- score_completions -------------------------------------------------------------------


def test_score_completions_weights_and_components_sum_to_total():
    rewards = resolve_rewards(["correctness:2", "strict_format", "xml_count:0.5"])
    completions = [CLEAN, ONE_LINE, NO_TAGS]
    scores = score_completions(rewards, completions, ["1234", "1234", "1234"])

    assert list(scores.components) == ["correctness", "strict_format", "xml_count"]
    np.testing.assert_allclose(scores.components["correctness"], [4.0, 4.0, 0.0])
    np.testing.assert_allclose(scores.components["strict_format"], [0.5, 0.0, 0.0])
    np.testing.assert_allclose(scores.components["xml_count"], [0.25, 0.0, 0.0])
    np.testing.assert_allclose(scores.total, [4.75, 4.0, 0.0])
    np.testing.assert_allclose(sum(scores.components.values()), scores.total, rtol=1e-6)
    assert scores.total.dtype == np.float32 and scores.total.shape == (3,)
    assert all(c.dtype == np.float32 for c in scores.components.values())


def test_score_completions_default_rewards_on_a_perfect_completion():
    scores = score_completions(resolve_rewards(), [CLEAN], ["#### 1,234"])
    assert scores.total[0] == pytest.approx(2.0 + 0.5 + 0.5 + 0.5 + 0.5)


def test_score_completions_passes_kwargs_and_accepts_numbers_of_any_kind():
    seen = {}

    def uses_questions(completions, answers, *, questions, **kwargs):
        seen["questions"] = questions
        return [len(q) for q in questions]  # ints

    rewards = [
        WeightedReward("uses_questions", uses_questions),
        WeightedReward("flag", lambda c, a, **kw: [True, False]),  # bools are 1 and 0
        WeightedReward("array", lambda c, a, **kw: np.array([0.5, 1.5], dtype=np.float32)),
        WeightedReward("numpy_items", lambda c, a, **kw: (np.float64(1.0), np.int32(2)), 2.0),
    ]
    scores = score_completions(rewards, ["a", "b"], ["1", "2"], questions=["q1", "q22"])
    assert seen["questions"] == ["q1", "q22"]
    np.testing.assert_allclose(scores.components["uses_questions"], [2.0, 3.0])
    np.testing.assert_allclose(scores.components["flag"], [1.0, 0.0])
    np.testing.assert_allclose(scores.components["numpy_items"], [2.0, 4.0])
    np.testing.assert_allclose(scores.total, [5.5, 8.5])


def test_score_completions_gives_each_reward_its_own_copy_of_the_lists():
    def mutates(completions, answers, **kwargs):
        n = len(completions)
        completions.clear()
        return [0.0] * n

    def counts(completions, answers, **kwargs):
        return [float(len(completions))] * len(completions)

    completions = ["a", "b"]
    rewards = [WeightedReward("mutates", mutates), WeightedReward("counts", counts)]
    scores = score_completions(rewards, completions, ["", ""])
    np.testing.assert_allclose(scores.components["counts"], [2.0, 2.0])
    assert completions == ["a", "b"]


def test_score_completions_with_no_rewards_or_no_completions():
    assert score_completions([], ["a"], ["1"]).total.tolist() == [0.0]
    scores = score_completions(resolve_rewards(), [], [])
    assert scores.total.shape == (0,) and scores.components["correctness"].shape == (0,)


def test_score_completions_length_mismatch_is_a_bug():
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        score_completions([], ["a", "b"], ["1"])


def raises_value_error(completions, answers, **kwargs):
    raise ValueError("bad\ninput")


def no_kwargs(completions, answers):
    return [0.0] * len(completions)


@pytest.mark.parametrize(
    "fn, expected",
    [
        (raises_value_error, r"raised ValueError: bad input"),
        (no_kwargs, r"raised TypeError: .*'questions'.*must accept \*\*kwargs"),
        (lambda c, a, **kw: [1.0], r"returned 1 scores for 2 completions"),
        (lambda c, a, **kw: [1.0, 2.0, 3.0], r"returned 3 scores for 2 completions"),
        (lambda c, a, **kw: None, r"returned NoneType; it must return a list of 2 numbers"),
        (lambda c, a, **kw: 1.0, r"returned float"),
        (lambda c, a, **kw: "10", r"returned str"),
        (lambda c, a, **kw: {"a": 1.0, "b": 2.0}, r"returned dict"),
        (lambda c, a, **kw: (x for x in [1.0, 2.0]), r"returned generator"),
        (lambda c, a, **kw: [1.0, None], r"non-number at index 1: None"),
        (lambda c, a, **kw: [1.0, "2.0"], r"non-number at index 1: '2.0'"),
        (lambda c, a, **kw: [[1.0], [2.0]], r"non-number at index 0"),
        (lambda c, a, **kw: [1.0, math.nan], r"returned nan at index 1; scores must be finite"),
        (lambda c, a, **kw: [math.inf, 1.0], r"returned inf at index 0"),
        (lambda c, a, **kw: np.array([1.0, -np.inf]), r"returned -inf at index 1"),
        (lambda c, a, **kw: np.ones((2, 1)), r"array of shape \(2, 1\)"),
        (lambda c, a, **kw: np.array(["a", "b"]), r"array of <U1"),
    ],
)
def test_score_completions_bad_rewards_name_the_function(fn, expected):
    reward = WeightedReward("my_reward", fn, 2.0)
    with pytest.raises(ReasonerError) as info:
        score_completions(
            [WeightedReward("correctness", REWARDS["correctness"]), reward],
            ["a", "b"],
            ["1", "2"],
            questions=["q", "q"],
        )
    message = str(info.value)
    assert message.startswith("reward function 'my_reward' (test_rewards.py:")
    assert "\n" not in message
    assert re.search(expected, message), message
