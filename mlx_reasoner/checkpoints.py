"""Checkpoints stage: the run directory and everything written into it, atomically.

Files are written to a temporary name in the same folder, flushed to disk, then renamed
over the old one, so a crash leaves either the previous file or the new one, never half.
"""

import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx

from .errors import ReasonerError

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def _fsync_dir(path: Path) -> None:
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


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers never see a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_safetensors(path: Path, arrays: dict[str, mx.array], metadata=None) -> None:
    """``mx.save_safetensors`` through a temporary file and a rename."""
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
    _fsync_dir(path.parent)


def save_adapters(folder: Path, weights: dict[str, mx.array], adapter_config: dict) -> None:
    """Write adapters in mlx-lm's layout (``mlx_lm.load(..., adapter_path=folder)`` reads it).

    The weights go first: a config without weights would look loadable and fail later.
    """
    folder = Path(folder)
    atomic_save_safetensors(folder / ADAPTER_FILE, weights)
    atomic_write_json(folder / ADAPTER_CONFIG, adapter_config)


def prepare_run_dir(run_dir: str | None, root: str = "runs") -> Path:
    """Create the run folder (default ``runs/<timestamp>``) and check it can be written.

    A folder that already holds a run is refused rather than silently overwritten.
    """
    path = Path(run_dir) if run_dir else Path(root) / time.strftime("%Y%m%d-%H%M%S")
    if (path / "metrics.jsonl").exists() or (path / ADAPTER_FILE).exists():
        raise ReasonerError(f"{path} already holds a run; pick a new --run-dir")
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
