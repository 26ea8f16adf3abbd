"""Report stage: a run's story as one self-contained HTML page, figures embedded.

It reads what a run folder holds (``config.json``, ``metrics.jsonl``, ``rollouts.jsonl``) as it
is on disk, so it works on a run still going, and skips a line being written. Figures are drawn
with matplotlib (PNG, no pyplot state) and embedded as data URIs: the page needs no network and
opens from disk. The same folder gives the same bytes. No mlx here: ``report`` starts fast.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoints import atomic_write_bytes, atomic_write_text
from .errors import ReasonerError
from .ui import format_seconds

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
ROLLOUTS_FILE = "rollouts.jsonl"
REPORT_FILE = "report.html"
DEMO_SUMMARY = "summary.json"
MATPLOTLIB_MISSING = "the report needs matplotlib: pip install 'mlx-reasoner[report]'"

# Steps whose mean the headline figures show (the last step alone is noisy).
RECENT_STEPS = 10


@dataclass(frozen=True)
class FigureSpec:
    """One figure: the metrics it draws against the step, and how.

    ``prefix`` adds every metric whose key starts with it (``reward/``), labelled by the rest;
    ``band`` draws ± that metric around the first series; ``stacked`` stacks the series.
    """

    name: str
    title: str
    series: tuple[tuple[str, str], ...] = ()
    ylabel: str = ""
    caption: str = ""
    prefix: str = ""
    band: str = ""
    percent: bool = False
    stacked: bool = False
    smoothed: bool = True  # False for what is exact already (the schedule, the peak memory)
    # The y axis starts at 0, its top set by the data (amounts whose small wobbles mislead, and
    # shares that stay small); other shares span 0-100%.
    from_zero: bool = False


# In story order. A figure is drawn when the run logged any of its metrics, so a GRPO run, an
# SFT run and a run without held-out evaluation each get their own set.
FIGURES = (
    FigureSpec(
        "reward",
        "Total reward",
        (("reward_mean", "mean"),),
        caption="Weighted sum of the rewards, mean over the step's completions; the band is "
        "± one standard deviation.",
        band="reward_std",
    ),
    FigureSpec(
        "reward_components",
        "Reward components",
        caption="Each reward's mean over the step's completions.",
        prefix="reward/",
    ),
    FigureSpec(
        "eval",
        "Held-out accuracy and format",
        (
            ("eval/accuracy", "accuracy"),
            ("eval/strict_format_rate", "strict format"),
            ("eval/soft_format_rate", "soft format"),
        ),
        caption="Greedy answers to held-out questions (--eval-every).",
        percent=True,
    ),
    FigureSpec("loss", "Loss", (("loss", "loss"),)),
    FigureSpec(
        "completion_length",
        "Completion length",
        (("completion_tokens_mean", "mean"), ("completion_tokens_max", "max")),
        ylabel="tokens",
    ),
    FigureSpec(
        "truncated",
        "Completions cut at the length limit",
        (("truncated_fraction", "share cut"),),
        caption="Their rewards judge answers the model was not allowed to finish.",
        percent=True,
    ),
    FigureSpec(
        "zero_spread",
        "Groups with no reward spread",
        (("frac_reward_zero_std", "share of groups"),),
        caption="A group whose completions all scored the same teaches nothing.",
        percent=True,
    ),
    FigureSpec("kl", "KL to the reference policy", (("kl", "KL"),)),
    FigureSpec(
        "clip_fraction",
        "Clipped tokens",
        (("clip_fraction", "share clipped"),),
        caption="Tokens whose policy ratio left [1 - epsilon, 1 + epsilon-high].",
        percent=True,
        from_zero=True,
    ),
    FigureSpec("grad_norm", "Gradient norm (before clipping)", (("grad_norm", "norm"),)),
    FigureSpec(
        "entropy",
        "Entropy of the sampled tokens",
        (("entropy", "mean surprisal"),),
        ylabel="nats",
    ),
    FigureSpec("learning_rate", "Learning rate", (("learning_rate", "rate"),), smoothed=False),
    FigureSpec(
        "throughput",
        "Throughput",
        (("tokens_per_s", "rollout"), ("train_tokens_per_s", "training")),
        ylabel="tokens/s",
        from_zero=True,
    ),
    FigureSpec(
        "step_time",
        "Step time",
        (("time_generate", "generate"), ("time_score", "score"), ("time_train", "train")),
        ylabel="seconds",
        caption="Stacked; the dots are each step's total (held-out evaluation not included).",
        stacked=True,
    ),
    FigureSpec(
        "peak_memory",
        "Peak memory",
        (("peak_memory_gb", "peak"),),
        ylabel="GB",
        smoothed=False,
        from_zero=True,
    ),
)


# ---------------------------------------------------------------------------------------------
# Reading a run folder


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The records of a JSON-lines file, and how many lines could not be read.

    A run still going may be writing its last line; such a line is left out, not an error.
    A missing file has no records.
    """
    records, unreadable = [], 0
    for record in _jsonl_lines(path):
        if record is None:
            unreadable += 1
        else:
            records.append(record)
    return records, unreadable


def _jsonl_lines(path: Path) -> Iterator[dict | None]:
    """Each line's record, or None for a line that is not a JSON object."""
    if not path.is_file():
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            yield record if isinstance(record, dict) else None


def first_and_last_steps(path: Path) -> tuple[list[dict], list[dict]]:
    """The rollout records of the first and of the last step in ``rollouts.jsonl``, streamed
    (the file holds every completion of the run and may be large)."""
    first: list[dict] = []
    last: list[dict] = []
    for record in _jsonl_lines(path):
        if record is None or "step" not in record:
            continue
        if not first or record["step"] == first[0]["step"]:
            first.append(record)
        if last and record["step"] != last[0]["step"]:
            last = []
        last.append(record)
    return first, last


@dataclass
class RunLogs:
    """What a run folder holds, as read now."""

    folder: Path
    config: dict  # the run's config.json; {} when the folder has none (a model folder's)
    metrics: list[dict]
    early: list[dict] = field(default_factory=list)  # rollouts of the first step
    late: list[dict] = field(default_factory=list)  # rollouts of the last step
    unreadable: int = 0  # metrics lines left out (a line being written)


def read_run(folder: Path) -> RunLogs:
    """Read a run folder (``train``, ``sft``, or the demo's warm start) as it is now."""
    config = read_json(folder / CONFIG_FILE)
    if "command" not in config:  # a model folder's config.json (the demo's warm start)
        config = {}
    metrics, unreadable = read_jsonl(folder / METRICS_FILE)
    metrics = [m for m in metrics if isinstance(m.get("step"), (int, float))]
    early, late = first_and_last_steps(folder / ROLLOUTS_FILE)
    return RunLogs(folder, config, metrics, early, late, unreadable)


def read_json(path: Path) -> dict:
    """A JSON object file's contents; {} where it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def check_run_folder(folder: Path) -> None:
    """Refuse what is not a run folder, in one line that says what to pass."""
    if not folder.is_dir():
        raise ReasonerError(f"run folder not found: {folder}")
    if not (folder / METRICS_FILE).is_file() and not _is_demo(folder):
        raise ReasonerError(
            f"{folder} has no {METRICS_FILE}: not a run folder; pass the --run-dir of a "
            "train or sft run (runs/<name>) or the demo's folder"
        )


def _is_demo(folder: Path) -> bool:
    return (folder / DEMO_SUMMARY).is_file() and (folder / "grpo").is_dir()


# ---------------------------------------------------------------------------------------------
# Figures


def metric_series(metrics: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of the steps where ``key`` holds a finite number."""
    steps, values = [], []
    for m in metrics:
        value = m.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(float(m["step"]))
            values.append(float(value))
    return np.array(steps), np.array(values)


def smooth(values: np.ndarray) -> np.ndarray:
    """A centred moving average, so the line does not lag the points: no smoothing under 20
    points, a window of 5 steps at 40, of 15 at 150, at most 25.

    >>> smooth(np.arange(40.0))[[0, 1, 2, 20, 39]].tolist()
    [1.0, 1.5, 2.0, 20.0, 38.0]
    """
    half = min(len(values) // 20, 12)  # the window is 2 * half + 1 steps, fewer at the ends
    if half == 0:
        return values.copy()
    sums = np.concatenate([[0.0], np.cumsum(values)])
    index = np.arange(len(values))
    low, high = np.maximum(index - half, 0), np.minimum(index + half + 1, len(values))
    return (sums[high] - sums[low]) / (high - low)


def figure_series(spec: FigureSpec, metrics: Sequence[dict]) -> list[tuple[str, str]]:
    """The ``(metric key, label)`` pairs of ``spec`` that the run logged."""
    pairs = list(spec.series)
    if spec.prefix:
        keys = dict.fromkeys(k for m in metrics for k in m if k.startswith(spec.prefix))
        pairs += [(k, k.removeprefix(spec.prefix)) for k in keys]
    return [(k, label) for k, label in pairs if len(metric_series(metrics, k)[0])]


# A fixed look, whatever the user's matplotlibrc says, so that the bytes are the same everywhere.
STYLE = {
    "figure.figsize": (6.4, 3.4),
    "figure.dpi": 160,  # 1024 x 544 pixels: sharp on a high-density screen
    "font.size": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "svg.hashsalt": "mlx-reasoner",
    "path.simplify": True,
}


MARGINS = {"left": 0.11, "right": 0.98, "bottom": 0.14, "top": 0.9}


@contextlib.contextmanager
def report_style():
    """matplotlib's defaults plus ``STYLE``, whatever the user's matplotlibrc says."""
    import matplotlib
    from matplotlib import style

    with style.context("default"), matplotlib.rc_context(STYLE):
        yield


def draw_figure(spec: FigureSpec, metrics: Sequence[dict]) -> bytes | None:
    """The figure as PNG bytes, or None when the run logged none of its metrics; call it
    inside ``report_style()``."""
    series = figure_series(spec, metrics)
    if not series:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    figure = Figure()
    figure.subplots_adjust(**MARGINS)  # fixed: a layout engine would double the time
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if spec.stacked:
        _draw_stacked(axes, series, metrics)
    else:
        _draw_lines(axes, spec, series, metrics)
    axes.set_title(spec.title, loc="left", fontweight="bold")
    axes.set_xlabel("step")
    axes.set_ylabel(spec.ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    if spec.percent:
        axes.yaxis.set_major_formatter(PercentFormatter(1.0))
    if spec.percent and not spec.from_zero:
        axes.set_ylim(-0.03, 1.03)  # a share is read against the whole
    if spec.from_zero:
        top = max(axes.get_ylim()[1], 0.0)
        axes.set_ylim(-0.02 * top, top)  # a line at zero stays visible above the axis
    if len(series) > 1 or spec.stacked:
        axes.legend(loc="best")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _colors() -> list[str]:
    import matplotlib

    return list(matplotlib.colormaps["tab10"].colors)


def _draw_lines(axes, spec: FigureSpec, series, metrics) -> None:
    """Raw points faint, a smoothed line over them; sparse series (evaluations) as markers."""
    for (key, label), color in zip(series, _colors() * 3):
        steps, values = metric_series(metrics, key)
        if len(values) < 10 or not spec.smoothed:
            marker = "o-" if len(values) < 10 else "-"
            axes.plot(steps, values, marker, color=color, label=label, markersize=4)
            continue
        axes.plot(steps, values, ".", color=color, alpha=0.3, markersize=3)
        smoothed = smooth(values)
        axes.plot(steps, smoothed, "-", color=color, label=label, linewidth=1.8)
        if spec.band and key == series[0][0]:
            band_steps, spread = metric_series(metrics, spec.band)
            if np.array_equal(band_steps, steps):
                spread = smooth(spread)
                axes.fill_between(
                    steps, smoothed - spread, smoothed + spread, color=color, alpha=0.15
                )


def _draw_stacked(axes, series, metrics) -> None:
    """Smoothed parts stacked, each step's raw total as dots."""
    steps = np.array([float(m["step"]) for m in metrics])
    parts = []
    for key, _ in series:
        known, values = metric_series(metrics, key)
        lookup = dict(zip(known.tolist(), values.tolist()))
        parts.append(np.array([lookup.get(s, 0.0) for s in steps.tolist()]))
    colors = _colors()
    axes.stackplot(
        steps,
        *[smooth(p) for p in parts],
        labels=[label for _, label in series],
        colors=colors[: len(parts)],
        alpha=0.75,
    )
    axes.plot(steps, np.sum(parts, axis=0), ".", color="black", alpha=0.4, markersize=3)


def draw_figures(metrics: Sequence[dict], prefix: str = "") -> dict[str, tuple[FigureSpec, bytes]]:
    """Every figure the run's metrics allow, by name (``prefix`` + the spec's name)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ReasonerError(MATPLOTLIB_MISSING) from None
    drawn = {}
    with report_style():  # once: entering it costs as much as drawing a small figure
        for spec in FIGURES:
            png = draw_figure(spec, metrics)
            if png is not None:
                drawn[prefix + spec.name] = (spec, png)
    return drawn


# ---------------------------------------------------------------------------------------------
# Headline figures (also the model card's)


def recent_mean(metrics: Sequence[dict], key: str, last: int = RECENT_STEPS) -> float | None:
    """The mean of ``key`` over the last ``last`` steps that logged it, or None."""
    _, values = metric_series(metrics, key)
    return float(np.mean(values[-last:])) if len(values) else None


def last_value(metrics: Sequence[dict], key: str) -> tuple[float, int] | None:
    """``(value, step)`` of the last step that logged ``key``, or None."""
    steps, values = metric_series(metrics, key)
    return (float(values[-1]), int(steps[-1])) if len(values) else None


def headline(metrics: Sequence[dict]) -> dict[str, str]:
    """The run's final figures in words: label -> value (only those the run logged)."""
    out = {}
    window = f"mean of the last {min(RECENT_STEPS, len(metrics))} steps"
    if (reward := recent_mean(metrics, "reward_mean")) is not None:
        out["reward"] = f"{reward:.3f} ({window})"
    for key, label in (
        ("eval/accuracy", "held-out accuracy"),
        ("eval/strict_format_rate", "held-out strict format"),
    ):
        if (found := last_value(metrics, key)) is not None:
            out[label] = f"{found[0]:.1%} (step {found[1]})"
    if (loss := recent_mean(metrics, "loss")) is not None and "reward" not in out:
        out["loss"] = f"{loss:.4g} ({window})"
    if (length := recent_mean(metrics, "completion_tokens_mean")) is not None:
        out["completion length"] = f"{length:.0f} tokens ({window})"
    if (cut := recent_mean(metrics, "truncated_fraction")) is not None:
        out["cut at the limit"] = f"{cut:.0%} ({window})"
    if (seconds := sum(metric_series(metrics, "time_step")[1])) > 0:
        out["training time"] = format_seconds(seconds)
    _, memory = metric_series(metrics, "peak_memory_gb")
    if len(memory):
        peak = memory.max()
        out["peak memory"] = f"{peak:.2f} GB" if peak >= 0.1 else f"{peak * 1000:.1f} MB"
    return out


# ---------------------------------------------------------------------------------------------
# The page

CSS = """
body { font-family: -apple-system, system-ui, "Segoe UI", Roboto, sans-serif; margin: 0;
       color: #1d1d1f; background: #f5f5f7; }
main { max-width: 1360px; margin: 0 auto; padding: 24px; }
h1 { font-size: 1.6em; margin: 0 0 4px; } h2 { margin: 32px 0 12px; font-size: 1.25em; }
.sub { color: #6e6e73; margin-bottom: 16px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { background: #fff; border-radius: 10px; padding: 10px 14px; min-width: 150px;
        box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.card .label { color: #6e6e73; font-size: .8em; } .card .value { font-size: 1.15em; }
.note { background: #fff8e1; border-left: 4px solid #f5b800; padding: 8px 12px; margin: 12px 0; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 16px; }
figure { background: #fff; margin: 0; padding: 10px; border-radius: 10px;
         box-shadow: 0 1px 2px rgba(0,0,0,.08); }
figure img { width: 100%; height: auto; display: block; }
figcaption { color: #6e6e73; font-size: .85em; margin-top: 4px; }
table { border-collapse: collapse; background: #fff; }
td, th { border-bottom: 1px solid #e5e5ea; padding: 4px 10px; text-align: left;
         vertical-align: top; font-size: .9em; }
.samples { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; margin-bottom: 20px; }
.sample { background: #fff; border-radius: 10px; padding: 10px 14px;
          box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.sample.best { border-top: 4px solid #34c759; } .sample.worst { border-top: 4px solid #ff3b30; }
.question { margin: 8px 0; }
details { margin-top: 12px; } summary { cursor: pointer; color: #0066cc; }
pre { white-space: pre-wrap; word-break: break-word; background: #f5f5f7; padding: 8px;
      border-radius: 6px; max-height: 320px; overflow: auto; font-size: .85em; margin: 6px 0; }
"""

# Control characters a random model may emit; HTML has no place for them.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def esc(value) -> str:
    """Text made safe for the page."""
    return html.escape(_CONTROL.sub("\ufffd", str(value)))


@dataclass
class Report:
    """The page and the PNG of each figure in it, by name."""

    html: str
    images: dict[str, bytes]


def build_report(folder: Path) -> Report:
    """The report of a run folder, or of the demo's folder (its summary, warm start and GRPO).

    Raises:
        ReasonerError: the folder is missing or holds no run; matplotlib is missing.
    """
    folder = Path(folder)
    check_run_folder(folder)
    if _is_demo(folder) and not (folder / METRICS_FILE).is_file():
        return _demo_report(folder)
    logs = read_run(folder)
    body, images = run_sections(logs)
    title = f"mlx-reasoner report: {folder.name or folder.resolve().name}"
    return Report(_page(title, _run_subtitle(logs), body), images)


def _demo_report(folder: Path) -> Report:
    summary = read_json(folder / DEMO_SUMMARY)
    body, images = [_demo_summary(summary)], {}
    for name, heading in (("sft", "1. Warm start (SFT)"), ("grpo", "2. GRPO")):
        if (folder / name / METRICS_FILE).is_file():
            part, drawn = run_sections(read_run(folder / name), prefix=f"{name}-", level=3)
            body += [f"<h2>{esc(heading)}</h2>", part]
            images.update(drawn)
    subtitle = f"the offline demo: {esc(summary.get('task', ''))}, seed {esc(summary.get('seed'))}"
    return Report(_page(f"mlx-reasoner report: {folder.name}", subtitle, "\n".join(body)), images)


def _demo_summary(summary: dict) -> str:
    rows = [
        ("held-out questions", summary.get("held_out_questions"), "{}"),
        ("always the commonest answer", summary.get("majority_baseline"), "{:.1%}"),
        ("accuracy after the warm start", summary.get("accuracy_after_sft"), "{:.1%}"),
        ("accuracy after GRPO", summary.get("accuracy_after_grpo"), "{:.1%}"),
        ("strict format after GRPO", summary.get("format_rate_after_grpo"), "{:.1%}"),
        ("seconds in all", summary.get("seconds"), "{:.0f}"),
    ]
    cards = {label: fmt.format(value) for label, value, fmt in rows if value is not None}
    return _cards(cards)


def _run_subtitle(logs: RunLogs) -> str:
    config, metrics = logs.config, logs.metrics
    parts = [config.get("command", "a run without config.json")]
    parts += [str(config[k]) for k in ("model", "dataset") if config.get(k)]
    last = int(metrics[-1]["step"]) if metrics else 0
    total = config.get("steps")
    if total:
        state = "finished" if last >= total else "still going, or stopped early"
        parts.append(f"step {last} of {total} ({state})")
    else:
        parts.append(f"{last} steps logged")
    return " · ".join(esc(p) for p in parts)


def run_sections(logs: RunLogs, prefix: str = "", level: int = 2) -> tuple[str, dict[str, bytes]]:
    """The headline, figures, completions and configuration of one run, as HTML."""
    h = f"h{level}"
    parts = [_cards(headline(logs.metrics))]
    if logs.unreadable:
        parts.append(
            f'<p class="note">{logs.unreadable} line(s) of {METRICS_FILE} could not be read '
            "(a line being written, or a crash mid-line) and were left out.</p>"
        )
    drawn = draw_figures(logs.metrics, prefix)
    if not drawn:
        parts.append('<p class="note">No steps logged yet.</p>')
    else:
        parts += [f"<{h}>Training curves</{h}>", '<div class="grid">']
        parts += [_figure_html(name, spec, png) for name, (spec, png) in drawn.items()]
        parts.append("</div>")
    if logs.early:
        parts += [f"<{h}>Completions, early and late</{h}>", _samples_html(logs)]
    if logs.config:
        parts += [f"<{h}>Configuration</{h}>", _config_html(logs.config)]
    return "\n".join(parts), {name: png for name, (_, png) in drawn.items()}


def _figure_html(name: str, spec: FigureSpec, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    caption = f"<figcaption>{esc(spec.caption)}</figcaption>" if spec.caption else ""
    return (
        f'<figure id="{esc(name)}"><img data-figure="{esc(name)}" alt="{esc(spec.title)}" '
        f'src="data:image/png;base64,{data}">{caption}</figure>'
    )


def _cards(values: dict[str, str]) -> str:
    cards = "".join(
        f'<div class="card"><div class="label">{esc(k)}</div><div class="value">{esc(v)}</div>'
        "</div>"
        for k, v in values.items()
    )
    return f'<div class="cards">{cards}</div>'


def best_and_worst(records: Sequence[dict]) -> tuple[dict, dict] | None:
    """The highest- and lowest-reward completion of the first group (first prompt) among a
    step's rollout records: the first of the best and the last of the worst, so that a group
    whose completions all scored the same still shows two of them."""
    if not records:
        return None
    group = [r for r in records if r.get("prompt") == records[0].get("prompt")]
    rewards = np.array([r.get("reward", 0.0) for r in group])
    worst = len(group) - 1 - int(np.argmin(rewards[::-1]))
    return group[int(np.argmax(rewards))], group[worst]


def _samples_html(logs: RunLogs) -> str:
    parts = []
    steps = [("early", logs.early), ("late", logs.late)]
    if logs.late and logs.late[0]["step"] == logs.early[0]["step"]:
        steps = steps[:1]
    for when, records in steps:
        pair = best_and_worst(records)
        if pair is None:
            continue
        best, worst = pair
        same = best.get("reward") == worst.get("reward")
        parts.append(
            f'<p class="question"><b>Step {esc(best["step"])} ({when})</b>: '
            f'{esc(best.get("prompt", ""))} <i>gold: {esc(best.get("answer", ""))}</i>'
            f'{" (every completion of this group scored the same)" if same else ""}</p>'
        )
        parts.append('<div class="samples">')
        parts += [_sample_html("best", best), _sample_html("worst", worst)]
        parts.append("</div>")
    return "\n".join(parts)


def _sample_html(kind: str, record: dict) -> str:
    components = ", ".join(f"{k} {v:.3g}" for k, v in (record.get("rewards") or {}).items())
    return (
        f'<div class="sample {kind}"><b>{kind}</b> of its group: reward '
        f'{record.get("reward", 0.0):.3f} ({esc(components)}), '
        f'{esc(record.get("completion_tokens", "?"))} tokens, '
        f'{esc(record.get("finish_reason", ""))}'
        f'<pre>{esc(record.get("completion", ""))}</pre></div>'
    )


# The options that say what a run did, in the order a reader asks about them.
RECIPE_KEYS = (
    "command",
    "model",
    "dataset",
    "adapter_path",
    "steps",
    "batch_size",
    "group_size",
    "learning_rate",
    "lora",
    "rewards",
    "loss_type",
    "beta",
    "temperature",
    "max_completion_tokens",
    "max_seq_tokens",
    "seed",
)


def recipe(config: dict) -> dict[str, str]:
    """The run's key options in words (``RECIPE_KEYS`` it has), e.g. for the model card."""
    out = {}
    for key in RECIPE_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if key == "lora":
            params = value.get("lora_parameters", {})
            value = f"rank {params.get('rank')} on {value.get('num_layers')} blocks"
        elif key == "rewards":
            value = ", ".join(f"{r['name']}:{r['weight']:g}" for r in value)
        out[key] = value if isinstance(value, str) else json.dumps(value)
    return out


def _config_html(config: dict) -> str:
    rows = "".join(
        f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in recipe(config).items()
    )
    everything = []
    for key, value in config.items():
        if key == "system_prompt_text":
            continue
        shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        everything.append(f"<tr><th>{esc(key)}</th><td>{esc(shown)}</td></tr>")
    prompt = config.get("system_prompt_text")
    prompt_html = f"<p>System prompt:</p><pre>{esc(prompt)}</pre>" if prompt else ""
    return (
        f"<table>{rows}</table>{prompt_html}"
        f"<details><summary>Every option ({CONFIG_FILE})</summary>"
        f"<table>{''.join(everything)}</table></details>"
    )


def _page(title: str, subtitle: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>\n"
        f'<body><main><h1>{esc(title)}</h1><div class="sub">{subtitle}</div>\n'
        f"{body}\n</main></body></html>\n"
    )


def write_report(
    run_dir: str | Path, output: str | Path | None = None, png_dir: str | Path | None = None
) -> Path:
    """Write the report of ``run_dir`` (default ``run_dir/report.html``), atomically; with
    ``png_dir``, each figure as ``png_dir/NAME.png`` too.

    Returns:
        The HTML file written.
    """
    report = build_report(Path(run_dir))
    path = Path(output) if output else Path(run_dir) / REPORT_FILE
    if not path.parent.is_dir():
        raise ReasonerError(f"cannot write {path}: folder {path.parent} does not exist")
    atomic_write_text(path, report.html)
    if png_dir is not None:
        write_pngs(report.images, Path(png_dir))
    return path


def write_pngs(images: dict[str, bytes], folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReasonerError(f"cannot create {folder}: {exc.strerror or exc}") from exc
    for name, png in images.items():
        atomic_write_bytes(folder / f"{name}.png", png)
