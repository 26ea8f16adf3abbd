"""Token lengths of GSM8K with the real Qwen2.5 tokenizer: gold solutions in our XML format,
and prompts through the chat template.

    python scripts/gsm8k_lengths.py                  # finds ../shared/real from the project
    python scripts/gsm8k_lengths.py --real-dir PATH  # a folder with gsm8k/ and qwen2.5-tokenizer/

A completion is what SFT trains on: ``render_completion(reasoning, answer)`` followed by the
template's end of turn (``<|im_end|>``), where the reasoning is the solution before ``####``
and the answer its parsed final number. GSM8K's solutions carry calculator notes
(``<<48/2=24>>``) that models do not write, so completions are measured with and without them.
A prompt is the system prompt and the question through the chat template (``encode_prompt``).
Prints a Markdown table; see docs/performance.md, "GSM8K completion lengths".
"""

import argparse
import json
import re
from pathlib import Path

import numpy as np
from mlx_lm.utils import load_tokenizer

from mlx_reasoner.answers import parse_gsm8k_answer
from mlx_reasoner.prompts import encode_prompt, load_system_prompt
from mlx_reasoner.sft import render_completion, turn_terminator

PROJECT = Path(__file__).resolve().parents[1]
CALCULATOR_NOTE = re.compile(r"<<[^>]*>>")
PERCENTILES = (50, 75, 90, 95, 99)
LIMITS = (256, 384, 512)


def completion_ids(tokenizer, terminator: int, solution: str, keep_notes: bool) -> list[int]:
    """The assistant's tokens for one GSM8K solution, in our XML format."""
    steps, _, final = solution.rpartition("####")
    if not keep_notes:
        steps = CALCULATOR_NOTE.sub("", steps)
    text = render_completion(steps.strip(), parse_gsm8k_answer(final))
    return [*tokenizer.encode(text, add_special_tokens=False), terminator]


def summary(lengths: list[int]) -> dict:
    """Median, mean, percentiles, max and the share over each limit."""
    values = np.asarray(lengths)
    row = {"n": len(values), "mean": float(values.mean()), "max": int(values.max())}
    row.update({f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES})
    row.update({f"over_{limit}": float((values > limit).mean()) for limit in LIMITS})
    return row


def check_against_template(tokenizer, system: str, row: dict, terminator: int) -> None:
    """The prompt followed by the completion is the chat template's own rendering."""
    completion = completion_ids(tokenizer, terminator, row["answer"], keep_notes=False)
    prompt = encode_prompt(tokenizer, system, row["question"])
    text = tokenizer.decode(completion[:-1])
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": row["question"]},
        {"role": "assistant", "content": text},
    ]
    full = tokenizer.apply_chat_template(messages, tokenize=True)
    full = list(full["input_ids"] if isinstance(full, dict) else full)
    assert full[: len(prompt) + len(completion)] == prompt + completion, row["question"]


def measure(real_dir: Path, system_prompt: str) -> dict[str, dict]:
    tokenizer_dir = real_dir / "qwen2.5-tokenizer"
    generation = json.loads((tokenizer_dir / "generation_config.json").read_text())
    tokenizer = load_tokenizer(tokenizer_dir, eos_token_ids=generation["eos_token_id"])
    terminator = turn_terminator(tokenizer)
    system = load_system_prompt(system_prompt)
    results = {}
    for split in ("train", "test"):
        path = real_dir / "gsm8k" / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        for row in rows[:20]:
            check_against_template(tokenizer, system, row, terminator)
        with_notes = [completion_ids(tokenizer, terminator, r["answer"], True) for r in rows]
        without = [completion_ids(tokenizer, terminator, r["answer"], False) for r in rows]
        prompts = [encode_prompt(tokenizer, system, r["question"]) for r in rows]
        results[f"{split} completion, with notes"] = summary([len(c) for c in with_notes])
        results[f"{split} completion, without notes"] = summary([len(c) for c in without])
        results[f"{split} prompt"] = summary([len(p) for p in prompts])
        results[f"{split} prompt + completion without notes"] = summary(
            [len(p) + len(c) for p, c in zip(prompts, without)]
        )
    return results


def markdown(results: dict[str, dict]) -> str:
    head = ["tokens", "n", "median", "mean", "p75", "p90", "p95", "p99", "max"]
    head += [f"> {limit}" for limit in LIMITS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results.items():
        cells = [name, str(row["n"]), f"{row['p50']:.0f}", f"{row['mean']:.1f}"]
        cells += [f"{row[f'p{q}']:.0f}" for q in PERCENTILES[1:]] + [str(row["max"])]
        cells += [f"{row[f'over_{limit}']:.2%}" for limit in LIMITS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--real-dir", type=Path, default=PROJECT / ".." / "shared" / "real")
    parser.add_argument("--system-prompt", default="reasoning", help="built-in name or a file")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    options = parser.parse_args()
    if not (options.real_dir / "gsm8k").is_dir():
        parser.error(f"{options.real_dir} has no gsm8k/ folder; pass --real-dir")
    results = measure(options.real_dir.resolve(), options.system_prompt)
    print(json.dumps(results, indent=2) if options.json else markdown(results))


if __name__ == "__main__":
    main()
