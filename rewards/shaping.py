"""Built-in shaping rewards, off by default: select one with ``--reward NAME[:WEIGHT]``.

Every public top-level function here is registered under its name next to ``gsm8k.py``'s.
"""


def overlong(
    completions: list[str],
    answers: list[str],
    completion_tokens: list[int] | None = None,
    max_completion_tokens: int | None = None,
    overlong_buffer: int | None = None,
    **kwargs,
) -> list[float]:
    """DAPO's soft overlong penalty: 0 up to ``max - buffer`` tokens, then falling linearly to
    -1 at the limit, so the model learns to finish before it is cut off.

    The trainer passes each completion's token count, ``--max-completion-tokens`` and
    ``--overlong-buffer`` (default: a fifth of the limit).

    >>> overlong(["a"] * 4, [""] * 4, [10, 80, 90, 100], max_completion_tokens=100,
    ...          overlong_buffer=20)
    [0.0, 0.0, -0.5, -1.0]
    """
    if completion_tokens is None or max_completion_tokens is None:
        raise ValueError(
            "overlong needs completion_tokens and max_completion_tokens (the trainer passes them)"
        )
    buffer = overlong_buffer or max(1, max_completion_tokens // 5)
    start = max_completion_tokens - buffer  # penalty-free up to here
    return [min(0.0, (start - n) / buffer) if n > start else 0.0 for n in completion_tokens]
