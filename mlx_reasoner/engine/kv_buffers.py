"""Fixed-size KV buffers for the compiled decode: where each step writes its key and value
columns, and which columns each row may see."""

import mlx.core as mx

# The KV buffers grow by this many columns at a time: a step attends to at most this many
# columns not written yet, and every rollout passes through the same few buffer widths (one
# trace each).
CACHE_MULTIPLE = 64


def write_columns(buffer: mx.array, previous: mx.array, current: mx.array, write) -> mx.array:
    """``buffer`` (``[rows, heads, S, D]``) with the last step's column at ``write - 1`` and
    this step's at ``write``.

    The decode keeps two sets of buffers and uses them in turn, so each set is two steps
    behind and takes both columns. The set a step writes into was last read two steps ago,
    which has finished by then (the loop has read that step's tokens), so ``slice_update``
    can write into it in place: with one set, the step before is still running and every
    step copies every layer's buffers.
    """
    buffer = mx.slice_update(buffer, previous, write - 1, axes=(2,))
    return mx.slice_update(buffer, current, write, axes=(2,))


def visible_columns(width: int, write, start: mx.array) -> tuple[mx.array, mx.array]:
    """What a decode step's rows see of their buffers: ``[rows, width]`` true from each row's
    first prompt column (``start``) to the column written now (``write``), and each row's own
    position (what RoPE sees)."""
    columns = mx.arange(width)
    visible = (columns[None] >= start[:, None]) & (columns[None] <= write)
    return visible, write - start


def last_prompt_columns(keys: list, values: list, write: int) -> list[tuple]:
    """The ``previous`` columns of a decode's first step (``write_columns``): the last prompt
    column of each layer, rewritten where a previous step's would go."""
    return [(k[:, :, write - 1 : write], v[:, :, write - 1 : write]) for k, v in zip(keys, values)]
