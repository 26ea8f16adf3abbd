"""Time TRL's GRPOTrainer (PEFT LoRA, PyTorch on the CPU) on the bench's model and prompts.

Not part of mlx-reasoner: run it in a separate virtual environment with torch, trl and peft
(see docs/performance.md, "Comparing with TRL and mlx-lm-lora"). It mirrors the settings of
``mlx-reasoner bench``: completions forced to full length, LoRA rank 8 with scale 20 on every
linear layer, AdamW, and a constant zero reward (ours cost about 1 ms per step).

    python scripts/trl_bench.py --model runs/bench-model --data runs/bench-data/train.jsonl \
        --batch-size 1 --group-size 4 --max-completion-tokens 64 --output trl.json

Prints the seconds of every optimizer step and their median (steps after the first), with the
generation time of each step (TRL's ``_generate_and_score_completions``) and the peak RSS.
"""

import argparse
import json
import resource
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="HF model folder (build_bench_model)")
    parser.add_argument("--data", required=True, help="jsonl with prompt, answer, system")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--max-completion-tokens", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    with open(args.data) as f:
        rows = [json.loads(line) for line in f][: args.batch_size]
    prompts = [
        {
            "prompt": [
                {"role": "system", "content": r["system"]},
                {"role": "user", "content": r["prompt"]},
            ],
            "answer": r["answer"],
        }
        for r in rows
    ]
    dataset = Dataset.from_list(prompts * (args.steps + 2))

    def zero_reward(completions, **kwargs):
        return [0.0] * len(completions)

    step_seconds, generate_seconds = [], []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            self.start = time.perf_counter()
            generate_seconds.append(0.0)

        def on_step_end(self, *a, **kw):
            step_seconds.append(time.perf_counter() - self.start)
            print(
                f"step {len(step_seconds)}: {step_seconds[-1]:.3f} s "
                f"(generate {generate_seconds[-1]:.3f} s)",
                flush=True,
            )

    completions = args.batch_size * args.group_size
    config = GRPOConfig(
        output_dir="/tmp/trl-bench",
        use_cpu=True,
        max_steps=args.steps,
        logging_steps=1,
        report_to=[],
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=max(completions // args.micro_batch_size, 1),
        num_generations=args.group_size,
        max_completion_length=args.max_completion_tokens,
        generation_kwargs={"min_new_tokens": args.max_completion_tokens},
        temperature=0.9,
        beta=args.beta,
        loss_type="grpo",
        epsilon=0.2,
        num_iterations=1,
        learning_rate=1e-5,
        save_strategy="no",
        shuffle_dataset=False,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    trainer = GRPOTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=zero_reward,
        args=config,
        train_dataset=dataset,
        callbacks=[StepTimer()],
        peft_config=LoraConfig(r=8, lora_alpha=160, lora_dropout=0.0, target_modules="all-linear"),
    )
    generate = trainer._generate_and_score_completions

    def timed_generate(*a, **kw):
        start = time.perf_counter()
        out = generate(*a, **kw)
        generate_seconds[-1] += time.perf_counter() - start
        lengths = out["completion_mask"].sum(dim=1).tolist()
        if min(lengths) < args.max_completion_tokens:
            print(f"warning: completion lengths {lengths}")
        return out

    trainer._generate_and_score_completions = timed_generate
    trainer.train()
    measured = step_seconds[1:]
    figures = {
        "step_seconds": statistics.median(measured),
        "generate_seconds": statistics.median(generate_seconds[1:]),
        "steps": step_seconds,
        "generate": generate_seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "settings": vars(args),
        "versions": {"torch": torch.__version__, "trl": __import__("trl").__version__},
    }
    print(json.dumps({k: v for k, v in figures.items() if k not in ("steps", "generate")}))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
