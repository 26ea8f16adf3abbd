"""Fast BLAS for MLX's Linux CPU backend: load OpenBLAS into the process before ``mlx.core``.

The ``mlx[cpu]`` wheel links a bundled reference BLAS/LAPACK (~6 GFLOP/s on a 1024x1024 float32
matmul). A library opened with ``RTLD_GLOBAL`` before ``libmlx.so`` is loaded wins the dynamic
linker's symbol lookup, so MLX's ``cblas_sgemm`` and LAPACK calls then bind to OpenBLAS instead.
That only works if it happens first: ``mlx_reasoner/__init__.py`` calls :func:`enable_fast_blas`
before any module imports mlx, and nothing here imports mlx at module level.

Set ``MLX_REASONER_FAST_BLAS=0`` to keep the reference BLAS. Unless ``OPENBLAS_NUM_THREADS`` is
set, OpenBLAS gets half the cores (at least one): its threads busy-wait, and with one per core any
other load on the machine made steps 10-20x slower in our measurements, while one thread per two
cores lost little on an idle machine.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import statistics
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ENV_VAR = "MLX_REASONER_FAST_BLAS"
REFERENCE_NAME = "reference (bundled with mlx)"
ACCELERATE_NAME = "accelerate (macOS)"
MLX_IMPORTED_FIRST = "mlx.core was imported before mlx_reasoner"

OFF_VALUES = {"0", "false", "off", "no"}
_CMEEL_LIB = Path("cmeel.prefix") / "lib"
_LIBRARY_NAMES = ("libopenblas.so.0", "libopenblas.so")

# CPU features an OpenBLAS built for one target (DYNAMIC_ARCH=OFF) needs; without them it dies of
# SIGILL. Keys are OpenBLAS TARGET names; values are /proc/cpuinfo "flags"/"Features" words.
_AVX512 = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})
_TARGET_CPU_FLAGS: dict[str, frozenset[str]] = {
    "PRESCOTT": frozenset({"sse3"}),
    "NEHALEM": frozenset({"sse4_2"}),
    "SANDYBRIDGE": frozenset({"avx"}),
    "HASWELL": frozenset({"avx2", "fma"}),
    "ZEN": frozenset({"avx2", "fma"}),
    "SKYLAKEX": _AVX512,
    "COOPERLAKE": _AVX512 | {"avx512_bf16"},
    "SAPPHIRERAPIDS": _AVX512 | {"avx512_bf16", "avx512_fp16", "amx_tile"},
    "ARMV8": frozenset(),
    "CORTEXA57": frozenset(),
    "CORTEXA72": frozenset(),
    "NEOVERSEN1": frozenset(),
    "NEOVERSEV1": frozenset({"sve", "bf16"}),
    "NEOVERSEN2": frozenset({"sve", "sve2", "bf16"}),
}


@dataclass(frozen=True)
class BlasInfo:
    """Which BLAS MLX's CPU matmuls use in this process, and why fast BLAS is off if it is.

    >>> BlasInfo(REFERENCE_NAME, reason="disabled by MLX_REASONER_FAST_BLAS=0").as_dict()["enabled"]
    False
    """

    name: str
    path: str | None = None
    reason: str | None = None
    enabled: bool = False
    threads: int | None = None

    def as_dict(self) -> dict:
        """A JSON-ready dict, for the run's config.json."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Candidate:
    """An OpenBLAS we might load: ``target`` is a file path or a soname for the linker to find."""

    label: str
    target: str
    problem: str | None = None


_state: BlasInfo | None = None


def enable_fast_blas() -> BlasInfo:
    """Load OpenBLAS with ``RTLD_GLOBAL`` so that MLX, imported later, binds its BLAS calls to it.

    Idempotent: the first call decides and later calls return the same answer. Never raises (it
    runs at import time); a failure comes back as ``enabled=False`` with the reason.

    Returns:
        The :class:`BlasInfo` for this process.
    """
    global _state
    if _state is None:
        try:
            _state = _decide()
        except Exception as error:  # an import-time speed-up must never break the import
            _state = BlasInfo(REFERENCE_NAME, reason=f"fast BLAS setup failed: {error!r}")
    return _state


def blas_info() -> BlasInfo:
    """The BLAS decided when ``mlx_reasoner`` was imported (see :func:`enable_fast_blas`)."""
    return enable_fast_blas()


def describe() -> str:
    """One line for logs: the BLAS in use, or why fast BLAS is off."""
    info = blas_info()
    if info.enabled:
        threads = f", OpenBLAS threads: {info.threads}" if info.threads else ""
        return f"BLAS: {info.name}{threads}"
    return f"BLAS: {info.name} (fast BLAS off: {info.reason})"


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    """Time an ``n x n`` float32 matmul on MLX's CPU stream; median of ``repeats`` after a warm-up.

    Args:
        n: Matrix side.
        repeats: Timed runs; the median is reported.

    Returns:
        GFLOP/s, counting ``2 * n**3`` floating-point operations per matmul.
    """
    import mlx.core as mx

    key_a, key_b = mx.random.split(mx.random.key(0))
    a = mx.random.normal((n, n), key=key_a)  # [n, n]
    b = mx.random.normal((n, n), key=key_b)  # [n, n]
    mx.eval(a, b)
    mx.eval(mx.matmul(a, b, stream=mx.cpu))  # warm-up: thread pools, allocator
    seconds = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        mx.eval(mx.matmul(a, b, stream=mx.cpu))
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(seconds) / 1e9


def _default_thread_count() -> None:
    """Give OpenBLAS half the cores unless the user chose (it reads the variable when loaded)."""
    if not any(os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS")):
        os.environ["OPENBLAS_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))


def _decide() -> BlasInfo:
    if sys.platform == "darwin":
        return BlasInfo(ACCELERATE_NAME, enabled=True)
    if not sys.platform.startswith("linux"):
        return BlasInfo(REFERENCE_NAME, reason=f"no fast BLAS loader for {sys.platform}")
    setting = os.environ.get(ENV_VAR, "")
    if setting.strip().lower() in OFF_VALUES:
        return BlasInfo(REFERENCE_NAME, reason=f"disabled by {ENV_VAR}={setting}")

    preloaded = _preloaded_openblas()
    if preloaded is not None:
        # Already in the global scope, ahead of everything: loading a second copy would only add a
        # second thread pool.
        return _loaded_info("LD_PRELOAD", preloaded, ctypes.CDLL(preloaded))

    candidates = _candidates()
    if "mlx.core" in sys.modules:
        usable = [c.target for c in candidates if c.problem is None and "/" in c.target]
        hint = usable[0] if usable else "<path to libopenblas.so.0>"
        return BlasInfo(
            REFERENCE_NAME,
            reason=f"{MLX_IMPORTED_FIRST}; import mlx_reasoner first or set LD_PRELOAD={hint}",
        )

    _default_thread_count()
    failures = []
    for candidate in candidates:
        if candidate.problem is not None:
            failures.append(f"{candidate.label}: {candidate.problem}")
            continue
        try:
            library = ctypes.CDLL(candidate.target, mode=ctypes.RTLD_GLOBAL)
        except OSError as error:
            failures.append(f"{candidate.label}: {_explain_load_error(error)}")
            continue
        return _loaded_info(candidate.label, candidate.target, library)
    return BlasInfo(REFERENCE_NAME, reason="; ".join(dict.fromkeys(failures)))


def _candidates() -> list[_Candidate]:
    """The pip wheel ``cmeel-openblas`` first, then the system's OpenBLAS (found by soname)."""
    candidates = []
    cmeel = _cmeel_openblas()
    if cmeel is not None:
        candidates.append(cmeel)
    candidates.extend(_Candidate("system", soname) for soname in _LIBRARY_NAMES)
    return candidates


def _cmeel_openblas() -> _Candidate | None:
    try:
        distribution = metadata.distribution("cmeel-openblas")
    except metadata.PackageNotFoundError:
        return None
    label = f"cmeel-openblas {distribution.version}"
    lib_dir = Path(str(distribution.locate_file(_CMEEL_LIB)))
    library = next((lib_dir / name for name in _LIBRARY_NAMES if (lib_dir / name).is_file()), None)
    if library is None:
        return _Candidate(label, str(lib_dir), problem=f"no libopenblas.so in {lib_dir}")
    config_file = lib_dir / "pkgconfig" / "openblas.pc"
    config = config_file.read_text() if config_file.is_file() else ""
    return _Candidate(label, str(library), problem=build_cpu_problem(config, _cpu_flags()))


def build_cpu_problem(openblas_config: str, cpu_flags: set[str]) -> str | None:
    """Why an OpenBLAS build cannot run here, judged from its ``openblas_config`` line, or None.

    A build without ``DYNAMIC_ARCH`` holds kernels for one CPU target only and crashes with
    SIGILL elsewhere; a 64-bit-integer (ILP64) build does not match MLX's 32-bit BLAS calls.

    Args:
        openblas_config: The ``openblas_config=...`` line of ``openblas.pc`` (or the whole file).
        cpu_flags: This CPU's feature words from /proc/cpuinfo.

    Returns:
        None when the build should run here, else a sentence saying why not.

    >>> line = "openblas_config=USE_64BITINT= DYNAMIC_ARCH=OFF SKYLAKEX MAX_THREADS=4"
    >>> build_cpu_problem(line, {"avx2", "fma"})
    'built for SKYLAKEX CPUs only; this CPU lacks avx512bw, avx512cd, avx512dq, avx512f, avx512vl'
    >>> build_cpu_problem(line, {"avx2", "fma"} | _AVX512) is None
    True
    """
    settings, targets = {}, []
    for line in openblas_config.splitlines():
        if not line.startswith("openblas_config="):
            continue
        for word in line.removeprefix("openblas_config=").split():
            key, equals, value = word.partition("=")
            if equals:
                settings[key] = value
            else:
                targets.append(word)
    if settings.get("USE_64BITINT", "").upper() not in ("", "0", "OFF"):
        return "built with 64-bit integers (ILP64), which MLX cannot call"
    if settings.get("DYNAMIC_ARCH", "").upper() in ("1", "ON") or not targets:
        return None
    target = targets[0]
    needed = _TARGET_CPU_FLAGS.get(target)
    if needed is None:
        return f"built for {target} CPUs only, a target mlx_reasoner does not know how to check"
    missing = sorted(needed - cpu_flags)
    if missing:
        return f"built for {target} CPUs only; this CPU lacks {', '.join(missing)}"
    return None


def _cpu_flags() -> set[str]:
    """Feature words of the first CPU in /proc/cpuinfo ("flags" on x86, "Features" on Arm)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def _preloaded_openblas() -> str | None:
    """The OpenBLAS named in ``LD_PRELOAD``, if it is actually mapped into this process."""
    preload = os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
    named = [entry for entry in preload if Path(entry).name.startswith("libopenblas")]
    if named and _mapped_openblas() is not None:
        return named[0]
    return None


def _mapped_openblas() -> str | None:
    """The path of a ``libopenblas*`` mapped into this process (per /proc/self/maps), if any."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1]
        if Path(path).name.startswith("libopenblas"):
            return path
    return None


def _loaded_info(label: str, target: str, library: ctypes.CDLL) -> BlasInfo:
    version = ""
    try:
        library.openblas_get_config.restype = ctypes.c_char_p
        config = library.openblas_get_config().decode(errors="replace").split()
        version = config[1] if len(config) > 1 and config[0] == "OpenBLAS" else ""
        threads = int(library.openblas_get_num_threads())
    except AttributeError:  # not OpenBLAS after all, or an old one
        threads = None
    if version and version not in label:
        label = f"{label} {version}"
    path = target if "/" in target else (_mapped_openblas() or target)
    return BlasInfo(f"openblas ({label})", path=path, enabled=True, threads=threads)


def _explain_load_error(error: OSError) -> str:
    message = str(error)
    if "libgfortran" in message:
        return f"{message} (install the system's libgfortran5, e.g. apt-get install libgfortran5)"
    if "cannot open shared object file" in message:
        return "not installed (e.g. apt-get install libopenblas0)"
    return message
