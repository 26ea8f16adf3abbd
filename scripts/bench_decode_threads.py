"""The rollout with the decode choosing OpenBLAS's thread count, against one thread, in turns.

Usage: python scripts/bench_decode_threads.py MODEL_DIR ROWS TOKENS ROUNDS

Loads the model with LoRA rank 8 on every block and times ``generate_groups`` of one 110-token
prompt x ROWS completions of TOKENS tokens (forced to full length): "chosen" lets
``blas.DecodeThreads`` pick per step (the default), "one" holds one thread as
``OPENBLAS_NUM_THREADS=1`` would. Prints each round's seconds and their ratio.
"""

from mlx_reasoner import backend  # noqa: I001

backend.start()  # first: the fast BLAS must load before anything imports mlx

import sys
import time

import mlx.core as mx
import mlx_lm
import numpy as np

from mlx_reasoner.engine import blas
from mlx_reasoner.model import attach_lora, lora_config
from mlx_reasoner.rollout import generate_groups

path, rows, tokens, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model, tokenizer = mlx_lm.load(path)
attach_lora(model, lora_config(-1, 8))
mx.eval(model.parameters())
prompt = [int(t) for t in np.random.default_rng(0).integers(3, tokenizer.vocab_size, 110)]


def roll(chosen: bool) -> float:
    blas._user_threads = not chosen  # a user's OPENBLAS_NUM_THREADS turns the choice off
    start = time.perf_counter()
    generate_groups(model, tokenizer, [prompt], rows, tokens, ignore_eos=True)
    return time.perf_counter() - start


roll(True)  # warm-up: compiles the decode step
times = {"chosen": [], "one": []}
for _ in range(rounds):
    times["chosen"].append(roll(True))
    times["one"].append(roll(False))
print({name: [round(t, 2) for t in values] for name, values in times.items()})
print("chosen / one per round:", [round(a / b, 3) for a, b in zip(times["chosen"], times["one"])])
