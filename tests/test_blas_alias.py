"""The in-memory alias library: its ELF loads, its names resolve, its stubs jump where told; and
MLX's BLAS/LAPACK calls reach scipy-openblas32 through it."""

import ctypes
import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from mlx_reasoner.engine import blas, blas_alias

x86_linux = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.machine() != "x86_64",
    reason="the alias stubs are x86-64 Linux code",
)


def test_elf_hash_matches_the_system_v_definition():
    # Values from the System V ABI's algorithm worked by hand: short names are plain shifts.
    assert blas_alias.elf_hash(b"") == 0
    assert blas_alias.elf_hash(b"a") == 0x61
    assert blas_alias.elf_hash(b"ab") == (0x61 << 4) + 0x62
    # After "g" the sum 0x6789abc7 has a top nibble (6): it is xored in 24 bits down (0x60) and
    # cleared, 0x0789aba7; "h" then gives 0x789abad8, folded (0x70) and cleared again.
    assert blas_alias.elf_hash(b"abcdefg") == 0x0789ABA7
    assert blas_alias.elf_hash(b"abcdefgh") == 0x089ABAA8


def test_alias_library_refuses_bad_names():
    for names in ([], ["a", "a"], ["a", ""]):
        with pytest.raises(ValueError, match="distinct and non-empty"):
            blas_alias.alias_library(names)


@x86_linux
def test_alias_names_resolve_and_jump_to_the_functions_in_their_slots():
    """libc's labs and abs behind made-up names: dlsym goes through the hash table we wrote."""
    names = [f"mlx_reasoner_test_fn_{i}" for i in range(40)]  # enough to share hash buckets
    library = blas._load_from_memory(blas_alias.alias_library(names), "alias-test.so")
    slots = (ctypes.c_void_p * len(names)).in_dll(library, blas_alias.SLOTS_SYMBOL)
    assert all(slot is None for slot in slots)  # zero until filled
    libc = ctypes.CDLL(None)
    targets = [libc.labs, libc.abs]
    for index in range(len(names)):
        slots[index] = ctypes.cast(targets[index % 2], ctypes.c_void_p).value
    for index, name in enumerate(names):
        function = getattr(library, name)
        function.argtypes, function.restype = [ctypes.c_long], ctypes.c_long
        assert function(-(index + 3)) == index + 3
    with pytest.raises(AttributeError):
        library.mlx_reasoner_test_fn_40  # noqa: B018  (a name it does not export)


@x86_linux
def test_undefined_symbols_of_libmlx_include_its_blas_calls():
    names = set(blas_alias.undefined_symbols(blas._libmlx_path()))
    assert {"cblas_sgemm", "sgetrf_"} <= names
    assert "malloc" in names
    with pytest.raises(ValueError, match="not a 64-bit"):
        blas_alias.undefined_symbols(__file__)


# Runs in a child interpreter: aliases scipy-openblas32 by hand (the automatic choice may pick
# cmeel-openblas on an AVX-512 CPU), then checks MLX's matmul and LAPACK calls against numpy.
ALIAS_PROBE = """
import json, sys
from mlx_reasoner.engine import blas
assert "mlx.core" not in sys.modules
candidate = blas._scipy_openblas()
assert candidate.problem is None, candidate.problem
library = blas._load_aliased(candidate)
import mlx.core as mx
import numpy as np
from mlx_reasoner.showcase.bench import matmul_gflops
maps = open("/proc/self/maps").read()
a = np.random.default_rng(0).normal(size=(256, 192)).astype(np.float32)
square = a.T @ a + 192 * np.eye(192, dtype=np.float32)
product = mx.matmul(mx.array(a.T), mx.array(a), stream=mx.cpu)
inverse = mx.linalg.inv(mx.array(square), stream=mx.cpu)
print(json.dumps({
    "alias_mapped": "mlx_reasoner_blas_alias.so" in maps,
    "scipy_mapped": candidate.target in maps,
    "gflops": matmul_gflops(512, repeats=7),
    "product_error": float(np.abs(np.array(product) - a.T @ a).max()),
    "inverse_error": float(np.abs(np.array(inverse) @ square - np.eye(192)).max()),
}))
"""


@x86_linux
def test_mlx_calls_scipy_openblas_through_the_alias():
    if blas._scipy_openblas().problem is not None:
        pytest.fail("scipy-openblas32 should be installed by the set-up command on x86-64 Linux")
    env = {k: v for k, v in os.environ.items() if k not in (blas.ENV_VAR, "LD_PRELOAD")}
    env[blas.ENV_VAR] = "0"  # the import must not pick a BLAS itself: the probe does it by hand
    env["OPENBLAS_NUM_THREADS"] = "1"
    results = {}
    for name, code in (("alias", ALIAS_PROBE), ("reference", ALIAS_PROBE_REFERENCE)):
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        results[name] = json.loads(done.stdout.splitlines()[-1])
    alias = results["alias"]
    assert alias["alias_mapped"] and alias["scipy_mapped"]
    # float32 sums of 256 terms of size ~1: the rounding bound is 256 * eps * |sum| (|sum| <~ 300).
    assert alias["product_error"] < 256 * np.finfo(np.float32).eps * 300
    assert alias["inverse_error"] < 1e-4
    # The reference BLAS runs a 512-square product at a few GFLOP/s; any OpenBLAS kernel at
    # several times that (measured ~60-70 vs ~4 GFLOP/s here) shows the calls were rebound.
    assert alias["gflops"] > 3 * results["reference"]["gflops"], results


ALIAS_PROBE_REFERENCE = """
import json
from mlx_reasoner.showcase.bench import matmul_gflops
print(json.dumps({"gflops": matmul_gflops(512, repeats=7)}))
"""
