"""Wires the stages into each command's run: check inputs, load, train or evaluate, keep results.

Inputs are checked in order of cost (options, rewards, prompt, run folder, dataset, model)
so that a typo fails in milliseconds, not after a multi-gigabyte download.
"""

import json
import platform
import shutil
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx

from . import backend
from .checkpoints import JsonlWriter, atomic_write_json, prepare_run_dir, save_adapters
from .config import TrainConfig
from .errors import ReasonerError

if TYPE_CHECKING:
    from .trainer import StepHooks


def versions() -> dict:
    """Library versions and what the backend applies, for the run's ``config.json``."""
    import mlx_lm

    from . import __version__

    return {
        "mlx_reasoner": __version__,
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(mx.default_device()),
        **backend.describe(),
    }


def load_train_and_eval_examples(config):
    """The training examples and, with ``--eval-every``, held-out ones that never overlap.

    Hub datasets and built-in tasks have a separate test split; a local file is split by a
    stable hash of each question, so a question is never on both sides.
    """
    from .data import is_local_dataset, load_examples, split_examples

    common = config.data_options()
    examples = load_examples(config.dataset, split=config.split, **common)
    if not config.eval_every:
        return examples, []
    if is_local_dataset(config.dataset):
        examples, held_out = split_examples(examples, config.eval_fraction, config.seed)
        if not examples or not held_out:
            raise ReasonerError(
                f"{config.dataset} is too small to hold out --eval-fraction "
                f"{config.eval_fraction:g} for evaluation; add rows or drop --eval-every"
            )
    else:
        held_out = load_examples(
            config.dataset, split=config.eval_split, limit=config.eval_limit, **common
        )
    return examples, held_out[: config.eval_limit]


# The adapters a run started from (``--adapter-path``), its KL reference.
STARTING_ADAPTERS = "starting_adapters.safetensors"


def setup_model(
    model_name: str,
    adapter_path,
    lora_layers: int,
    lora_rank: int,
    lora_scale: float,
    saved_lora: dict | None = None,
):
    """Load the base model and attach LoRA: fresh, from saved adapters, or a saved layout.

    Returns:
        ``(model, tokenizer, lora_description, trainable_parameter_count)``.
    """
    from .model import (
        attach_lora,
        load_adapters,
        load_model,
        lora_config,
        trainable_parameter_count,
    )

    model, tokenizer = load_model(model_name)
    if adapter_path is not None:
        # Continue from earlier adapters (e.g. an SFT run): their shape wins.
        lora = load_adapters(model, adapter_path)
        trainable = trainable_parameter_count(model)
    else:
        lora = saved_lora or lora_config(lora_layers, lora_rank, scale=lora_scale)
        trainable = attach_lora(model, lora)
    return model, tokenizer, lora, trainable


def apply_memory_options(model, config) -> None:
    """``--grad-checkpoint`` (mlx-lm's block checkpointing) and ``--memory-limit-gb``."""
    if config.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])
    if config.memory_limit_gb is not None:
        mx.set_memory_limit(int(config.memory_limit_gb * 1e9))


def run_train(config: TrainConfig, console=None, live: bool | None = None) -> Path:
    """Run ``mlx-reasoner train`` (GRPO) end to end and return the run folder.

    Raises:
        ReasonerError: for any input problem; the message is one actionable line.
    """
    from .data import batch_iterator
    from .rewards import resolve_rewards
    from .trainer import make_optimizer, train

    config.validate()
    rewards = resolve_rewards(config.reward, config.reward_file)

    def fit(run: "TrainingRun") -> None:
        run.sampler = batch_iterator(run.examples, config.batch_size, config.seed)
        run.optimizer = make_optimizer(config, config.num_iterations)
        starting = run.starting_adapters()  # before a resumed run loads its checkpoint
        hooks = run.restore()
        train(
            config,
            run.model,
            run.tokenizer,
            run.sampler,
            rewards,
            run.system_prompt,
            run.display,
            run.optimizer,
            hooks,
            starting_adapters=starting,
        )

    return training_run(
        config,
        "mlx-reasoner grpo",
        fit,
        console,
        live,
        resolved={"rewards": [{"name": r.name, "weight": r.weight} for r in rewards]},
        header={
            "batch": f"{config.batch_size} prompts x {config.group_size} completions",
            "rewards": ", ".join(f"{r.name}:{r.weight:g}" for r in rewards),
            "loss": f"{config.loss_type}, beta {config.beta:g}, epsilon {config.epsilon:g}",
        },
    )


def run_sft(config, console=None, live: bool | None = None) -> Path:
    """Run ``mlx-reasoner sft`` end to end and return the run folder."""
    from .data import BatchSampler
    from .sft import example_sequences, train_sft
    from .trainer import make_optimizer

    config.validate()

    def fit(run: "TrainingRun") -> None:
        sequences = example_sequences(
            run.tokenizer, run.system_prompt, run.examples, config.max_seq_tokens
        )
        run.display.message(
            f"{len(sequences)} of {len(run.examples)} examples fit in "
            f"--max-seq-tokens {config.max_seq_tokens}"
        )
        run.sampler = BatchSampler(list(range(len(sequences))), config.batch_size, config.seed)
        run.optimizer = make_optimizer(config)
        hooks = run.restore()
        train_sft(
            config,
            run.model,
            run.tokenizer,
            sequences,
            run.display,
            run.sampler,
            run.optimizer,
            hooks,
        )

    return training_run(
        config,
        "mlx-reasoner sft",
        fit,
        console,
        live,
        header={"batch": f"{config.batch_size} examples per step"},
    )


SIGNAL_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class StopSignals:
    """Turn the first Ctrl-C / SIGTERM into a request to stop after the current step.

    A second signal interrupts at once (KeyboardInterrupt); files are written atomically, so
    the last complete checkpoint survives either way.
    """

    def __init__(self, display):
        self.display = display
        self.received: str | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        self.display.message(
            f"{self.received}: finishing this step and saving a checkpoint "
            "(press Ctrl-C again to quit at once)"
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def reason(self) -> str | None:
        return f"stopped by {self.received}" if self.received else None


class TrainingRun:
    """What a training command works with: model, data, optimizer, display, run folder."""

    def __init__(self, config, run_dir: Path, adapter_config: dict, display, **loaded):
        self.config = config
        self.run_dir = run_dir
        self.adapter_config = adapter_config
        self.display = display
        self.model = loaded["model"]
        self.tokenizer = loaded["tokenizer"]
        self.examples = loaded["examples"]
        self.held_out = loaded["held_out"]
        self.system_prompt = loaded["system_prompt"]
        self.signals = StopSignals(display)
        self.optimizer = None  # set by the command's fit() before restore()
        self.sampler = None
        self.last_step = 0
        self.metrics_log = None
        self.rollouts_log = None
        self.tracker = None

    def starting_adapters(self) -> dict | None:
        """The KL reference's adapters: those training started from (``--adapter-path``),
        kept in the run folder so that a resumed run compares with the same policy; None for
        the bare base (no starting adapters, or ``--kl-reference base``)."""
        from .checkpoints import atomic_save_safetensors
        from .model import adapter_weights

        config, path = self.config, self.run_dir / STARTING_ADAPTERS
        if config.kl_reference == "base":
            return None
        if config.resume:
            return dict(mx.load(str(path))) if path.is_file() else None
        if config.adapter_path is None:
            return None
        weights = adapter_weights(self.model)
        atomic_save_safetensors(path, weights)
        return weights

    def restore(self) -> "StepHooks":
        """Continue from the newest checkpoint when resuming; open the logs; build the hooks."""
        from mlx.utils import tree_unflatten

        from .checkpoints import latest_checkpoint, load_checkpoint, truncate_jsonl
        from .tracking import RunTracker
        from .trainer import StepHooks

        start = 0
        if self.config.resume:
            path = latest_checkpoint(self.run_dir)
            adapters, optimizer_state, state = load_checkpoint(path)
            self.model.load_weights(list(adapters.items()), strict=False)
            self.optimizer.state = tree_unflatten(list(optimizer_state.items()))
            self.sampler.load_state_dict(state["data"])
            start = self.last_step = state["step"]
            for name in ("metrics.jsonl", "rollouts.jsonl"):
                truncate_jsonl(self.run_dir / name, start)
            self.display.message(f"resumed from {path} at step {start}")
        self.metrics_log = JsonlWriter(self.run_dir / "metrics.jsonl")
        self.rollouts_log = JsonlWriter(self.run_dir / "rollouts.jsonl")
        self.tracker = RunTracker(self.config, self.run_dir, warn=self.display.message)
        return StepHooks(
            self.config,
            self.display,
            on_step=self.on_step,
            on_save=self.on_save,
            on_eval=self.on_eval if self.config.eval_every else None,
            should_stop=self.signals.reason,
            start_step=start,
        )

    def on_step(self, step: int, metrics: dict, records: list[dict]) -> None:
        self.metrics_log.write([metrics])
        if records:
            self.rollouts_log.write(records)
        self.last_step = step
        self.tracker.after_step(step, metrics)  # reads the logs just written

    def on_save(self, step: int) -> None:
        """Adapters at the top of the run folder, plus a checkpoint to resume from."""
        from mlx.utils import tree_flatten

        from .checkpoints import save_checkpoint
        from .model import adapter_weights

        weights = adapter_weights(self.model)
        adapter_config = {**self.adapter_config, "step": step}
        save_adapters(self.run_dir, weights, adapter_config)
        save_checkpoint(
            self.run_dir,
            step,
            weights,
            adapter_config,
            dict(tree_flatten(self.optimizer.state)),
            # Sampling randomness is reseeded from (seed, step) every step: nothing to keep.
            {
                "data": self.sampler.state_dict(),
                "seed": self.config.seed,
                "config": self.config.to_dict(),
            },
            keep=self.config.keep_checkpoints,
        )
        self.display.message(f"step {step}: adapters and checkpoint saved in {self.run_dir}")

    def on_eval(self, step: int) -> dict:
        from .evaluate import evaluate

        result = evaluate(
            self.model,
            self.tokenizer,
            self.held_out,
            self.system_prompt,
            max_tokens=self.config.max_completion_tokens,
            seed=self.config.seed,
        )
        return {f"eval/{k}": v for k, v in result.summary.items() if k != "samples"}

    def close(self) -> None:
        for log in (self.metrics_log, self.rollouts_log):
            if log is not None:
                log.close()
        if self.tracker is not None:
            self.tracker.close()


def resume_command(run_dir: Path, trainer: str) -> str:
    command = "sft" if trainer.endswith("sft") else "train"
    return f"mlx-reasoner {command} --resume {run_dir}"


def training_run(config, trainer: str, fit, console, live, resolved=None, header=None) -> Path:
    """The run-folder life cycle shared by ``train`` and ``sft``.

    Checks the cheap inputs, creates (or, with ``--resume``, reopens) the folder, loads data
    and model, writes the resolved ``config.json``, runs ``fit(run)`` under the display, and
    turns Ctrl-C / SIGTERM into a checkpoint plus the exact command that resumes the run. A
    run that failed before writing anything leaves no folder behind.
    """
    from .checkpoints import latest_checkpoint
    from .memory import preflight
    from .model import check_adapter_dir
    from .prompts import load_system_prompt
    from .tracking import check_tracking
    from .trainer import StopTraining
    from .ui import TrainDisplay

    system_prompt = load_system_prompt(config.system_prompt)
    if config.adapter_path is not None and not config.resume:
        check_adapter_dir(config.adapter_path)
    check_lora_layers(config)
    check_tracking(config)
    # A GRPO step that cannot fit is refused here, before any folder or model (memory.py).
    preflight(config, system_prompt)
    if config.resume:
        run_dir = Path(config.resume)
        if latest_checkpoint(run_dir) is None:
            raise ReasonerError(f"{run_dir} has no complete checkpoint to resume from")
    else:
        run_dir = prepare_run_dir(config.run_dir, overwrite=config.overwrite)
    started = bool(config.resume)  # once a step has finished, the folder is worth keeping
    try:
        examples, held_out = load_train_and_eval_examples(config)
        mx.random.seed(config.seed)
        model, tokenizer, lora, trainable = setup_model(
            config.model,
            None if config.resume else config.adapter_path,
            config.lora_layers,
            config.lora_rank,
            config.lora_scale,
            saved_lora=_saved_lora(run_dir) if config.resume else None,
        )
        apply_memory_options(model, config)
        if not config.resume:
            atomic_write_json(
                run_dir / "config.json",
                {
                    **config.to_dict(),
                    **(resolved or {}),
                    "command": trainer,
                    "run_dir": str(run_dir),
                    "system_prompt_text": system_prompt,
                    "num_examples": len(examples),
                    "num_eval_examples": len(held_out),
                    "trainable_parameters": int(trainable),
                    "lora": lora,
                    "versions": versions(),
                },
            )
        display = TrainDisplay(
            config.steps, title=trainer.replace(" grpo", " train"), console=console, live=live
        )
        run = TrainingRun(
            config,
            run_dir,
            {**lora, "model": config.model, "trainer": trainer},
            display,
            model=model,
            tokenizer=tokenizer,
            examples=examples,
            held_out=held_out,
            system_prompt=system_prompt,
        )
        with display, run.signals:
            display.header(
                {
                    "model": config.model,
                    "dataset": f"{config.dataset} ({len(examples)} examples)",
                    "run dir": str(run_dir),
                    **(header or {}),
                    "LoRA": f"rank {lora['lora_parameters']['rank']} on {lora['num_layers']} "
                    f"blocks ({trainable:,} parameters)",
                    "eval": (
                        f"every {config.eval_every} steps on {len(held_out)} held-out questions"
                        if config.eval_every
                        else "off"
                    ),
                    **tracking_header(config, run_dir),
                    "device": str(mx.default_device()),
                    "BLAS": backend.blas_summary()["name"],
                }
            )
            try:
                fit(run)
            except StopTraining as stop:
                raise ReasonerError(
                    f"{stop.reason}; checkpoint of step {stop.step} saved. Resume with: "
                    f"{resume_command(run_dir, trainer)}",
                    exit_code=SIGNAL_EXIT_CODES.get(run.signals.received, 1),
                ) from None
            except KeyboardInterrupt:
                found = latest_checkpoint(run_dir)
                where = f"the last checkpoint is {found}" if found else "no checkpoint yet"
                raise ReasonerError(
                    (
                        f"interrupted at once; {where}. Resume with: "
                        f"{resume_command(run_dir, trainer)}"
                        if found
                        else f"interrupted; {where}"
                    ),
                    exit_code=130,
                ) from None
            finally:
                started = started or run.last_step > 0
                run.close()
    finally:
        if not started:
            _discard_unstarted_run(run_dir)
    return run_dir


def tracking_header(config, run_dir: Path) -> dict:
    """The header line saying where the run's report and W&B logs go, when anywhere."""
    where = []
    if config.report_every:
        where.append(f"{run_dir / 'report.html'} every {config.report_every} steps")
    if config.report_to:
        where.append(config.report_to)
    return {"report": ", ".join(where)} if where else {}


def check_lora_layers(config) -> None:
    """Refuse an explicit ``--lora-layers`` above the model's depth from its config.json, before
    data or weights are loaded (where the shape cannot be read, ``attach_lora`` refuses it)."""
    from .memory import model_shape
    from .model import lora_blocks

    if config.resume or config.adapter_path is not None or not (config.lora_layers or 0) > 0:
        return  # the saved layout wins, or the default and -1 fit any model
    shape = model_shape(config.model)
    if shape is not None:
        lora_blocks(config.lora_layers, shape.num_layers)


def _discard_unstarted_run(run_dir: Path) -> None:
    """Remove what a run that never finished a step wrote, and its folder if that empties it."""
    from .report import REPORT_FILE
    from .tracking import WANDB_ID_FILE

    names = ("config.json", "metrics.jsonl", "rollouts.jsonl", STARTING_ADAPTERS, REPORT_FILE)
    for name in (*names, WANDB_ID_FILE):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "wandb", ignore_errors=True)  # --report-to wandb's files
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)


def _saved_lora(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "config.json").read_text())["lora"]


def run_eval(config, console=None) -> dict:
    """Run ``mlx-reasoner eval``: evaluate, print a table, write the outputs.

    Returns:
        ``{"adapter" or "model": summary, "base": summary (with --compare)}``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from .checkpoints import atomic_write_text
    from .data import load_examples
    from .evaluate import evaluate
    from .model import adapters_disabled, check_adapter_dir, load_adapters, load_model
    from .prompts import load_system_prompt
    from .ui import console as default_console
    from .ui import eval_table

    console = console or default_console
    config.validate()
    system_prompt = load_system_prompt(config.system_prompt)
    if config.adapter_path is not None:
        check_adapter_dir(config.adapter_path)
    output = Path(config.output) if config.output else None
    if output is not None:
        try:
            output.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ReasonerError(f"cannot create output folder {output}: {exc.strerror}") from exc
    examples = load_examples(
        config.dataset,
        split=config.split,
        question_field=config.question_field,
        answer_field=config.answer_field,
        dataset_config=config.dataset_config,
        limit=config.limit,
        seed=config.seed,
    )
    model, tokenizer = load_model(config.model)
    if config.adapter_path is not None:
        load_adapters(model, config.adapter_path)

    runs = []
    if config.compare:
        runs.append(("base", adapters_disabled))
    runs.append(("adapter" if config.adapter_path else "model", None))
    results = {}
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as progress:
        for name, context in runs:
            task = progress.add_task(f"eval {name}", total=len(examples))

            def advance(done, total, task=task):
                progress.update(task, completed=done)

            def run_once():
                return evaluate(
                    model,
                    tokenizer,
                    examples,
                    system_prompt,
                    max_tokens=config.max_completion_tokens,
                    samples=config.samples,
                    temperature=config.temperature,
                    batch_size=config.batch_size,
                    seed=config.seed,
                    progress=advance,
                )

            if context is None:
                results[name] = run_once()
            else:
                with context(model):
                    results[name] = run_once()

    console.print(eval_table({name: r.summary for name, r in results.items()}))
    main_name = runs[-1][0]
    summary = {
        **results[main_name].summary,
        "model": config.model,
        "adapter_path": config.adapter_path,
        "dataset": config.dataset,
        "split": config.split,
        "config": config.to_dict(),
    }
    if "base" in results:
        summary["base"] = results["base"].summary
    if output is not None:
        atomic_write_json(output / "eval.json", summary)
        lines = [
            json.dumps({"model": name, **record}, ensure_ascii=False)
            for name, result in results.items()
            for record in result.samples
        ]
        atomic_write_text(output / "eval_samples.jsonl", "\n".join(lines) + "\n")
        console.print(f"wrote {output / 'eval.json'} and {output / 'eval_samples.jsonl'}")
    return {name: r.summary for name, r in results.items()}
