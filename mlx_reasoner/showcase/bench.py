"""Benchmark stage: how fast a GRPO step runs, and how close the rollout is to mlx-lm's engine.

This module owns ``mlx-reasoner bench``. It runs a few GRPO steps with the package's own pieces
(``generate_groups``, the rewards, ``group_advantages``, ``policy_update``) on fixed prompts, with
completions forced to full length, and times mlx-lm's ``BatchGenerator`` alone on the same
prompts, sampler and lengths, so the rollout's overhead over the raw engine is a single ratio.
Heavy modules are imported inside the functions, as in ``run``: the CLI imports this module for
its options, so ``mlx-reasoner --help`` stays quick.
"""

import dataclasses
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import LOSS_TYPES, TrainConfig, check_ranges, option
from ..errors import ReasonerError

# The model built when no --model is given: a Qwen2 of about 2.9M parameters, like the issue's.
TINY_BENCH_MODEL = dict(
    vocab_size=512,
    hidden_size=256,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=640,
)
TINY_MODEL_NAME = "tiny Qwen2 (built offline: hidden 256, 4 layers, MLP 640, vocab 512)"
# --compare-beta runs this beta against 0 when --beta itself is 0.
COMPARE_BETA = 0.04
# Targets from the "speed" issue; shown next to the figures, never asserted by tests.
TARGET_ROLLOUT_VS_ENGINE = 0.95
TARGET_PEAK_MEMORY_RATIO_BETA = 1.15


@dataclass
class BenchConfig:
    """Everything ``mlx-reasoner bench`` needs; training options mean what they mean in train."""

    model: str | None = option(
        None, "Hub id or local mlx-lm model directory; default: a tiny 2.9M-parameter Qwen2."
    )
    dataset: str = option("task:arithmetic", "Where the fixed prompts come from (as in train).")
    steps: int = option(5, "GRPO steps; the first is a warm-up, left out of the medians.")
    batch_size: int = option(2, "Prompts per step.", at_least=1)
    group_size: int = option(8, "Completions sampled per prompt (G >= 2).")
    max_completion_tokens: int = option(128, "Completion length in tokens.", at_least=1)
    micro_batch_size: int = option(
        4, "Completions per forward/backward pass (memory bound).", at_least=1
    )
    num_iterations: int = option(1, "Updates per batch of rollouts (mu).", at_least=1)
    loss_type: str = option("grpo", "Loss aggregation.", choices=LOSS_TYPES)
    beta: float = option(
        0.04, "KL weight to the base model (adapters off); 0 skips it.", at_least=0
    )
    lora_rank: int = option(8, "LoRA rank.", at_least=1)
    lora_layers: int = option(
        -1,
        "LoRA on all linear layers of this many top blocks (-1: all; more than the model has "
        "is an error, as in train).",
        at_least=-1,
    )
    temperature: float = option(0.9, "Sampling temperature.", above=0)
    compile: bool = option(
        True, "mx.compile the training pass and the rollout's decode step (models that allow it)."
    )
    grad_checkpoint: bool = option(
        False, "Recompute block activations in the backward pass (less memory, slower)."
    )
    share_prompts: bool = option(
        True,
        "Training pass: run each prompt once for its whole group (models that allow it, "
        "not with --grad-checkpoint).",
    )
    memory_limit_gb: float | None = option(
        None, "Cap the memory MLX may use, in GB (default: MLX's own limit).", above=0
    )
    ignore_eos: bool = option(True, "Generate every completion to full length, past EOS.")
    compare_beta: bool = option(
        False, "Also run with the other of beta 0 / beta > 0 and report the peak-memory ratio."
    )
    seed: int = option(0, "Random seed (prompts, sampling, LoRA init).", at_least=0)
    output: str | None = option(None, "Write the figures to this JSON file.")

    def train_config(self, beta: float | None = None) -> TrainConfig:
        """The ``TrainConfig`` the trainer's functions read, with these settings."""
        shared = {f.name for f in dataclasses.fields(TrainConfig)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in shared}
        values["model"] = self.model or TINY_MODEL_NAME
        if beta is not None:
            values["beta"] = beta
        return TrainConfig(**values)

    def validate(self) -> "BenchConfig":
        """Reject bad options before any model is loaded; returns ``self``."""
        if self.steps < 2:
            raise ReasonerError(
                f"--steps must be at least 2 (the first step is a warm-up, left out of the "
                f"figures), got {self.steps}"
            )
        check_ranges(self)  # ranges and choices (--loss-type)
        self.train_config().validate()  # the checks train makes, naming the same flags
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def build_bench_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Build the default benchmark model (``TINY_BENCH_MODEL``) in ``out_dir``, offline."""
    from .tiny import build_tiny_model

    return build_tiny_model(out_dir, seed=seed, **TINY_BENCH_MODEL)


def engine_generate(
    model,
    prompts: Sequence[Sequence[int]],
    group_size: int,
    max_tokens: int,
    sampler: Callable,
    stop_tokens: list[list[int]] | None,
) -> tuple[int, float]:
    """Decode with mlx-lm's ``BatchGenerator`` alone: the baseline the rollout is compared with.

    All ``len(prompts) * group_size`` sequences are inserted directly, each prompt repeated
    ``group_size`` times with no cache sharing, in one prefill batch and one decode batch.

    Returns:
        ``(generated tokens, seconds)``, prefill included.
    """
    from mlx_lm.generate import BatchGenerator

    start = time.perf_counter()
    total = len(prompts) * group_size
    generator = BatchGenerator(
        model,
        max_tokens=max_tokens,
        stop_tokens=stop_tokens,
        sampler=sampler,
        completion_batch_size=total,
        prefill_batch_size=total,
    )
    generated = 0
    try:
        generator.insert(
            [list(p) for p in prompts for _ in range(group_size)], max_tokens=[max_tokens] * total
        )
        while responses := generator.next_generated():
            generated += len(responses)
    finally:
        generator.close()
    return generated, time.perf_counter() - start


def bench_steps(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    examples: Sequence,
    rewards: list,
    config: BenchConfig,
    beta: float,
    measure_engine: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Run ``config.steps`` GRPO steps on the same prompts and time each part.

    Each step first times the raw engine on the step's prompts (unless ``measure_engine`` is
    False), then runs rollout, scoring and the update as ``trainer.train`` does (cache releases
    included). Peak memory is reset before the rollout, so it covers the GRPO step only.

    Returns:
        One dict of figures per step; the first step is the warm-up.
    """
    import mlx.core as mx
    from mlx_lm.sample_utils import make_sampler

    from ..advantages import group_advantages
    from ..rewards import score_completions
    from ..rollout import generate_groups
    from ..trainer import GradientComputer, make_optimizer, policy_update, use_shared_prompts

    train_config = config.train_config(beta)
    group = config.group_size
    optimizer = make_optimizer(train_config, config.num_iterations)
    grads = GradientComputer.for_config(
        model, train_config, use_shared_prompts(model, train_config)
    )
    sampler = make_sampler(config.temperature)
    stop_tokens = None if config.ignore_eos else [[t] for t in sorted(tokenizer.eos_token_ids)]
    answers = [ex.answer for ex in examples for _ in range(group)]
    questions = [ex.question for ex in examples for _ in range(group)]

    records = []
    for step in range(1, config.steps + 1):
        mx.random.seed(config.seed * 1_000_003 + step)
        engine_tokens, engine_seconds = 0, math.nan
        if measure_engine:
            engine_tokens, engine_seconds = engine_generate(
                model, prompts, group, config.max_completion_tokens, sampler, stop_tokens
            )
            mx.clear_cache()  # the rollout starts as it does in train, after a release
        mx.reset_peak_memory()
        start = time.perf_counter()
        rollouts = generate_groups(
            model,
            tokenizer,
            prompts,
            group,
            config.max_completion_tokens,
            sampler,
            ignore_eos=config.ignore_eos,
            compiled=None if config.compile else False,
            temperature=config.temperature,  # as train does: keep the sampled log-probs
        )
        mx.clear_cache()  # as train does: the decode's KV caches go back before training
        generated = time.perf_counter()
        scores = score_completions(rewards, rollouts.texts, answers, questions=questions)
        advantages = group_advantages(scores.total, group)
        scored = time.perf_counter()
        update = policy_update(model, optimizer, grads, rollouts, advantages, train_config)
        mx.clear_cache()
        trained = time.perf_counter()

        sequence_tokens = sum(
            len(p) + len(c) for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids)
        )
        record = {
            "step": step,
            "warmup": step == 1,
            "completion_tokens": rollouts.generated_tokens,
            "prompt_tokens": rollouts.prompt_tokens,
            "generate_seconds": generated - start,
            "score_seconds": scored - generated,
            "train_seconds": trained - scored,
            "step_seconds": trained - start,
            "rollout_tokens_per_s": rollouts.tokens_per_second,
            # Every pass over the batch (num_iterations of them) scores each sequence once; a
            # prompt shared by its group is counted with every completion all the same.
            "train_tokens": sequence_tokens * config.num_iterations,
            "train_tokens_per_s": sequence_tokens * config.num_iterations / (trained - scored),
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
            "loss": update.loss,
            "skipped_update": update.skipped,
            "shared_prompts": grads.share_prompts,
            "decoder": rollouts.decoder,
        }
        if measure_engine:
            record.update(
                engine_tokens=engine_tokens,
                engine_seconds=engine_seconds,
                engine_tokens_per_s=engine_tokens / engine_seconds,
                rollout_vs_engine=rollouts.tokens_per_second * engine_seconds / engine_tokens,
            )
        records.append(record)
        if log is not None:
            log(_step_line(record, config.steps, beta))
    return records


def _step_line(record: dict, steps: int, beta: float) -> str:
    parts = [
        f"beta {beta:g} step {record['step']}/{steps}" + (" (warm-up)" if record["warmup"] else ""),
        f"{record['step_seconds']:.2f} s",
        f"generate {record['generate_seconds']:.2f} s",
        f"train {record['train_seconds']:.2f} s",
        f"rollout {record['rollout_tokens_per_s']:,.0f} tok/s",
    ]
    if "engine_tokens_per_s" in record:
        parts.append(f"engine {record['engine_tokens_per_s']:,.0f} tok/s")
    return ", ".join(parts)


def summarize(records: Sequence[dict]) -> dict:
    """Medians over the steps after the warm-up (peak memory: the largest of them)."""
    measured = [r for r in records if not r["warmup"]]

    def median(key: str) -> float:
        return statistics.median(r[key] for r in measured)

    summary = {
        "step_seconds": median("step_seconds"),
        "generate_seconds": median("generate_seconds"),
        "score_seconds": median("score_seconds"),
        "train_seconds": median("train_seconds"),
        "rollout_tokens_per_s": median("rollout_tokens_per_s"),
        "train_tokens_per_s": median("train_tokens_per_s"),
        "peak_memory_gb": max(r["peak_memory_gb"] for r in measured),
        "warmup_step_seconds": records[0]["step_seconds"],
        "measured_steps": len(measured),
    }
    if all("engine_tokens_per_s" in r for r in measured):
        summary["engine_tokens_per_s"] = median("engine_tokens_per_s")
        summary["rollout_vs_engine"] = summary["rollout_tokens_per_s"] / max(
            summary["engine_tokens_per_s"], 1e-9
        )
    return summary


def _prepare_output(output: str | None) -> Path | None:
    if output is None:
        return None
    path = Path(output)
    if path.is_dir():
        raise ReasonerError(f"--output {output} is a folder; name a JSON file, e.g. bench.json")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReasonerError(
            f"cannot create the folder for --output {output}: {exc.strerror}"
        ) from exc
    return path


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Time an ``n x n`` float32 matmul on MLX's CPU stream; median of ``repeats`` after a warm-up.

    Args:
        n: Matrix side.
        repeats: Timed runs; the median is reported.

    Returns:
        GFLOP/s, counting ``2 * n**3`` floating-point operations per matmul.
    """
    import mlx.core as mx

    key_a, key_b = mx.random.split(mx.random.key(0))
    a = mx.random.normal((n, n), key=key_a)  # [n, n]
    b = mx.random.normal((n, n), key=key_b)  # [n, n]
    mx.eval(a, b)
    mx.eval(mx.matmul(a, b, stream=mx.cpu))  # warm-up: thread pools, allocator
    seconds = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        mx.eval(mx.matmul(a, b, stream=mx.cpu))
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(seconds) / 1e9


def run_bench(config: BenchConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run ``mlx-reasoner bench``: GRPO steps and the raw engine, timed; write ``--output``.

    Args:
        config: the benchmark settings.
        log: called with one line per step (progress), or None for silence.

    Returns:
        The figures: medians over the steps after the warm-up, per-step records under
        ``steps``, the settings, model size, device, BLAS and versions.

    Raises:
        ReasonerError: for bad options, an unloadable model or an unwritable ``--output``.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from .. import backend
    from ..checkpoints import atomic_write_json
    from ..data import load_examples
    from ..model import LORA_SCALE
    from ..prompts import encode_prompt, load_system_prompt
    from ..rewards import resolve_rewards
    from ..run import apply_memory_options, setup_model, versions

    config.validate()
    output = _prepare_output(config.output)
    rewards = resolve_rewards()
    system_prompt = load_system_prompt()
    examples = load_examples(config.dataset, limit=config.batch_size, seed=config.seed)
    if len(examples) < config.batch_size:
        raise ReasonerError(
            f"{config.dataset} has {len(examples)} examples, fewer than --batch-size "
            f"{config.batch_size}"
        )
    examples = examples[: config.batch_size]

    with tempfile.TemporaryDirectory(prefix="mlx-reasoner-bench-") as scratch:
        model_path = config.model or str(build_bench_model(scratch, seed=config.seed))
        mx.random.seed(config.seed)
        model, tokenizer, lora, trainable = setup_model(
            model_path, None, config.lora_layers, config.lora_rank, LORA_SCALE
        )
    apply_memory_options(model, config)
    parameters = sum(v.size for _, v in tree_flatten(model.parameters())) - trainable
    initial_adapters = tree_flatten(model.trainable_parameters())
    prompts = [encode_prompt(tokenizer, system_prompt, ex.question) for ex in examples]

    estimate = memory_estimate(model, config, prompts, lora["num_layers"])
    gflops = matmul_gflops(1024)
    records = bench_steps(
        model, tokenizer, prompts, examples, rewards, config, config.beta, log=log
    )
    result = summarize(records)
    if config.compare_beta:
        other_beta = 0.0 if config.beta > 0 else COMPARE_BETA
        model.update(tree_unflatten(initial_adapters))  # the same start as the first run
        other = summarize(
            bench_steps(
                model, tokenizer, prompts, examples, rewards, config, other_beta, False, log
            )
        )
        with_kl, without_kl = (result, other) if config.beta > 0 else (other, result)
        result["peak_memory_ratio_beta"] = with_kl["peak_memory_gb"] / without_kl["peak_memory_gb"]
        result["compare_beta"] = {
            "beta": max(config.beta, other_beta),
            "peak_memory_gb_beta": with_kl["peak_memory_gb"],
            "peak_memory_gb_beta0": without_kl["peak_memory_gb"],
            "step_seconds_beta": with_kl["step_seconds"],
            "step_seconds_beta0": without_kl["step_seconds"],
            "train_seconds_beta": with_kl["train_seconds"],
            "train_seconds_beta0": without_kl["train_seconds"],
        }

    blas = backend.blas_summary()
    result.update(
        train_layout="shared prompts" if records[-1]["shared_prompts"] else "packed",
        rollout_decoder=records[-1]["decoder"],
        completion_tokens_per_step=records[-1]["completion_tokens"],
        prompt_tokens_per_step=records[-1]["prompt_tokens"],
        blas=blas["name"],
        blas_threads=blas.get("threads"),
        matmul_gflops=gflops,
        model=config.model or TINY_MODEL_NAME,
        parameters=int(parameters),
        trainable_parameters=int(trainable),
        lora=lora,
        settings=config.to_dict(),
        device=str(mx.default_device()),
        cpu=_cpu_name(),
        cpu_count=os.cpu_count(),
        versions=versions(),
        steps=records,
    )
    if estimate is not None:
        result["memory_estimate_gb"] = estimate.split()
        result["memory_estimate_phase"] = estimate.phase
    if output is not None:
        atomic_write_json(output, _json_ready(result))
    return result


def memory_estimate(model, config: BenchConfig, prompts, lora_layers: int):
    """``memory.estimate_step`` for this bench's model and settings (None for a model whose
    shape it cannot read)."""
    import dataclasses

    from ..memory import ModelShape, estimate_step, step_options

    try:
        shape = ModelShape.from_model(model)
    except (AttributeError, ValueError):
        return None
    options = step_options(config.train_config(), max(len(p) for p in prompts), shape)
    return estimate_step(shape, dataclasses.replace(options, lora_layers=lora_layers))


def _json_ready(value):
    """NaN and infinity become null: strict JSON has no spelling for them."""
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def bench_table(result: dict):
    """The figures as a rich table: value, then what it measures (and the target, if any)."""
    from rich.table import Table

    settings = result["settings"]
    shape = (
        f"{settings['batch_size']} prompts x {settings['group_size']} completions x "
        f"{settings['max_completion_tokens']} tokens"
    )
    table = Table(
        title=f"mlx-reasoner bench: {result['model']} ({result['parameters']:,} parameters)",
        caption=(
            f"{shape}; medians of {result['measured_steps']} steps after a warm-up; "
            f"decode: {result['rollout_decoder']}; training layout: {result['train_layout']}; "
            f"{result['device']}, {result['cpu_count']} cores, {result['blas']}"
        ),
    )
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("what it measures")

    ratio = result.get("rollout_vs_engine")
    rows = [
        (
            "rollout tokens/s",
            f"{result['rollout_tokens_per_s']:,.0f}",
            "generate_groups: prefill + decode of the step's completions",
        ),
    ]
    if ratio is not None:
        rows += [
            (
                "engine tokens/s",
                f"{result['engine_tokens_per_s']:,.0f}",
                "mlx-lm BatchGenerator alone, same prompts, sampler and lengths",
            ),
            (
                "rollout / engine",
                _verdict(f"{ratio:.3f}", ratio >= TARGET_ROLLOUT_VS_ENGINE),
                f"target >= {TARGET_ROLLOUT_VS_ENGINE}",
            ),
        ]
    rows += [
        ("step", f"{result['step_seconds']:.3f} s", "generate + score + train"),
        ("  generate", f"{result['generate_seconds']:.3f} s", "rollout"),
        ("  score", f"{result['score_seconds']:.3f} s", "rewards and advantages"),
        ("  train", f"{result['train_seconds']:.3f} s", "reference pass + update(s)"),
        ("warm-up step", f"{result['warmup_step_seconds']:.3f} s", "first step (compiles)"),
        (
            "train tokens/s",
            f"{result['train_tokens_per_s']:,.0f}",
            "prompt + completion tokens per second of the training pass",
        ),
        ("peak memory", f"{result['peak_memory_gb']:.3f} GB", "mx.get_peak_memory, per step"),
    ]
    rows += _estimate_rows(result)
    if "peak_memory_ratio_beta" in result:
        value = result["peak_memory_ratio_beta"]
        beta = result["compare_beta"]["beta"]
        rows.append(
            (
                f"peak memory beta {beta:g} / beta 0",
                _verdict(f"{value:.3f}", value <= TARGET_PEAK_MEMORY_RATIO_BETA),
                f"target <= {TARGET_PEAK_MEMORY_RATIO_BETA} (reference = adapters off)",
            )
        )
    rows.append(
        ("matmul 1024", f"{result['matmul_gflops']:.1f} GFLOP/s", "float32, MLX CPU stream")
    )
    for row in rows:
        table.add_row(*row)
    return table


def _estimate_rows(result: dict) -> list[tuple[str, str, str]]:
    """The memory estimate's split, under the measured peak."""
    split = result.get("memory_estimate_gb")
    if split is None:
        return []
    rows = [
        (
            "  estimated",
            f"{split['peak']:.3f} GB",
            f"memory.estimate_step, peak at the {result['memory_estimate_phase']} "
            f"(rollout {split['rollout']:.3f}, training pass {split['training']:.3f} GB)",
        )
    ]
    parts = [
        ("weights", "weights", "the model's weights"),
        ("KV cache", "kv_cache", "the rollout's key/value buffers"),
        ("activations", "activations", "kept for the backward pass of one micro-batch"),
        ("logits", "logits", "float32 logits of one micro-batch, forward and backward"),
        ("adapters", "adapters", "LoRA weights, gradients and AdamW moments"),
    ]
    for label, key, what in parts:
        rows.append((f"    {label}", f"{split[key]:.3f} GB", what))
    return rows


def _verdict(text: str, met: bool) -> str:
    return f"[green]{text}[/green]" if met else f"[yellow]{text}[/yellow]"
