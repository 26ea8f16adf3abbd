"""Data-parallel runs over several processes, on MLX's own distributed layer.

``mlx.launch -n N -- mlx-reasoner train …`` (ring, JACCL or MPI) starts one process per rank. This
module owns what they share: the group, each rank's contiguous share of a step's items, the
collectives the pipeline needs (gathering small JSON objects, summing the LoRA gradients with
``mlx.nn.average_gradients``, agreeing on a failure or a stop), what every rank must hold
before training (rank 0's options, the same inputs, rank 0's starting adapters) and the
watchdog that keeps a rank from waiting on a dead peer for ever.

A process started without a launcher gets ``World()``, one rank, and never touches
``mx.distributed``: every method is then a no-op that returns its input. Importing this module
loads no mlx.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ReasonerError

# How long a rank waits in a collective before it gives up on its peers. A rank that finished
# its share early waits there for the slowest one, so this must cover the largest imbalance of
# a step (or an evaluation); a dead peer's closed connection is noticed at once anyway.
DEFAULT_TIMEOUT_S = 1800.0
TIMEOUT_VARIABLE = "MLX_REASONER_PEER_TIMEOUT"


def launched_rank() -> int | None:
    """This process's rank when a launcher started it as one of several, else None.

    Read from the launcher's environment only (no mlx import): ``mlx.launch`` sets ``MLX_RANK``,
    MPI ``OMPI_COMM_WORLD_RANK``. ``mlx.launch -n 1`` counts as no launcher.
    """
    if launched_size() < 2:
        return None
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return None


def launched_size() -> int:
    """How many processes the launcher started (1 without one), from its environment.

    The ring backend reads a JSON list of hosts from the file ``MLX_HOSTFILE`` names (empty for
    one process); JACCL one of devices from ``MLX_IBV_DEVICES``; NCCL and MPI give the size.
    """
    for name in ("MLX_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    for name in ("MLX_HOSTFILE", "MLX_IBV_DEVICES"):
        path = os.environ.get(name)
        if not path:
            continue
        try:
            hosts = json.loads(Path(path).read_text().strip() or "[]")
        except (OSError, ValueError):
            return 2  # unreadable: let mx.distributed.init say what is wrong with it
        return max(len(hosts), 1) if isinstance(hosts, list) else 1
    return 1


def peer_timeout() -> float:
    """Seconds a collective may wait (``MLX_REASONER_PEER_TIMEOUT``, default 30 minutes)."""
    text = os.environ.get(TIMEOUT_VARIABLE, "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ReasonerError(
            f"{TIMEOUT_VARIABLE} must be a number of seconds, got {text!r}"
        ) from None
    if value <= 0:
        raise ReasonerError(f"{TIMEOUT_VARIABLE} must be positive, got {text!r}")
    return value


@contextlib.contextmanager
def launcher_stop_reported() -> Iterator[None]:
    """On rank 0 of a launched run: turn a SIGTERM or SIGHUP into one error line, not a silent
    death. ``mlx.launch`` sends SIGTERM to every rank once one has ended, and rank 0 may get it
    before noticing the lost rank itself (while loading, say). A training run's own handler
    (``run.StopSignals``) takes over while it trains."""
    if launched_rank() != 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None]

    def stop(signum, frame):
        for sig in signals:  # one report: a second signal must not cut it off
            signal.signal(sig, signal.SIG_IGN)
        why = (
            "under mlx.launch this means another rank has ended (its error, if it printed "
            "one, is above)"
            if signum == signal.SIGTERM
            else "its terminal or ssh connection closed"
        )
        name = signal.Signals(signum).name
        raise ReasonerError(f"stopped by {name}; {why}", exit_code=128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in signals}
    try:
        yield
    except BaseException:
        # The error is on its way to being printed: the launcher's stop must not cut it off
        # (what is left is bounded: print, exit).
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
        raise
    for sig, handler in previous.items():
        signal.signal(sig, handler)


class RunEnded(ReasonerError):
    """The run ends on every rank for a reason rank 0 reports (a rank failed or was asked to
    stop, and all of them learnt it together); the other ranks raise this and stay quiet."""


class PeerLost(RunEnded):
    """A rank vanished in the middle of a collective; every rank that sees it says so (rank 0
    may be the one that vanished)."""


@dataclass(frozen=True)
class World:
    """The processes of one run and the collectives between them.

    ``World()`` is a single process: no collective is ever called.
    """

    group: Any = None  # mx.distributed.Group; None for one process
    rank: int = 0
    size: int = 1
    timeout: float = DEFAULT_TIMEOUT_S

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the run folder and drives the display."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1

    def shares(self, count: int) -> list[range]:
        """Every rank's contiguous share of ``count`` items, in rank order.

        Shares differ by one at most: the first ``count % size`` ranks take one more.

        >>> World(rank=0, size=3).shares(8)
        [range(0, 3), range(3, 6), range(6, 8)]
        """
        base, extra = divmod(count, self.size)
        bounds = [0]
        for rank in range(self.size):
            bounds.append(bounds[-1] + base + (rank < extra))
        return [range(bounds[r], bounds[r + 1]) for r in range(self.size)]

    def share(self, count: int) -> range:
        """This rank's share of ``count`` items (all of them in one process)."""
        return self.shares(count)[self.rank]

    def sampling_seed(self, seed: int) -> int:
        """The seed this rank samples with where one process would use ``seed``: the same on
        rank 0, a different stream on each other rank (its prompts must not get rank 0's
        noise)."""
        if self.rank == 0:
            return seed
        import numpy as np

        low, high = np.random.SeedSequence([seed, self.rank]).generate_state(2, np.uint32)
        return int(low) | (int(high) << 32)

    def gather(self, obj, what: str = "exchanging step figures") -> list:
        """Every rank's ``obj`` (JSON-serialisable), in rank order; ``[obj]`` in one process.

        Floats survive exactly (JSON keeps their shortest round-trip form), so figures summed
        from the gathered values are the same on every rank.
        """
        if not self.is_distributed:
            return [obj]
        import mlx.core as mx
        import numpy as np

        data = np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)
        with self.waiting(what):
            lengths = self._all_gather(mx.array([data.size], dtype=mx.int32)).tolist()
            padded = np.zeros((1, max(lengths)), dtype=np.uint8)
            padded[0, : data.size] = data
            rows = np.array(self._all_gather(mx.array(padded)))
        return [json.loads(rows[r, :n].tobytes()) for r, n in enumerate(lengths)]

    def from_main(self, obj, what: str = "receiving rank 0's settings"):
        """Rank 0's ``obj`` on every rank (the others' are ignored)."""
        if not self.is_distributed:
            return obj
        return self.gather(obj if self.is_main else None, what)[0]

    def sum_figures(self, figures: dict[str, float]) -> dict[str, float]:
        """Each key summed over the ranks (keys missing on a rank count as 0)."""
        if not self.is_distributed:
            return figures
        total: dict[str, float] = {}
        for part in self.gather(figures):
            for key, value in part.items():
                total[key] = total.get(key, 0.0) + value
        return total

    def max_figures(self, figures: dict[str, float]) -> dict[str, float]:
        """Each key's largest value over the ranks: a step's time is its slowest rank's."""
        if not self.is_distributed:
            return figures
        parts = self.gather(figures)
        return {key: max(part[key] for part in parts) for key in figures}

    def sum_gradients(self, grads):
        """The sum of every rank's gradients, evaluated.

        Each rank's loss is its share of the whole step's loss (normalised by the step's
        counts), so the step's gradient is the sum of the ranks'. ``average_gradients``
        divides by the size; multiplying first undoes that.
        """
        if not self.is_distributed:
            return grads
        import mlx.core as mx
        from mlx.nn import average_gradients
        from mlx.utils import tree_map

        summed = average_gradients(tree_map(lambda g: g * self.size, grads), group=self.group)
        with self.waiting("averaging gradients"):
            mx.eval(summed)
        return summed

    def broadcast_arrays(self, arrays: dict | None, what: str = "receiving rank 0's weights"):
        """Rank 0's ``{name: array}`` on every rank (None on rank 0 gives None everywhere).

        Arrays of one dtype travel as one buffer: each rank adds zeros to rank 0's values, so
        they arrive bit for bit.
        """
        if not self.is_distributed:
            return arrays
        import mlx.core as mx

        layout = None
        if self.is_main and arrays is not None:
            layout = [[name, list(a.shape), str(a.dtype)] for name, a in arrays.items()]
        layout = self.from_main(layout, what)
        if layout is None:
            return None
        out = {}
        for dtype in sorted({d for _, _, d in layout}):
            names = [(n, s) for n, s, d in layout if d == dtype]
            if self.is_main:
                flat = mx.concatenate([arrays[n].reshape(-1) for n, _ in names])
            else:
                size = sum(int(_product(s)) for _, s in names)
                flat = mx.zeros((size,), dtype=getattr(mx, dtype.split(".")[-1]))
            with self.waiting(what):
                flat = self._all_sum(flat)
                mx.eval(flat)
            start = 0
            for name, shape in names:
                n = int(_product(shape))
                out[name] = flat[start : start + n].reshape(shape)
                start += n
        mx.eval(list(out.values()))
        return {name: out[name] for name, _, _ in layout}

    def agree(self, error: BaseException | None, what: str) -> None:
        """Every rank says whether it is fine; if one is not, every rank raises.

        Rank 0 raises its own error, or a ``RunEnded`` naming the first failing rank and its
        message; the other ranks raise the ``RunEnded`` too and leave the report to rank 0,
        so the run ends with one line.
        """
        if not self.is_distributed:
            if error is not None:
                raise error
            return
        message = None if error is None else _describe(error)
        reports = self.gather(message, what)
        failed = [(rank, text) for rank, text in enumerate(reports) if text is not None]
        if not failed:
            return
        if error is not None and self.is_main:
            raise error
        rank, text = failed[0]
        raise RunEnded(f"rank {rank} of {self.size} could not go on ({what}): {text}")

    def check_same(self, facts: dict, what: str, fix: str) -> None:
        """Refuse to go on unless every rank has the same ``facts`` (JSON values) as rank 0.

        Raises:
            ReasonerError: on rank 0, naming the first rank and fact that differ and ``fix``;
                ``RunEnded`` on the others.
        """
        if not self.is_distributed:
            return
        reports = self.gather(facts, what)
        for rank, theirs in enumerate(reports[1:], start=1):
            for key, value in reports[0].items():
                if theirs.get(key) != value:
                    message = (
                        f"rank {rank} has other {key} than rank 0 ({theirs.get(key)} vs "
                        f"{value}); {fix}"
                    )
                    raise ReasonerError(message) if self.is_main else RunEnded(message)

    def outlive_main(self) -> None:
        """On a rank other than 0, wait for rank 0 to end (its connection closes) before this
        process ends: ``mlx.launch`` stops every rank as soon as one exits with an error, and
        rank 0 must first finish writing and say why the run ended. Only where every rank
        knows the run is ending (``RunEnded``): rank 0 must make no further collective."""
        if not self.is_distributed or self.is_main:
            return
        import mlx.core as mx

        # Rank 0 never joins this sum: it returns (with an error) when rank 0's connection
        # closes, or the timer lets this process go anyway.
        timer = threading.Timer(self.timeout, os._exit, args=(0,))
        timer.daemon = True
        timer.start()
        with contextlib.suppress(Exception):
            mx.eval(self._all_sum(mx.zeros((1,))))
        timer.cancel()

    @contextlib.contextmanager
    def waiting(self, what: str) -> Iterator[None]:
        """Around a collective: a closed peer connection becomes ``PeerLost``; no answer
        within ``timeout`` seconds ends this process with one line on stderr (a blocked
        collective cannot be interrupted from Python)."""
        timer = threading.Timer(self.timeout, self._give_up, args=(what,))
        timer.daemon = True
        timer.start()
        try:
            yield
        except RuntimeError as exc:  # the ring backend: "connection to a peer was lost"
            raise PeerLost(
                f"lost contact with the other ranks while {what} ({exc}): a process of this "
                "run stopped or its machine is unreachable; its own error, if it printed one, "
                "is above"
            ) from exc
        finally:
            timer.cancel()

    def _give_up(self, what: str) -> None:
        who = "" if self.is_main else f"rank {self.rank}: "
        sys.stderr.write(
            f"{who}error: no answer from the other ranks for {self.timeout:g} s while {what}; "
            f"a rank hangs or the network is down (raise {TIMEOUT_VARIABLE} if steps are "
            "this uneven)\n"
        )
        sys.stderr.flush()
        os._exit(1)

    def _all_gather(self, x):
        import mlx.core as mx

        return mx.distributed.all_gather(x, group=self.group, stream=mx.cpu)

    def _all_sum(self, x):
        import mlx.core as mx

        return mx.distributed.all_sum(x, group=self.group, stream=mx.cpu)


# What the ranks of a run agree on before and while training: one set of options, inputs
# and starting adapters, a batch every rank has a share of, and the same number of ranks on
# resume.


def agreed(world: World, what: str, work: Callable):
    """``work()``'s result, once every rank of ``world`` has done its own ``work`` without an
    error; if any rank failed, every rank raises (``World.agree``), so one rank's bad input
    ends the run with one line from rank 0 instead of leaving the others waiting. In one
    process, just ``work()``."""
    try:
        result = work()
    except Exception as exc:  # re-raised as it is, here or by agree()
        world.agree(exc, what)
        raise
    world.agree(None, what)
    return result


def main_config(world: World, config):
    """Rank 0's options on every rank: one run, one configuration (a resumed run's is in
    rank 0's run folder, which the other machines do not have)."""
    if not world.is_distributed:
        return config
    values = world.from_main(config.to_dict(), "receiving rank 0's options")
    return type(config)(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def check_batch_split(config, world: World, items: str) -> None:
    """Every rank needs at least one of a step's ``--batch-size`` items."""
    if config.batch_size < world.size:
        raise ReasonerError(
            f"--batch-size {config.batch_size} cannot be shared by {world.size} processes: "
            f"each needs at least one {items} per step; use --batch-size {world.size} or more"
        )


def batch_split(config, world: World, items: str) -> str:
    """How a step's items are shared, for the run header."""
    sizes = [len(share) for share in world.shares(config.batch_size)]
    even = len(set(sizes)) == 1
    split = f"{sizes[0]} each" if even else f"{'+'.join(map(str, sizes))}, the step waits for"
    note = "" if even else " the ranks with more"
    return f"{world.size} ranks, {items}s per rank: {split}{note}"


def check_world_size(state: dict, world: World, run_dir: Path) -> None:
    """A run resumes on as many processes as it ran on: each rank samples its share of a
    step with its own seed, so another count would not continue the same run."""
    saved = state.get("world_size", 1)  # checkpoints from before distributed runs: 1
    if saved != world.size:
        how = "one process, without mlx.launch" if saved == 1 else f"mlx.launch -n {saved} …"
        raise ReasonerError(
            f"{run_dir} was trained on {saved} process{'es' if saved > 1 else ''} and this "
            f"resume has {world.size}; resume it on {saved} ({how}), or start a new run from "
            f"its adapters with --adapter-path {run_dir}"
        )


def check_same_inputs(
    world: World, examples, held_out, system_prompt: str, trainable: int | None = None
) -> None:
    """Refuse to go on unless every rank holds the same data and model shape as rank 0."""
    if not world.is_distributed:
        return

    def digest(items) -> str:
        text = json.dumps([[ex.question, ex.answer] for ex in items], ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    world.check_same(
        {
            "examples": f"{len(examples)}, digest {digest(examples)}",
            "held-out examples": f"{len(held_out)}, digest {digest(held_out)}",
            "system prompt": hashlib.sha256(system_prompt.encode()).hexdigest()[:16],
            "trainable parameters": trainable,
        },
        "comparing the ranks' inputs",
        "every machine needs the same dataset, system prompt, model and options",
    )


def start_from_main_adapters(world: World, model) -> None:
    """Give every rank rank 0's adapters: the same seed makes the same fresh ones, but
    adapters from ``--adapter-path`` are each machine's own copy."""
    import mlx.core as mx

    from .model import adapter_weights

    weights = world.broadcast_arrays(adapter_weights(model), "receiving rank 0's adapters")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.trainable_parameters())


def _product(shape: Sequence[int]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def _describe(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text if isinstance(error, ReasonerError) else f"{type(error).__name__}: {text}"


SINGLE_PROCESS = World()  # the default of every function that takes a world
_WORLD: World | None = None


def current_world() -> World:
    """The world of this process: several ranks under a launcher, else ``World()``.

    Under a launcher of more than one process, ``mx.distributed.init(strict=True)`` joins the
    group (once; later calls return it); otherwise mx.distributed is not touched.

    Raises:
        ReasonerError: the launcher's settings are there but the group cannot be formed.
    """
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    if launched_size() < 2:
        _WORLD = SINGLE_PROCESS
        return _WORLD
    import mlx.core as mx

    try:
        group = mx.distributed.init(strict=True)
    except RuntimeError as exc:
        raise ReasonerError(
            f"started by a distributed launcher but MLX could not join its group ({exc}); "
            "check the hostfile (mlx.launch --hostfile) and that every host is reachable"
        ) from exc
    _WORLD = World(group, group.rank(), group.size(), peer_timeout())
    return _WORLD
