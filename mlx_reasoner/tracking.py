"""Tracking stage: what a training run shows outside its console while it goes.

``--report-every N`` rewrites ``report.html`` in the run folder every N steps and at the end;
``--report-to wandb`` logs each step's metrics, and the report's figures, to Weights & Biases
(offline too: ``WANDB_MODE=offline``). Both are checked before a run starts, so a missing
package fails in a second, not after the model has loaded.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from .checkpoints import atomic_write_text
from .errors import ReasonerError
from .report import MATPLOTLIB_MISSING, REPORT_FILE, build_report

WANDB_MISSING = "--report-to wandb needs wandb: pip install 'mlx-reasoner[wandb]'"
WANDB_ID_FILE = "wandb_run_id.txt"  # so that a resumed run goes on logging to the same W&B run
DEFAULT_WANDB_PROJECT = "mlx-reasoner"


def check_tracking(config) -> None:
    """Refuse, in one line, tracking options whose packages are not installed."""
    wants_figures = config.report_every > 0 or config.report_to is not None
    if wants_figures and importlib.util.find_spec("matplotlib") is None:
        raise ReasonerError(MATPLOTLIB_MISSING)
    if config.report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ReasonerError(WANDB_MISSING)


class RunTracker:
    """Refreshes the run's report and logs to W&B after each step (``after_step``).

    Args:
        config: the run's ``RunConfig`` (``report_every``, ``report_to``, ``steps``).
        run_dir: the run folder; the report is written there, W&B's files under ``wandb/``.
        warn: where a report that could not be written is said (training goes on).
    """

    def __init__(self, config, run_dir: Path, warn: Callable[[str], None] = print):
        self.config = config
        self.run_dir = Path(run_dir)
        self.warn = warn
        self.wandb_run = None
        self.reported_step = 0  # the last step whose report and figures are out
        if config.report_to == "wandb":
            self.wandb_run = start_wandb(config, self.run_dir)

    def after_step(self, step: int, metrics: dict) -> None:
        """Log ``metrics`` (already in ``metrics.jsonl``); on the report's cadence, rewrite it
        and send its figures. The figures go to W&B at the end even without --report-every."""
        from .trainer import is_due

        config = self.config
        refresh = config.report_every > 0 and is_due(step, config.report_every, config.steps)
        figures = self.wandb_run is not None and (refresh or step == config.steps)
        images = self._report(step, refresh, figures)
        if self.wandb_run is not None:
            log_to_wandb(self.wandb_run, step, metrics, images)

    def finish(self, step: int) -> None:
        """At an early stop after ``step``: the report and the W&B figures as of that step,
        where the cadence left them behind (a run that reaches --steps has them already)."""
        if step <= self.reported_step:
            return
        images = self._report(step, self.config.report_every > 0, self.wandb_run is not None)
        if images:
            log_to_wandb(self.wandb_run, step, {}, images)

    def _report(self, step: int, write: bool, figures: bool) -> dict[str, bytes]:
        """Rebuild the report from the run folder; write it (``write``) and return its images
        (``figures``). A report that fails is said and skipped: training goes on."""
        if not (write or figures):
            return {}
        try:
            report = build_report(self.run_dir)
            if write:
                atomic_write_text(self.run_dir / REPORT_FILE, report.html)
        except (OSError, ReasonerError) as exc:  # a report is no reason to stop training
            self.warn(f"step {step}: report not written ({exc}); training goes on")
            return {}
        self.reported_step = step
        return report.images if figures else {}

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def start_wandb(config, run_dir: Path):
    """A W&B run named after the run folder, in ``WANDB_PROJECT`` (default mlx-reasoner),
    holding the resolved configuration; a resumed run continues the same W&B run."""
    import wandb

    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", DEFAULT_WANDB_PROJECT),
        name=run_dir.resolve().name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=config.to_dict(),
    )
    if not id_file.is_file():
        atomic_write_text(id_file, run_id + "\n")
    return run


def log_to_wandb(run, step: int, metrics: dict, images: dict[str, bytes]) -> None:
    """One ``run.log`` per step: the numeric metrics, and the figures as images."""
    import io

    import wandb
    from PIL import Image

    values = {
        key: value
        for key, value in metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    for name, png in images.items():
        values[f"report/{name}"] = wandb.Image(Image.open(io.BytesIO(png)), caption=name)
    run.log(values, step=step)
