"""Fast BLAS: OpenBLAS loaded before mlx. The choice is made once, at import, so each case that
needs a different choice runs in a fresh interpreter."""

import dataclasses
import json
import os
import platform
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest

from mlx_reasoner.backend import switched_off
from mlx_reasoner.engine import blas
from mlx_reasoner.engine.blas import (
    ENV_VAR,
    MLX_IMPORTED_FIRST,
    REFERENCE_NAME,
    blas_info,
    build_cpu_problem,
    enable_fast_blas,
)

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux loader")

# Runs in a child interpreter: `{before}` may import mlx first; prints one JSON line.
PROBE = """
import json
{before}
from mlx_reasoner import backend
backend.start()
import mlx.core as mx
from mlx_reasoner.engine.blas import blas_info
from mlx_reasoner.showcase.bench import matmul_gflops

key_a, key_b, key_c = mx.random.split(mx.random.key(7), 3)
a = mx.random.normal((64, 96), key=key_a)  # [64, 96]
b = mx.random.normal((96, 80), key=key_b)  # [96, 80]
square = mx.random.normal((32, 32), key=key_c) + 8 * mx.eye(32)  # well conditioned
result = {{
    "info": blas_info().as_dict(),
    "product": mx.matmul(a, b, stream=mx.cpu).tolist(),
    "inverse": mx.linalg.inv(square, stream=mx.cpu).tolist(),  # LAPACK, also rebound
    "gflops": matmul_gflops(512, repeats=7) if {gflops} else None,
}}
print(json.dumps(result))
"""


def probe(fast_blas: str | None, before: str = "", gflops: bool = False) -> dict:
    """Run PROBE in a fresh interpreter with ``MLX_REASONER_FAST_BLAS`` set (or unset)."""
    env = {key: value for key, value in os.environ.items() if key not in (ENV_VAR, "LD_PRELOAD")}
    if fast_blas is not None:
        env[ENV_VAR] = fast_blas
    # One BLAS thread: the ratio then compares kernels, not how busy the other core is.
    env["OPENBLAS_NUM_THREADS"] = "1"
    code = PROBE.format(before=before, gflops=gflops)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def cmeel_openblas_installed() -> bool:
    try:
        metadata.distribution("cmeel-openblas")
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.parametrize(
    ("config", "cpu_flags", "problem"),
    [
        ("openblas_config=USE_64BITINT= DYNAMIC_ARCH=ON HASWELL", set(), None),
        ("openblas_config=USE_64BITINT= DYNAMIC_ARCH=OFF ZEN", {"avx2", "fma"}, None),
        ("openblas_config=USE_64BITINT= DYNAMIC_ARCH=OFF ZEN", {"avx"}, "lacks avx2, fma"),
        ("openblas_config=USE_64BITINT=1 DYNAMIC_ARCH=ON HASWELL", {"avx2"}, "ILP64"),
        ("openblas_config=DYNAMIC_ARCH=OFF NEOVERSEN2", {"asimd"}, "lacks bf16, sve, sve2"),
        ("openblas_config=DYNAMIC_ARCH=OFF LOONGSON3R5", set(), "does not know"),
        ("", set(), None),
    ],
)
def test_build_cpu_problem(config, cpu_flags, problem):
    found = build_cpu_problem(f"Name: OpenBLAS\n{config}\n", cpu_flags)
    if problem is None:
        assert found is None
    else:
        assert problem in found


def test_enable_fast_blas_is_idempotent():
    assert enable_fast_blas() is enable_fast_blas() is blas_info()
    assert json.loads(json.dumps(blas_info().as_dict()))["name"] == blas_info().name


def test_enable_fast_blas_never_raises(monkeypatch):
    def broken():
        raise RuntimeError("no /proc here")

    monkeypatch.setattr(blas, "_decide", broken)
    monkeypatch.setattr(blas, "_state", None)
    info = enable_fast_blas()
    assert not info.enabled
    assert info.reason == "fast BLAS setup failed: RuntimeError('no /proc here')"


def test_missing_libgfortran_says_what_to_install():
    error = OSError("libgfortran.so.5: cannot open shared object file: No such file or directory")
    assert "reinstall mlx[cpu]" in blas._explain_load_error(error)


@linux_only
def test_env_var_off_keeps_reference_blas():
    info = probe("0")["info"]
    assert info == {
        "name": REFERENCE_NAME,
        "path": None,
        "reason": f"disabled by {ENV_VAR}=0",
        "enabled": False,
        "threads": None,
        "fix": f"unset {ENV_VAR}",
    }


@linux_only
def test_mlx_imported_first_is_explained():
    info = probe(None, before="import mlx.core")["info"]
    assert not info["enabled"]
    assert info["reason"].startswith(f"{MLX_IMPORTED_FIRST}; call mlx_reasoner.backend.start()")
    assert "LD_PRELOAD=" in info["reason"]


@pytest.mark.engine
@linux_only
@pytest.mark.skipif(platform.machine() != "x86_64", reason="the pip wheels checked on x86_64")
def test_openblas_is_faster_and_gives_the_same_numbers():
    """On any x86-64 CPU one of the two wheels the set-up installs loads."""
    fast = probe(None, gflops=True)
    assert fast["info"]["enabled"], fast["info"]["reason"]
    wheel = "cmeel-openblas" if "avx512f" in blas._cpu_flags() else "scipy-openblas32"
    assert fast["info"]["name"].startswith(f"openblas ({wheel} ")
    assert fast["info"]["threads"] == 1  # OPENBLAS_NUM_THREADS is respected
    reference = probe("0", gflops=True)
    assert not reference["info"]["enabled"]

    speedup = fast["gflops"] / reference["gflops"]
    assert speedup > 3, f"{fast['gflops']:.1f} vs {reference['gflops']:.1f} GFLOP/s"
    np.testing.assert_allclose(fast["product"], reference["product"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(fast["inverse"], reference["inverse"], rtol=1e-4, atol=1e-6)
    if not switched_off(ENV_VAR):
        assert blas_info().enabled, "conftest should start the backend before importing mlx"


def mlx_fortran_runtime() -> bytes:
    return open(blas._wheel_fortran_runtime(), "rb").read()


def mlx_cpu_wheel_installed() -> bool:
    try:
        blas._wheel_fortran_runtime()
    except OSError:
        return False
    return True


needs_mlx_cpu_runtime = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not mlx_cpu_wheel_installed(),
    reason="the mlx[cpu] wheel's Fortran runtime exists on Linux only",
)


@needs_mlx_cpu_runtime
def test_soname_is_rewritten_in_place_and_nothing_else_changes():
    data = mlx_fortran_runtime()
    old = blas.elf_soname(data)
    assert old.startswith("libgfortran-") and old != blas.FORTRAN_SONAME  # auditwheel's rename
    patched = blas.with_soname(data, blas.FORTRAN_SONAME)
    assert blas.elf_soname(patched) == blas.FORTRAN_SONAME
    assert len(patched) == len(data)
    assert blas.elf_needed(patched) == blas.elf_needed(data)
    changed = [i for i, (a, b) in enumerate(zip(data, patched)) if a != b]
    assert len(changed) <= len(old) and changed[-1] - changed[0] < len(old)


@needs_mlx_cpu_runtime
def test_soname_rewrite_refuses_what_it_cannot_do():
    data = mlx_fortran_runtime()
    with pytest.raises(ValueError, match="longer"):
        blas.with_soname(data, "x" * 200)
    with pytest.raises(ValueError, match="64-bit little-endian ELF"):
        blas.with_soname(b"#!/bin/sh\n" + data, blas.FORTRAN_SONAME)


# Runs in a child interpreter: lends mlx's Fortran runtime, then loads cmeel's OpenBLAS from its
# own path, then checks MLX's matmul and LAPACK calls against numpy. Prints one JSON line.
BUNDLED_PROBE = """
import ctypes, json, sys
from mlx_reasoner.engine import blas
assert "mlx.core" not in sys.modules
runtime = blas.load_bundled_fortran_runtime()
openblas = blas._cmeel_openblas()
ctypes.CDLL(openblas.target, mode=ctypes.RTLD_GLOBAL)
import mlx.core as mx
import numpy as np
maps = open("/proc/self/maps").read()
a = np.random.default_rng(0).normal(size=(64, 48)).astype(np.float32)
square = a.T @ a + 48 * np.eye(48, dtype=np.float32)
product = mx.matmul(mx.array(a.T), mx.array(a), stream=mx.cpu)
inverse = mx.linalg.inv(mx.array(square), stream=mx.cpu)
print(json.dumps({
    "runtime": runtime,
    "memfd": "memfd:libgfortran.so.5" in maps,
    "openblas_mapped": openblas.target in maps,
    "system_runtime": [l for l in maps.splitlines() if "/libgfortran.so" in l],
    "product_error": float(np.abs(np.array(product) - a.T @ a).max()),
    "inverse_error": float(np.abs(np.array(inverse) @ square - np.eye(48)).max()),
}))
"""


@needs_mlx_cpu_runtime
@pytest.mark.skipif(not cmeel_openblas_installed(), reason="cmeel-openblas not installed")
def test_openblas_runs_on_mlxs_own_fortran_runtime():
    """Whether or not the system has libgfortran5, the wheel's runtime alone is enough."""
    if build_cpu_problem(
        open(blas._cmeel_openblas().target.rsplit("/", 1)[0] + "/pkgconfig/openblas.pc").read(),
        blas._cpu_flags(),
    ):
        pytest.skip("cmeel-openblas's build cannot run on this CPU")
    env = {key: value for key, value in os.environ.items() if key not in (ENV_VAR, "LD_PRELOAD")}
    env[ENV_VAR] = "0"  # the import must not load OpenBLAS by itself: the probe does it by hand
    env["OPENBLAS_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", BUNDLED_PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert "mlx_cpu.libs" in result["runtime"]
    assert result["memfd"] and result["openblas_mapped"]
    assert result["system_runtime"] == []  # OpenBLAS took the lent runtime, not a system one
    # float32 sums of 64 (product) and 48 (inverse) terms of size ~10 and ~1: well within 1e-3.
    assert result["product_error"] < 64 * 10 * np.finfo(np.float32).eps * 8
    assert result["inverse_error"] < 1e-3


@pytest.mark.engine
@linux_only
@pytest.mark.skipif(platform.machine() != "x86_64", reason="cmeel-openblas checked on x86_64")
@pytest.mark.skipif(not cmeel_openblas_installed(), reason="cmeel-openblas not installed")
def test_two_processes_starting_at_once_both_get_openblas():
    """Nothing is written to disk, so simultaneous starts cannot race."""
    env = {key: value for key, value in os.environ.items() if key not in (ENV_VAR, "LD_PRELOAD")}
    code = (
        "import json; from mlx_reasoner import backend; backend.start(); import mlx.core as mx;"
        "from mlx_reasoner.engine.blas import blas_info;"
        "mx.eval(mx.ones((8, 8)) @ mx.ones((8, 8))); print(json.dumps(blas_info().as_dict()))"
    )
    children = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    infos = [json.loads(child.communicate(timeout=120)[0].splitlines()[-1]) for child in children]
    assert all(child.returncode == 0 for child in children)
    if any("this CPU lacks" in (info["reason"] or "") for info in infos):
        pytest.skip("cmeel-openblas's build cannot run on this CPU")
    assert all(info["enabled"] for info in infos), infos
    assert len({info["name"] for info in infos}) == 1


def test_slow_blas_notice_names_the_cost_and_one_fix(monkeypatch):
    slow = blas.BlasInfo(REFERENCE_NAME, reason="cmeel-openblas: gone", fix="pip install it")
    monkeypatch.setattr(blas, "_state", slow)
    monkeypatch.setattr(blas.sys, "platform", "linux")
    notice = blas.slow_blas_notice("demo")
    what, fix = notice.splitlines()
    assert "reference BLAS" in what and "cmeel-openblas: gone" in what
    assert "about 8 minutes instead of about 1" in what
    assert fix == "Fix: pip install it"
    monkeypatch.setattr(blas, "_state", dataclasses.replace(slow, enabled=True))
    assert blas.slow_blas_notice("demo") is None


@pytest.mark.parametrize(
    ("problem", "fix"),
    [
        (None, blas._PIP_FIX),
        ("built for SKYLAKEX CPUs only; this CPU lacks avx512f", blas._SYSTEM_FIX),
    ],
)
def test_fix_follows_why_the_wheel_failed(problem, fix):
    cmeel = blas._Candidate("cmeel-openblas 0.3.31", "/x/libopenblas.so.0", problem=problem)
    system = blas._Candidate("system", "libopenblas.so.0")
    assert blas._fix_for([cmeel, system]) == fix
    assert blas._fix_for([system]).startswith("pip install")
    # On x86-64 the scipy wheel runs on every CPU, so (re)installing it is the fix.
    scipy = blas._Candidate("scipy-openblas32", "", problem=blas._NOT_INSTALLED, prefix="scipy_")
    assert blas._fix_for([cmeel, scipy, system]) == "pip install scipy-openblas32"
    broken = dataclasses.replace(scipy, problem="no scipy_cblas_sgemm")
    assert blas._fix_for([cmeel, broken, system]).startswith("pip install --force-reinstall scipy")
