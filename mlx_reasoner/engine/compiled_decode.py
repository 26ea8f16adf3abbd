"""The compiled fixed-shape decode: every row's KV cache in fixed-size buffers, so each decode
step has the same shapes and runs as one ``mx.compile``d graph (model, log-softmax, sampling).

For mlx-lm's Qwen2 and Llama models the step is ``fused_decode``'s, written out on 2-D rows
("fused"); for other models with plain KV caches it runs mlx-lm's own modules ("compiled").
``compiled_decode_supported`` checks a model once against a full forward pass before use.
"""

import functools
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..logprobs import round_up, sampled_logprobs
from ..model import prefill_prompt
from .addmm_lora import lora_as_addmm
from .blas import decode_threads
from .cpu_math import fast_activations_apply, shared_rope, small_weights_transposed
from .fused_decode import block_ropes, fused_decode_apply, fused_plan, fused_step
from .kv_buffers import CACHE_MULTIPLE, last_prompt_columns, visible_columns, write_columns


class _FixedCache:
    """Stands in for an mlx-lm ``KVCache`` at one decode step, over a fixed-size buffer.

    Row ``r`` holds its prompt's keys and values left-padded to end at column ``write`` (the
    column this step's token goes to; ``write_columns`` also writes the last step's, at
    ``write - 1``); ``offset`` is each row's own position, which is what RoPE sees, and
    ``mask`` hides the padding and the columns not yet written.
    """

    def __init__(self, keys, values, previous, write, offset, mask):
        self.keys, self.values = keys, values
        self.previous = previous  # the last step's (keys, values) column
        self.current = None  # this step's, once written
        self.write, self.offset, self.mask = write, offset, mask

    def make_mask(self, n: int, return_array: bool = False, window_size=None) -> mx.array:
        if window_size is not None:
            raise NotImplementedError("the compiled decode has no sliding-window mask")
        return self.mask

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        previous_keys, previous_values = self.previous
        self.keys = write_columns(self.keys, previous_keys, keys, self.write)
        self.values = write_columns(self.values, previous_values, values, self.write)
        self.current = (keys, values)
        return self.keys, self.values


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def _decode_step_fn(model: nn.Module, sampler: Callable):
    """One decode step of every row: ``(tokens, previous, keys, values, write, start) -> (next
    tokens, log-probabilities, keys, values, this step's columns)``. ``previous`` holds the
    last step's key and value column of each layer (``write_columns``); ``start`` is where
    each row's prompt begins."""

    def step(tokens, previous, keys, values, write, start):
        # One positions array for every block (cpu_math.shared_rope uses it).
        mask, positions = visible_columns(keys[0].shape[2], write, start)
        caches = [
            _FixedCache(k, v, last, write, positions, mask[:, None, None, :])
            for k, v, last in zip(keys, values, previous)
        ]
        logits = model(tokens[:, None], cache=caches)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return (
            sampler(logprobs).astype(mx.uint32),
            logprobs,
            [c.keys for c in caches],
            [c.values for c in caches],
            [c.current for c in caches],
        )

    return step


class _DecoderCache:
    """What the compiled decode knows of the last model it ran: per module layout, whether the
    model passed ``compiled_decode_supported`` and the compiled steps of its last samplers.

    The layout is part of the key because ``adapters_disabled`` swaps modules in and out: a
    trace made with the adapters on must not run with them off (and so is whether ``cpu_math``
    swaps the activations). Only one model is remembered, so a model the caller has let go of
    is not kept alive here for long: the next model decoded replaces it.
    """

    def __init__(self, samplers: int = 3):
        self.samplers = samplers
        self.model: nn.Module | None = None
        self.layouts: dict[tuple, dict] = {}

    def entry(self, model: nn.Module) -> dict:
        if self.model is not model:
            self.model, self.layouts = model, {}
        layout = tuple((name, type(m).__name__) for name, m in model.named_modules())
        key = (layout, fast_activations_apply(), fused_decode_apply())
        # "fused": whether fused_decode's step passed the check (None: not checked yet)
        entry = {"supported": None, "fused": None, "steps": [], "fused_steps": []}
        return self.layouts.setdefault(key, entry)

    @staticmethod
    def _compiled(steps: list, key, make: Callable, limit: int) -> Callable:
        """The step compiled for ``key`` (samplers compare by identity), newest first."""
        for known, fn in steps:
            if known == key:
                return fn
        fn = make()
        steps.insert(0, (key, fn))
        del steps[limit:]
        return fn

    def fused(self, entry: dict, model: nn.Module, plan, sampler: Callable) -> Callable:
        """The compiled ``fused_decode.fused_step`` for this plan and sampler, in ``entry``
        (``self.entry(model)``); plans differ by row count too, so twice as many are kept."""
        return self._compiled(
            entry["fused_steps"],
            (plan, sampler),
            lambda: mx.compile(
                fused_step(plan, block_ropes(model), sampler),
                inputs=[mx.random.state],
                outputs=[mx.random.state],
            ),
            2 * self.samplers,
        )

    def step(self, model: nn.Module, sampler: Callable) -> Callable:
        """The compiled module step for this sampler, in the model's current layout."""
        return self._compiled(
            self.entry(model)["steps"],
            sampler,
            lambda: mx.compile(
                _decode_step_fn(model, sampler),
                inputs=[model.state, mx.random.state],
                outputs=[mx.random.state],
            ),
            self.samplers,
        )


_DECODERS = _DecoderCache()


def _fixed_buffers(caches: list[list], group_size: int, sets: int = 2):
    """Lay each prompt's per-layer cache into buffers of ``[rows, heads, width, dim]``.

    Row ``i * group_size + g`` is prompt ``i``'s, left-padded so that every prompt ends at the
    same column. Returns ``(sets, write, start)``: ``sets`` separate ``(keys, values)`` sets
    of per-layer buffers (``write_columns``) with room for at least one more column, the
    first column the decode writes, and each row's first prompt column.
    """
    lengths = [cache[0].offset for cache in caches]
    write = max(lengths)
    width = round_up(write + 1, CACHE_MULTIPLE)
    start = mx.array([write - n for n in lengths for _ in range(group_size)], dtype=mx.int32)

    def laid_out(arrays: list[mx.array]) -> mx.array:
        # arrays: one [1, heads, >= length, dim] per prompt
        rows = []
        for array, length in zip(arrays, lengths):
            _, heads, _, dim = array.shape
            left = mx.zeros((1, heads, write - length, dim), array.dtype)
            right = mx.zeros((1, heads, width - write, dim), array.dtype)
            row = mx.concatenate([left, array[:, :, :length], right], axis=2)
            rows.append(mx.broadcast_to(row, (group_size, heads, width, dim)))
        return mx.concatenate(rows, axis=0)

    layers = range(len(caches[0]))
    buffers = [
        (
            [laid_out([c[layer].keys for c in caches]) for layer in layers],
            [laid_out([c[layer].values for c in caches]) for layer in layers],
        )
        for _ in range(sets)
    ]
    mx.eval(buffers, start)
    return buffers, write, start


def _widen(buffers: list[mx.array], columns: int) -> list[mx.array]:
    """The same buffers with ``columns`` more (zero) columns at the end."""
    rows, heads, _, dim = buffers[0].shape
    extra = mx.zeros((rows, heads, columns, dim), buffers[0].dtype)
    return [mx.concatenate([b, extra], axis=2) for b in buffers]


def decode_compiled(
    model,
    prompts,
    caches,
    group_size,
    max_tokens,
    sampler,
    stop,
    record=None,
    fused=None,
    temperature=None,
):
    """Decode every completion with the compiled fixed-shape step (``_DecoderCache``).

    Where ``fused_decode.fused_plan`` accepts the model (and, with ``fused=None``, the check
    has not rejected it), the step is ``fused_decode``'s, on arrays prepared for this rollout.
    Otherwise it runs mlx-lm's modules, with the LoRA layers as ``addmm_lora.lora_as_addmm``'s and,
    on the CPU, the RoPE layers as ``cpu_math.shared_rope``'s (fewer graph nodes, same numbers)
    and, with OpenBLAS, the small weights it would pack at every call transposed once per
    rollout (``cpu_math.small_weights_transposed``). The next step is queued before the last
    one's tokens are read, so the device never waits on Python; decoding stops once every row
    has met a stop token or ``max_tokens``. The buffers grow by ``CACHE_MULTIPLE`` columns when
    full, so a step's shapes change only then. Returns the completions, their finish reasons,
    which step ran ("fused" or "compiled") and, with ``temperature``, the sampled tokens'
    log-probabilities (else None). ``record``, if given, receives each step's log-probabilities.
    """
    rows = len(prompts) * group_size
    sampler = sampler or _greedy
    entry = _DECODERS.entry(model)
    if fused is None:
        fused = entry["fused"] is not False
    planned = fused_plan(model, rows) if fused else None
    threads = decode_threads(_weight_bytes(model))
    if planned is not None:
        plan, params = planned
        step = functools.partial(_DECODERS.fused(entry, model, plan, sampler), params)
        completions, reasons, logprobs = _decode_loop(
            step, prompts, caches, group_size, max_tokens, stop, record, threads, temperature
        )
        return completions, reasons, "fused", logprobs
    with lora_as_addmm(model), shared_rope(model), small_weights_transposed(model, rows):
        step = _DECODERS.step(model, sampler)
        completions, reasons, logprobs = _decode_loop(
            step, prompts, caches, group_size, max_tokens, stop, record, threads, temperature
        )
    return completions, reasons, "compiled", logprobs


def _weight_bytes(model: nn.Module) -> int:
    return sum(value.nbytes for _, value in tree_flatten(model.parameters()))


def _decode_loop(
    step, prompts, caches, group_size, max_tokens, stop, record, threads=None, temperature=None
):
    """Run ``step`` until every row stops; ``threads`` (a ``blas.DecodeThreads``) sets
    OpenBLAS's thread count around the steps. Returns the completions, their finish reasons
    and, with ``temperature``, the sampled tokens' log-probabilities (else None)."""
    sets, write, start = _fixed_buffers(caches, group_size)
    rows = len(prompts) * group_size
    completions = [[] for _ in range(rows)]
    logprobs_kept = [[] for _ in range(rows)]
    reasons: list[str | None] = [None] * rows
    open_rows = rows

    def take(tokens: mx.array, chosen: mx.array | None) -> None:
        nonlocal open_rows
        chosen = None if chosen is None else chosen.tolist()
        for r, token in enumerate(tokens.tolist()):
            if reasons[r] is not None:
                continue
            completions[r].append(token)
            if chosen is not None:
                logprobs_kept[r].append(chosen[r])
            if token in stop:
                reasons[r] = "stop"
            elif len(completions[r]) >= max_tokens:
                reasons[r] = "length"
            else:
                continue
            open_rows -= 1

    tokens = mx.array([p[-1] for p in prompts for _ in range(group_size)], dtype=mx.uint32)
    previous = last_prompt_columns(*sets[0], write)  # two sets, used in turn (write_columns)
    pending = None
    try:
        for i in range(max_tokens):
            if threads is not None:
                threads.before_step(i)
            if write + i == sets[0][0][0].shape[2]:
                sets = [tuple(_widen(b, CACHE_MULTIPLE) for b in pair) for pair in sets]
            # Once the set is replaced by the step's outputs, only the step holds the old buffers,
            # so slice_update may write into them.
            tokens, logprobs, keys, values, previous = step(
                tokens, previous, *sets[i % 2], mx.array(write + i), start
            )
            sets[i % 2] = (keys, values)
            if record is not None:
                record(logprobs)
            chosen = (
                None if temperature is None else sampled_logprobs(logprobs, tokens, temperature)
            )
            mx.async_eval(tokens, sets[i % 2], previous, *([] if chosen is None else [chosen]))
            if pending is not None:
                take(*pending)
                if threads is not None:
                    threads.step_done()
                if open_rows == 0:
                    break
            pending = (tokens, chosen)
        else:
            take(*pending)
    finally:
        if threads is not None:
            threads.close()
    return completions, reasons, (logprobs_kept if temperature is not None else None)


def compiled_decode_default() -> bool:
    """Whether rollouts take the compiled decode unless told otherwise: on the CPU, where it
    was measured to win. Elsewhere (Metal, CUDA) mlx-lm's ``BatchGenerator`` runs."""
    return mx.default_device() == mx.cpu


def compiled_decode_supported(model: nn.Module) -> bool:
    """Whether ``model`` can run the compiled fixed-shape decode, and gives the same numbers.

    It needs an ``nn.Module`` whose every layer uses a plain ``KVCache`` (no sliding window,
    no quantized or recurrent state) and whose attention follows mlx-lm's cache protocol,
    with per-row positions. The answer is checked once per model and module layout: two
    prompts of different lengths decode three greedy tokens through the compiled step (so a
    backend that cannot compile it is found out here), and the log-probabilities must match a
    full forward pass over each sequence (to 1e-3 in float32, 48 roundings in half precision). The
    fused step (``fused_decode``), where it applies, is checked first; if it fails, the
    module decode is checked and used instead.
    """
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    if not isinstance(model, nn.Module):
        return False
    entry = _DECODERS.entry(model)
    if entry["supported"] is None:
        entry["supported"] = False
        try:
            if all(type(c) is KVCache for c in make_prompt_cache(model)):
                entry["fused"] = fused_plan(model, 2) is not None and _check_fixed_decode(
                    model, fused=True
                )
                entry["supported"] = entry["fused"] or _check_fixed_decode(model, fused=False)
        except Exception:  # any model the stand-in caches do not fit: use the BatchGenerator
            pass
    return entry["supported"]


def _check_fixed_decode(model: nn.Module, fused: bool) -> bool:
    prompts = [[3, 5, 7, 11, 13], [17, 19]]
    caches = [prefill_prompt(model, p) for p in prompts]
    logprobs = []  # from the compiled step, so a backend that cannot compile it fails here
    try:
        completions, *_ = decode_compiled(
            model, prompts, caches, 1, 3, None, frozenset(), record=logprobs.append, fused=fused
        )
    except Exception:
        if fused:  # the module decode may still work
            return False
        raise
    got = mx.stack(logprobs[:3], axis=1).astype(mx.float32)  # [rows, 3, vocab]
    # A few roundings of the compute dtype per block: tight in float32, loose in bfloat16.
    tolerance = max(1e-3, 48.0 * mx.finfo(logprobs[0].dtype).eps)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        full = model(mx.array(prompt + completion)[None])[0, len(prompt) - 1 : -1]
        full = full - mx.logsumexp(full, axis=-1, keepdims=True)
        gap = mx.max(mx.abs(full.astype(mx.float32) - got[row])).item()
        if not (np.isfinite(gap) and gap <= tolerance):
            return False
    return True
