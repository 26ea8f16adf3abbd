"""Rollouts with the fused / module decode step and 1 / 2 OpenBLAS threads, in turns.

Usage: python scripts/bench_decode_paths.py MODEL_DIR ROWS TOKENS ROUNDS
"""

from mlx_reasoner import backend  # noqa: I001

backend.start()  # first: the fast BLAS must load before anything imports mlx

import os
import sys
import time

import mlx.core as mx
import mlx_lm
import numpy as np

from mlx_reasoner.engine import blas
from mlx_reasoner.engine.blas import set_threads
from mlx_reasoner.model import attach_lora, lora_config
from mlx_reasoner.rollout import generate_groups

path, rows, tokens, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model, tok = mlx_lm.load(path)
attach_lora(model, lora_config(-1, 8))
mx.eval(model.parameters())
prompt = [int(t) for t in np.random.default_rng(0).integers(100, 5000, 110)]


blas._user_threads = True  # the threads are set by hand here: keep the decode from choosing


def roll(fused, threads):
    os.environ["MLX_REASONER_FUSED_DECODE"] = "1" if fused else "0"
    set_threads(threads)
    t = time.perf_counter()
    r = generate_groups(model, tok, [prompt], rows, tokens, ignore_eos=True)
    dt = time.perf_counter() - t
    set_threads(1)
    return dt, r.decoder


settings = [(True, 1), (False, 1), (True, 2), (False, 2)]
for s in settings:
    roll(*s)  # warm / compile
res = {s: [] for s in settings}
for _ in range(rounds):
    for s in settings:
        dt, dec = roll(*s)
        res[s].append(dt)
base = np.array(res[(True, 1)])
for s in settings:
    a = np.array(res[s])
    print(
        s,
        f"median {np.median(a)*1e3:.0f} ms",
        "ratio to fused/1 thread per round",
        np.round(a / base, 2).tolist(),
        flush=True,
    )
