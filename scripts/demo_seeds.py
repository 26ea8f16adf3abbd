"""Run the offline demo on several seeds and print held-out accuracy after GRPO and wall time.

Usage: python scripts/demo_seeds.py OUT_DIR SEED [SEED ...] [--set FIELD=VALUE ...]

FIELD is a ``DemoRecipe`` field (``dynamic_sampling=true``, ``grpo_steps=30``, ...). Each seed
runs in OUT_DIR/seed-N; one JSON line per seed is printed and appended to OUT_DIR/seeds.jsonl.
"""

from mlx_reasoner import backend  # noqa: I001

backend.start()  # first: the fast BLAS must load before anything imports mlx

import argparse
import dataclasses
import io
import json
import shutil
from pathlib import Path

from rich.console import Console

from mlx_reasoner.showcase.demo import DemoRecipe, run_demo


def parse_value(field: dataclasses.Field, text: str):
    kind = field.type if isinstance(field.type, type) else type(field.default)
    if kind is bool:
        return text.lower() in ("1", "true", "yes", "on")
    return kind(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("seeds", nargs="+", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args()
    fields = {f.name: f for f in dataclasses.fields(DemoRecipe)}
    changes = {}
    for item in args.set:
        name, _, value = item.partition("=")
        changes[name] = parse_value(fields[name], value)
    recipe = dataclasses.replace(DemoRecipe(), **changes)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        folder = out / f"seed-{seed}"
        shutil.rmtree(folder, ignore_errors=True)
        quiet = Console(file=io.StringIO(), force_terminal=False)
        summary = run_demo(str(folder), seed, recipe=recipe, console=quiet, live=False)
        line = {
            "seed": seed,
            "changes": changes,
            "after_sft": summary["accuracy_after_sft"],
            "after_grpo": summary["accuracy_after_grpo"],
            "seconds": round(summary["seconds"], 1),
            "grpo_seconds": round(summary["grpo_seconds"], 1),
        }
        print(json.dumps(line), flush=True)
        with open(out / "seeds.jsonl", "a", encoding="utf-8") as file:
            file.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
