"""Wires the stages into one training run: check inputs, load, train, and keep the results.

Inputs are checked in order of cost (options, rewards, prompt, run folder, dataset, model)
so that a typo fails in milliseconds, not after a multi-gigabyte download.
"""

import platform
import shutil
from pathlib import Path

import mlx.core as mx

from .checkpoints import JsonlWriter, atomic_write_json, prepare_run_dir, save_adapters
from .config import TrainConfig
from .errors import ReasonerError


def _versions() -> dict[str, str]:
    import mlx_lm

    from . import __version__

    return {
        "mlx_reasoner": __version__,
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(mx.default_device()),
    }


def run_train(config: TrainConfig, console=None, live: bool | None = None) -> Path:
    """Run ``mlx-reasoner train`` end to end and return the run folder.

    Raises:
        ReasonerError: for any input problem; the message is one actionable line.
    """
    from .data import batch_iterator, load_examples
    from .model import adapter_weights, attach_lora, load_model, lora_config, read_adapter_config
    from .prompts import load_system_prompt
    from .rewards import resolve_rewards
    from .trainer import train
    from .ui import TrainDisplay

    config.validate()
    rewards = resolve_rewards(config.reward, config.reward_file)
    system_prompt = load_system_prompt(config.system_prompt)
    if config.adapter_path is not None:
        from .model import check_adapter_dir

        check_adapter_dir(config.adapter_path)
    run_dir = prepare_run_dir(config.run_dir)
    created_files = False
    try:
        examples = load_examples(
            config.dataset,
            split=config.split,
            question_field=config.question_field,
            answer_field=config.answer_field,
            dataset_config=config.dataset_config,
        )
        model, tokenizer = load_model(config.model)
        mx.random.seed(config.seed)
        if config.adapter_path is not None:
            # Continue from earlier adapters (e.g. an SFT run): their shape wins.
            lora = read_adapter_config(config.adapter_path)
            lora = lora_config(lora["num_layers"], **lora["lora_parameters"])
        else:
            lora = lora_config(config.lora_layers, config.lora_rank, scale=config.lora_scale)
        trainable = attach_lora(model, lora)
        if config.adapter_path is not None:
            model.load_weights(
                str(Path(config.adapter_path) / "adapters.safetensors"), strict=False
            )
        adapter_config = {**lora, "model": config.model, "trainer": "mlx-reasoner grpo"}

        resolved = {
            **config.to_dict(),
            "run_dir": str(run_dir),
            "rewards": [{"name": r.name, "weight": r.weight} for r in rewards],
            "system_prompt_text": system_prompt,
            "num_examples": len(examples),
            "trainable_parameters": int(trainable),
            "lora": lora,
            "versions": _versions(),
        }
        atomic_write_json(run_dir / "config.json", resolved)
        created_files = True
        metrics_log = JsonlWriter(run_dir / "metrics.jsonl")
        rollouts_log = JsonlWriter(run_dir / "rollouts.jsonl")
        done: list[int] = []

        def on_step(step: int, metrics: dict, records: list[dict]) -> None:
            metrics_log.write([metrics])
            rollouts_log.write(records)
            done.append(step)

        def on_save(step: int) -> None:
            save_adapters(run_dir, adapter_weights(model), {**adapter_config, "step": step})
            display.message(f"step {step}: adapters saved to {run_dir}")

        display = TrainDisplay(config.steps, console=console, live=live)
        with display:
            display.header(
                {
                    "model": config.model,
                    "dataset": f"{config.dataset} ({len(examples)} examples)",
                    "run dir": str(run_dir),
                    "batch": f"{config.batch_size} prompts x {config.group_size} completions",
                    "LoRA": f"rank {lora['lora_parameters']['rank']} on {lora['num_layers']} "
                    f"blocks "
                    f"({trainable:,} parameters)",
                    "rewards": ", ".join(f"{r.name}:{r.weight:g}" for r in rewards),
                    "loss": f"{config.loss_type}, beta {config.beta:g}, epsilon {config.epsilon:g}",
                    "device": str(mx.default_device()),
                }
            )
            try:
                train(
                    config,
                    model,
                    tokenizer,
                    batch_iterator(examples, config.batch_size, config.seed),
                    rewards,
                    system_prompt,
                    display,
                    on_step=on_step,
                    on_save=on_save,
                )
            except KeyboardInterrupt:
                last = done[-1] if done else 0
                if last:
                    on_save(last)
                raise ReasonerError(
                    f"interrupted after step {last}; adapters of step {last} are in {run_dir}"
                    if last
                    else "interrupted before the first step finished"
                ) from None
            finally:
                metrics_log.close()
                rollouts_log.close()
    finally:
        if not created_files and run_dir.is_dir() and not any(run_dir.iterdir()):
            shutil.rmtree(run_dir, ignore_errors=True)
    return run_dir
