"""Fast BLAS for MLX's Linux CPU backend: load OpenBLAS into the process before ``mlx.core``.

The ``mlx[cpu]`` wheel links a bundled reference BLAS/LAPACK, many times slower than OpenBLAS. A
library opened with ``RTLD_GLOBAL`` before ``libmlx.so`` is loaded wins the dynamic linker's
symbol lookup, so MLX's ``cblas_sgemm`` and LAPACK calls then bind to OpenBLAS instead.
That only works if it happens first: commands call ``backend.start()`` (which calls
:func:`enable_fast_blas`) before anything imports mlx, and nothing here imports mlx at module level.

The OpenBLAS comes from the ``cmeel-openblas`` wheel and needs ``libgfortran.so.5``. Where the
system has none, the Fortran runtime shipped inside the ``mlx[cpu]`` wheel stands in: auditwheel
renamed it (``libgfortran-<hash>.so.5.0.0``), so an in-memory copy whose soname reads
``libgfortran.so.5`` again is loaded first (see :func:`load_bundled_fortran_runtime`). Nothing is
written to disk, so concurrent processes cannot trip over each other.

``cmeel-openblas`` is built for one CPU target (AVX-512 on x86-64). On other x86-64 CPUs the
``scipy-openblas32`` wheel (every CPU target, no Fortran runtime needed) is used through a small
in-memory library that gives its ``scipy_``-prefixed functions the names MLX calls
(:mod:`mlx_reasoner.engine.blas_alias`). The system's OpenBLAS is the last resort.

Set ``MLX_REASONER_FAST_BLAS=0`` to keep the reference BLAS. Unless ``OPENBLAS_NUM_THREADS`` is
set, OpenBLAS gets half the cores (at least one): its threads busy-wait, and with one per core any
other load on the machine made steps 10-20x slower in our measurements, while one thread per two
cores lost little on an idle machine.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import os
import statistics
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..backend import switched_off

ENV_VAR = "MLX_REASONER_FAST_BLAS"
REFERENCE_NAME = "reference (bundled with mlx)"
ACCELERATE_NAME = "accelerate (macOS)"
MLX_IMPORTED_FIRST = "mlx.core was imported before the fast BLAS was loaded"

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
    fix: str | None = None

    def as_dict(self) -> dict:
        """A JSON-ready dict, for the run's config.json."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Candidate:
    """An OpenBLAS we might load: ``target`` is a file path or a soname for the linker to find."""

    label: str
    target: str
    problem: str | None = None
    prefix: str = ""  # its functions' name prefix: they are aliased to the plain names MLX calls


_state: BlasInfo | None = None
_library: ctypes.CDLL | None = None  # the OpenBLAS loaded, and its functions' name prefix
_prefix = ""
_user_threads = False  # OPENBLAS_NUM_THREADS was set by the user: never vary it


def enable_fast_blas() -> BlasInfo:
    """Load OpenBLAS with ``RTLD_GLOBAL`` so that MLX, imported later, binds its BLAS calls to it.

    Idempotent: the first call decides and later calls return the same answer. Never raises (it
    runs before every command); a failure comes back as ``enabled=False`` with the reason.

    Returns:
        The :class:`BlasInfo` for this process.
    """
    global _state
    if _state is None:
        try:
            _state = _decide()
        except Exception as error:  # a speed-up must never stop a command from starting
            _state = BlasInfo(
                REFERENCE_NAME, reason=f"fast BLAS setup failed: {error!r}", fix=_REPORT_FIX
            )
    return _state


def blas_info() -> BlasInfo:
    """The BLAS decided for this process (deciding now if nothing has: :func:`enable_fast_blas`)."""
    return enable_fast_blas()


def set_threads(count: int) -> bool:
    """Set the loaded OpenBLAS's thread count for later calls; False where no OpenBLAS is ours."""
    if _library is None:
        return False
    try:
        getattr(_library, _prefix + "openblas_set_num_threads")(int(count))
    except AttributeError:
        return False
    return True


def describe() -> str:
    """One line for logs: the BLAS in use, or why fast BLAS is off."""
    info = blas_info()
    if info.enabled:
        threads = f", OpenBLAS threads: {info.threads}" if info.threads else ""
        return f"BLAS: {info.name}{threads}"
    return f"BLAS: {info.name} (fast BLAS off: {info.reason})"


# What the reference BLAS costs, per command, measured on a 2-core x86-64 Linux machine
# (docs/performance.md, "Fast BLAS on a fresh machine").
SLOW_BLAS_COST = {
    "demo": "the demo takes about 8 minutes instead of about 1",
    "train": "each training step takes several times longer",
    "sft": "each SFT step takes several times longer",
    "bench": "its figures are for the slow BLAS, not what a user with fast BLAS sees",
}


def slow_blas_notice(command: str) -> str | None:
    """What to tell a user before ``command`` runs on the slow reference BLAS, or None.

    Args:
        command: ``"train"``, ``"sft"``, ``"demo"`` or ``"bench"`` (others get a generic cost).

    Returns:
        Two lines (what, why, cost; then the fix), or None where the BLAS is fast or not ours
        to choose (macOS uses Accelerate).
    """
    info = blas_info()
    if info.enabled or not sys.platform.startswith("linux"):
        return None
    cost = SLOW_BLAS_COST.get(command, "matrix products run many times slower")
    fix = info.fix or _PIP_FIX
    return (
        f"Slow BLAS: MLX's matrix products use its reference BLAS ({info.reason}); {cost}.\n"
        f"Fix: {fix}"
    )


def _default_thread_count() -> None:
    """Give OpenBLAS half the cores unless the user chose (it reads the variable when loaded)."""
    if not _user_threads:
        os.environ["OPENBLAS_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // 2))


class DecodeThreads:
    """Picks OpenBLAS's thread count for a decode by timing its own steps, and keeps checking.

    A decode step is a chain of few-row products that read every weight once: a second thread
    reads memory faster on an idle machine, but its busy-waiting threads make every step several
    times slower once another process holds a core. So the decode tries both counts on a few
    steps each and keeps the faster. The kept count's latest steps are watched all along; the
    other count is tried again after ``recheck`` steps, cut short as soon as it is clearly slower,
    and each try that changes nothing doubles the wait before the next.

    Use: ``before_step(i)`` before step ``i`` is queued, ``step_done()`` once a step's tokens are
    read, ``close()`` at the end (restores the process's count).
    """

    def __init__(self, counts: tuple[int, int], trial: int = 3, recheck: int = 48):
        self.counts, self.trial, self.recheck = counts, trial, recheck
        self.current = self.best = counts[0]
        # The latest step times per count (older ones would hide a change in the machine's load).
        self.seconds = {count: collections.deque(maxlen=2 * trial) for count in counts}
        self._plan = [c for c in counts for _ in range(trial + 1)]  # counts for the next steps
        self._last: float | None = None  # None: the next interval holds a switch's pipeline bubble
        self._wait = recheck
        self._next_check: int | None = None  # set once the first trials are done
        self._rechecking = False
        self._kept = self.best

    def before_step(self, index: int) -> None:
        if not self._plan:
            if self._rechecking:
                self._end_recheck(index)
            elif self._next_check is None:  # the first trials just ended
                self._choose()
                self._next_check = index + self._wait
            elif index >= self._next_check:
                other = next(c for c in self.counts if c != self.best)
                self.seconds[other].clear()
                self._plan = [other] * (self.trial + 1)
                self._rechecking, self._kept = True, self.best
        wanted = self._plan.pop(0) if self._plan else self.best
        if wanted != self.current:
            import mlx.core as mx

            mx.synchronize()  # no product in flight while OpenBLAS's count changes
            set_threads(wanted)
            self.current, self._last = wanted, None

    def step_done(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            seconds = now - self._last
            self.seconds[self.current].append(seconds)
            if not self._rechecking:
                self._choose()
            elif seconds > 1.5 * statistics.median(self.seconds[self.best]):
                self._plan.clear()  # clearly slower: back to the kept count at the next step
        self._last = now

    def _end_recheck(self, index: int) -> None:
        self._choose()
        self._rechecking = False
        self._wait = self._wait * 2 if self.best == self._kept else self.recheck
        self._next_check = index + self._wait

    def _choose(self) -> None:
        timed = {c: statistics.median(s) for c, s in self.seconds.items() if s}
        if len(timed) == len(self.counts):
            self.best = min(timed, key=timed.get)

    def close(self) -> None:
        if self.current != self.counts[0]:
            import mlx.core as mx

            mx.synchronize()
            set_threads(self.counts[0])
            self.current = self.counts[0]


# Below this much weight a decode step's products read from cache, and switching counts costs
# more than a second thread gains (docs/performance.md, "The decode's OpenBLAS threads").
DECODE_THREADS_MIN_BYTES = 256 * 2**20


def decode_threads(weight_bytes: int) -> DecodeThreads | None:
    """A :class:`DecodeThreads` for a CPU decode over ``weight_bytes`` of weights, or None where
    the count is not ours to vary (no OpenBLAS of ours, one core, ``OPENBLAS_NUM_THREADS`` set by
    the user) or the model is too small to gain (:data:`DECODE_THREADS_MIN_BYTES`)."""
    info = blas_info()
    cores = os.cpu_count() or 1
    if not info.enabled or _library is None or _user_threads or cores < 2 or not info.threads:
        return None
    more = min(cores, 2 * info.threads)
    if more <= info.threads or weight_bytes < DECODE_THREADS_MIN_BYTES:
        return None
    return DecodeThreads((info.threads, more))


def _decide() -> BlasInfo:
    if sys.platform == "darwin":
        return BlasInfo(ACCELERATE_NAME, enabled=True)
    if not sys.platform.startswith("linux"):
        return BlasInfo(REFERENCE_NAME, reason=f"no fast BLAS loader for {sys.platform}")
    if switched_off(ENV_VAR):
        return BlasInfo(
            REFERENCE_NAME,
            reason=f"disabled by {ENV_VAR}={os.environ[ENV_VAR]}",
            fix=f"unset {ENV_VAR}",
        )

    global _user_threads  # read before anything of ours sets the variable, on every path
    _user_threads = any(os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS"))
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
            reason=(
                f"{MLX_IMPORTED_FIRST}; call mlx_reasoner.backend.start() before importing mlx, "
                f"or set LD_PRELOAD={hint}"
            ),
            fix="call mlx_reasoner.backend.start() before importing mlx in your script",
        )

    _default_thread_count()
    failures = []
    for candidate in candidates:
        if candidate.problem is not None:
            failures.append(f"{candidate.label}: {candidate.problem}")
            continue
        try:
            library, label = _load_candidate(candidate)
        except (OSError, ValueError) as error:
            failures.append(f"{candidate.label}: {_explain_load_error(error)}")
            continue
        return _loaded_info(label, candidate.target, library, candidate.prefix)
    return BlasInfo(
        REFERENCE_NAME, reason="; ".join(dict.fromkeys(failures)), fix=_fix_for(candidates)
    )


def _load_candidate(candidate: _Candidate) -> tuple[ctypes.CDLL, str]:
    """Open ``candidate`` globally; if only ``libgfortran.so.5`` is missing, lend it mlx's copy."""
    if candidate.prefix:
        return _load_aliased(candidate), candidate.label
    try:
        return ctypes.CDLL(candidate.target, mode=ctypes.RTLD_GLOBAL), candidate.label
    except OSError as error:
        if "libgfortran" not in str(error):
            raise
        try:
            load_bundled_fortran_runtime()
        except (OSError, ValueError) as bundled_error:
            raise OSError(f"{error}; mlx's bundled Fortran runtime: {bundled_error}") from error
    library = ctypes.CDLL(candidate.target, mode=ctypes.RTLD_GLOBAL)
    return library, f"{candidate.label}, Fortran runtime from the mlx wheel"


def _load_aliased(candidate: _Candidate) -> ctypes.CDLL:
    """Open a prefixed OpenBLAS privately and expose the functions libmlx needs under plain names.

    Raises:
        OSError: The library or libmlx.so could not be found or loaded.
        ValueError: libmlx.so could not be read, or the library lacks ``cblas_sgemm``.
    """
    from . import blas_alias

    library = ctypes.CDLL(candidate.target)  # local: only the aliases enter the global scope
    wanted = blas_alias.undefined_symbols(_libmlx_path())
    names = [name for name in wanted if hasattr(library, candidate.prefix + name)]
    if "cblas_sgemm" not in names:
        raise ValueError(f"{candidate.target} has no {candidate.prefix}cblas_sgemm")
    alias = _load_from_memory(blas_alias.alias_library(names), "mlx_reasoner_blas_alias.so")
    slots = (ctypes.c_void_p * len(names)).in_dll(alias, blas_alias.SLOTS_SYMBOL)
    for index, name in enumerate(names):  # filled before mlx.core is imported, so before any call
        slots[index] = ctypes.cast(getattr(library, candidate.prefix + name), ctypes.c_void_p).value
    return library


def _libmlx_path() -> Path:
    """``mlx/lib/libmlx.so`` of the installed mlx, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("mlx")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "lib" / "libmlx.so"
        if path.is_file():
            return path
    raise OSError("mlx's libmlx.so was not found")


_PIP_FIX = 'pip install --force-reinstall cmeel-openblas "mlx[cpu]"'
_SYSTEM_FIX = "sudo apt-get install libopenblas0 (or your distribution's OpenBLAS package)"
_NOT_INSTALLED = "not installed"
_REPORT_FIX = "run with --debug and report the message to mlx-reasoner's issue tracker"


def _fix_for(candidates: list[_Candidate]) -> str:
    """The one command most likely to bring fast BLAS back, given why each candidate failed."""
    scipy = next((c for c in candidates if c.prefix), None)
    if scipy is not None:  # on x86-64 this wheel runs on every CPU: reinstalling it is the fix
        if scipy.problem == _NOT_INSTALLED:
            return "pip install scipy-openblas32"
        return 'pip install --force-reinstall scipy-openblas32 "mlx[cpu]"'
    cmeel = next((c for c in candidates if c.label.startswith("cmeel-openblas")), None)
    if cmeel is None:
        return "pip install cmeel-openblas"
    if cmeel.problem is not None and "this CPU lacks" in cmeel.problem:
        return _SYSTEM_FIX  # the wheel's build cannot run on this CPU; a distribution's can
    return _PIP_FIX


def _candidates() -> list[_Candidate]:
    """The pip wheels ``cmeel-openblas`` then ``scipy-openblas32``, then the system's OpenBLAS."""
    candidates = []
    cmeel = _cmeel_openblas()
    if cmeel is not None:
        candidates.append(cmeel)
    scipy = _scipy_openblas()
    if scipy is not None:
        candidates.append(scipy)
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


def _scipy_openblas() -> _Candidate | None:
    """``scipy-openblas32``'s library, on x86-64 only (the alias stubs are x86-64 code)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        distribution = metadata.distribution("scipy-openblas32")
    except metadata.PackageNotFoundError:
        return _Candidate("scipy-openblas32", "", problem=_NOT_INSTALLED, prefix="scipy_")
    label = f"scipy-openblas32 {distribution.version}"
    for file in distribution.files or ():
        if Path(str(file)).name.startswith("libscipy_openblas"):
            path = Path(str(distribution.locate_file(file)))
            if path.is_file():
                return _Candidate(label, str(path), prefix="scipy_")
    return _Candidate(label, "", problem="its library file is missing", prefix="scipy_")


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


def _loaded_info(label: str, target: str, library: ctypes.CDLL, prefix: str = "") -> BlasInfo:
    global _library, _prefix
    _library, _prefix = library, prefix
    version = ""
    try:
        get_config = getattr(library, prefix + "openblas_get_config")
        get_config.restype = ctypes.c_char_p
        config = get_config().decode(errors="replace").split()
        version = config[1] if len(config) > 1 and config[0] == "OpenBLAS" else ""
        threads = int(getattr(library, prefix + "openblas_get_num_threads")())
    except AttributeError:  # not OpenBLAS after all, or an old one
        threads = None
    if version and version not in label:
        label = f"{label} {version}"
    path = target if "/" in target else (_mapped_openblas() or target)
    return BlasInfo(f"openblas ({label})", path=path, enabled=True, threads=threads)


def _explain_load_error(error: OSError) -> str:
    message = str(error)
    if "libgfortran" in message:
        return f"{message} (reinstall mlx[cpu], or install the system's libgfortran5)"
    if "cannot open shared object file" in message:
        return "not installed (e.g. apt-get install libopenblas0)"
    return message


# --- mlx's bundled Fortran runtime under the name OpenBLAS asks for ---------------------------

FORTRAN_SONAME = "libgfortran.so.5"
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_SONAME = 0, 1, 5, 14
_PT_LOAD, _PT_DYNAMIC = 1, 2

_bundled_runtime: str | None = None


def load_bundled_fortran_runtime() -> str:
    """Load the ``mlx[cpu]`` wheel's Fortran runtime so that it answers to ``libgfortran.so.5``.

    The dynamic linker satisfies a library's ``NEEDED`` entry with an already loaded library of
    the same soname. The wheel's copy is renamed, so this loads its own dependencies (renamed
    ``libquadmath``) by path, then an in-memory copy of it with the soname rewritten. Idempotent.

    Returns:
        The path of the wheel's runtime that was loaded.

    Raises:
        OSError: No wheel runtime was found, or the linker refused it.
        ValueError: The file is not a 64-bit little-endian ELF library with a soname.
    """
    global _bundled_runtime
    if _bundled_runtime is not None:
        return _bundled_runtime
    runtime = _wheel_fortran_runtime()
    data = Path(runtime).read_bytes()
    for needed in elf_needed(data):  # its renamed siblings, found by path before it needs them
        sibling = Path(runtime).parent / needed
        if sibling.is_file():
            ctypes.CDLL(str(sibling), mode=ctypes.RTLD_GLOBAL)
    _load_from_memory(with_soname(data, FORTRAN_SONAME), FORTRAN_SONAME)
    _bundled_runtime = runtime
    return runtime


def _wheel_fortran_runtime() -> str:
    """Path of ``libgfortran-*.so*`` inside the installed ``mlx-cpu`` distribution."""
    try:
        distribution = metadata.distribution("mlx-cpu")
    except metadata.PackageNotFoundError as error:
        raise OSError("the mlx-cpu wheel is not installed") from error
    for file in distribution.files or ():
        if Path(str(file)).name.startswith("libgfortran"):
            path = Path(str(distribution.locate_file(file)))
            if path.is_file():
                return str(path)
    raise OSError("the mlx-cpu wheel holds no libgfortran")


def _load_from_memory(data: bytes, name: str) -> ctypes.CDLL:
    """dlopen ``data`` as a library without a file on disk (memfd), else via a private temp file."""
    if hasattr(os, "memfd_create"):
        try:
            descriptor = os.memfd_create(name, os.MFD_CLOEXEC)
        except OSError:
            descriptor = None
        if descriptor is not None:
            try:
                os.write(descriptor, data)
                return ctypes.CDLL(f"/proc/self/fd/{descriptor}", mode=ctypes.RTLD_GLOBAL)
            finally:
                os.close(descriptor)  # the mapping keeps the memory alive
    with tempfile.TemporaryDirectory(prefix="mlx-reasoner-") as folder:
        path = Path(folder) / name  # private to this process; gone once mapped
        path.write_bytes(data)
        return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


def _dynamic_strings(data: bytes) -> tuple[dict[int, list[int]], int]:
    """The dynamic section's entries (tag -> values) and the file offset of its string table."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    entry_size, count = struct.unpack_from("<HH", data, 0x36)
    loads, dynamic = [], None
    for index in range(count):
        kind, _, offset, vaddr, _, size = struct.unpack_from(
            "<IIQQQQ", data, phoff + index * entry_size
        )
        if kind == _PT_LOAD:
            loads.append((vaddr, offset, size))
        elif kind == _PT_DYNAMIC:
            dynamic = (offset, size)
    if dynamic is None:
        raise ValueError("no dynamic section")
    entries: dict[int, list[int]] = {}
    for position in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, value = struct.unpack_from("<qQ", data, position)
        if tag == _DT_NULL:
            break
        entries.setdefault(tag, []).append(value)
    if _DT_STRTAB not in entries:
        raise ValueError("no dynamic string table")
    address = entries[_DT_STRTAB][0]
    for vaddr, offset, size in loads:
        if vaddr <= address < vaddr + size:
            return entries, offset + address - vaddr
    raise ValueError("the dynamic string table is outside every loaded segment")


def _string_at(data: bytes, offset: int) -> str:
    return data[offset : data.index(b"\0", offset)].decode()


def elf_needed(data: bytes) -> list[str]:
    """The ``NEEDED`` library names of an ELF shared library."""
    entries, strings = _dynamic_strings(data)
    return [_string_at(data, strings + value) for value in entries.get(_DT_NEEDED, [])]


def elf_soname(data: bytes) -> str:
    """The soname of an ELF shared library."""
    entries, strings = _dynamic_strings(data)
    if _DT_SONAME not in entries:
        raise ValueError("the library has no soname")
    return _string_at(data, strings + entries[_DT_SONAME][0])


def with_soname(data: bytes, soname: str) -> bytes:
    """A copy of ``data`` whose soname reads ``soname``, written over the old one in place.

    The new name must not be longer than the old; the leftover bytes become NULs. The old
    string must not be shared as the tail of another name (the linker may merge suffixes).
    """
    entries, strings = _dynamic_strings(data)
    if _DT_SONAME not in entries:
        raise ValueError("the library has no soname")
    start = strings + entries[_DT_SONAME][0]
    old = _string_at(data, start)
    new = soname.encode()
    if len(new) > len(old.encode()):
        raise ValueError(f"soname {soname!r} is longer than {old!r}")
    end = start + len(old.encode())
    for values in entries.values():  # another string pointing inside the old name would change
        for value in values:
            if start < strings + value <= end and (strings + value) != start:
                raise ValueError(f"the soname {old!r} shares its bytes with another name")
    patched = bytearray(data)
    patched[start : end + 1] = new + b"\0" * (end + 1 - start - len(new))
    return bytes(patched)
