"""The GRPO objective as pure array maths: importance ratios, the clipped surrogate, the KL
penalty and the ways of averaging over tokens, each a small function; the choices are lookups.

Losses are written so that micro-batch losses add up to the full-batch loss: the normalising
constants come from the whole batch (``Normalizer``), which makes gradient accumulation exact.
"""

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class LossConfig:
    """Hyper-parameters of the GRPO objective."""

    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float | None = None  # upper clip (DAPO); None means epsilon
    beta: float = 0.0  # weight of the k3 KL to the reference; 0 skips the reference
    loss_type: str = "grpo"  # a key of AGGREGATORS
    importance_sampling_level: str = "token"  # a key of IMPORTANCE_LEVELS
    tis_cap: float | None = None  # truncated importance sampling against the rollout's log-probs


@dataclass(frozen=True)
class Normalizer:
    """Batch-wide constants, so that the loss of a micro-batch is its share of the total."""

    num_completions: int
    num_tokens: int  # real completion tokens in the whole batch, at least 1
    max_completion_tokens: int


def token_kl(logp: mx.array, ref_logp: mx.array) -> mx.array:
    """k3 estimator of KL(policy || reference) per token: exp(r - p) - (r - p) - 1 >= 0."""
    delta = ref_logp - logp
    return mx.exp(delta) - delta - 1.0


def token_log_ratio(logp: mx.array, old_logp: mx.array, mask: mx.array) -> mx.array:
    """Each token's own log importance ratio (GRPO, PPO)."""
    return logp - old_logp


def sequence_log_ratio(logp: mx.array, old_logp: mx.array, mask: mx.array) -> mx.array:
    """GSPO: one log-ratio per completion, the mean of its tokens', shared by all its tokens.

    Its gradient is ``ratio * mean(grad logp)`` over the completion's tokens, so long
    completions do not weigh more, and clipping acts on whole completions.
    """
    lengths = mx.maximum(mask.sum(axis=1, keepdims=True), 1.0)
    per_completion = ((logp - old_logp) * mask).sum(axis=1, keepdims=True) / lengths  # [B, 1]
    return mx.broadcast_to(per_completion, logp.shape)


IMPORTANCE_LEVELS: dict[str, Callable[[mx.array, mx.array, mx.array], mx.array]] = {
    "token": token_log_ratio,
    "sequence": sequence_log_ratio,
}


def clipped_surrogate(
    log_ratio: mx.array,
    advantages: mx.array,
    epsilon_low: float,
    epsilon_high: float,
) -> tuple[mx.array, mx.array]:
    """Per-token PPO-style clipped objective, negated into a loss.

    Args:
        log_ratio: ``[B, T]`` log importance ratio, current over sampling policy
            (differentiable; see ``IMPORTANCE_LEVELS``).
        advantages: ``[B]`` per completion.

    Returns:
        ``(per_token_loss [B, T], ratio [B, T])``.
    """
    ratio = mx.exp(log_ratio)
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = mx.clip(ratio, 1.0 - epsilon_low, 1.0 + epsilon_high) * adv
    return -mx.minimum(unclipped, clipped), ratio


def truncated_importance_weights(
    old_logp: mx.array, rollout_logp: mx.array, cap: float
) -> mx.array:
    """``min(exp(old - rollout), cap)`` per token, without gradient: corrects for the decode
    having sampled with slightly different log-probs from the training pass's (TIS)."""
    return mx.stop_gradient(mx.minimum(mx.exp(old_logp - rollout_logp), cap))


def aggregate_grpo(per_token: mx.array, mask: mx.array, norm: Normalizer) -> mx.array:
    """Mean over each completion's tokens, then mean over completions."""
    lengths = mx.maximum(mask.sum(axis=1), 1.0)
    return ((per_token * mask).sum(axis=1) / lengths).sum() / norm.num_completions


def aggregate_bnpo(per_token: mx.array, mask: mx.array, norm: Normalizer) -> mx.array:
    """Mean over every completion token of the whole step (``norm`` counts the step's tokens,
    not the micro-batch's). This is DAPO's token-level loss, so ``dapo`` names it too."""
    return (per_token * mask).sum() / norm.num_tokens


def aggregate_dr_grpo(per_token: mx.array, mask: mx.array, norm: Normalizer) -> mx.array:
    """Sum over tokens divided by a constant (completions x max tokens): no length bias."""
    return (per_token * mask).sum() / (norm.num_completions * norm.max_completion_tokens)


AGGREGATORS: dict[str, Callable[[mx.array, mx.array, Normalizer], mx.array]] = {
    "grpo": aggregate_grpo,
    "bnpo": aggregate_bnpo,
    "dr_grpo": aggregate_dr_grpo,
    "dapo": aggregate_bnpo,
}
LOSS_TYPES = tuple(AGGREGATORS)


def grpo_loss(
    logp: mx.array,
    old_logp: mx.array | None,
    ref_logp: mx.array | None,
    advantages: mx.array,
    mask: mx.array,
    config: LossConfig,
    normalizer: Normalizer,
    rollout_logp: mx.array | None = None,
) -> tuple[mx.array, dict[str, mx.array]]:
    """The GRPO loss for a (micro-)batch.

    Args:
        logp: ``[B, T]`` current policy log-probabilities of the completion tokens.
        old_logp: ``[B, T]`` log-probabilities before this batch's first update, or None
            for a single update per batch (the ratio is then exp(logp - sg(logp)) = 1 with
            the policy gradient as its gradient).
        ref_logp: ``[B, T]`` reference (adapters off) log-probabilities; ignored when
            ``config.beta`` is 0.
        advantages: ``[B]``.
        mask: ``[B, T]`` 1 for completion tokens in the loss, 0 for padding (and for
            completions left out of it).
        config: clip range, KL weight, aggregation, importance-sampling level and TIS cap.
        normalizer: batch-wide constants for the aggregation.
        rollout_logp: ``[B, T]`` the log-probabilities the decode sampled with, or None. With
            them the sums hold the sampler/trainer mismatch, and ``config.tis_cap`` applies.

    Returns:
        ``(loss, sums)``: the scalar loss and additive statistics for logging:
        ``tokens``, ``clip_low``, ``clip_high`` (token counts), ``neg_logp_sum`` (sampled
        tokens' surprisal, an estimate of the policy's entropy), ``kl_sum`` when
        ``config.beta > 0``, and ``mismatch_abs_sum``, ``mismatch_kl_sum`` with
        ``rollout_logp``.
    """
    # Zero the padding first: exp() of garbage there could overflow, and inf * 0 is NaN.
    real = mask > 0
    logp = mx.where(real, logp, 0.0)
    if old_logp is None:
        old_logp = mx.stop_gradient(logp)
    else:
        old_logp = mx.where(real, old_logp, 0.0)
    if ref_logp is not None:
        ref_logp = mx.where(real, ref_logp, 0.0)
    epsilon_high = config.epsilon if config.epsilon_high is None else config.epsilon_high
    log_ratio = IMPORTANCE_LEVELS[config.importance_sampling_level](logp, old_logp, mask)
    per_token, ratio = clipped_surrogate(log_ratio, advantages, config.epsilon, epsilon_high)
    sums = {
        "tokens": mask.sum(),
        "neg_logp_sum": mx.stop_gradient(-(logp * mask).sum()),
    }
    if rollout_logp is not None:
        rollout_logp = mx.where(real, rollout_logp, 0.0)
        gap = old_logp - rollout_logp  # training pass minus decode, at the sampled tokens
        sums["mismatch_abs_sum"] = mx.stop_gradient((mx.abs(gap) * mask).sum())
        # k3 estimate of KL(decode || training pass) from the decode's own samples.
        sums["mismatch_kl_sum"] = mx.stop_gradient((token_kl(rollout_logp, old_logp) * mask).sum())
        if config.tis_cap is not None:
            weights = truncated_importance_weights(old_logp, rollout_logp, config.tis_cap)
            per_token = per_token * weights
    if config.beta > 0.0:
        kl = token_kl(logp, ref_logp)
        per_token = per_token + config.beta * kl
        sums["kl_sum"] = mx.stop_gradient((kl * mask).sum())
    adv = advantages[:, None]
    sums["clip_low"] = (((ratio < 1.0 - config.epsilon) & (adv < 0)) * mask).sum()
    sums["clip_high"] = (((ratio > 1.0 + epsilon_high) & (adv > 0)) * mask).sum()
    loss = AGGREGATORS[config.loss_type](per_token, mask, normalizer)
    return loss, sums
