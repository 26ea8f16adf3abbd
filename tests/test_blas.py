"""Fast BLAS: OpenBLAS loaded before mlx. The choice is made once, at import, so each case that
needs a different choice runs in a fresh interpreter."""

import json
import os
import platform
import subprocess
import sys
from importlib import metadata

import numpy as np
import pytest

from mlx_reasoner import blas
from mlx_reasoner.blas import (
    ENV_VAR,
    MLX_IMPORTED_FIRST,
    OFF_VALUES,
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
import mlx_reasoner.cli
import mlx.core as mx
from mlx_reasoner.blas import blas_info, matmul_gflops

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
    assert "apt-get install libgfortran5" in blas._explain_load_error(error)


@linux_only
def test_env_var_off_keeps_reference_blas():
    info = probe("0")["info"]
    assert info == {
        "name": REFERENCE_NAME,
        "path": None,
        "reason": f"disabled by {ENV_VAR}=0",
        "enabled": False,
        "threads": None,
    }


@linux_only
def test_mlx_imported_first_is_explained():
    info = probe(None, before="import mlx.core")["info"]
    assert not info["enabled"]
    assert info["reason"].startswith(f"{MLX_IMPORTED_FIRST}; import mlx_reasoner first")
    assert "LD_PRELOAD=" in info["reason"]


@linux_only
@pytest.mark.skipif(platform.machine() != "x86_64", reason="cmeel-openblas checked on x86_64")
@pytest.mark.skipif(not cmeel_openblas_installed(), reason="cmeel-openblas not installed")
def test_openblas_is_faster_and_gives_the_same_numbers():
    fast = probe(None, gflops=True)
    reason = fast["info"]["reason"] or ""
    if "cannot open shared object file" in reason or "this CPU lacks" in reason:
        pytest.skip(f"this machine cannot load cmeel-openblas: {reason}")
    assert fast["info"]["enabled"], reason
    assert fast["info"]["name"].startswith("openblas (cmeel-openblas ")
    assert fast["info"]["threads"] == 1  # OPENBLAS_NUM_THREADS is respected
    reference = probe("0", gflops=True)
    assert not reference["info"]["enabled"]

    speedup = fast["gflops"] / reference["gflops"]
    assert speedup > 3, f"{fast['gflops']:.1f} vs {reference['gflops']:.1f} GFLOP/s"
    np.testing.assert_allclose(fast["product"], reference["product"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(fast["inverse"], reference["inverse"], rtol=1e-4, atol=1e-6)
    if os.environ.get(ENV_VAR, "1").strip().lower() not in OFF_VALUES:
        assert blas_info().enabled, "conftest should import mlx_reasoner before mlx"
