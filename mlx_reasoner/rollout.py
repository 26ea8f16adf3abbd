"""Rollout stage: sample a group of completions per prompt, all of them decoding together.

Each prompt is prefilled once; its KV cache is then handed to every member of its group,
and all completions of the step decode together in one batch. Token ids are kept exactly
as sampled, so the loss scores the very tokens the policy produced.

The batch decodes with mlx-lm's ``BatchGenerator`` and sampler, or, where the engine offers
one for this model (``backend.compiled_decoder``: the CPU's compiled fixed-shape decode), with
that instead; both return the same kind of result.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from . import backend
from .logprobs import sampled_logprobs
from .model import prefill_prompt


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
    decoder: str = ""  # "fused", "compiled" or "BatchGenerator": which decode ran
    stats: dict = field(default_factory=dict)
    # Per completion, each token's log-probability under the distribution it was sampled from
    # (the decode's logits at the sampling temperature); None unless asked for.
    logprobs: list[list[float]] | None = None

    def __len__(self) -> int:
        return len(self.completion_ids)

    @property
    def generated_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / max(self.generation_seconds, 1e-9)


def generate_groups(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    group_size: int,
    max_tokens: int,
    sampler: Callable[[mx.array], mx.array] | None = None,
    ignore_eos: bool = False,
    compiled: bool | None = None,
    temperature: float | None = None,
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
        compiled: use the compiled fixed-shape decode (True), mlx-lm's ``BatchGenerator``
            (False), or the compiled one where ``compiled_decode_supported`` (None).
        temperature: when given, keep each sampled token's log-probability at this
            temperature (``Rollouts.logprobs``), what the sampler drew it from.

    Returns:
        ``Rollouts`` with ``len(prompts) * group_size`` completions, grouped by prompt.
    """
    start = time.perf_counter()
    eos_ids = sorted(tokenizer.eos_token_ids)
    stop = frozenset() if ignore_eos else frozenset(eos_ids)
    with backend.fast_forward(model):
        caches = [prefill_prompt(model, p) for p in prompts]
        decode = backend.compiled_decoder(model, prompts, compiled) or _decode_batch_generator
        completion_ids, finish_reasons, decoder, logprobs = decode(
            model, prompts, caches, group_size, max_tokens, sampler, stop, temperature=temperature
        )
    del caches
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
        decoder=decoder,
        logprobs=logprobs,
    )


def merge_rollouts(parts: Sequence[Rollouts], rows: Sequence[tuple[int, int]]) -> Rollouts:
    """One ``Rollouts`` of the completions ``rows`` (``(part, index)`` pairs, whole groups in
    order) taken from several rollouts of the same group size."""
    group = parts[0].group_size

    def pick(name):
        return [getattr(parts[p], name)[i] for p, i in rows]

    logprobs = None if any(p.logprobs is None for p in parts) else pick("logprobs")
    prompts = {(p, i // group) for p, i in rows}
    return Rollouts(
        group_size=group,
        prompt_ids=pick("prompt_ids"),
        completion_ids=pick("completion_ids"),
        finish_reasons=pick("finish_reasons"),
        texts=pick("texts"),
        prompt_tokens=sum(len(parts[p].prompt_ids[g * group]) for p, g in prompts),
        generation_seconds=sum(p.generation_seconds for p in parts),
        decoder=parts[0].decoder,
        logprobs=logprobs,
    )


def _decode_batch_generator(
    model, prompts, caches, group_size, max_tokens, sampler, stop, temperature=None
):
    """Decode every completion in one mlx-lm ``BatchGenerator`` batch."""
    from mlx_lm.generate import BatchGenerator

    total = len(prompts) * group_size
    generator = BatchGenerator(
        model,
        max_tokens=max_tokens,
        stop_tokens=[[t] for t in sorted(stop)] or None,
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
        logprobs = {uid: [] for uid in uids}
        reasons = {}
        while responses := generator.next_generated():
            if temperature is not None:  # one small evaluation per step, for every row at once
                chosen = sampled_logprobs(
                    mx.stack([r.logprobs for r in responses]),
                    mx.array([r.token for r in responses]),
                    temperature,
                ).tolist()
            for index, response in enumerate(responses):
                tokens[response.uid].append(response.token)
                if temperature is not None:
                    logprobs[response.uid].append(chosen[index])
                if response.finish_reason is not None:
                    reasons[response.uid] = response.finish_reason
    finally:
        generator.close()
    kept = [logprobs[uid] for uid in uids] if temperature is not None else None
    return [tokens[uid] for uid in uids], [reasons[uid] for uid in uids], "BatchGenerator", kept
