"""The problem record every data source produces (``Example``), and the stable question hash
that decides which split a question belongs to."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

TASK_PREFIX = "task:"  # datasets named task:NAME are built-in generators (tasks.py)


@dataclass(frozen=True)
class Example:
    """One training or evaluation problem.

    Attributes:
        question: The problem text shown to the model.
        answer: The gold answer, already parsed (GSM8K ``'... #### 42'`` becomes ``'42'``).
        reasoning: A worked solution for supervised warm-start, or ``""`` when there is none.
    """

    question: str
    answer: str
    reasoning: str = ""
    # A whole chat for SFT, as (role, content) pairs ending with the assistant's turn.
    messages: tuple[tuple[str, str], ...] = ()


def normalize_question(question: str) -> str:
    """Return the question with case and runs of whitespace ignored, for hashing and dedup.

    Args:
        question: A question as shown to the model.

    Returns:
        The lower-cased question with whitespace collapsed to single spaces.

    >>> normalize_question("  How many  R's\\nin Strawberry? ")
    "how many r's in strawberry?"
    """
    return " ".join(question.lower().split())


def question_hash(question: str, seed: int = 0) -> float:
    """Map a question to a stable number in [0, 1) that decides which split it belongs to.

    Python's ``hash()`` is salted per process, so SHA-256 of the normalised text is used.

    Args:
        question: The question text; see :func:`normalize_question`.
        seed: Salt that gives an independent split.

    Returns:
        A uniform-looking value in [0, 1), the same on every machine and run.
    """
    text = f"{seed}\x00{normalize_question(question)}".encode()
    digest = hashlib.sha256(text).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
