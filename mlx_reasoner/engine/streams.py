"""The training pass's rows split over CPU streams: MLX runs each stream's kernels on a thread of
its own, so on a multi-core CPU the halves of a micro-batch run side by side."""

import os

import mlx.core as mx

# How many streams, at most (1 turns the split off).
ROW_STREAMS_ENV = "MLX_REASONER_CPU_STREAMS"
_SIDE_STREAMS: list = []  # made once, on first use, and reused


def row_streams() -> int:
    """How many CPU streams ``completion_logprobs`` splits its rows over:
    ``MLX_REASONER_CPU_STREAMS`` if set (1 turns the split off), else 2 on a CPU with two or more
    cores; 1 off the CPU."""
    if mx.default_device() != mx.cpu:
        return 1
    setting = os.environ.get(ROW_STREAMS_ENV, "").strip()
    if setting:
        try:
            return max(1, int(setting))
        except ValueError:
            return 1
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def row_split(rows: int) -> list[tuple[mx.Stream, slice]]:
    """Consecutive slices of ``rows``, each with the stream that computes it (the default first)."""
    parts = min(row_streams(), rows)
    default = mx.default_stream(mx.default_device())
    if parts <= 1:
        return [(default, slice(0, rows))]
    while len(_SIDE_STREAMS) < parts - 1:
        _SIDE_STREAMS.append(mx.new_stream(mx.cpu))
    bounds = [round(i * rows / parts) for i in range(parts + 1)]
    streams = [default, *_SIDE_STREAMS[: parts - 1]]
    return [(s, slice(a, b)) for s, a, b in zip(streams, bounds, bounds[1:])]
