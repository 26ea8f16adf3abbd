"""Rollout stage: sample a group of completions per prompt with mlx-lm's batched engine.

Each prompt is prefilled once; its KV cache is then handed to every member of its group,
and all completions of the step decode together in one ``BatchGenerator`` batch. Token
ids are kept exactly as sampled, so the loss scores the very tokens the policy produced.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn


@dataclass
class Rollouts:
    """The completions of one step, grouped: index ``i`` belongs to prompt ``i // group_size``."""

    group_size: int
    prompt_ids: list[list[int]]  # per completion: the prompt it continues
    completion_ids: list[list[int]]  # as generated, including the stop token if one was emitted
    finish_reasons: list[str]  # "stop" or "length"
    texts: list[str]  # decoded completions without the stop token
    prompt_tokens: int = 0  # prompt tokens prefilled (each prompt once)
    generation_seconds: float = 0.0
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def generated_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / max(self.generation_seconds, 1e-9)


def prefill_prompt(model: nn.Module, prompt: Sequence[int], step_size: int = 2048) -> list:
    """Run a prompt (all but its last token) through the model once and return its KV cache.

    The last token is left out: the generator feeds it to produce the first completion token.
    """
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    tokens = mx.array(prompt[:-1])[None]
    for start in range(0, tokens.shape[1], step_size):
        model(tokens[:, start : start + step_size], cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def generate_groups(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    group_size: int,
    max_tokens: int,
    sampler: Callable[[mx.array], mx.array] | None = None,
    ignore_eos: bool = False,
) -> Rollouts:
    """Sample ``group_size`` completions for every prompt in one batched decode.

    Args:
        model: the policy (with its LoRA adapters active).
        tokenizer: the mlx-lm tokenizer wrapper (for EOS ids and decoding).
        prompts: token ids of each prompt.
        group_size: completions per prompt (G).
        max_tokens: completion length limit.
        sampler: from ``mlx_lm.sample_utils.make_sampler``; greedy when None.
        ignore_eos: keep going past EOS to ``max_tokens`` (benchmarks).

    Returns:
        ``Rollouts`` with ``len(prompts) * group_size`` completions, grouped by prompt.
    """
    from mlx_lm.generate import BatchGenerator

    start = time.perf_counter()
    eos_ids = sorted(tokenizer.eos_token_ids)
    caches = [prefill_prompt(model, p) for p in prompts]
    total = len(prompts) * group_size
    generator = BatchGenerator(
        model,
        max_tokens=max_tokens,
        stop_tokens=None if ignore_eos else [[t] for t in eos_ids],
        sampler=sampler,
        completion_batch_size=total,
        prefill_batch_size=total,
    )
    try:
        # BatchKVCache.merge copies each cache, so group members may share one.
        uids = generator.insert(
            [[p[-1]] for p in prompts for _ in range(group_size)],
            max_tokens=[max_tokens] * total,
            caches=[cache for cache in caches for _ in range(group_size)],
        )
        tokens = {uid: [] for uid in uids}
        reasons = {}
        while responses := generator.next_generated():
            for response in responses:
                tokens[response.uid].append(response.token)
                if response.finish_reason is not None:
                    reasons[response.uid] = response.finish_reason
    finally:
        generator.close()
    del caches
    completion_ids = [tokens[uid] for uid in uids]
    finish_reasons = [reasons[uid] for uid in uids]
    eos = set(eos_ids)
    texts = [
        tokenizer.decode(ids[:-1] if reason == "stop" and ids and ids[-1] in eos else ids)
        for ids, reason in zip(completion_ids, finish_reasons)
    ]
    return Rollouts(
        group_size=group_size,
        prompt_ids=[p for p in map(list, prompts) for _ in range(group_size)],
        completion_ids=completion_ids,
        finish_reasons=finish_reasons,
        texts=texts,
        prompt_tokens=sum(len(p) for p in prompts),
        generation_seconds=time.perf_counter() - start,
    )
