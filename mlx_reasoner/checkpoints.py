"""Checkpoints stage: the run directory and everything written into it, atomically.

Files are written to a temporary name in the same folder, flushed to disk, then renamed
over the old one, so a crash leaves either the previous file or the new one, never half.
The text writers need no mlx (``report`` uses them); mlx is imported where arrays are written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ReasonerError

if TYPE_CHECKING:
    import mlx.core as mx

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (where the file system allows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers never see a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) so that readers never see a partial file."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(path: Path, arrays: dict[str, mx.array], metadata=None) -> None:
    """``mx.save_safetensors`` through a temporary file and a rename."""
    import mlx.core as mx

    path = Path(path)
    # mx.save_safetensors insists on the .safetensors suffix.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
    try:
        mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_adapters(folder: Path, weights: dict[str, mx.array], adapter_config: dict) -> None:
    """Write adapters in mlx-lm's layout (``mlx_lm.load(..., adapter_path=folder)`` reads it).

    The weights go first: a config without weights would look loadable and fail later.
    """
    folder = Path(folder)
    atomic_save_safetensors(folder / ADAPTER_FILE, weights)
    atomic_write_json(folder / ADAPTER_CONFIG, adapter_config)


def holds_run(path: Path) -> bool:
    """Whether a folder already holds a training run's results."""
    path = Path(path)
    return any((path / name).exists() for name in ("metrics.jsonl", ADAPTER_FILE, CHECKPOINT_DIR))


def prepare_run_dir(run_dir: str | None, root: str = "runs", overwrite: bool = False) -> Path:
    """Create the run folder (default ``runs/<timestamp>``) and check it can be written.

    A folder that already holds a run is never silently reused: it is refused unless
    ``overwrite`` is set, in which case the old run is deleted first.
    """
    path = Path(run_dir) if run_dir else Path(root) / time.strftime("%Y%m%d-%H%M%S")
    if holds_run(path):
        if not overwrite:
            raise ReasonerError(
                f"{path} already holds a run; continue it with --resume {path}, "
                "pick a new --run-dir, or pass --overwrite to replace it"
            )
        shutil.rmtree(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-", delete=True)
        probe.close()
    except OSError as exc:
        raise ReasonerError(f"cannot write to run directory {path}: {exc.strerror or exc}") from exc
    return path


class JsonlWriter:
    """Append-only JSON lines; each record is written whole and flushed to disk."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, records: Iterable[dict]) -> None:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        self._file.write(text)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


def _checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder only gets its final name when complete)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / TRAINER_STATE).is_file()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    found = _checkpoint_dirs(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    adapters: dict[str, mx.array],
    adapter_config: dict,
    optimizer_state: dict[str, mx.array],
    trainer_state: dict,
    keep: int,
) -> Path:
    """Write everything needed to continue a run exactly, as ``checkpoints/step_NNNNNNN``.

    The files go into a hidden temporary folder that is renamed into place only when all
    of them are on disk, so a crash at any moment leaves the previous checkpoint intact.
    The oldest checkpoints beyond ``keep`` are removed afterwards.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_adapters(tmp, adapters, adapter_config)
        atomic_save_safetensors(tmp / OPTIMIZER_FILE, optimizer_state)
        atomic_write_json(tmp / TRAINER_STATE, {**trainer_state, "step": step})  # last: marker
        if final.exists():  # the same step saved twice (e.g. a stop right after a save)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(root)
    for old in _checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # left by a process killed mid-write
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """Read a checkpoint: ``(adapter weights, optimizer state, trainer state)``."""
    import mlx.core as mx

    path = Path(path)
    try:
        adapters = mx.load(str(path / ADAPTER_FILE))
        optimizer_state = mx.load(str(path / OPTIMIZER_FILE))
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError, RuntimeError) as exc:
        raise ReasonerError(
            f"checkpoint {path} cannot be read ({exc}); delete it to use the " "one before"
        ) from exc
    return adapters, optimizer_state, state


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Drop records after ``last_step`` (steps a resumed run will redo), atomically."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if record.get("step", 0) <= last_step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))
