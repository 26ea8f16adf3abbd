"""glibc keeps freed blocks for MLX's CPU arrays (host_memory.py): a repeated large allocation
must stop faulting in fresh pages. Each case runs in a fresh interpreter, since the setting
is made once per process at import."""

import json
import os
import subprocess
import sys

import pytest

from mlx_reasoner import host_memory

# Adds 1 to an 80 MB float32 array five times and prints the page faults per addition.
PROBE = """
import json, resource
import mlx_reasoner
import mlx.core as mx
from mlx_reasoner.host_memory import keep_freed_memory
x = mx.zeros((20_000_000,))
mx.eval(x, x + 1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    mx.eval(x + 1.0)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
print(json.dumps({"state": keep_freed_memory(), "faults": faults}))
"""

PAGES = 20_000_000 * 4 // 4096  # 19,531 pages of 4 KB in one result


def probe(switch: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV_SWITCH}
    if switch is not None:
        env[host_memory.ENV_SWITCH] = switch
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


needs_glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or host_memory._decide().endswith("not glibc"),
    reason="glibc's malloc on Linux",
)


@needs_glibc
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    kept = probe(None)
    assert kept["state"] == "kept"
    assert kept["faults"] < PAGES / 100  # the freed block comes back with its pages mapped


@needs_glibc
def test_switched_off_each_large_array_faults_in_every_page():
    plain = probe("0")
    assert plain["state"] == f"not applied: {host_memory.ENV_SWITCH}=0"
    assert plain["faults"] > PAGES / 2  # glibc's default: a fresh mmap per large block
