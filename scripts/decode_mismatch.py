"""How far the rollout's sampled log-probs are from the training pass's at the same tokens.

Usage: python scripts/decode_mismatch.py MODEL_DIR [COMPLETIONS] [TOKENS] [--dtype bfloat16]

Loads the model (LoRA rank 8 on every block, B nudged off zero so the adapters act), samples
COMPLETIONS completions of TOKENS tokens at temperature 0.9 with the decode ``train`` uses, then
scores the same tokens with the training pass (``completion_logprobs``) and prints the mean and
largest absolute gap and the k3 estimate of KL(decode || training pass), per token: the figures
``train`` logs as ``mismatch_abs`` and ``mismatch_kl``.
"""

from mlx_reasoner import backend  # noqa: I001

backend.start()  # first: the fast BLAS must load before anything imports mlx

import argparse
import json

import mlx.core as mx
import mlx_lm
import numpy as np
from mlx.utils import tree_flatten, tree_map
from mlx_lm.sample_utils import make_sampler

from mlx_reasoner.logprobs import completion_logprobs, pack_sequences
from mlx_reasoner.model import attach_lora, lora_config
from mlx_reasoner.rollout import generate_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("completions", type=int, nargs="?", default=8)
    parser.add_argument("tokens", type=int, nargs="?", default=64)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    args = parser.parse_args()
    model, tokenizer = mlx_lm.load(args.model)
    if args.dtype:
        model.set_dtype(getattr(mx, args.dtype))
    attach_lora(model, lora_config(-1, 8))
    mx.random.seed(0)
    model.update(
        tree_map(lambda p: p + 0.01 * mx.random.normal(p.shape, dtype=p.dtype),
                 model.trainable_parameters())
    )  # fmt: skip
    prompt = tokenizer.encode("Even or odd number of z: kvqzzxvqxzxzzzzq. " * 4)
    rollouts = generate_groups(
        model, tokenizer, [prompt], args.completions, args.tokens, make_sampler(0.9),
        ignore_eos=True, temperature=0.9,
    )  # fmt: skip
    batch = pack_sequences(rollouts.prompt_ids, rollouts.completion_ids, np.zeros(len(rollouts)))
    train = np.array(completion_logprobs(model, batch, 0.9).astype(mx.float32))
    decode = np.zeros_like(train)
    for row, values in enumerate(rollouts.logprobs):
        decode[row, : len(values)] = values
    mask = np.array(batch.mask) > 0
    gap = (train - decode)[mask]
    k3 = np.exp(gap) - gap - 1.0
    dtype = str(next(iter(dict(tree_flatten(model.parameters())).values())).dtype)
    print(json.dumps({
        "model": args.model, "dtype": dtype, "decoder": rollouts.decoder,
        "tokens": int(mask.sum()), "mismatch_abs": float(np.abs(gap).mean()),
        "mismatch_max": float(np.abs(gap).max()), "mismatch_kl": float(k3.mean()),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
