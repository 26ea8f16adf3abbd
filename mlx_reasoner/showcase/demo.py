"""Demo stage: the strawberry test (before/after letter counting) and the offline demo.

The strawberry test asks the same letter-counting questions of the base model and of the
model with trained adapters, greedily, and shows both answers side by side.
"""

import dataclasses
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..checkpoints import atomic_write_json
from ..data import Example
from ..errors import ReasonerError
from ..evaluate import evaluate
from ..tasks import letter_count_example

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
DEMO_MARKER = ".mlx-reasoner-demo"


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
    from ..model import adapters_disabled, check_adapter_dir, load_adapters, load_model
    from ..prompts import load_system_prompt

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


@dataclass(frozen=True)
class DemoRecipe:
    """Everything the offline demo does, sized to finish in a few minutes on a laptop CPU.

    The settings come from the research written up in ``docs/demo-research.md``: a model this
    small learns the chat format and the task only with full-weight training at about 1e-3,
    and GRPO on LoRA adapters is stable at 1e-4. The task (parity of the z's among 16 letters)
    is one that the model cannot answer at a glance but can work out bit by bit, and its warm
    start mixes both styles, so there is a better style for GRPO to find.
    """

    task: str = "task:parity"
    # The tiny model built from scratch; 263 tokens give a character-level tokenizer.
    vocab_size: int = 263
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 256
    rope_theta: float = 1e4
    # Supervised warm start on the task's traces, all weights trained.
    sft_examples: int = 4000
    sft_steps: int = 150
    sft_batch_size: int = 32
    sft_learning_rate: float = 1e-3
    sft_warmup_steps: int = 20
    # GRPO on LoRA adapters over the warm-started model.
    grpo_steps: int = 40
    grpo_batch_size: int = 8
    group_size: int = 8
    grpo_learning_rate: float = 1e-4
    grpo_warmup_steps: int = 5
    temperature: float = 1.0
    beta: float = 0.04
    # Training-signal controls (see TrainConfig), as train's defaults unless set here.
    dynamic_sampling: bool = False
    max_resample: int = 3
    scale_rewards: str = "group"
    mask_truncated: bool = False
    rewards: tuple[str, ...] = ("correctness", "strict_format")
    max_completion_tokens: int = 64
    lora_rank: int = 16
    # Held-out evaluation, and how many of its questions the before/after table shows.
    eval_limit: int = 200
    showcase: int = 8
    trace_note: str = (
        "A worked answer writes the parity so far: 0 before the first letter, then one bit "
        "per letter (1 = an odd number of z's so far)."
    )
    expected_minutes: float = 1.0


def _summary_path(run_dir: Path) -> Path:
    return run_dir / "summary.json"


def prepare_demo_dir(run_dir: Path) -> None:
    """Start from an empty folder; an earlier demo's folder is replaced, anything else kept."""
    marker = run_dir / DEMO_MARKER
    if run_dir.exists() and any(run_dir.iterdir()):
        if not marker.exists():
            raise ReasonerError(
                f"{run_dir} exists and is not a demo folder; pass another --run-dir"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text("written by mlx-reasoner demo; the next demo run replaces this folder\n")


def warm_start(
    model_dir: Path,
    out_dir: Path,
    recipe: DemoRecipe,
    seed: int,
    console=None,
    live: bool | None = None,
) -> tuple[Path, list[dict]]:
    """Supervised warm start of every weight of the tiny model on the task's traces.

    A model trained from scratch has nothing for LoRA adapters to build on, so this stage
    trains all weights (with the same loss, optimizer and display as ``mlx-reasoner sft``)
    and writes a complete model folder that ``mlx-reasoner train --model`` takes.

    Returns:
        The new model folder and the per-step metrics.
    """
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from ..checkpoints import atomic_save_safetensors, atomic_write_text
    from ..config import SFTConfig
    from ..data import BatchSampler, load_examples
    from ..model import load_model, trainable_parameter_count
    from ..prompts import load_system_prompt
    from ..sft import example_sequences, train_sft
    from ..ui import TrainDisplay

    config = SFTConfig(
        model=str(model_dir),
        dataset=recipe.task,
        steps=recipe.sft_steps,
        batch_size=recipe.sft_batch_size,
        learning_rate=recipe.sft_learning_rate,
        warmup_steps=recipe.sft_warmup_steps,
        seed=seed,
        save_every=0,
        sample_every=max(recipe.sft_steps // 2, 1),
    )
    config.validate()
    model, tokenizer = load_model(str(model_dir))
    model.unfreeze()
    examples = load_examples(recipe.task, limit=recipe.sft_examples, seed=seed)
    sequences = example_sequences(
        tokenizer, load_system_prompt("reasoning"), examples, config.max_seq_tokens
    )
    order = BatchSampler(list(range(len(sequences))), config.batch_size, seed)
    trainable = trainable_parameter_count(model)
    with TrainDisplay(
        config.steps, title="demo: warm start", console=console, live=live
    ) as display:
        display.header(
            {
                "model": f"{model_dir} (random init)",
                "dataset": f"{recipe.task} ({len(sequences)} worked traces)",
                "trains": f"all weights ({trainable:,} parameters)",
                "device": str(mx.default_device()),
            }
        )
        history = train_sft(config, model, tokenizer, sequences, display, order)
    out_dir.mkdir(parents=True, exist_ok=True)
    for source in model_dir.iterdir():
        if source.is_file() and source.name != "model.safetensors":
            shutil.copy2(source, out_dir / source.name)
    atomic_save_safetensors(
        out_dir / "model.safetensors",
        dict(tree_flatten(model.parameters())),
        metadata={"format": "mlx"},
    )
    atomic_write_text(out_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history))
    return out_dir, history


def run_demo(
    run_dir: str = "runs/demo",
    seed: int = 0,
    recipe: DemoRecipe | None = None,
    console=None,
    live: bool | None = None,
) -> dict:
    """Build a tiny model, warm-start it, evaluate, GRPO it, evaluate again, show before/after.

    Returns:
        The summary written to ``<run_dir>/summary.json``.
    """
    from collections import Counter

    from ..backend import slow_blas_notice
    from ..config import TrainConfig
    from ..data import load_examples
    from ..model import load_adapters, load_model
    from ..prompts import load_system_prompt
    from ..run import run_train
    from ..tasks import get_task
    from ..ui import console as default_console
    from ..ui import eval_table, strawberry_view
    from .tiny import build_tiny_model

    recipe = recipe or DemoRecipe()
    console = console or default_console
    root = Path(run_dir)
    prepare_demo_dir(root)
    start = time.perf_counter()
    slow = slow_blas_notice("demo") is not None
    console.print(
        f"[bold]mlx-reasoner demo[/bold]: a tiny model built from scratch learns {recipe.task} "
        f"({get_task(recipe.task.removeprefix('task:')).description}), offline.\n"
        "The warm start shows it two styles of answer, at a glance or worked out step by step; "
        "GRPO rewards right answers and so finds out which style pays.\n"
        f"Budget: about {recipe.expected_minutes:g} "
        f"minute{'' if recipe.expected_minutes == 1 else 's'} on 2 CPU cores "
        f"{'with fast BLAS, far longer on the slow BLAS in use here ' if slow else ''}"
        f"(warm start {recipe.sft_steps} steps, GRPO {recipe.grpo_steps} steps, "
        f"{recipe.eval_limit} held-out questions). Results in {root}/."
    )
    timings = {}
    tic = time.perf_counter()
    model_dir = build_tiny_model(
        root / "model",
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        intermediate_size=recipe.intermediate_size,
        rope_theta=recipe.rope_theta,
        seed=seed,
    )
    timings["build_seconds"] = time.perf_counter() - tic

    console.rule("1. supervised warm start on the task's traces (all weights)")
    tic = time.perf_counter()
    sft_dir, _ = warm_start(model_dir, root / "sft", recipe, seed, console=console, live=live)
    timings["sft_seconds"] = time.perf_counter() - tic

    console.rule("2. GRPO on LoRA adapters over the warm-started model")
    tic = time.perf_counter()
    grpo_dir = run_train(
        TrainConfig(
            model=str(sft_dir),
            dataset=recipe.task,
            seed=seed,
            lora_layers=-1,
            lora_rank=recipe.lora_rank,
            max_completion_tokens=recipe.max_completion_tokens,
            save_every=0,
            steps=recipe.grpo_steps,
            batch_size=recipe.grpo_batch_size,
            group_size=recipe.group_size,
            learning_rate=recipe.grpo_learning_rate,
            warmup_steps=recipe.grpo_warmup_steps,
            temperature=recipe.temperature,
            beta=recipe.beta,
            dynamic_sampling=recipe.dynamic_sampling,
            max_resample=recipe.max_resample,
            scale_rewards=recipe.scale_rewards,
            mask_truncated=recipe.mask_truncated,
            reward=recipe.rewards,
            micro_batch_size=recipe.grpo_batch_size * recipe.group_size,
            sample_every=max(recipe.grpo_steps // 3, 1),
            run_dir=str(root / "grpo"),
        ),
        console=console,
        live=live,
    )
    timings["grpo_seconds"] = time.perf_counter() - tic

    console.rule("3. held-out evaluation: after the warm start vs after GRPO")
    tic = time.perf_counter()
    system_prompt = load_system_prompt("reasoning")
    held_out = load_examples(recipe.task, split="test", limit=recipe.eval_limit, seed=seed)
    majority_answer, majority_count = Counter(ex.answer for ex in held_out).most_common(1)[0]
    # One load: the warm-started model is evaluated first, then with the GRPO adapters on it.
    model, tokenizer = load_model(str(sft_dir))
    results = {}
    for name in ("after SFT", "after GRPO"):
        if name == "after GRPO":
            load_adapters(model, str(grpo_dir))
        results[name] = evaluate(
            model,
            tokenizer,
            held_out,
            system_prompt,
            max_tokens=recipe.max_completion_tokens,
            batch_size=100,
            seed=seed,
        )
    timings["eval_seconds"] = time.perf_counter() - tic
    console.print(eval_table({name: r.summary for name, r in results.items()}))
    console.print(
        f"Always answering the most common held-out answer ({majority_answer}) would score "
        f"{majority_count / len(held_out):.1%}."
    )
    console.rule("4. before and after GRPO, question by question")
    console.print(recipe.trace_note)
    showcase = {name: r.samples[: recipe.showcase] for name, r in results.items()}
    console.print(strawberry_view(showcase))
    console.print(f"[bold]score:[/bold] {score_line(showcase)}")

    after_sft, after_grpo = results["after SFT"].summary, results["after GRPO"].summary
    summary = {
        "task": recipe.task,
        "seed": seed,
        "held_out_questions": len(held_out),
        "majority_baseline": majority_count / len(held_out),
        "accuracy_after_sft": after_sft["accuracy"],
        "accuracy_after_grpo": after_grpo["accuracy"],
        "format_rate_after_sft": after_sft["strict_format_rate"],
        "format_rate_after_grpo": after_grpo["strict_format_rate"],
        "mean_completion_tokens_after_sft": after_sft["mean_completion_tokens"],
        "mean_completion_tokens_after_grpo": after_grpo["mean_completion_tokens"],
        "seconds": time.perf_counter() - start,
        **timings,
        "recipe": dataclasses.asdict(recipe),
        "runs": {"model": str(model_dir), "sft": str(sft_dir), "grpo": str(grpo_dir)},
    }
    atomic_write_json(_summary_path(root), summary)
    console.print(
        f"held-out accuracy: {after_sft['accuracy']:.1%} after the warm start -> "
        f"{after_grpo['accuracy']:.1%} after GRPO (answers of "
        f"{after_sft['mean_completion_tokens']:.0f} -> "
        f"{after_grpo['mean_completion_tokens']:.0f} tokens); strict format "
        f"{after_grpo['strict_format_rate']:.1%}; {summary['seconds']:.0f} s in all. "
        f"Summary: {_summary_path(root)}"
    )
    return summary
