"""Built-in GSM8K reward functions: answer correctness and the reasoning/answer XML format.

Every public top-level function here is registered under its name (see
``mlx_reasoner.rewards``); helpers start with ``_`` so they are not. Each function takes the
completions and the gold answers of one batch, plus keyword arguments it may ignore, and
returns one float per completion. The format they reward is::

    <reasoning>
    ...
    </reasoning>
    <answer>
    ...
    </answer>
"""

import re

from mlx_reasoner.answers import (
    answers_match,
    extract_xml_answer,
    normalize_answer,
    parse_gsm8k_answer,
)

# Each block's body may not hold its own closing tag, so nothing can follow the first
# </answer> but one optional newline (fullmatch: no trailing text, no second newline).
_STRICT_FORMAT = re.compile(
    r"<reasoning>\n(?:(?!</reasoning>).)*?\n</reasoning>\n"
    r"<answer>\n(?:(?!</answer>).)*?\n</answer>\n?",
    flags=re.DOTALL,
)
_SOFT_FORMAT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", flags=re.DOTALL)
_INTEGER = re.compile(r"-?\d+")

_TAG_BONUS = 0.125
_TRAILING_CHAR_PENALTY = 0.001


def correctness(completions: list[str], answers: list[str], **kwargs) -> list[float]:
    r"""Reward 2.0 when the completion's ``<answer>`` is the gold answer, else 0.0.

    Both sides are compared with ``mlx_reasoner.answers.answers_match``, so ``$1,234.00``
    equals ``1234``. A gold answer may be bare (``72``) or a whole GSM8K solution ending
    in ``#### 72``.

    Args:
        completions: model completions, one per sample.
        answers: gold answers, aligned with ``completions``.
        **kwargs: ignored (the trainer also passes ``questions``).

    Returns:
        One score per completion.

    >>> correctness(["<answer>\n$1,234\n</answer>", "<answer>12</answer>", "1234"],
    ...             ["1234", "#### 13", "1234"])
    [2.0, 0.0, 0.0]
    """
    return [
        2.0 if answers_match(extract_xml_answer(completion), parse_gsm8k_answer(gold)) else 0.0
        for completion, gold in zip(completions, answers)
    ]


def integer(completions: list[str], answers: list[str], **kwargs) -> list[float]:
    r"""Reward 0.5 when the completion's ``<answer>`` is a whole number, else 0.0.

    The answer is normalised first, so ``-3``, ``1,000`` and ``12.00`` count and
    ``12.5``, ``3/4`` or a missing answer do not. The gold answer is not used.

    Args:
        completions: model completions, one per sample.
        answers: gold answers (unused).
        **kwargs: ignored.

    Returns:
        One score per completion.

    >>> integer(["<answer>1,000</answer>", "<answer>-3</answer>", "<answer>2.5</answer>"],
    ...         ["", "", ""])
    [0.5, 0.5, 0.0]
    """
    return [
        0.5 if _INTEGER.fullmatch(normalize_answer(extract_xml_answer(completion))) else 0.0
        for completion in completions
    ]


def strict_format(completions: list[str], answers: list[str], **kwargs) -> list[float]:
    r"""Reward 0.5 when the whole completion is exactly the reasoning/answer layout.

    Each tag sits on its own line and nothing follows ``</answer>`` but at most one
    newline. The trainer passes completions with the stop token removed, and a chat
    model usually stops right after ``</answer>`` (Qwen writes ``</answer><|im_end|>``),
    so both endings earn the reward; any other text after ``</answer>`` does not.

    Args:
        completions: model completions, one per sample.
        answers: gold answers (unused).
        **kwargs: ignored.

    Returns:
        One score per completion.

    >>> strict_format(["<reasoning>\nhalf of 8\n</reasoning>\n<answer>\n4\n</answer>",
    ...                "<reasoning>\nhalf of 8\n</reasoning>\n<answer>\n4\n</answer>\n",
    ...                "<reasoning>\nhalf of 8\n</reasoning>\n<answer>\n4\n</answer>\nbye",
    ...                "<reasoning>half of 8</reasoning><answer>4</answer>"], ["4"] * 4)
    [0.5, 0.5, 0.0, 0.0]
    """
    return [0.5 if _STRICT_FORMAT.fullmatch(completion) else 0.0 for completion in completions]


def soft_format(completions: list[str], answers: list[str], **kwargs) -> list[float]:
    r"""Reward 0.5 when a ``<reasoning>`` block is followed by an ``<answer>`` block.

    Lenient: the blocks may sit anywhere in the completion, on one line or many, with
    any whitespace between them.

    Args:
        completions: model completions, one per sample.
        answers: gold answers (unused).
        **kwargs: ignored.

    Returns:
        One score per completion.

    >>> soft_format(["Sure! <reasoning>half of 8</reasoning>  <answer>4</answer>",
    ...              "<answer>4</answer>"], ["4", "4"])
    [0.5, 0.0]
    """
    return [0.5 if _SOFT_FORMAT.search(completion) else 0.0 for completion in completions]


def xml_count(completions: list[str], answers: list[str], **kwargs) -> list[float]:
    r"""Partial credit for each well-placed tag, minus a little for text after the answer.

    Adds 0.125 for each of these pieces that occurs exactly once: ``<reasoning>\n``,
    ``\n</reasoning>\n``, ``\n<answer>\n`` and ``\n</answer>``, so a clean completion
    scores 0.5. Then, when the completion has a ``</answer>``, subtracts 0.001 for each
    character after the last one, not counting a single newline right after it. The
    score goes below zero when a long tail follows the answer; that is intended.

    Args:
        completions: model completions, one per sample.
        answers: gold answers (unused).
        **kwargs: ignored.

    Returns:
        One score per completion.

    >>> xml_count(["<reasoning>\nhalf of 8\n</reasoning>\n<answer>\n4\n</answer>\n",
    ...            "<reasoning>\nhalf of 8\n</reasoning>\n<answer>\n4\n</answer>\nbye",
    ...            "<answer>4</answer>"], ["4", "4", "4"])
    [0.5, 0.497, 0.0]
    """
    return [_xml_count_one(completion) for completion in completions]


def _xml_count_one(completion: str) -> float:
    """Score one completion as described in :func:`xml_count`."""
    pieces = ("<reasoning>\n", "\n</reasoning>\n", "\n<answer>\n", "\n</answer>")
    score = sum((_TAG_BONUS for piece in pieces if completion.count(piece) == 1), 0.0)
    _, closing_tag, tail = completion.rpartition("</answer>")
    if closing_tag:
        tail = tail.removeprefix("\n")
        score -= _TRAILING_CHAR_PENALTY * len(tail)
    return score
