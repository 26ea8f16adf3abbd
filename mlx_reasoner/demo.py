"""Demo stage: the strawberry test (before/after letter counting) and the offline demo.

The strawberry test asks the same letter-counting questions of the base model and of the
model with trained adapters, greedily, and shows both answers side by side.
"""

from collections.abc import Sequence

from .data import Example
from .evaluate import evaluate
from .tasks import letter_count_example

# (word, letter, phrasing): the classic question first, then variants of word, letter and
# phrasing (the phrasings are the letter-count task's templates).
STRAWBERRY_SUITE = (
    ("strawberry", "r", 1),
    ("strawberry", "r", 0),
    ("banana", "a", 2),
    ("mississippi", "s", 3),
    ("cheese", "e", 4),
    ("raspberry", "r", 1),
    ("committee", "t", 0),
    ("bookkeeper", "e", 2),
)


def strawberry_questions() -> list[Example]:
    """The strawberry test's questions, with their (case-insensitive) letter counts."""
    return [letter_count_example(w, letter, t) for w, letter, t in STRAWBERRY_SUITE]


def ask(model, tokenizer, system_prompt: str, questions: Sequence[Example], max_tokens: int):
    """Greedy answers to ``questions``: one record per question (completion, verdict)."""
    return evaluate(
        model,
        tokenizer,
        questions,
        system_prompt,
        max_tokens=max_tokens,
        batch_size=len(questions),
    ).samples


def score_line(results: dict[str, list[dict]]) -> str:
    """``base 1/8, trained 6/8``."""
    return ", ".join(
        f"{name} {sum(r['correct'] for r in records)}/{len(records)}"
        for name, records in results.items()
    )


def run_strawberry_test(
    model_name: str,
    adapter_path: str | None,
    system_prompt_name: str = "reasoning",
    max_tokens: int = 256,
) -> dict[str, list[dict]]:
    """Load the model once; ask the base (adapters off) and, if given, the trained model.

    Returns:
        ``{"base": records, "trained": records}`` (``trained`` only with adapters).
    """
    from .model import adapters_disabled, check_adapter_dir, load_adapters, load_model
    from .prompts import load_system_prompt

    system_prompt = load_system_prompt(system_prompt_name)
    if adapter_path is not None:
        check_adapter_dir(adapter_path)
    model, tokenizer = load_model(model_name)
    questions = strawberry_questions()
    if adapter_path is None:
        return {"base": ask(model, tokenizer, system_prompt, questions, max_tokens)}
    load_adapters(model, adapter_path)
    with adapters_disabled(model):
        base = ask(model, tokenizer, system_prompt, questions, max_tokens)
    return {"base": base, "trained": ask(model, tokenizer, system_prompt, questions, max_tokens)}
