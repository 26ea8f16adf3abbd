"""Trainer stage: the GRPO loop that ties rollout, rewards, advantages and loss together.

One step: sample a batch of prompts, generate a group of completions for each, score
them, turn the scores into group-relative advantages, and update the LoRA adapters.
"""

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from .advantages import group_advantages, groups_with_spread, zero_std_fraction
from .config import TrainConfig
from .distributed import SINGLE_PROCESS, World
from .logprobs import (
    PackedBatch,
    completion_logprobs,
    pack_groups,
    pack_sequences,
    shared_prompts_supported,
)
from .model import parameter_count, reference_policy
from .objective import LossConfig, Normalizer, grpo_loss
from .rollout import Rollouts, generate_groups, merge_rollouts


def make_optimizer(config, updates_per_step: int = 1) -> optim.Optimizer:
    """AdamW on the schedule of ``make_schedule``."""
    schedule = make_schedule(config, updates_per_step)
    optimizer = optim.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)
    optimizer.schedule = schedule  # kept for reporting the rate of the next update
    return optimizer


def current_learning_rate(optimizer: optim.Optimizer) -> float:
    """The rate the next update will use (the schedule at the optimizer's step count)."""
    schedule = getattr(optimizer, "schedule", None)
    if schedule is None:
        return float(optimizer.learning_rate)
    return float(schedule(optimizer.state.get("step", mx.array(0))))


def make_schedule(config, updates_per_step: int = 1) -> Callable:
    """Linear warm-up to the peak rate, then cosine decay to ``min_lr_ratio`` of it.

    Args:
        config: a ``RunConfig`` (steps, warm-up, peak rate, final ratio).
        updates_per_step: optimizer updates per step (GRPO's ``num_iterations``).
    """
    total = config.steps * updates_per_step
    warmup = min(config.warmup_steps * updates_per_step, total - 1)
    peak = config.learning_rate
    cosine = optim.cosine_decay(peak, max(total - warmup, 1), end=peak * config.min_lr_ratio)
    if warmup <= 0:
        return cosine
    return optim.join_schedules(
        [optim.linear_schedule(peak / warmup, peak, warmup), cosine], [warmup]
    )


class GradientComputer:
    """Loss and gradients of one micro-batch, optionally ``mx.compile``d over the model state."""

    def __init__(
        self,
        model: nn.Module,
        loss_config: LossConfig,
        temperature: float,
        compile: bool = True,
        share_prompts: bool = False,
    ):
        """``share_prompts``: lay micro-batches out so each prompt runs once per micro-batch
        (``loss.pack_groups``); only for models ``shared_prompts_supported`` accepts."""
        self.model = model
        self.share_prompts = share_prompts

        def loss_fn(model, inputs: dict[str, mx.array]):
            batch = PackedBatch(
                inputs["tokens"],
                inputs["positions"],
                inputs["targets"],
                inputs["mask"],
                inputs["advantages"],
                inputs.get("prefix"),
                inputs.get("prefix_start"),
                inputs.get("group_of"),
            )
            logp = completion_logprobs(model, batch, temperature)
            norm = Normalizer(
                inputs["num_completions"], inputs["num_tokens"], inputs["max_completion_tokens"]
            )
            return grpo_loss(
                logp,
                inputs.get("old_logp"),
                inputs.get("ref_logp"),
                batch.advantages,
                batch.mask,
                loss_config,
                norm,
                inputs.get("rollout_logp"),
            )

        value_and_grad = nn.value_and_grad(model, loss_fn)

        def step(inputs):
            (loss, sums), grads = value_and_grad(model, inputs)
            return loss, sums, grads

        state = [model.state, mx.random.state]
        self._step = mx.compile(step, inputs=state, outputs=state) if compile else step

    @classmethod
    def for_config(
        cls, model: nn.Module, config: TrainConfig, share_prompts: bool
    ) -> "GradientComputer":
        """The computer ``config`` asks for: its loss, temperature and compilation, in the
        layout the caller chose (``use_shared_prompts`` checks the model for it)."""
        loss_config = LossConfig(
            config.epsilon,
            config.epsilon_high,
            config.beta,
            config.loss_type,
            config.importance_sampling_level,
            config.tis_cap,
        )
        return cls(
            model,
            loss_config,
            config.temperature,
            compile=config.compile and compile_training_pass(parameter_count(model)),
            share_prompts=share_prompts,
        )

    def __call__(
        self, batch: PackedBatch, norm: Normalizer, old_logp=None, ref_logp=None, rollout_logp=None
    ):
        inputs = {
            "tokens": batch.tokens,
            "positions": batch.positions,
            "targets": batch.targets,
            "mask": batch.mask,
            "advantages": batch.advantages,
            # Passed as arrays so a compiled step is not retraced when they change.
            "num_completions": mx.array(norm.num_completions, mx.float32),
            "num_tokens": mx.array(norm.num_tokens, mx.float32),
            "max_completion_tokens": mx.array(norm.max_completion_tokens, mx.float32),
        }
        if batch.shares_prompts:
            inputs.update(
                prefix=batch.prefix, prefix_start=batch.prefix_start, group_of=batch.group_of
            )
        if old_logp is not None:
            inputs["old_logp"] = old_logp
        if ref_logp is not None:
            inputs["ref_logp"] = ref_logp
        if rollout_logp is not None:
            inputs["rollout_logp"] = rollout_logp
        return self._step(inputs)


# On the CPU, ``mx.compile`` pays off for the training pass of small models, whose time goes on
# dispatching many small kernels, and loses on large ones (docs/performance.md).
COMPILE_MAX_PARAMETERS = 50_000_000


def compile_training_pass(parameters: int) -> bool:
    """Whether the training pass of a model with this many parameters is compiled
    (``--compile`` permitting): always off the CPU, as mlx-lm's own trainer does; on the CPU
    under ``COMPILE_MAX_PARAMETERS``. ``memory`` asks the same from a model's shape."""
    return mx.default_device() != mx.cpu or parameters < COMPILE_MAX_PARAMETERS


@dataclass
class UpdateStats:
    loss: float
    kl: float
    clip_fraction: float
    grad_norm: float
    skipped: bool = False
    entropy: float = float("nan")  # mean surprisal of the sampled tokens (estimates entropy)
    mismatch_abs: float | None = None  # mean |training-pass - decode| log-prob, per token
    mismatch_kl: float | None = None  # k3 KL(decode || training pass), per token


def use_shared_prompts(model: nn.Module, config) -> bool:
    """The training pass's layout: shared prompts when asked for and the model allows it.

    mlx-lm's block checkpointing (``--grad-checkpoint``) cannot take the stand-in caches the
    shared layout passes through each block, so it always gets the packed layout.
    """
    if not config.share_prompts or config.grad_checkpoint:
        return False
    return shared_prompts_supported(model)


def _own_share(world: World, rollouts: Rollouts, advantages: np.ndarray, in_loss):
    """This rank's share of a step's groups: its rollouts, advantages and loss flags."""
    groups = world.share(len(rollouts) // rollouts.group_size)
    rows = range(groups.start * rollouts.group_size, groups.stop * rollouts.group_size)
    mine = merge_rollouts([rollouts], [(0, i) for i in rows])
    flags = None if in_loss is None else [in_loss[i] for i in rows]
    return mine, advantages[rows.start : rows.stop], flags


def micro_batches(
    rollouts: Rollouts,
    advantages: np.ndarray,
    size: int,
    share_prompts: bool = False,
    in_loss: Sequence[bool] | None = None,
) -> list[PackedBatch]:
    """Pack the step's completions into micro-batches of ``size``, each padded tightly.

    With ``share_prompts``, each micro-batch holds every prompt its completions continue once
    (``pack_groups``); otherwise each completion carries its own copy (``pack_sequences``).
    ``in_loss``: per completion, whether its tokens count in the loss (``--mask-truncated``
    leaves the cut ones out); default all.
    """
    batches = []
    for start in range(0, len(rollouts), size):
        rows = range(start, min(start + size, len(rollouts)))
        completions = [rollouts.completion_ids[i] for i in rows]
        if share_prompts:
            # Completion i continues prompt i // group_size.
            first = start // rollouts.group_size
            group_of = [i // rollouts.group_size - first for i in rows]
            prompts = [
                rollouts.prompt_ids[(first + g) * rollouts.group_size]
                for g in range(group_of[-1] + 1)
            ]
            batch = pack_groups(prompts, group_of, completions, advantages[rows.start : rows.stop])
        else:
            prompts = [rollouts.prompt_ids[i] for i in rows]
            batch = pack_sequences(prompts, completions, advantages[rows.start : rows.stop])
        if in_loss is not None and not all(in_loss[i] for i in rows):
            keep = mx.array([float(in_loss[i]) for i in rows])[:, None]  # [B, 1]
            batch.mask = batch.mask * keep
        batches.append(batch)
    return batches


def rollout_logprobs(rollouts: Rollouts, batches: Sequence[PackedBatch]) -> list:
    """The decode's log-probs laid out like each micro-batch's targets ([B, T], zero padded),
    or Nones where the rollout kept none."""
    if rollouts.logprobs is None:
        return [None] * len(batches)
    out, start = [], 0
    for batch in batches:
        rows, width = batch.targets.shape
        laid = np.zeros((rows, width), dtype=np.float32)
        for row in range(rows):
            values = rollouts.logprobs[start + row]
            laid[row, : len(values)] = values
        out.append(mx.array(laid))
        start += rows
    return out


def logprobs_no_grad(model: nn.Module, batches: Sequence[PackedBatch], temperature: float):
    out = []
    for batch in batches:
        logp = mx.stop_gradient(completion_logprobs(model, batch, temperature))
        mx.eval(logp)
        out.append(logp)
    return out


@dataclass
class OptimizerStep:
    """Gradient clipping and the optimizer's update, ``mx.compile``d over the model's and the
    optimizer's state (each is some hundred small operations on the adapters)."""

    model: nn.Module
    state: dict  # the optimizer state the update was compiled against
    max_norm: float
    compiled: bool
    clip: Callable
    update: Callable

    def apply(self, grads, loss: float) -> tuple[float, bool]:
        """Clip ``grads`` and update the adapters, unless the loss or the gradient norm is not
        finite: such an update would poison the adapters for good, so it is skipped.

        Returns:
            ``(gradient norm before clipping, whether the update was skipped)``.
        """
        clipped, grad_norm = self.clip(grads)
        grad_norm = grad_norm.item()
        if not (np.isfinite(grad_norm) and np.isfinite(loss)):
            return grad_norm, True
        self.update(clipped)
        mx.eval(self.model.trainable_parameters(), self.state)
        return grad_norm, False


def optimizer_step(
    model: nn.Module, optimizer: optim.Optimizer, max_norm: float, compile: bool = True
) -> OptimizerStep:
    """The ``OptimizerStep`` of this model, optimizer and clipping norm (0 or less: no
    clipping), kept on the optimizer.

    It is made again when the optimizer's state is replaced (a resumed run sets it), so the
    compiled update never writes into a state the optimizer no longer holds.
    """
    max_norm = max_norm if max_norm > 0 else float("inf")
    step = getattr(optimizer, "compiled_step", None)
    if (
        step is not None
        and step.model is model
        and step.state is optimizer.state
        and step.max_norm == max_norm
        and step.compiled == compile
    ):
        return step

    def clip(grads):
        return optim.clip_grad_norm(grads, max_norm)

    def update(grads):
        optimizer.update(model, grads)

    if compile:
        optimizer.init(model.trainable_parameters())  # the compiled update must not create it
        state = [model.state, optimizer.state]
        clip = mx.compile(clip)
        update = mx.compile(update, inputs=state, outputs=state)
    step = OptimizerStep(model, optimizer.state, max_norm, compile, clip, update)
    optimizer.compiled_step = step
    return step


def policy_update(
    model: nn.Module,
    optimizer: optim.Optimizer,
    grad_computer: GradientComputer,
    rollouts: Rollouts,
    advantages: np.ndarray,
    config: TrainConfig,
    starting_adapters: dict | None = None,
    world: World = SINGLE_PROCESS,
) -> UpdateStats:
    """Apply ``num_iterations`` clipped GRPO updates to the adapters from one batch of rollouts.

    The reference (``model.reference_policy``: the base, or the base with
    ``starting_adapters``) and, for several iterations, the old-policy log-probs are computed
    once, before the first update; gradients accumulate over micro-batches.

    With several ranks (``world``), ``rollouts`` and ``advantages`` are the whole step's, alike
    on every rank; each rank computes the loss of its share of the groups, normalised by the
    whole step's counts, and the ranks sum their gradients and figures before one identical
    update.
    """
    in_loss = None
    if config.mask_truncated:
        in_loss = [reason != "length" for reason in rollouts.finish_reasons]
    loss_tokens = sum(
        len(ids) for i, ids in enumerate(rollouts.completion_ids) if in_loss is None or in_loss[i]
    )
    norm = Normalizer(len(rollouts), max(loss_tokens, 1), config.max_completion_tokens)
    if world.is_distributed:
        rollouts, advantages, in_loss = _own_share(world, rollouts, advantages, in_loss)
    batches = micro_batches(
        rollouts, advantages, config.micro_batch_size, grad_computer.share_prompts, in_loss
    )
    decoded = rollout_logprobs(rollouts, batches)
    ref = [None] * len(batches)
    if config.beta > 0:
        with reference_policy(model, starting_adapters):
            ref = logprobs_no_grad(model, batches, config.temperature)
    old = [None] * len(batches)
    if config.num_iterations > 1:
        old = logprobs_no_grad(model, batches, config.temperature)

    losses, kls, clips, norms, first = [], [], [], [], {}
    for _ in range(config.num_iterations):
        total_grads, total_loss = None, 0.0
        sums = {"tokens": 0.0, "kl_sum": 0.0, "clip_low": 0.0, "clip_high": 0.0}
        for batch, ref_logp, old_logp, decoded_logp in zip(batches, ref, old, decoded):
            loss, batch_sums, grads = grad_computer(batch, norm, old_logp, ref_logp, decoded_logp)
            total_grads = grads if total_grads is None else tree_map(mx.add, total_grads, grads)
            mx.eval(total_grads, loss, batch_sums)
            total_loss += loss.item()
            for key, value in batch_sums.items():
                sums[key] = sums.get(key, 0.0) + value.item()
        if world.is_distributed:  # the step's loss, gradient and counts: every rank's summed
            total_grads = world.sum_gradients(total_grads)
            sums = world.sum_figures({**sums, "loss": total_loss})
            total_loss = sums.pop("loss")
        first = first or sums  # entropy and mismatch: of the policy that sampled
        step = optimizer_step(model, optimizer, config.max_grad_norm, config.compile)
        grad_norm, skipped = step.apply(total_grads, total_loss)
        if skipped:
            return UpdateStats(total_loss, float("nan"), float("nan"), grad_norm, skipped=True)
        tokens = max(sums["tokens"], 1.0)
        losses.append(total_loss)
        kls.append(sums["kl_sum"] / tokens)
        clips.append((sums["clip_low"] + sums["clip_high"]) / tokens)
        norms.append(grad_norm)
    tokens = max(first.get("tokens", 0.0), 1.0)
    mismatch = "mismatch_abs_sum" in first and first["tokens"] > 0
    return UpdateStats(
        float(np.mean(losses)),
        float(np.mean(kls)),
        float(np.mean(clips)),
        float(np.mean(norms)),
        entropy=first["neg_logp_sum"] / tokens,
        mismatch_abs=first["mismatch_abs_sum"] / tokens if mismatch else None,
        mismatch_kl=first["mismatch_kl_sum"] / tokens if mismatch else None,
    )


# The share of a step's completions cut at the length limit that earns a warning.
TRUNCATION_WARNING = 0.5


def is_due(step: int, every: int, last: int) -> bool:
    """Whether a periodic action (save, evaluate) runs after ``step``: every N and at the end."""
    return step == last or (every > 0 and step % every == 0)


class StopTraining(Exception):
    """Raised after a checkpoint was written, when the run must stop early."""

    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step = step
        self.reason = reason


class StepHooks:
    """What happens after every step of either trainer: evaluate, log, show, save, stop.

    Args:
        config: a ``RunConfig`` (cadences, ``max_bad_steps``).
        display: the training display.
        on_step: ``(step, metrics, records)`` -> None, e.g. append to the logs.
        on_save: ``(step)`` -> None, writes adapters and a resumable checkpoint.
        on_eval: ``(step)`` -> dict of ``eval/*`` figures, or None for no evaluation.
        should_stop: ``()`` -> a reason to stop (e.g. a signal arrived) or None; with several
            ranks, every rank's is asked at the same point, so all of them stop together.
        start_step: steps already done (a resumed run starts after them).
        world: the ranks of the run (default: this process alone); each samples with its own
            seed.
    """

    def __init__(
        self,
        config,
        display,
        on_step=None,
        on_save=None,
        on_eval=None,
        should_stop=None,
        start_step: int = 0,
        world: World = SINGLE_PROCESS,
    ):
        self.config = config
        self.display = display
        self.on_step = on_step
        self.on_save = on_save
        self.on_eval = on_eval
        self.should_stop = should_stop
        self.start_step = start_step
        self.world = world
        self.bad_in_a_row = 0
        self.warned_truncation = False

    def steps(self):
        """The steps still to run; each starts from its own seed, so a resumed run samples
        exactly what an uninterrupted one would."""
        for step in range(self.start_step + 1, self.config.steps + 1):
            mx.random.seed(self.world.sampling_seed(self.config.seed * 1_000_003 + step))
            yield step

    def finish(self, step: int, metrics: dict, records: list[dict], skipped: bool) -> None:
        """Run the after-step actions; raises ``StopTraining`` when the run must end."""
        config, display = self.config, self.display
        if self.on_eval is not None and is_due(step, config.eval_every, config.steps):
            display.phase("evaluating")
            start = time.perf_counter()
            metrics.update(self.on_eval(step))
            metrics["time_eval"] = time.perf_counter() - start
        if self.on_step is not None:
            self.on_step(step, metrics, records)
        display.update(metrics)
        self._warn_truncation(step, metrics)
        saved = False
        if skipped:
            self.bad_in_a_row += 1
            display.message(
                f"step {step}: non-finite loss or gradient, update skipped "
                f"({self.bad_in_a_row} in a row; its rollouts are in rollouts.jsonl)"
            )
            if self.bad_in_a_row >= config.max_bad_steps:
                saved = self._save(step)
                raise StopTraining(
                    step,
                    f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradient "
                    f"(--max-bad-steps {config.max_bad_steps}); the adapters of the last good "
                    "step are saved. Try a lower --learning-rate or --max-grad-norm",
                )
        else:
            self.bad_in_a_row = 0
        if is_due(step, config.save_every, config.steps):
            saved = self._save(step)
        reason = self._stop_reason()
        if reason and step < config.steps:
            if not saved:
                self._save(step)
            raise StopTraining(step, reason)

    def _stop_reason(self) -> str | None:
        """Why to stop after this step, if any rank was asked to (its own reason on one)."""
        reason = self.should_stop() if self.should_stop is not None else None
        if not self.world.is_distributed:
            return reason
        reasons = self.world.gather(reason, "agreeing whether to stop")
        asked = [(rank, text) for rank, text in enumerate(reasons) if text]
        if not asked:
            return None
        rank, text = asked[0]
        return f"{text} on rank {rank}"

    def _warn_truncation(self, step: int, metrics: dict) -> None:
        """Say once when most of a step's completions hit the length limit: their rewards then
        judge answers the model was not allowed to finish."""
        cut = metrics.get("truncated_fraction")
        if self.warned_truncation or cut is None or cut < TRUNCATION_WARNING:
            return
        self.warned_truncation = True
        self.display.message(
            f"step {step}: {cut:.0%} of the completions were cut at --max-completion-tokens "
            f"{self.config.max_completion_tokens}; if answers need more room, raise it "
            "(the truncated share is logged every step as truncated_fraction)"
        )

    def _save(self, step: int) -> bool:
        if self.on_save is None:
            return False
        self.display.phase("saving")
        self.on_save(step)
        return True


def _draw_groups(model, tokenizer, system_prompt, rewards, sampler, config, world, batch):
    """Generate and score one group per example of ``batch``; also returns the seconds spent
    scoring. With several ranks, each generates and scores its share of ``batch``, and every
    rank gets the whole batch's rollouts and scores back, in ``batch`` order."""
    if world.is_distributed:
        mine = [batch[i] for i in world.share(len(batch))]
        _, rollouts, scores, seconds = _draw_groups(
            model, tokenizer, system_prompt, rewards, sampler, config, SINGLE_PROCESS, mine
        )
        rollouts, scores = _gather_groups(world, rollouts, scores)
        return batch, rollouts, scores, seconds

    from .prompts import encode_prompt
    from .rewards import score_completions

    prompts = [encode_prompt(tokenizer, system_prompt, ex.question) for ex in batch]
    rollouts = generate_groups(
        model,
        tokenizer,
        prompts,
        config.group_size,
        config.max_completion_tokens,
        sampler,
        compiled=None if config.compile else False,
        temperature=config.temperature,
    )
    start = time.perf_counter()
    answers = [ex.answer for ex in batch for _ in range(config.group_size)]
    questions = [ex.question for ex in batch for _ in range(config.group_size)]
    lengths = [len(ids) for ids in rollouts.completion_ids]
    scores = score_completions(
        rewards,
        rollouts.texts,
        answers,
        questions=questions,
        completion_tokens=lengths,
        max_completion_tokens=config.max_completion_tokens,
        overlong_buffer=config.overlong_buffer,
    )
    return batch, rollouts, scores, time.perf_counter() - start


def _gather_groups(world: World, rollouts: Rollouts, scores):
    """Every rank's rollouts and scores, joined in rank order (each rank's share in turn).

    The generation took as long as the slowest rank, so that is the joined rollouts' time.
    """
    from .rewards import RewardScores

    parts = world.gather(
        {
            "prompt_ids": rollouts.prompt_ids,
            "completion_ids": rollouts.completion_ids,
            "finish_reasons": rollouts.finish_reasons,
            "texts": rollouts.texts,
            "logprobs": rollouts.logprobs,
            "prompt_tokens": rollouts.prompt_tokens,
            "seconds": rollouts.generation_seconds,
            "total": scores.total.tolist(),
            "components": {name: v.tolist() for name, v in scores.components.items()},
        },
        "sharing the step's rollouts",
    )

    def joined(name):
        return [item for part in parts for item in part[name]]

    keep_logprobs = all(part["logprobs"] is not None for part in parts)
    everything = Rollouts(
        group_size=rollouts.group_size,
        prompt_ids=joined("prompt_ids"),
        completion_ids=joined("completion_ids"),
        finish_reasons=joined("finish_reasons"),
        texts=joined("texts"),
        prompt_tokens=sum(part["prompt_tokens"] for part in parts),
        generation_seconds=max(part["seconds"] for part in parts),
        decoder=rollouts.decoder,
        logprobs=joined("logprobs") if keep_logprobs else None,
    )
    total = np.array(joined("total"), dtype=np.float32)
    components = {
        name: np.array([v for part in parts for v in part["components"][name]], np.float32)
        for name in scores.components
    }
    return everything, RewardScores(total, components)


def _dynamic_batch(draw, batches, first, config, display, step):
    """DAPO's dynamic sampling: draw further rounds of ``batch_size`` prompts (at most
    ``config.max_resample``) until ``batch_size`` groups have differing rewards, then keep
    those (``_keep_groups``). Says so when the rounds ran out first."""
    parts = [(*first, groups_with_spread(first[2].total, config.group_size))]
    score_seconds = 0.0
    while sum(len(p[3]) for p in parts) < config.batch_size and len(parts) <= config.max_resample:
        display.phase(f"generating (dynamic sampling, round {len(parts) + 1})")
        batch, rollouts, scores, seconds = draw(next(batches))
        parts.append((batch, rollouts, scores, groups_with_spread(scores.total, config.group_size)))
        score_seconds += seconds
    batch, rollouts, scores, figures = _keep_groups(parts, config.batch_size)
    if figures["groups_kept"] < config.batch_size:
        display.message(
            f"step {step}: dynamic sampling found {figures['groups_kept']} of "
            f"{config.batch_size} groups with differing rewards in {len(parts)} rounds "
            f"(--max-resample {config.max_resample}); the step trains on them plus "
            f"{config.batch_size - figures['groups_kept']} equal-reward groups"
        )
    return batch, rollouts, scores, figures, score_seconds


def _keep_groups(parts, batch_size: int):
    """The first ``batch_size`` groups with a reward spread over the rounds ``parts`` (each
    ``(batch, rollouts, scores, spread group indices)``), topped up with the first round's
    equal-reward groups if there are too few. Returns the merged batch, rollouts, scores and
    the dynamic-sampling figures."""
    from .rewards import RewardScores

    chosen = [(p, g) for p, (*_, spread) in enumerate(parts) for g in spread][:batch_size]
    found = len(chosen)
    for p, (batch, *_, spread) in enumerate(parts):
        for g in range(len(batch)):
            if len(chosen) < batch_size and g not in spread:
                chosen.append((p, g))
    group = parts[0][1].group_size
    rows = [(p, g * group + j) for p, g in chosen for j in range(group)]
    batch = [parts[p][0][g] for p, g in chosen]
    rollouts = merge_rollouts([parts[p][1] for p in range(len(parts))], rows)
    total = np.array([parts[p][2].total[r] for p, r in rows], dtype=np.float32)
    components = {
        name: np.array([parts[p][2].components[name][r] for p, r in rows], dtype=np.float32)
        for name in parts[0][2].components
    }
    drawn = [r for _, r, *_ in parts]
    figures = {
        "groups_drawn": sum(len(b) for b, *_ in parts),
        "groups_kept": found,
        "resample_rounds": len(parts) - 1,
        # Every round's tokens, not only the kept ones'.
        "tokens_per_s": sum(r.generated_tokens for r in drawn)
        / max(sum(r.generation_seconds for r in drawn), 1e-9),
    }
    return batch, rollouts, RewardScores(total, components), figures


def _step_metrics(step, rollouts, scores, update, config, times, lr) -> dict:
    total = scores.total
    lengths = np.array([len(c) for c in rollouts.completion_ids])
    metrics = {
        "step": step,
        "loss": update.loss,
        "reward_mean": float(total.mean()),
        "reward_std": float(total.std()),
    }
    for name, values in scores.components.items():
        metrics[f"reward/{name}"] = float(np.mean(values))
    metrics.update(
        frac_reward_zero_std=zero_std_fraction(total, config.group_size),
        kl=update.kl if config.beta > 0 else 0.0,
        clip_fraction=update.clip_fraction,
        grad_norm=update.grad_norm,
        skipped_update=update.skipped,
        learning_rate=lr,
        entropy=_entropy(rollouts, update),
        completion_tokens_mean=float(lengths.mean()),
        completion_tokens_max=int(lengths.max()),
        truncated_fraction=float(np.mean([r == "length" for r in rollouts.finish_reasons])),
        tokens_per_s=rollouts.tokens_per_second,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        **times,
    )
    if update.mismatch_abs is not None:
        metrics["mismatch_abs"] = update.mismatch_abs
        metrics["mismatch_kl"] = update.mismatch_kl
    return metrics


def _entropy(rollouts: Rollouts, update: UpdateStats) -> float:
    """Mean surprisal of every sampled token under the distribution it was drawn from (an
    estimate of the policy's entropy): the decode's own log-probs, else the training pass's
    (which leaves out completions outside the loss)."""
    if rollouts.logprobs is None:
        return update.entropy
    values = [v for row in rollouts.logprobs for v in row]
    return -float(np.mean(values)) if values else float("nan")


def _rollout_records(step, batch, rollouts, scores, advantages) -> list[dict]:
    records = []
    for i, text in enumerate(rollouts.texts):
        example = batch[i // rollouts.group_size]
        records.append(
            {
                "step": step,
                "prompt": example.question,
                "answer": example.answer,
                "completion": text,
                "reward": float(scores.total[i]),
                "rewards": {name: float(v[i]) for name, v in scores.components.items()},
                "advantage": float(advantages[i]),
                "completion_tokens": len(rollouts.completion_ids[i]),
                "finish_reason": rollouts.finish_reasons[i],
            }
        )
    return records


def train(
    config: TrainConfig,
    model: nn.Module,
    tokenizer,
    batches,
    rewards,
    system_prompt: str,
    display,
    optimizer: optim.Optimizer | None = None,
    hooks: StepHooks | None = None,
    starting_adapters: dict | None = None,
    world: World = SINGLE_PROCESS,
) -> list[dict]:
    """Run GRPO steps on LoRA adapters already attached to ``model``.

    Args:
        config: the validated run configuration.
        model: policy with LoRA layers (base frozen).
        tokenizer: mlx-lm tokenizer wrapper.
        batches: iterator yielding lists of ``Example`` (``batch_size`` prompts each).
        rewards: active ``WeightedReward`` list.
        system_prompt: text of the system prompt.
        display: a ``TrainDisplay`` (or anything with phase/update/sample/message).
        optimizer: from ``make_optimizer`` (possibly restored from a checkpoint).
        hooks: after-step actions and the first step; default: none, from step 1.
        starting_adapters: the adapters training started from, by name, as the KL reference
            (``model.reference_policy``); None: the bare base model.
        world: the ranks sharing each step (``distributed``): every rank draws the same
            ``batches``, generates and scores its share, and trains on its share of the whole
            step's groups; the metrics are the whole step's, alike on every rank.

    Returns:
        The list of per-step metrics.
    """
    from mlx_lm.sample_utils import make_sampler

    optimizer = optimizer or make_optimizer(config, config.num_iterations)
    hooks = hooks or StepHooks(config, display, world=world)
    grads = GradientComputer.for_config(model, config, use_shared_prompts(model, config))
    sampler = make_sampler(
        config.temperature, top_p=config.top_p, min_p=config.min_p, top_k=config.top_k
    )
    history = []
    for step in hooks.steps():
        mx.reset_peak_memory()
        start = time.perf_counter()
        display.phase("generating")
        draw = functools.partial(
            _draw_groups, model, tokenizer, system_prompt, rewards, sampler, config, world
        )
        batch, rollouts, scores, score_seconds = draw(next(batches))
        if config.dynamic_sampling:
            batch, rollouts, scores, dynamic, more_seconds = _dynamic_batch(
                draw, batches, (batch, rollouts, scores), config, display, step
            )
            score_seconds += more_seconds
        mx.clear_cache()  # give the decode's KV caches back before the training pass
        generated = time.perf_counter()

        display.phase("scoring")
        advantages = group_advantages(scores.total, config.group_size, scale=config.scale_rewards)
        scored = time.perf_counter()

        display.phase("training")
        lr = current_learning_rate(optimizer)
        update = policy_update(
            model, optimizer, grads, rollouts, advantages, config, starting_adapters, world
        )
        mx.clear_cache()
        trained = time.perf_counter()

        times = {
            "time_generate": generated - start - score_seconds,
            "time_score": scored - generated + score_seconds,
            "time_train": trained - scored,
            "time_step": trained - start,
        }
        metrics = _step_metrics(step, rollouts, scores, update, config, times, lr)
        # Each rank's own figures: the step took as long as its slowest rank.
        metrics.update(world.max_figures({**times, "peak_memory_gb": metrics["peak_memory_gb"]}))
        if config.dynamic_sampling:
            metrics.update(dynamic)
        history.append(metrics)
        if config.sample_every and (step % config.sample_every == 0 or step == 1):
            best = int(np.argmax(scores.total[: config.group_size]))
            display.sample(
                {
                    "step": step,
                    "question": batch[0].question,
                    "answer": batch[0].answer,
                    "completion": rollouts.texts[best],
                    "rewards": scores.total[: config.group_size].tolist(),
                    "index": best,
                }
            )
        records = _rollout_records(step, batch, rollouts, scores, advantages)
        hooks.finish(step, metrics, records, update.skipped)
    return history
