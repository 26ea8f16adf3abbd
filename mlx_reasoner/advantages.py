"""Advantages stage: turn each group's rewards into group-relative advantages.

GRPO needs no critic: the baseline for a completion is the mean reward of the other
completions sampled for the same prompt.
"""

import numpy as np

# How advantages are scaled, TRL's names: by the group's reward std (GRPO), by the whole step's
# (more robust when a group's rewards barely differ), or not at all (Dr. GRPO).
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(
    rewards: np.ndarray, group_size: int, eps: float = 1e-4, scale: str | bool = "group"
) -> np.ndarray:
    """Centre rewards within each group of ``group_size`` consecutive completions, then scale.

    Args:
        rewards: ``[num_prompts * group_size]`` total reward per completion, grouped
            contiguously (all completions of prompt 0, then prompt 1, ...).
        group_size: completions per prompt (G).
        eps: added to the standard deviation so a group with equal rewards gives zeros,
            not NaN.
        scale: ``"group"`` divides by each group's reward std (GRPO), ``"batch"`` by the std of
            all the step's rewards, ``"none"`` only centres them, as Dr. GRPO recommends
            (``True``/``False`` stand for ``"group"``/``"none"``).

    Returns:
        ``[num_prompts * group_size]`` float32 advantages.

    >>> group_advantages(np.array([1.0, 0.0, 0.5]), 3).astype(np.float64).round(2).tolist()
    [1.22, -1.22, 0.0]
    >>> batch = group_advantages(np.array([1.0, 0.0, 0.5, 3.0, 3.0, 3.0]), 3, scale="batch")
    >>> batch.astype(np.float64).round(2).tolist()  # std of all six rewards: 1.283
    [0.39, -0.39, 0.0, 0.0, 0.0, 0.0]
    """
    scale = {True: "group", False: "none"}.get(scale, scale)
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale must be one of {', '.join(SCALE_REWARDS)}, got {scale!r}")
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 1 or rewards.size % group_size != 0:
        raise ValueError(
            f"expected a flat array whose length is a multiple of {group_size}, "
            f"got shape {rewards.shape}"
        )
    grouped = rewards.reshape(-1, group_size)  # [prompts, G]
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    # Equal rewards must give exact zeros; the float mean of [0.1, 0.1, 0.1] is not 0.1.
    centred = np.where(np.ptp(grouped, axis=1, keepdims=True) == 0.0, 0.0, centred)
    # Population std (ddof=0) in both: rewards [1, 0, 0.5] give std 0.408.
    if scale == "group":
        centred = centred / (grouped.std(axis=1, keepdims=True) + eps)
    elif scale == "batch":
        centred = centred / (grouped.std() + eps)
    return centred.reshape(-1).astype(np.float32)


def groups_with_spread(rewards: np.ndarray, group_size: int) -> list[int]:
    """Indices of the groups whose rewards are not all equal: the ones GRPO learns from."""
    grouped = np.asarray(rewards, dtype=np.float64).reshape(-1, group_size)
    return np.flatnonzero(np.ptp(grouped, axis=1) > 0.0).tolist()


def zero_std_fraction(rewards: np.ndarray, group_size: int) -> float:
    """Fraction of groups whose rewards are all equal, which carry no learning signal."""
    groups = np.asarray(rewards).size // group_size
    return (groups - len(groups_with_spread(rewards, group_size))) / groups
