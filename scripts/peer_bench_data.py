"""Write the bench's prompts as data files that TRL and mlx-lm-lora read.

    python scripts/peer_bench_data.py runs

writes ``runs/bench-data/{train,valid}.jsonl`` (the bench's first two ``task:arithmetic``
questions) and ``runs/bench-data1/{train,valid}.jsonl`` (the first question, four times), each
row with ``prompt``, ``answer`` and the built-in ``system`` prompt. See docs/performance.md,
"Comparing with TRL and mlx-lm-lora".
"""

import json
import sys
from pathlib import Path

from mlx_reasoner.checkpoints import atomic_write_text
from mlx_reasoner.data import load_examples
from mlx_reasoner.prompts import load_system_prompt


def main(root: str) -> None:
    system = load_system_prompt()
    rows = [
        {"prompt": ex.question, "answer": ex.answer, "system": system}
        for ex in load_examples("task:arithmetic", limit=2)
    ]
    for folder, chosen in (("bench-data", rows), ("bench-data1", [rows[0]] * 4)):
        out = Path(root) / folder
        out.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(row) + "\n" for row in chosen)
        for name in ("train", "valid"):
            atomic_write_text(out / f"{name}.jsonl", text)
        print(f"wrote {out}/train.jsonl and valid.jsonl ({len(chosen)} rows)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs")
