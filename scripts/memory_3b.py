"""Measured against estimated: a GRPO step's peak memory at the Qwen2.5-3B width, in bfloat16.

A full 3B step takes hours on a 2-core CPU (its bfloat16 products run without BLAS), so the
step is measured over a few depths of the 3B body (hidden 2048, 16/2 heads, MLP 11008, the
151,936-token vocabulary, tied embeddings) and the extrapolation to 36 blocks is checked on
one full-depth micro-batch. Every model is built in memory with random weights
(``shapes.random_weights``) and LoRA attached as ``train`` attaches it, and runs the package's
own code: ``generate_groups`` for the rollout, ``policy_update`` (reference pass, gradients,
AdamW) for the training pass. ``mx.get_peak_memory`` is read per phase and set beside
``memory.estimate_step`` for the same shape and options.

    python scripts/memory_3b.py --depths 1 2 4 --phases train      # the default micro-batch
    python scripts/memory_3b.py --depths 36 --phases train --micro-batch-size 1 --beta 0
    python scripts/memory_3b.py --depths 2 --phases rollout --rollout-tokens 64
    python scripts/memory_3b.py --estimate-only       # the full 3B table, nothing run

Memory figures do not depend on what else the machine runs; the times printed do.
"""

from mlx_reasoner import backend  # noqa: I001

backend.start()  # first: the fast BLAS must load before anything imports mlx

import argparse
import dataclasses
import itertools
import json
import sys
import time

import mlx.core as mx
import numpy as np

from mlx_reasoner.config import TrainConfig
from mlx_reasoner.memory import GB, ModelShape, StepOptions, estimate_step, step_options
from mlx_reasoner.model import attach_lora, lora_config
from mlx_reasoner.rollout import Rollouts, generate_groups
from mlx_reasoner.showcase.shapes import model_args, random_weights
from mlx_reasoner.trainer import (
    GradientComputer,
    make_optimizer,
    policy_update,
    use_shared_prompts,
)

SHAPE = "3B"
DTYPE = "bfloat16"


class StubTokenizer:
    """What ``generate_groups`` asks of a tokenizer: stop ids and decoding (memory only)."""

    eos_token_ids = {151645}

    def decode(self, ids) -> str:
        return ""


def build_model(depth: int, lora_layers: int, lora_rank: int, seed: int = 0):
    from mlx_lm.models.qwen2 import Model

    args = model_args(SHAPE, depth)
    model = Model(args)
    model.load_weights(list(random_weights(args, DTYPE, seed).items()))
    mx.eval(model.parameters())
    mx.random.seed(seed)
    layers = depth if lora_layers < 0 else min(lora_layers, depth)  # train refuses more
    attach_lora(model, lora_config(layers, lora_rank))
    mx.eval(model.parameters())
    return model


def random_tokens(rng, count: int) -> list[int]:
    return rng.integers(10, 150_000, count).tolist()


def measure_rollout(model, config: TrainConfig, prompt_tokens: int, rng) -> float:
    """Peak GB of one rollout of ``batch_size`` prompts x ``group_size`` completions, run to
    full length."""
    from mlx_lm.sample_utils import make_sampler

    prompts = [random_tokens(rng, prompt_tokens) for _ in range(config.batch_size)]
    mx.clear_cache()
    mx.reset_peak_memory()
    generate_groups(
        model,
        StubTokenizer(),
        prompts,
        config.group_size,
        config.max_completion_tokens,
        make_sampler(config.temperature),
        ignore_eos=True,
    )
    return mx.get_peak_memory() / GB


def measure_training(model, config: TrainConfig, prompt_tokens: int, rng) -> float:
    """Peak GB of ``policy_update`` over one micro-batch of full-length completions of one
    prompt (the reference pass with beta > 0, gradients, the AdamW update)."""
    rows = config.micro_batch_size
    prompt = random_tokens(rng, prompt_tokens)
    rollouts = Rollouts(
        group_size=config.group_size,
        prompt_ids=[prompt] * rows,
        completion_ids=[random_tokens(rng, config.max_completion_tokens) for _ in range(rows)],
        finish_reasons=["length"] * rows,
        texts=[""] * rows,
    )
    advantages = np.linspace(-1.0, 1.0, rows).astype(np.float32)
    optimizer = make_optimizer(config)
    grads = GradientComputer.for_config(model, config, use_shared_prompts(model, config))
    mx.clear_cache()
    mx.reset_peak_memory()
    policy_update(model, optimizer, grads, rollouts, advantages, config)
    return mx.get_peak_memory() / GB


def shape_at(depth: int) -> ModelShape:
    return dataclasses.replace(
        ModelShape.from_args(model_args(SHAPE), dtype_bytes=2), num_layers=depth
    )


def row(depth: int, phase: str, measured: float | None, estimate, seconds: float) -> dict:
    expected = estimate.training if phase == "train" else estimate.rollout
    split = {k: round(v, 3) for k, v in estimate.split().items()}
    return {
        "depth": depth,
        "phase": phase,
        "measured_gb": None if measured is None else round(measured, 3),
        "estimated_gb": round(expected / GB, 3),
        "ratio": None if measured is None else round(measured * GB / expected, 3),
        "split_gb": split,
        "seconds": round(seconds, 1),
    }


def print_row(r: dict) -> None:
    s = r["split_gb"]
    measured = "-" if r["measured_gb"] is None else f"{r['measured_gb']:.3f}"
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.3f}"
    print(
        f"{r['depth']:>5} {r['phase']:>7} {measured:>9} {r['estimated_gb']:>9.3f} {ratio:>6}"
        f"   weights {s['weights']:.3f} kv {s['kv_cache']:.3f} act {s['activations']:.3f}"
        f" logits {s['logits']:.3f} adapters {s['adapters']:.3f}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--phases", nargs="+", default=["rollout", "train"])
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--max-completion-tokens", type=int, default=256)
    parser.add_argument("--rollout-tokens", type=int, default=None, help="rollout length")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--lora-layers", type=int, default=16)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--grad-checkpoint", action="store_true")
    parser.add_argument("--no-share-prompts", action="store_true")
    parser.add_argument("--estimate-only", action="store_true", help="print the 3B table only")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    options = parser.parse_args(argv)

    if options.estimate_only:
        print_3b_table(options)
        return 0
    rng = np.random.default_rng(0)
    print(f"{'depth':>5} {'phase':>7} {'measured':>9} {'estimate':>9} {'ratio':>6}   split (GB)")
    rows = []
    for depth in options.depths:
        model = build_model(depth, options.lora_layers, options.lora_rank)
        for phase in options.phases:
            tokens = options.max_completion_tokens
            if phase == "rollout" and options.rollout_tokens:
                tokens = options.rollout_tokens
            config = TrainConfig(
                batch_size=options.batch_size,
                group_size=options.group_size,
                max_completion_tokens=tokens,
                micro_batch_size=options.micro_batch_size,
                lora_layers=options.lora_layers,
                lora_rank=options.lora_rank,
                beta=options.beta,
                grad_checkpoint=options.grad_checkpoint,
                share_prompts=not options.no_share_prompts,
            )
            if options.grad_checkpoint:
                from mlx_lm.tuner.trainer import grad_checkpoint

                grad_checkpoint(model.layers[0])
            shape = shape_at(depth)
            estimate = estimate_step(shape, step_options(config, options.prompt_tokens, shape))
            start = time.perf_counter()
            measure = measure_rollout if phase == "rollout" else measure_training
            measured = measure(model, config, options.prompt_tokens, rng)
            rows.append(row(depth, phase, measured, estimate, time.perf_counter() - start))
            print_row(rows[-1])
        del model
        mx.clear_cache()
    if options.json:
        with open(options.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def print_3b_table(options) -> None:
    """The estimate of a step at the full 3B shape for the default and nearby settings."""
    shape = ModelShape.from_args(model_args(SHAPE), dtype_bytes=2)
    print(f"Qwen2.5-3B shape, bfloat16, prompt {options.prompt_tokens} tokens (GB)")
    print(f"{'pass':>8} {'tokens':>6} {'micro':>5} {'ckpt':>5} {'peak':>6}  split")
    settings = ((4, False), (2, False), (1, False), (4, True), (2, True), (1, True))
    for compiled, tokens, (micro, checkpoint) in itertools.product(
        (True, False), (256, 384, 512), settings
    ):
        step = StepOptions(
            batch_size=options.batch_size,
            group_size=options.group_size,
            prompt_tokens=options.prompt_tokens,
            max_completion_tokens=tokens,
            micro_batch_size=micro,
            lora_layers=options.lora_layers,
            lora_rank=options.lora_rank,
            grad_checkpoint=checkpoint,
            compiled_training=compiled,
        )
        s = estimate_step(shape, step).split()
        print(
            f"{'compiled' if compiled else 'plain':>8} {tokens:>6} {micro:>5} "
            f"{'yes' if checkpoint else 'no':>5} {s['peak']:>6.2f}  weights {s['weights']:.2f} "
            f"kv {s['kv_cache']:.2f} act {s['activations']:.2f} logits {s['logits']:.2f} "
            f"adapters {s['adapters']:.2f} (rollout {s['rollout']:.2f}, "
            f"training {s['training']:.2f})"
        )


if __name__ == "__main__":
    sys.exit(main())
