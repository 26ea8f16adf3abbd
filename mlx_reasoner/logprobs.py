"""Running the model for log-probabilities: completions laid out with their prompts
(``pack_sequences``, or ``pack_groups`` with each prompt run once per group) and each completion
token's log-probability under the policy (``completion_logprobs``).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import backend


@dataclass
class PackedBatch:
    """Prompt + completion sequences laid out for one forward pass.

    Two layouts share this class:

    - *packed* (``pack_sequences``): each row is ``prompt + completion``, right-padded;
      padding at the end never affects earlier positions under a causal mask.
    - *shared prompt* (``pack_groups``): each distinct prompt (all but its last token) is a
      row of ``prefix``, left-padded, and runs through the model once; each completion row
      of ``tokens`` is the prompt's last token followed by the completion, and attends to
      its prompt's keys and values. A group of G completions then costs one prompt, not G.
    """

    tokens: mx.array  # [B, L] int32
    positions: mx.array  # [B, T] int32: where each completion token is predicted from
    targets: mx.array  # [B, T] int32: the completion tokens, as generated
    mask: mx.array  # [B, T] float32: 1 for real completion tokens
    advantages: mx.array  # [B] float32
    prefix: mx.array | None = None  # [N, P] int32: prompts minus their last token, left-padded
    prefix_start: mx.array | None = None  # [N] int32: where each prefix's real tokens begin
    group_of: mx.array | None = None  # [B] int32: the prefix row each completion continues

    @property
    def shares_prompts(self) -> bool:
        return self.prefix is not None

    def __len__(self) -> int:
        return self.tokens.shape[0]


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (at least one multiple)."""
    return max(multiple, -(-n // multiple) * multiple)


def pack_sequences(
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    advantages: np.ndarray,
    pad_multiple: int = 16,
) -> PackedBatch:
    """Lay out completions with their prompts in front, for scoring.

    Lengths are rounded up to ``pad_multiple`` so that compiled functions see few
    distinct shapes. Token ids are used exactly as generated (never re-tokenised).

    Args:
        prompt_ids: per completion, the prompt's token ids.
        completion_ids: per completion, the generated token ids (EOS included if emitted).
        advantages: ``[B]`` advantage per completion.

    Returns:
        A ``PackedBatch``.
    """
    batch = len(completion_ids)
    max_completion = round_up(max(len(c) for c in completion_ids), pad_multiple)
    max_total = round_up(
        max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)), pad_multiple
    )
    tokens = np.zeros((batch, max_total), dtype=np.int32)
    positions = np.zeros((batch, max_completion), dtype=np.int32)
    targets = np.zeros((batch, max_completion), dtype=np.int32)
    mask = np.zeros((batch, max_completion), dtype=np.float32)
    for row, (prompt, completion) in enumerate(zip(prompt_ids, completion_ids)):
        sequence = list(prompt) + list(completion)
        tokens[row, : len(sequence)] = sequence
        n = len(completion)
        # Token j of the completion is predicted by the hidden state one position before it.
        positions[row] = np.minimum(len(prompt) - 1 + np.arange(max_completion), max_total - 1)
        targets[row, :n] = completion
        mask[row, :n] = 1.0
    return PackedBatch(
        mx.array(tokens),
        mx.array(positions),
        mx.array(targets),
        mx.array(mask),
        mx.array(np.asarray(advantages, dtype=np.float32)),
    )


def pack_groups(
    prompts: Sequence[Sequence[int]],
    group_of: Sequence[int],
    completion_ids: Sequence[Sequence[int]],
    advantages: np.ndarray,
    pad_multiple: int = 16,
) -> PackedBatch:
    """Lay out completions in the shared-prompt layout (see ``PackedBatch``).

    Args:
        prompts: the distinct prompts' token ids (at least one token each).
        group_of: per completion, the index of its prompt in ``prompts``.
        completion_ids: per completion, the generated token ids (EOS included if emitted).
        advantages: ``[B]`` advantage per completion.
        pad_multiple: prefix and completion widths are rounded up to this.

    Returns:
        A ``PackedBatch`` whose ``prefix`` is set.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    batch = len(completion_ids)
    width = round_up(max(len(p) - 1 for p in prompts), pad_multiple)
    prefix = np.zeros((len(prompts), width), dtype=np.int32)
    prefix_start = np.zeros(len(prompts), dtype=np.int32)
    for row, prompt in enumerate(prompts):
        body = list(prompt[:-1])
        prefix_start[row] = width - len(body)
        prefix[row, prefix_start[row] :] = body
    max_completion = round_up(max(len(c) for c in completion_ids), pad_multiple)
    tokens = np.zeros((batch, max_completion), dtype=np.int32)
    targets = np.zeros((batch, max_completion), dtype=np.int32)
    mask = np.zeros((batch, max_completion), dtype=np.float32)
    for row, (group, completion) in enumerate(zip(group_of, completion_ids)):
        n = len(completion)
        # Position j holds the token before completion token j: the prompt's last token, then
        # the completion's own.
        tokens[row, :n] = [prompts[group][-1], *completion[:-1]]
        targets[row, :n] = completion
        mask[row, :n] = 1.0
    positions = np.broadcast_to(np.arange(max_completion, dtype=np.int32), (batch, max_completion))
    return PackedBatch(
        mx.array(tokens),
        mx.array(positions),
        mx.array(targets),
        mx.array(mask),
        mx.array(np.asarray(advantages, dtype=np.float32)),
        prefix=mx.array(prefix),
        prefix_start=mx.array(prefix_start),
        group_of=mx.array(np.asarray(group_of, dtype=np.int32)),
    )


def _full_mask(mask: mx.array, window_size) -> mx.array:
    if window_size is not None:
        # Sliding-window attention needs a windowed mask; such models use the packed layout
        # (``shared_prompts_supported`` sees this error and says no).
        raise NotImplementedError("the shared-prompt layout has no sliding-window mask")
    return mask


class _PrefixCache:
    """Stands in for an mlx-lm KV cache in the prefix pass: keeps the layer's keys/values."""

    offset = 0

    def __init__(self, mask: mx.array):
        self.mask = mask
        self.keys = self.values = None

    def make_mask(self, n: int, return_array: bool = False, window_size=None) -> mx.array:
        return _full_mask(self.mask, window_size)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.keys, self.values = keys, values
        return keys, values


class _SharedPrefixCache:
    """Stands in for an mlx-lm KV cache in the completion pass: each row's keys/values are its
    prompt's (from the prefix pass, differentiably) followed by its own."""

    def __init__(self, prefix: _PrefixCache, group_of: mx.array, mask: mx.array):
        self.prefix, self.group_of, self.mask = prefix, group_of, mask
        self.offset = prefix.keys.shape[2]

    def make_mask(self, n: int, return_array: bool = False, window_size=None) -> mx.array:
        return _full_mask(self.mask, window_size)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        return (
            mx.concatenate([self.prefix.keys[self.group_of], keys], axis=2),
            mx.concatenate([self.prefix.values[self.group_of], values], axis=2),
        )


def _shared_prompt_rows(model: nn.Module, batch: PackedBatch) -> Callable[[slice], mx.array]:
    """The shared-prompt layout: run the prefix pass (every prompt once), and return a function
    giving the final hidden states at the completion positions of a slice of rows."""
    width, length = batch.prefix.shape[1], batch.tokens.shape[1]
    key = mx.arange(width)
    # Prefix pass: causal over real tokens; a padding query sees only itself (never a NaN).
    real = key[None, None, :] >= batch.prefix_start[:, None, None]  # [N, 1, P]
    causal = key[None, :] <= key[:, None]  # [P, P]
    prefix_mask = ((causal[None] & real) | mx.eye(width, dtype=mx.bool_)[None])[:, None]
    # Completion pass: the row's real prompt tokens, then causal over its own tokens.
    start = batch.prefix_start[batch.group_of]
    to_prefix = mx.broadcast_to(
        key[None, None, :] >= start[:, None, None], (len(batch), length, width)
    )
    own = mx.arange(length)
    to_self = mx.broadcast_to(own[None, :] <= own[:, None], (len(batch), length, length))
    completion_mask = mx.concatenate([to_prefix, to_self], axis=2)[:, None]

    caches = [_PrefixCache(prefix_mask) for _ in model.layers]
    model.model(batch.prefix, cache=caches)

    def rows_hidden(rows: slice) -> mx.array:
        group_of, mask = batch.group_of[rows], completion_mask[rows]
        shared = [_SharedPrefixCache(cache, group_of, mask) for cache in caches]
        return model.model(batch.tokens[rows], cache=shared)  # [rows, T, H]

    return rows_hidden


class _GivenHidden:
    """Stands in for a model's decoder stack (``model.model``) inside the model's own
    ``__call__``: returns hidden states computed elsewhere, and reads every attribute
    (``embed_tokens``, ``args``) from the real stack."""

    def __init__(self, stack: nn.Module, hidden: mx.array):
        self._stack, self._hidden = stack, hidden

    def __call__(self, *args, **kwargs) -> mx.array:
        return self._hidden

    def __getattr__(self, name: str):
        return getattr(self._stack, name)


class _HeadView:
    """A model seen by its own ``__call__`` with ``model.model`` replaced (see
    ``_GivenHidden``); the model itself is never modified."""

    def __init__(self, model: nn.Module, stack: _GivenHidden):
        self._model, self.model = model, stack

    def __getattr__(self, name: str):
        return getattr(self._model, name)


def output_head(model: nn.Module) -> tuple[nn.Module, Callable[[mx.array], mx.array]]:
    """The module holding the output weights, and the projection from final hidden states to
    logits exactly as ``model(tokens)`` computes it.

    The projection runs the model's own ``__call__`` with its decoder stack standing in for
    the given hidden states, so whatever a family does after its stack (Gemma 2's soft-capping,
    Cohere's ``logit_scale``, Granite's ``logits_scaling``, MiniCPM's width scaling) is kept:
    log-probabilities are scored on the distribution the rollout sampled from.
    """
    holder = model.lm_head if "lm_head" in model else model.model.embed_tokens
    model_call = type(model).__call__

    def head(hidden: mx.array) -> mx.array:  # [..., H] -> [..., V]
        view = _HeadView(model, _GivenHidden(model.model, hidden))
        return model_call(view, mx.zeros(hidden.shape[:-1], dtype=mx.int32))

    return holder, head


def _chunk_logprobs(head: Callable, temperature: float):
    def fn(hidden: mx.array, targets: mx.array) -> mx.array:
        logits = head(hidden).astype(mx.float32) / temperature  # [B, c, V]
        picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return picked - mx.logsumexp(logits, axis=-1)  # [B, c]

    return fn


def layout_tolerance(dtype: mx.Dtype) -> float:
    """How far the two layouts' log-probabilities may differ from rounding alone.

    The layouts compute the same sums in different orders, so they differ by a few roundings
    of the model's compute dtype per block: about 1e-6 in float32, but 0.01-0.16 at the
    Qwen2.5-0.5B shape in bfloat16. A layout that gets the attention wrong is off by whole
    nats on a real model, far above this bound.
    """
    return max(0.05, 48.0 * mx.finfo(dtype).eps)


def shared_prompts_supported(model: nn.Module, tolerance: float | None = None) -> bool:
    """Whether ``model`` gives the same log-probabilities in both layouts.

    The shared-prompt layout drives the attention through stand-in KV caches, which works for
    the mlx-lm models that follow its cache protocol (Qwen2, Llama, Mistral and most others).
    This runs two short prompts of different lengths, with two completions each, both ways,
    and allows ``layout_tolerance`` of the model's compute dtype unless ``tolerance`` is given.
    """
    prompts = [[3, 5, 7, 11, 13], [17, 19]]
    completions = [[23, 29, 31], [37], [41, 43], [47, 53, 59, 61]]
    group_of = [0, 0, 1, 1]
    zeros = np.zeros(len(completions))
    try:
        packed = pack_sequences([prompts[g] for g in group_of], completions, zeros, pad_multiple=4)
        shared = pack_groups(prompts, group_of, completions, zeros, pad_multiple=4)
        width = packed.targets.shape[1]
        reference = completion_logprobs(model, packed)
        candidate = completion_logprobs(model, shared)[:, :width]
        gap = mx.max(mx.abs(reference - candidate) * packed.mask).item()
        if tolerance is None:
            tolerance = layout_tolerance(model.model(mx.array([prompts[1]])).dtype)
    except Exception:  # any model the stand-in caches do not fit: use the packed layout
        return False
    return bool(np.isfinite(gap) and gap <= tolerance)


# The float32 logits of one chunk of completion positions (all rows) stay under this: at
# Qwen2.5's 151,936-token vocabulary, 8 rows x 128 positions would be 622 MB, and the chunk's
# backward pass holds a few arrays of that size (docs/performance.md).
LOGITS_CHUNK_BYTES = 160 * 2**20
MAX_LOGITS_CHUNK = 128


def logits_chunk(rows: int, vocab: int) -> int:
    """Completion positions per chunk of the vocabulary projection: ``MAX_LOGITS_CHUNK``, or
    fewer (a multiple of 8, at least 8) where ``rows`` x that many logits would pass
    ``LOGITS_CHUNK_BYTES``.

    >>> logits_chunk(8, 512), logits_chunk(8, 151936), logits_chunk(4, 151936)
    (128, 32, 64)
    """
    fits = LOGITS_CHUNK_BYTES // (4 * max(rows, 1) * max(vocab, 1))
    return max(8, min(MAX_LOGITS_CHUNK, fits // 8 * 8))


def sampled_logprobs(logprobs: mx.array, tokens: mx.array, temperature: float) -> mx.array:
    """``[rows]`` log-probability of each sampled token at ``temperature``, from the decode's
    ``[rows, vocab]`` log-probabilities (at temperature 1)."""
    chosen = mx.take_along_axis(logprobs, tokens.astype(mx.int32)[:, None], axis=-1)[:, 0]
    if temperature == 1.0:
        return chosen.astype(mx.float32)
    scaled = logprobs.astype(mx.float32) * (1.0 / temperature)
    return chosen.astype(mx.float32) / temperature - mx.logsumexp(scaled, axis=-1)


def completion_logprobs(
    model: nn.Module,
    batch: PackedBatch,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> mx.array:
    """Log-probabilities of each completion token, with its prompt in context.

    Only hidden states at completion positions are projected onto the vocabulary, and
    that projection runs in chunks of ``chunk_size`` positions under ``mx.checkpoint``,
    so float32 logits for the whole ``[B, T, vocab]`` never exist at once, in the forward
    or the backward pass. The engine may split the rows over streams (``backend.row_split``), which
    MLX runs on threads of their own (the prompts' pass, shared by all rows, runs first); each
    row's numbers are the same either way.

    Args:
        model: an mlx-lm causal LM exposing ``model.model`` (the decoder stack).
        batch: the sequences, in either layout (see ``PackedBatch``). The shared-prompt layout
            needs a model whose attention uses mlx-lm's cache protocol
            (``shared_prompts_supported`` checks).
        temperature: logits are divided by it, matching the sampling distribution.
        chunk_size: completion positions projected at a time; by default as many as keep
            one chunk's float32 logits, over all rows, under ``LOGITS_CHUNK_BYTES``.

    Returns:
        ``[B, T]`` float32 log-probabilities (garbage where ``batch.mask`` is 0).
    """
    head_module, head = output_head(model)
    chunk_fn = _chunk_logprobs(head, temperature)
    if chunk_size is None:
        chunk_size = logits_chunk(len(batch), head_module.weight.shape[0])

    def rows_logprobs(hidden: mx.array, targets: mx.array) -> mx.array:
        pieces = []
        for start in range(0, targets.shape[1], chunk_size):
            chunk_targets = targets[:, start : start + chunk_size]
            # Targets are closed over (checkpoint differentiates its inputs); the head's weights
            # are passed through nn.utils.checkpoint so a trainable head still gets gradients.
            checkpointed = nn.utils.checkpoint(
                head_module, lambda h, t=chunk_targets: chunk_fn(h, t)
            )
            pieces.append(checkpointed(hidden[:, start : start + chunk_size]))
        return pieces[0] if len(pieces) == 1 else mx.concatenate(pieces, axis=1)

    with backend.fast_forward(model):
        if batch.shares_prompts:
            rows_hidden = _shared_prompt_rows(model, batch)
        else:

            def rows_hidden(rows: slice) -> mx.array:
                hidden = model.model(batch.tokens[rows])  # [rows, L, H]
                return mx.take_along_axis(hidden, batch.positions[rows][..., None], axis=1)

        parts = []
        for stream, rows in backend.row_split(len(batch)):
            with mx.stream(stream):
                parts.append(rows_logprobs(rows_hidden(rows), batch.targets[rows]))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)
