"""Eval stage: measure a model (with or without adapters) on held-out questions.

Generation reuses the rollout engine (one prefill per question, all samples of a batch
decoded together), and the verdicts reuse the reward functions' answer and format checks,
so "correct" means the same thing in training and in evaluation.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from .answers import answers_match, extract_xml_answer, majority_answer
from .data import Example
from .distributed import World
from .prompts import encode_prompt
from .rollout import generate_groups

SUMMARY_KEYS = (
    "accuracy",
    "strict_format_rate",
    "soft_format_rate",
    "mean_completion_tokens",
    "truncated_rate",
)


@dataclass
class EvalResult:
    summary: dict  # accuracy, format rates, lengths, n, samples, pass@k and maj@k
    samples: list[dict]  # one record per completion


def evaluate(
    model,
    tokenizer,
    examples: Sequence[Example],
    system_prompt: str,
    *,
    max_tokens: int = 256,
    samples: int = 1,
    temperature: float = 0.7,
    batch_size: int = 16,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Answer every question and score the answers.

    Args:
        model, tokenizer: from ``mlx_lm.load`` (adapters attached or not).
        examples: held-out questions with gold answers.
        system_prompt: the prompt text the model was trained with.
        max_tokens: completion length limit.
        samples: completions per question; 1 decodes greedily, more sample at
            ``temperature`` and report pass@k, maj@k and mean accuracy.
        batch_size: questions generated together.
        seed: sampling seed (the same seed gives the same samples).
        progress: called with ``(questions_done, total)`` after each batch.

    Returns:
        An ``EvalResult``: the summary (keys in ``SUMMARY_KEYS`` plus ``n``, ``samples``
        and, for several samples, ``pass@k`` and ``maj@k``) and one record per completion.
    """
    from mlx_lm.sample_utils import make_sampler

    from .rewards import REWARDS

    if not examples:
        raise ValueError("nothing to evaluate: no examples")
    sampler = None if samples == 1 else make_sampler(temperature)
    mx.random.seed(seed)
    records = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        prompts = [encode_prompt(tokenizer, system_prompt, ex.question) for ex in batch]
        rollouts = generate_groups(model, tokenizer, prompts, samples, max_tokens, sampler)
        texts = rollouts.texts
        strict = REWARDS["strict_format"](texts, [""] * len(texts))
        soft = REWARDS["soft_format"](texts, [""] * len(texts))
        for i, text in enumerate(texts):
            example = batch[i // samples]
            predicted = extract_xml_answer(text)
            records.append(
                {
                    "index": start + i // samples,
                    "sample": i % samples,
                    "question": example.question,
                    "answer": example.answer,
                    "completion": text,
                    "extracted": predicted,
                    "correct": bool(predicted) and answers_match(predicted, example.answer),
                    "strict_format": strict[i] > 0,
                    "soft_format": soft[i] > 0,
                    "completion_tokens": len(rollouts.completion_ids[i]),
                    "truncated": rollouts.finish_reasons[i] == "length",
                }
            )
        if progress is not None:
            progress(min(start + batch_size, len(examples)), len(examples))
    return EvalResult(summarize(records, samples), records)


def evaluate_shared(
    world: World, model, tokenizer, examples: Sequence[Example], system_prompt: str, **options
) -> EvalResult:
    """``evaluate`` with the questions spread over the ranks of ``world``: each answers its
    contiguous share (sampling with its own seed), and every rank gets the result of all of
    them, records in question order. In one process, exactly ``evaluate``.

    ``options``: ``evaluate``'s; its ``progress`` counts this rank's own share.
    """
    if not world.is_distributed:
        return evaluate(model, tokenizer, examples, system_prompt, **options)
    mine = world.share(len(examples))
    options["seed"] = world.sampling_seed(options.get("seed", 0))
    records = []
    if len(mine):  # fewer questions than ranks leave some ranks idle
        part = examples[mine.start : mine.stop]
        records = evaluate(model, tokenizer, part, system_prompt, **options).samples
    for record in records:
        record["index"] += mine.start
    records = [r for part in world.gather(records, "sharing evaluation") for r in part]
    if not records:
        raise ValueError("nothing to evaluate: no examples")
    return EvalResult(summarize(records, options.get("samples", 1)), records)


def summarize(records: Sequence[dict], samples: int) -> dict:
    """Aggregate per-completion verdicts into the evaluation summary."""

    def rate(key: str) -> float:
        return float(np.mean([r[key] for r in records]))

    summary = {
        "accuracy": rate("correct"),
        "strict_format_rate": rate("strict_format"),
        "soft_format_rate": rate("soft_format"),
        "mean_completion_tokens": float(np.mean([r["completion_tokens"] for r in records])),
        "truncated_rate": rate("truncated"),
        "n": len(records) // samples,
        "samples": samples,
    }
    if samples > 1:
        by_question: dict[int, list[dict]] = {}
        for r in records:
            by_question.setdefault(r["index"], []).append(r)
        # With exactly k samples per question, pass@k is the share of questions solved at
        # least once (the unbiased estimator reduces to this when n = k).
        summary[f"pass@{samples}"] = float(
            np.mean([any(r["correct"] for r in group) for group in by_question.values()])
        )
        summary[f"maj@{samples}"] = float(
            np.mean([majority_correct(group) for group in by_question.values()])
        )
    return summary


def majority_correct(group: Sequence[dict]) -> bool:
    """Self-consistency: whether the most common extracted answer of one question's samples is
    right (``answers.majority_answer``; empty answers do not vote)."""
    voted = majority_answer([r["extracted"] for r in group])
    return bool(voted) and answers_match(voted, group[0]["answer"])
