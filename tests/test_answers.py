"""Answer extraction and normalisation, rule by rule."""

import doctest

import pytest

from mlx_reasoner import answers
from mlx_reasoner.answers import (
    answers_match,
    extract_xml_answer,
    normalize_answer,
    parse_gsm8k_answer,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<answer>42</answer>", "42"),
        ("<reasoning>\n6*7\n</reasoning>\n<answer>\n42\n</answer>\n", "42"),
        ("<answer>\nTotal: 5 + 13\n= 18\n</answer>", "Total: 5 + 13\n= 18"),  # multi-line
        ("<answer>1</answer> wait, <answer>2</answer> done", "2"),  # the last one wins
        (
            "<reasoning>...</reasoning>\n<answer>\n17 and then the model ran o",
            "17 and then the model ran o",
        ),
        ("<answer></answer>", ""),
        ("just 42", ""),
        ("42</answer>", ""),
        ("", ""),
    ],
)
def test_extract_xml_answer(text, expected):
    assert extract_xml_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        # thousands separators, $ and trailing .00 all go
        ("1,234", "1234"),
        ("$1234.00", "1234"),
        ("1234", "1234"),
        ("1,234,567", "1234567"),
        ("$1,234.50", "1234.5"),
        ("1,2", "2"),  # not a thousands separator: two numbers, ends in the second
        # trailing zeros after the point
        ("12.50", "12.5"),
        ("12.0", "12"),
        ("0.10", "0.1"),
        (".5", "0.5"),
        ("007", "7"),
        # signs
        ("-5", "-5"),
        ("+7", "7"),
        ("-0", "0"),
        ("-0.00", "0"),
        ("-$5", "-5"),
        ("$-5", "-5"),
        ("\u22124", "-4"),  # Unicode minus
        ("x = -3", "-3"),
        ("5-3", "3"),  # a minus after a digit is subtraction, not a sign
        # percent, units, lead-ins and surrounding punctuation
        ("50%", "50"),
        ("12 apples", "12"),
        ("12,345 dollars.", "12345"),
        ("The answer is 18.", "18"),
        ("**18**", "18"),
        ("\\boxed{18}", "18"),
        ("'18'", "18"),
        ("  18\n", "18"),
        # several numbers: the last one only when it ends the text
        ("3 + 4 = 7", "7"),
        ("so the total is 5 + 13 = 18.", "18"),
        ("3 bags of 4 apples", "3 bags of 4 apples"),
        # fractions keep their form
        ("3/4", "3/4"),
        ("-3/4", "-3/4"),
        ("1/2 cup", "1/2"),
        # non-numeric text
        ("  Paris! ", "paris"),
        ('"Hello   \n World"', "hello world"),
        ("", ""),
        ("...", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "text", ["$1,234.50", "3 bags of 4 apples\u201c", "-0.0", " A  b. ", "1/2 cup"]
)
def test_normalize_answer_is_idempotent(text):
    once = normalize_answer(text)
    assert normalize_answer(once) == once


@pytest.mark.parametrize(
    "predicted, gold, expected",
    [
        ("1,234", "1234", True),
        ("$1234.00", "1234", True),
        ("1234", "$1,234", True),
        ("12.5", "125", False),
        ("12.50", "12.5", True),
        ("-5", "5", False),
        ("+7", "7", True),
        ("50%", "50", True),
        ("12 apples", "12", True),
        ("3/4", "0.75", True),  # equal value
        ("6/3", "2", True),
        ("1/3", "0.333", False),
        ("3/0", "3", False),
        ("Paris", "paris.", True),
        ("", "", False),  # an empty answer never matches
        ("", "0", False),
    ],
)
def test_answers_match(predicted, gold, expected):
    assert answers_match(predicted, gold) is expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48/2 = 24 clips in May.\nIn total 48+24 = 72 clips.\n#### 72", "72"),
        ("The sum is 1,000 + 234.\n#### 1,234", "1234"),
        ("#### -5", "-5"),
        ("a #### b\n#### 3", "3"),  # the last marker counts
        (" 72 ", "72"),  # no marker: the text itself
        ("$1,234.00", "1234"),
    ],
)
def test_parse_gsm8k_answer(text, expected):
    assert parse_gsm8k_answer(text) == expected


def test_docstring_examples():
    result = doctest.testmod(answers)
    assert result.attempted > 0 and result.failed == 0
