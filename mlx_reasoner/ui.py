"""Training display: a live rich view in a terminal, one plain line per step otherwise.

This module owns everything the trainer shows the user: the output and error consoles,
``on_error`` for fatal errors, the slow-BLAS notice, and ``TrainDisplay`` for the run header,
per-step metrics, sample completions and log messages. The trainer only hands it dicts; it
never formats.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self needs Python 3.11

console = Console()
err_console = Console(stderr=True)

SPARK_CHARS = "▁▂▃▄▅▆▇█"
TREND_STEPS = 40
SAMPLE_CHAR_LIMIT = 1200
REFRESH_PER_SECOND = 4

# One row of the live metrics table: (label, value) cells.
MetricRow = list[tuple[str, str]]


def on_error(
    message: str, debug: bool = False, *, console: Console | None = None, exit_code: int = 1
) -> NoReturn:
    """Print ``error: <message>`` in red and exit with ``exit_code`` (1 by default).

    Args:
        message: One actionable line saying what went wrong and how to fix it.
        debug: Also print the traceback of the exception being handled, if any.
        console: Where to print; defaults to the module's ``err_console`` (stderr).

    Raises:
        SystemExit: Always, with ``exit_code``.
    """
    target = console if console is not None else _error_console()
    # soft_wrap keeps a long message on one logical line instead of hard-breaking it.
    target.print(Text(f"error: {message}", style="red"), soft_wrap=True)
    if debug and sys.exc_info()[0] is not None:
        target.print_exception()
    raise SystemExit(exit_code)


def show_slow_blas_notice(command: str, console: Console | None = None) -> bool:
    """Before ``command`` does any work, warn in a yellow panel on stderr that MLX runs on the
    slow reference BLAS, what that costs and the one command that fixes it
    (``blas.slow_blas_notice``); print nothing where the BLAS is fast.

    Returns:
        Whether a notice was printed.
    """
    from .backend import slow_blas_notice

    notice = slow_blas_notice(command)
    if notice is None:
        return False
    target = console if console is not None else _error_console()
    target.print(Panel(Text(notice), title="warning", border_style="yellow", style="bold"))
    return True


def format_seconds(seconds: float) -> str:
    """Format a duration compactly, keeping two units at most.

    >>> [format_seconds(s) for s in (0.04, 1.23, 42, 80, 3725, 90061)]
    ['0.0s', '1.2s', '42s', '1m20s', '1h02m', '1d01h']
    """
    if not math.isfinite(seconds):
        return "?"
    seconds = max(seconds, 0.0)
    if seconds < 9.95:
        return f"{seconds:.1f}s"
    if seconds < 59.5:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_metric(value: float | None, digits: int = 3) -> str:
    """Format a metric with ``digits`` significant digits; scientific only for tiny values.

    >>> [format_metric(v) for v in (0.012345, 0.0004, 1e-5, 2.0, -0.5, None)]
    ['0.0123', '0.0004', '1e-05', '2', '-0.5', '-']
    """
    if value is None:
        return "-"
    return f"{float(value):.{digits}g}"


def format_percent(fraction: float, decimals: int = 0) -> str:
    """Format a fraction in [0, 1] as a percentage, e.g. ``0.125 -> '12%'``."""
    return f"{100 * fraction:.{decimals}f}%"


def sparkline(values: Sequence[float]) -> str:
    """Draw values as a row of block characters scaled between their min and max.

    Non-finite values become gaps; a flat series draws at mid height.

    >>> sparkline([0, 1, 2, 3, 4, 5, 6, 7])
    '▁▂▃▄▅▆▇█'
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return " " * len(values)
    low, high = min(finite), max(finite)
    top = len(SPARK_CHARS) - 1
    chars = []
    for value in values:
        if not math.isfinite(value):
            chars.append(" ")
        elif high == low:
            chars.append(SPARK_CHARS[top // 2])
        else:
            chars.append(SPARK_CHARS[round((value - low) / (high - low) * top)])
    return "".join(chars)


def shorten(text: str, limit: int = SAMPLE_CHAR_LIMIT) -> tuple[str, bool]:
    """Cut ``text`` to about ``limit`` characters, keeping its head and tail.

    The tail is kept because a reasoning completion puts its final answer at the end.

    Returns:
        The shortened text (with an omission marker in the middle) and whether it was cut.
    """
    if len(text) <= limit:
        return text, False
    head = limit * 2 // 3
    tail = limit - head
    omitted = len(text) - head - tail
    return f"{text[:head]}\n[… {omitted:,} characters omitted …]\n{text[-tail:]}", True


def metric_rows(metrics: Mapping[str, Any]) -> list[MetricRow]:
    """Turn a step's metrics into labelled, formatted cells grouped into display rows.

    Only keys that are present (and numeric) produce cells; unknown keys are ignored
    except ``reward/<name>``, which each get a cell labelled ``<name>``.

    Returns:
        Rows of ``(label, value)`` pairs: optimisation, reward, reward components,
        rollout, timing. Empty rows are dropped.
    """

    def number(key: str) -> float | None:
        return _as_float(metrics.get(key))

    optim: MetricRow = []
    if (loss := number("loss")) is not None:
        optim.append(("loss", format_metric(loss)))
    if (kl := number("kl")) is not None:
        optim.append(("kl", format_metric(kl, 2)))
    if (clip := number("clip_fraction")) is not None:
        optim.append(("clip", format_percent(clip, 1)))
    if (grad_norm := number("grad_norm")) is not None:
        optim.append(("grad", format_metric(grad_norm)))
    if (learning_rate := number("learning_rate")) is not None:
        optim.append(("lr", format_metric(learning_rate, 2)))

    reward: MetricRow = []
    reward_mean, reward_std = number("reward_mean"), number("reward_std")
    if reward_mean is not None or reward_std is not None:
        text = "?" if reward_mean is None else f"{reward_mean:.3f}"
        if reward_std is not None:
            text += f" ± {reward_std:.3f}"
        reward.append(("reward", text))
    if (zero_std := number("frac_reward_zero_std")) is not None:
        reward.append(("zero-std", format_percent(zero_std)))
    drawn, kept = number("groups_drawn"), number("groups_kept")
    if drawn is not None and kept is not None:  # --dynamic-sampling
        reward.append(("groups kept", f"{kept:.0f}/{drawn:.0f}"))

    components: MetricRow = []
    for key in metrics:
        if key.startswith("reward/") and (value := number(key)) is not None:
            components.append((key.removeprefix("reward/"), f"{value:.3f}"))

    # What the sampler drew from: the policy's entropy, and how far the decode's log-probs
    # are from the training pass's at the same tokens.
    sampling: MetricRow = []
    if (entropy := number("entropy")) is not None:
        sampling.append(("entropy", format_metric(entropy)))
    if (gap := number("mismatch_abs")) is not None:
        sampling.append(("decode gap", format_metric(gap, 2)))
    if (gap_kl := number("mismatch_kl")) is not None:
        sampling.append(("decode kl", format_metric(gap_kl, 2)))

    rollout: MetricRow = []
    length_mean, length_max = number("completion_tokens_mean"), number("completion_tokens_max")
    truncated = number("truncated_fraction")
    if length_mean is not None or length_max is not None:
        text = "/".join(f"{v:.0f}" for v in (length_mean, length_max) if v is not None)
        if truncated is not None:
            text += f" (trunc {format_percent(truncated)})"
        rollout.append(("len", text))
    elif truncated is not None:
        rollout.append(("trunc", format_percent(truncated)))
    if (tokens_per_s := number("tokens_per_s")) is not None:
        rollout.append(("rollout", f"{tokens_per_s:.0f} tok/s"))
    if (train_tokens_per_s := number("train_tokens_per_s")) is not None:
        rollout.append(("throughput", f"{train_tokens_per_s:.0f} tok/s"))
    if (memory := number("peak_memory_gb")) is not None:
        rollout.append(("mem", f"{memory:.2f} GB"))

    timing: MetricRow = []
    for key, label in (
        ("time_step", "time"),
        ("time_generate", "gen"),
        ("time_score", "score"),
        ("time_train", "train"),
    ):
        if (seconds := number(key)) is not None:
            timing.append((label, format_seconds(seconds)))

    evaluation: MetricRow = []
    for key, label, percent in (
        ("eval/accuracy", "eval accuracy", True),
        ("eval/strict_format_rate", "strict format", True),
        ("eval/mean_completion_tokens", "eval len", False),
        ("eval/step", "at step", False),
    ):
        if (value := number(key)) is not None:
            evaluation.append((label, format_percent(value, 1) if percent else f"{value:.0f}"))

    # Many components would make one very wide row; wrap them a few to a row.
    component_rows = [components[i : i + 5] for i in range(0, len(components), 5)]
    rows = [optim, reward, *component_rows, sampling, rollout, timing, evaluation]
    return [row for row in rows if row]


class TrainDisplay:
    """What the user sees while training runs.

    In a terminal it is a rich ``Live`` view (progress bar with phase, metrics table,
    reward trend) with samples and messages printed above it. Otherwise (CI, ``| tee``)
    it prints one plain line per step and plain sample blocks, with no ANSI codes.

    Use it as a context manager around the training loop::

        with TrainDisplay(total_steps, console=console) as display:
            display.header({"model": name, "run dir": str(run_dir)})
            for step in ...:
                display.phase("generating")
                ...
                display.update(metrics)
    """

    def __init__(
        self,
        total_steps: int,
        *,
        title: str = "mlx-reasoner train",
        console: Console | None = None,
        live: bool | None = None,
    ) -> None:
        """Create the display.

        Args:
            total_steps: Number of the last training step (steps are 1-based).
            title: Shown before the progress bar and over the header.
            console: Output console; defaults to the module's ``console``.
            live: Force the live view on or off; ``None`` picks it when the console is
                an interactive terminal.
        """
        if total_steps < 0:
            raise ValueError(f"total_steps must be >= 0, got {total_steps}")
        self.total_steps = total_steps
        self.title = title
        self.console = console if console is not None else _output_console()
        if live is None:
            live = self.console.is_terminal and not self.console.is_dumb_terminal
        self.is_live = live

        self._step = 0
        self._metrics: dict[str, Any] = {}
        self._last_eval: dict[str, Any] = {}
        self._reward_trend: deque[float] = deque(maxlen=TREND_STEPS)
        # ETA comes from the average step time measured here, so a resumed run's
        # earlier steps (not timed by this process) do not skew it.
        self._timed_seconds = 0.0
        self._timed_steps = 0
        self._last_update: float | None = None

        self._live: Live | None = None
        self._progress = Progress(
            TextColumn("{task.description}", style="bold", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("eta {task.fields[eta]}", style="progress.remaining", markup=False),
            SpinnerColumn(),
            TextColumn("{task.fields[phase]}", style="cyan", markup=False),
            console=self.console,
            auto_refresh=False,
        )
        self._task = self._progress.add_task(
            title, total=total_steps, start=False, eta="?", phase="starting"
        )

    def __enter__(self) -> Self:
        self._progress.start_task(self._task)
        if self.is_live:
            self._live = Live(
                self._render(),
                console=self.console,
                refresh_per_second=REFRESH_PER_SECOND,
                transient=False,
            )
            self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._live is not None:
            phase = "done" if exc_type is None else "stopped"
            self._progress.update(self._task, phase=phase)
            # Stopping a non-transient Live leaves its last frame on screen.
            self._live.update(self._render())
            self._live.stop()
            self._live = None

    def header(self, info: Mapping[str, Any]) -> None:
        """Print the run summary (model, dataset, run dir, ...) as a two-column table."""
        if not self.is_live:
            width = max((len(str(key)) for key in info), default=0)
            lines = [self.title, *(f"{key!s:<{width}}  {value}" for key, value in info.items())]
            self._print_plain("\n".join(lines))
            return
        table = Table.grid(padding=(0, 2))
        table.add_column(style="dim")
        table.add_column()
        for key, value in info.items():
            table.add_row(Text(str(key)), Text(str(value)))
        self.console.print(Text(self.title, style="bold"))
        self.console.print(table)

    def phase(self, name: str) -> None:
        """Show what the current step is doing ("generating", "training", ...); live only."""
        self._progress.update(self._task, phase=name)
        self._refresh()

    def update(self, metrics: Mapping[str, Any]) -> None:
        """Record a finished step and show its metrics.

        Args:
            metrics: The step's metrics (see ``metric_rows``); every key is optional.
                ``step`` is 1-based; if missing, the previous step plus one is assumed.
        """
        step_value = _as_float(metrics.get("step"))
        step = self._step + 1 if step_value is None else int(step_value)
        self._track_time(step, _as_float(metrics.get("time_step")))
        self._step = step
        if any(key.startswith("eval/") for key in metrics):
            self._last_eval = {k: v for k, v in metrics.items() if k.startswith("eval/")}
            self._last_eval["eval/step"] = step
        # The live view keeps showing the latest evaluation between evaluations.
        self._metrics = {**self._last_eval, **metrics} if self.is_live else dict(metrics)
        if (reward_mean := _as_float(metrics.get("reward_mean"))) is not None:
            self._reward_trend.append(reward_mean)

        eta = self._eta_seconds()
        eta_text = "?" if eta is None else format_seconds(eta)
        self._progress.update(self._task, completed=step, eta=eta_text)
        if self.is_live:
            self._refresh()
            return
        cells = [f"{label} {value}" for row in metric_rows(metrics) for label, value in row]
        line = " | ".join([f"step {step}/{self.total_steps}", *cells])
        if eta is not None:
            line += f" | eta {eta_text}"
        self._print_plain(line)

    def sample(self, sample: Mapping[str, Any]) -> None:
        """Show one completion from a group, its gold answer and the group's rewards.

        Args:
            sample: ``step``, ``question``, ``answer`` (gold), ``completion``, ``rewards``
                (the group's total rewards) and ``index`` (0-based position of
                ``completion`` in ``rewards``); every key is optional.
        """
        step = sample.get("step", self._step)
        question = str(sample.get("question", ""))
        answer = str(sample.get("answer", ""))
        completion = str(sample.get("completion", ""))
        rewards = list(sample.get("rewards") or [])
        index = sample.get("index")

        if not self.is_live:
            # Logs keep the whole completion: they are read later, not scrolled past.
            marked = [
                f"{_format_reward(r)}{'*' if i == index else ''}" for i, r in enumerate(rewards)
            ]
            note = "  (* = the response above)" if index is not None and rewards else ""
            separator = f"{'=' * 20} sample (step {step}) {'=' * 20}"
            self._print_plain(
                f"{separator}\n"
                f"Question: {question}\n"
                f"Gold Answer: {answer}\n"
                f"Sample Response:\n{completion}\n"
                f"Sample Rewards: [{', '.join(marked)}]{note}\n"
                f"{'=' * len(separator)}"
            )
            return

        shown, was_cut = shorten(completion)
        rewards_text = Text("rewards ", style="bold")
        for i, reward in enumerate(rewards):
            if i:
                rewards_text.append("  ")
            style = "bold reverse green" if i == index else "dim"
            rewards_text.append(_format_reward(reward), style=style)
        body = [
            Text.assemble(("question ", "bold"), question),
            Text.assemble(("gold ", "bold"), (answer, "green")),
            Text("completion", style="bold"),
            Text(shown),
        ]
        if was_cut:
            body.append(Text(f"(truncated from {len(completion):,} characters)", style="dim"))
        body.append(rewards_text)
        title = f"sample · step {step}"
        if index is not None and rewards:
            title += f" · completion {int(index) + 1} of {len(rewards)}"
        self.console.print(
            Panel(Group(*body), title=title, title_align="left", border_style="blue")
        )

    def message(self, text: str) -> None:
        """Print a log line (e.g. "saved adapters to runs/x") above the live view."""
        if self.is_live:
            self.console.print(Text(text))
        else:
            self._print_plain(text)

    def _print_plain(self, text: str) -> None:
        # ``out`` neither wraps nor parses markup, so model text prints verbatim on one line.
        self.console.out(text, highlight=False)

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=True)

    def _track_time(self, step: int, time_step: float | None) -> None:
        now = time.monotonic()
        if self._last_update is None:
            # Nothing to measure against yet: trust the trainer's own step time.
            if time_step is not None and time_step > 0:
                self._timed_seconds += time_step
                self._timed_steps += 1
        elif step > self._step:
            # Wall time between updates also counts saves and evaluation, like the real wait.
            self._timed_seconds += now - self._last_update
            self._timed_steps += step - self._step
        self._last_update = now

    def _eta_seconds(self) -> float | None:
        if self._timed_steps == 0:
            return None
        remaining = max(self.total_steps - self._step, 0)
        return self._timed_seconds / self._timed_steps * remaining

    def _render(self) -> RenderableType:
        """Build the live view; the progress bar re-renders its clock on every refresh."""
        rows = metric_rows(self._metrics)
        if not rows:
            return Group(self._progress, Text("waiting for the first step…", style="dim"))
        table = Table.grid(padding=(0, 3))
        for row in rows:
            table.add_row(*(Text.assemble((f"{label} ", "dim"), value) for label, value in row))
        parts: list[RenderableType] = [self._progress, table]
        if self._reward_trend:
            trend = list(self._reward_trend)
            parts.append(
                Text.assemble(
                    ("reward trend ", "dim"),
                    (sparkline(trend), "green"),
                    (f"  min {min(trend):.3f}  max {max(trend):.3f}", "dim"),
                    (f"  (last {len(trend)} steps)", "dim"),
                )
            )
        return Group(*parts)


class QuietDisplay:
    """The display of a rank other than 0 in a distributed run: rank 0 shows the whole run,
    so this one shows nothing."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def header(self, info: Mapping[str, Any]) -> None:
        """Nothing: rank 0 prints the header."""

    def phase(self, name: str) -> None:
        """Nothing: rank 0 shows the phase."""

    def update(self, metrics: Mapping[str, Any]) -> None:
        """Nothing: rank 0 shows the step's figures (the whole run's)."""

    def sample(self, sample: Mapping[str, Any]) -> None:
        """Nothing: rank 0 shows the samples."""

    def message(self, text: str) -> None:
        """Nothing: rank 0 says what matters to the run."""


def _as_float(value: Any) -> float | None:
    """Read a metric as a float (Python, NumPy or MLX scalar); ``None`` if it is not a number."""
    if value is None or isinstance(value, (str, bytes, bool)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _format_reward(value: Any) -> str:
    number = _as_float(value)
    return str(value) if number is None else f"{number:.3f}"


def _output_console() -> Console:
    # Read at call time so tests (or the CLI) can swap the module-level console.
    return console


def _error_console() -> Console:
    return err_console


def eval_table(summaries: Mapping[str, Mapping[str, Any]]) -> Table:
    """Evaluation results, one column per evaluated model (e.g. base vs adapter)."""
    table = Table(title="evaluation", show_lines=False)
    table.add_column("metric")
    for name in summaries:
        table.add_column(name, justify="right")
    first = next(iter(summaries.values()))
    rows = [
        ("questions", "n", lambda v: f"{v:.0f}"),
        ("accuracy", "accuracy", lambda v: format_percent(v, 1)),
        *[
            (key, key, lambda v: format_percent(v, 1))
            for key in first
            if key.startswith(("pass@", "maj@"))
        ],
        ("strict format", "strict_format_rate", lambda v: format_percent(v, 1)),
        ("soft format", "soft_format_rate", lambda v: format_percent(v, 1)),
        ("mean length (tokens)", "mean_completion_tokens", lambda v: f"{v:.1f}"),
        ("cut at length limit", "truncated_rate", lambda v: format_percent(v, 1)),
    ]
    for label, key, fmt in rows:
        table.add_row(label, *[fmt(s[key]) if key in s else "-" for s in summaries.values()])
    return table


def _reasoning_part(completion: str) -> str:
    """The text inside <reasoning>…</reasoning>, or the whole completion without tags."""
    start, end = completion.find("<reasoning>"), completion.find("</reasoning>")
    if start != -1 and end > start:
        return completion[start + len("<reasoning>") : end].strip()
    return completion.strip()


def strawberry_view(results: Mapping[str, Sequence[Mapping[str, Any]]]) -> Group:
    """Each question with every model's reasoning, extracted answer and verdict side by side."""
    names = list(results)
    first = results[names[0]]
    blocks: list[RenderableType] = []
    for i, record in enumerate(first):
        table = Table.grid(expand=True, padding=(0, 1))
        for _ in names:
            table.add_column(ratio=1)
        panels = []
        for name in names:
            r = results[name][i]
            mark = Text("✓", style="bold green") if r["correct"] else Text("✗", style="bold red")
            reasoning, _ = shorten(_reasoning_part(r["completion"]), 600)
            body = Group(
                Text(reasoning or "(no reasoning)", style="dim"),
                Text.assemble(("answer: ", "bold"), (r["extracted"] or "(none)"), "  ", mark),
            )
            panels.append(Panel(body, title=name, border_style="green" if r["correct"] else "red"))
        table.add_row(*panels)
        title = Text.assemble(
            (f"Q{i + 1}. ", "bold"),
            record["question"],
            "  ",
            (f"(gold: {record['answer']})", "cyan"),
        )
        blocks.extend([title, table])
    return Group(*blocks)


def reply_view(replies: Mapping[str, str]) -> Table:
    """Chat replies side by side, one column per model, each as a reasoning panel over an answer
    panel; a reply still streaming shows what has come so far."""
    from .answers import split_completion

    table = Table.grid(expand=True, padding=(0, 1))
    for _ in replies:
        table.add_column(ratio=1)
    columns = []
    for name, text in replies.items():
        reasoning, answer = split_completion(text)
        columns.append(
            Group(
                Panel(
                    Text(reasoning or "…", style="dim"),
                    title=f"{name} · reasoning",
                    title_align="left",
                    border_style="blue",
                ),
                Panel(
                    Text(answer or "…", style="bold"),
                    title=f"{name} · answer",
                    title_align="left",
                    border_style="green",
                ),
            )
        )
    table.add_row(*columns)
    return table


def reply_text(replies: Mapping[str, str], headers: bool = False) -> str:
    """Chat replies as plain text for scripts and logs: ``reasoning:`` and ``answer:`` blocks,
    under a ``== name ==`` line each when ``headers``."""
    from .answers import split_completion

    blocks = []
    for name, text in replies.items():
        reasoning, answer = split_completion(text)
        block = f"reasoning:\n{reasoning or '(none)'}\nanswer:\n{answer or '(none)'}"
        blocks.append(f"== {name} ==\n{block}" if headers else block)
    return "\n".join(blocks)
