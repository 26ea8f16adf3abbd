"""Answer extraction and normalisation: pull the answer out of a completion or a GSM8K
solution and decide whether two answers are the same. Shared by rewards, evaluation and chat."""

import re
from collections.abc import Sequence
from fractions import Fraction

_OPEN_TAG = "<answer>"
_CLOSE_TAG = "</answer>"

# A comma between digits followed by exactly three digits is a thousands separator;
# "1,2" or "3, 4" are left alone.
_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")

# A sign counts only when it does not follow a digit, letter or dot, so "5-3" is two
# numbers rather than 5 and -3. "$" may sit between the sign and the digits ("-$5").
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w.])[-+\u2212])?\$?" r"(?P<digits>\d+/\d+(?![\d.])|\d+(?:\.\d+)?|\.\d+)"
)

# Stripped from both ends of a non-numeric answer.
_SURROUNDING_NOISE = " \t\r\n.,;:!?\"'`*\u201c\u201d\u2018\u2019"
# Ignored when deciding whether the text ends in a number ("18.", "50%", "**18**"); a
# superset of the above so that normalising twice changes nothing.
_TRAILING_NOISE = _SURROUNDING_NOISE + ")]}%"

_CANONICAL_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|-?\d+/\d+")


def extract_xml_answer(text: str) -> str:
    """Return the text inside the last ``<answer>`` tag of a completion.

    Args:
        text: a model completion.

    Returns:
        The stripped text between the last ``<answer>`` and the ``</answer>`` after it,
        everything after the last ``<answer>`` when the closing tag is missing (the model
        may have been cut off), or ``""`` when there is no ``<answer>`` tag at all.

    >>> extract_xml_answer("<reasoning>\\n2+2\\n</reasoning>\\n<answer>\\n4\\n</answer>")
    '4'
    >>> extract_xml_answer("<answer> 1 </answer> then <answer> 7")
    '7'
    >>> extract_xml_answer("no tags here")
    ''
    """
    start = text.rfind(_OPEN_TAG)
    if start < 0:
        return ""
    body = text[start + len(_OPEN_TAG) :]
    end = body.find(_CLOSE_TAG)
    if end >= 0:
        body = body[:end]
    return body.strip()


def split_completion(text: str) -> tuple[str, str]:
    """A completion, or the part of it streamed so far, as ``(reasoning, answer)``.

    The reasoning is what stands inside ``<reasoning>`` (up to its closing tag, or the answer,
    or the end so far), or before ``<answer>`` when the tag is missing; the answer is what
    :func:`extract_xml_answer` reads. A completion with neither tag is all answer.

    >>> split_completion("<reasoning>\\n2 + 2\\n</reasoning>\\n<answer>\\n4\\n</answer>")
    ('2 + 2', '4')
    >>> split_completion("<reasoning>\\nstill thinking")
    ('still thinking', '')
    >>> split_completion("Just 4.")
    ('', 'Just 4.')
    """
    has_reasoning, has_answer = "<reasoning>" in text, "<answer>" in text
    if not has_reasoning and not has_answer:
        return "", text.strip()
    if has_reasoning:
        reasoning = text.split("<reasoning>", 1)[1]
        for end in ("</reasoning>", "<answer>"):
            reasoning = reasoning.split(end, 1)[0]
    else:  # thinking written without the tag, before the answer
        reasoning = text.split("<answer>", 1)[0]
    return reasoning.strip(), extract_xml_answer(text) if has_answer else ""


def normalize_answer(text: str) -> str:
    """Return a canonical form of an answer, so equal answers compare equal as strings.

    Rules, in order:

    1. Thousands separators are removed: a comma between digits that is followed by
       exactly three digits (``1,234,567`` -> ``1234567``; ``1,2`` is left alone).
    2. Numbers are found with an optional sign (``-``, ``+`` or a Unicode minus, only
       when it does not directly follow a digit, letter or dot), an optional ``$``, and
       digits: an integer, a decimal (``12.5``, ``.5``) or a fraction (``3/4``).
    3. The text is numeric when it contains exactly one number, or when its last number
       ends the text once trailing whitespace, punctuation, quotes, ``%``, ``*`` and
       closing brackets are ignored. Then the answer is the last number, and everything
       else goes: ``$``, ``%``, unit words (``12 apples``), a lead-in ("The answer is").
       Text with several numbers that does not end in one ("3 bags of 4 apples") is
       not numeric, because picking one of its numbers would be a guess.
    4. A numeric answer is written canonically: leading ``+`` dropped, leading zeros
       dropped, trailing zeros after the decimal point dropped along with a bare point
       (``1234.00`` -> ``1234``, ``12.50`` -> ``12.5``, ``.5`` -> ``0.5``), a minus kept
       except on zero (``-0`` -> ``0``). Fractions keep their form (``3/4``); see
       :func:`answers_match` for comparing them by value.
    5. Any other text is stripped of surrounding whitespace, punctuation and quotes,
       lower-cased, and has its runs of whitespace collapsed to one space.

    Normalising twice gives the same result as normalising once.

    Args:
        text: an extracted answer or a gold answer.

    Returns:
        The canonical answer; ``""`` for empty or all-punctuation text.

    >>> [normalize_answer(s) for s in ["1,234", "$1234.00", "The answer is 1234."]]
    ['1234', '1234', '1234']
    >>> [normalize_answer(s) for s in ["12.50", "-0", "+7", "50%", "12 apples", " Paris! "]]
    ['12.5', '0', '7', '50', '12', 'paris']
    """
    text = _THOUSANDS_SEPARATOR.sub("", text)
    numbers = list(_NUMBER.finditer(text))
    if numbers:
        last = numbers[-1]
        if len(numbers) == 1 or last.end() == len(text.rstrip(_TRAILING_NOISE)):
            return _canonical_number(last.group("sign") or "", last.group("digits"))
    return " ".join(text.strip(_SURROUNDING_NOISE).lower().split())


def answers_match(predicted: str, gold: str) -> bool:
    """Return whether a predicted answer equals the gold answer.

    Both are normalised with :func:`normalize_answer`; they match when the normalised
    strings are equal, or when both are numbers of equal value (``3/4`` and ``0.75``).
    An empty prediction never matches.

    Args:
        predicted: the model's answer, e.g. from :func:`extract_xml_answer`.
        gold: the reference answer.

    Returns:
        True when they are the same answer.

    >>> answers_match("$1,234.00", "1234"), answers_match("12.5", "125")
    (True, False)
    >>> answers_match("3/4", "0.75")
    True
    """
    predicted_norm, gold_norm = normalize_answer(predicted), normalize_answer(gold)
    if not predicted_norm or not gold_norm:
        return False
    if predicted_norm == gold_norm:
        return True
    predicted_value, gold_value = _as_fraction(predicted_norm), _as_fraction(gold_norm)
    return predicted_value is not None and predicted_value == gold_value


def majority_answer(answers: Sequence[str]) -> str:
    """Return the most common answer, counting answers that match (:func:`answers_match`) as one.

    Self-consistency (maj@K) votes with this over K sampled answers to a question. Empty answers
    do not vote; a tie goes to the answer seen first.

    Args:
        answers: extracted answers, e.g. from :func:`extract_xml_answer`.

    Returns:
        The first-seen form of the winning answer, or ``""`` when no answer is non-empty.

    >>> majority_answer(["5", "4", "$4.00", "", "5", "4.0"])
    '4'
    >>> majority_answer(["3/4", "0.75", "1"]), majority_answer(["", ""])
    ('3/4', '')
    """
    votes: list[list] = []  # [first-seen answer, count]
    for answer in answers:
        if not normalize_answer(answer):
            continue
        for vote in votes:
            if answers_match(answer, vote[0]):
                vote[1] += 1
                break
        else:
            votes.append([answer, 1])
    return max(votes, key=lambda vote: vote[1])[0] if votes else ""


def parse_gsm8k_answer(text: str) -> str:
    """Return the normalised gold answer of a GSM8K solution.

    GSM8K solutions end with ``#### <answer>``; the text after the last ``####`` is the
    answer. Text without ``####`` is taken to be the answer itself.

    Args:
        text: a GSM8K ``answer`` field, or a bare answer.

    Returns:
        The answer, normalised with :func:`normalize_answer`.

    >>> parse_gsm8k_answer("She sold 1,000 + 234 = 1,234 clips.\\n#### 1,234")
    '1234'
    >>> parse_gsm8k_answer(" 72 ")
    '72'
    """
    _, separator, tail = text.rpartition("####")
    return normalize_answer(tail if separator else text)


def _canonical_number(sign: str, digits: str) -> str:
    """Write a matched number canonically (see rule 4 of :func:`normalize_answer`)."""
    if "/" in digits:
        numerator, denominator = (int(part) for part in digits.split("/"))
        body = f"{numerator}/{denominator}"
        is_zero = numerator == 0
    else:
        whole, _, fraction = digits.partition(".")
        fraction = fraction.rstrip("0")
        body = f"{int(whole or '0')}.{fraction}" if fraction else str(int(whole or "0"))
        is_zero = body == "0"
    negative = sign in ("-", "\u2212")
    return f"-{body}" if negative and not is_zero else body


def _as_fraction(normalized: str) -> Fraction | None:
    """The exact value of a normalised numeric answer, or None for text (or x/0)."""
    if not _CANONICAL_NUMBER.fullmatch(normalized):
        return None
    try:
        return Fraction(normalized)
    except ZeroDivisionError:
        return None
