"""Random-weight model folders in the real Qwen2.5 shapes, with a real tokenizer folder.

This module owns writing such a folder: ``config.json`` in Qwen2.5's layout, random weights in
``model.safetensors`` and the tokenizer files copied from a given folder. It loads with
``mlx_lm.load(path)`` and behaves like the real model in everything but what the weights know:
vocabulary, chat template, stop tokens, memory and speed. Run it as
``python -m mlx_reasoner.shapes 0.5B OUT --tokenizer DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.qwen2 import Model, ModelArgs

QWEN25_VOCAB_SIZE = 151_936  # the embedding rows; the tokenizer uses the first 151,665
MAX_POSITION_EMBEDDINGS = 32_768
ROPE_THETA = 1_000_000.0
RMS_NORM_EPS = 1e-6
# Qwen2's initializer_range: logits stay finite and spread out at every width.
INIT_STD = 0.02
_BLOCK_ELEMENTS = 1 << 24  # rows of a big matrix sampled at a time (64 MB of float32 scratch)

DTYPES = {"bfloat16": mx.bfloat16, "float32": mx.float32, "float16": mx.float16}
# Copied when present; the first three are required.
REQUIRED_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")
OPTIONAL_TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json")


@dataclass(frozen=True)
class Shape:
    """The sizes of a Qwen2.5 model body (all tie their embeddings)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int = QWEN25_VOCAB_SIZE


SHAPES = {
    "0.5B": Shape(896, 24, 14, 2, 4864),
    "1.5B": Shape(1536, 28, 12, 2, 8960),
    "3B": Shape(2048, 36, 16, 2, 11008),
    # A tiny body on the real vocabulary: tests of the tokenizer, template and stop tokens.
    "vocab-test": Shape(64, 2, 4, 2, 128),
}


def model_args(shape: str = "0.5B", num_layers: int | None = None) -> ModelArgs:
    """mlx-lm's Qwen2 ``ModelArgs`` for a named shape.

    Args:
        shape: a key of ``SHAPES``.
        num_layers: blocks to keep instead of the shape's own depth.

    Raises:
        ValueError: the shape is unknown or ``num_layers`` is below 1.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape '{shape}'; choose one of {', '.join(SHAPES)}")
    if num_layers is not None and num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    sizes = SHAPES[shape]
    return ModelArgs(
        model_type="qwen2",
        hidden_size=sizes.hidden_size,
        num_hidden_layers=num_layers or sizes.num_hidden_layers,
        intermediate_size=sizes.intermediate_size,
        num_attention_heads=sizes.num_attention_heads,
        rms_norm_eps=RMS_NORM_EPS,
        vocab_size=sizes.vocab_size,
        num_key_value_heads=sizes.num_key_value_heads,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rope_theta=ROPE_THETA,
        tie_word_embeddings=True,
    )


def model_config(args: ModelArgs, dtype: str, generation_config: dict) -> dict:
    """The Hugging Face ``config.json`` of a Qwen2.5 model with ``args``."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "intermediate_size": args.intermediate_size,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_position_embeddings,
        "max_window_layers": args.num_hidden_layers,
        "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": args.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "initializer_range": INIT_STD,
        "sliding_window": args.max_position_embeddings,
        "use_sliding_window": False,
        "use_cache": True,
        "bos_token_id": generation_config.get("bos_token_id"),
        "eos_token_id": generation_config.get("eos_token_id"),
        "torch_dtype": dtype,
    }


def random_weights(args: ModelArgs, dtype: str = "bfloat16", seed: int = 0) -> dict[str, mx.array]:
    """Random Qwen2 weights named as in Hugging Face checkpoints, each evaluated as it is made.

    Matrices are normal with std ``INIT_STD``, norm weights are 1 and biases 0, as Qwen2
    initialises them. Made one at a time in ``dtype``, big ones in row blocks, so the peak
    is the weights plus a little scratch, never a second copy of the model.

    Args:
        args: the model's sizes.
        dtype: a key of ``DTYPES``.
        seed: the same seed gives the same weights.

    Raises:
        ValueError: the dtype is unknown.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    mx_dtype = DTYPES[dtype]
    # The module's own parameters are lazy and never evaluated: only names and shapes are read.
    param_shapes = {name: p.shape for name, p in tree_flatten(Model(args).parameters())}
    keys = mx.random.split(mx.random.key(seed), len(param_shapes))
    weights = {}
    for key, (name, shape) in zip(keys, sorted(param_shapes.items())):
        if name.endswith("norm.weight"):
            weight = mx.ones(shape, dtype=mx_dtype)
        elif name.endswith(".bias"):
            weight = mx.zeros(shape, dtype=mx_dtype)
        else:
            weight = _random_normal(shape, mx_dtype, key)
        mx.eval(weight)
        weights[name] = weight
    return weights


def _random_normal(shape: tuple[int, ...], dtype: mx.Dtype, key: mx.array) -> mx.array:
    """Normal ``INIT_STD`` noise written block by block into one array of ``dtype``.

    Sampling works in float32, so one call for the 3B embedding would need 1.2 GB of scratch
    on top of its 0.6 GB of bfloat16; blocks of rows keep the scratch small.
    """
    rows = max(1, _BLOCK_ELEMENTS // max(1, int(np.prod(shape[1:]))))
    if shape[0] <= rows:
        return mx.random.normal(shape, dtype=dtype, scale=INIT_STD, key=key)
    weight = mx.zeros(shape, dtype=dtype)
    starts = range(0, shape[0], rows)
    for start, block_key in zip(starts, mx.random.split(key, len(starts))):
        block_shape = (min(rows, shape[0] - start), *shape[1:])
        weight[start : start + rows] = mx.random.normal(
            block_shape, dtype=dtype, scale=INIT_STD, key=block_key
        )
        mx.eval(weight)  # one block's scratch at a time; the update reuses weight's buffer
    return weight


def build_shaped_model(
    path: str | Path,
    shape: str = "0.5B",
    *,
    tokenizer_dir: str | Path,
    dtype: str = "bfloat16",
    num_layers: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a random-weight Qwen2.5 model folder in a named shape, with a given tokenizer.

    The folder is written next to ``path`` under a temporary name and renamed into place, so
    a failed or interrupted call leaves nothing at ``path``.

    Args:
        path: the folder to create; it may exist only when empty (or with ``overwrite``).
        shape: ``"0.5B"``, ``"1.5B"``, ``"3B"`` or ``"vocab-test"`` (a tiny body on the
            real 151,936-token vocabulary).
        tokenizer_dir: a folder with ``tokenizer.json``, ``tokenizer_config.json`` and
            ``generation_config.json`` (``vocab.json`` and ``merges.txt`` are copied too).
        dtype: ``"bfloat16"`` (as Qwen ships) or ``"float32"``.
        num_layers: keep this many blocks instead of the shape's depth.
        seed: the same seed gives the same weights.
        overwrite: replace a folder that already has files.

    Returns:
        ``path`` as a ``Path``; ``mlx_lm.load(str(path))`` loads it.

    Raises:
        ValueError: an unknown shape or dtype, a bad ``num_layers``, missing tokenizer files,
            or a non-empty ``path`` without ``overwrite``.
    """
    out = Path(path)
    args = model_args(shape, num_layers)
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    tokenizer_dir = Path(tokenizer_dir)
    missing = [n for n in REQUIRED_TOKENIZER_FILES if not (tokenizer_dir / n).is_file()]
    if missing:
        raise ValueError(
            f"tokenizer folder {tokenizer_dir} lacks {', '.join(missing)}; pass a folder "
            "holding a Hugging Face tokenizer (e.g. ../shared/real/qwen2.5-tokenizer)"
        )
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise ValueError(f"{out} already exists and is not empty; remove it or pass --overwrite")
    generation_config = json.loads((tokenizer_dir / "generation_config.json").read_text())

    out.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        temp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide the folder from others
        weights = random_weights(args, dtype, seed)
        mx.save_safetensors(str(temp / "model.safetensors"), weights, metadata={"format": "mlx"})
        del weights
        config = model_config(args, dtype, generation_config)
        (temp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name in REQUIRED_TOKENIZER_FILES + OPTIONAL_TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, temp / name)
        _move_into_place(temp, out)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _move_into_place(temp: Path, out: Path) -> None:
    """Rename ``temp`` to ``out``; an existing ``out`` is moved aside first and then deleted."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(temp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def main(argv: list[str] | None = None) -> int:
    """``python -m mlx_reasoner.shapes SHAPE OUT --tokenizer DIR [--dtype] [--layers N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m mlx_reasoner.shapes",
        description="Write a random-weight Qwen2.5 model folder in a named shape.",
    )
    parser.add_argument("shape", choices=list(SHAPES), help="the Qwen2.5 shape")
    parser.add_argument("out", help="the model folder to write")
    parser.add_argument("--tokenizer", required=True, help="folder holding the tokenizer files")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--layers", type=int, default=None, help="blocks (default: the shape's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    options = parser.parse_args(argv)
    try:
        out = build_shaped_model(
            options.out,
            options.shape,
            tokenizer_dir=options.tokenizer,
            dtype=options.dtype,
            num_layers=options.layers,
            seed=options.seed,
            overwrite=options.overwrite,
        )
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
