"""Wires the stages into each command's run: check inputs, load, train or evaluate, keep results.

Inputs are checked in order of cost (options, rewards, prompt, run folder, dataset, model)
so that a typo fails in milliseconds, not after a multi-gigabyte download.
"""

import dataclasses
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
from .distributed import (
    RunEnded,
    World,
    agreed,
    batch_split,
    check_batch_split,
    check_same_inputs,
    check_world_size,
    current_world,
    main_config,
    start_from_main_adapters,
)
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


def run_train(
    config: TrainConfig, console=None, live: bool | None = None, world: World | None = None
) -> Path | None:
    """Run ``mlx-reasoner train`` (GRPO) end to end and return the run folder.

    Args:
        world: the ranks of a distributed run; default ``current_world()`` (one process
            unless a launcher started several). Only rank 0 has a run folder; the others
            return None.

    Raises:
        ReasonerError: for any input problem; the message is one actionable line.
    """
    from .data import batch_iterator
    from .rewards import resolve_rewards
    from .trainer import make_optimizer, train

    world = world or current_world()
    config = main_config(world, config)

    def check():
        config.validate()
        check_batch_split(config, world, "prompt")
        return resolve_rewards(config.reward, config.reward_file)

    rewards = agreed(world, "checking the options and rewards", check)

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
            world=world,
        )

    header = {
        "batch": f"{config.batch_size} prompts x {config.group_size} completions",
        "rewards": ", ".join(f"{r.name}:{r.weight:g}" for r in rewards),
        "loss": f"{config.loss_type}, beta {config.beta:g}, epsilon {config.epsilon:g}",
    }
    if world.is_distributed:
        header["data parallel"] = batch_split(config, world, "prompt")
    return training_run(
        config,
        "mlx-reasoner grpo",
        fit,
        console,
        live,
        resolved={"rewards": [{"name": r.name, "weight": r.weight} for r in rewards]},
        header=header,
        world=world,
    )


def run_sft(config, console=None, live: bool | None = None, world: World | None = None):
    """Run ``mlx-reasoner sft`` end to end and return the run folder (None on ranks other
    than 0 of a distributed run)."""
    from .data import BatchSampler
    from .sft import example_sequences, train_sft
    from .trainer import make_optimizer

    world = world or current_world()
    config = main_config(world, config)

    def check():
        config.validate()
        check_batch_split(config, world, "example")

    agreed(world, "checking the options", check)

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
            world=world,
        )

    header = {"batch": f"{config.batch_size} examples per step"}
    if world.is_distributed:
        header["data parallel"] = batch_split(config, world, "example")
    return training_run(config, "mlx-reasoner sft", fit, console, live, header=header, world=world)


SIGNAL_EXIT_CODES = {"SIGHUP": 129, "SIGINT": 130, "SIGTERM": 143}


class StopSignals:
    """Turn the first Ctrl-C / SIGTERM into a request to stop after the current step.

    A second signal interrupts at once (KeyboardInterrupt); files are written atomically, so
    the last complete checkpoint survives either way. A rank of a distributed run also takes
    SIGHUP so: one that ``mlx.launch`` started over ssh gets it when its terminal goes.
    ``reports`` marks rank 0 of such a run, whose closing error line speaks for every rank.
    """

    def __init__(self, display, hang_up: bool = False, reports: bool = False):
        self.display = display
        self.received: str | None = None
        self._previous = {}
        self._reports = reports
        self._signals = [signal.SIGINT, signal.SIGTERM]
        if hang_up and hasattr(signal, "SIGHUP"):
            self._signals.append(signal.SIGHUP)

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
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type, *exc):
        for sig, handler in self._previous.items():
            if self._reports and exc_type is not None and sig != signal.SIGINT:
                # Rank 0 is ending with the run's report on the way: when another rank died,
                # mlx.launch sends the survivors SIGTERM, which must not cut that report off
                # (what is left is bounded: no collective, print, exit).
                handler = signal.SIG_IGN
            signal.signal(sig, handler)

    def reason(self) -> str | None:
        return f"stopped by {self.received}" if self.received else None


class TrainingRun:
    """What a training command works with: model, data, optimizer, display, run folder.

    In a distributed run every rank has one; only rank 0's has a run folder (``run_dir`` is
    None on the others), writes into it and reads a checkpoint from it for the others.
    """

    def __init__(
        self, config, run_dir: Path | None, adapter_config: dict, display, world: World, **loaded
    ):
        self.config = config
        self.run_dir = run_dir
        self.adapter_config = adapter_config
        self.display = display
        self.world = world
        self.model = loaded["model"]
        self.tokenizer = loaded["tokenizer"]
        self.examples = loaded["examples"]
        self.held_out = loaded["held_out"]
        self.system_prompt = loaded["system_prompt"]
        self.signals = StopSignals(
            display, hang_up=world.is_distributed, reports=world.is_distributed and world.is_main
        )
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

        config, world = self.config, self.world
        if config.kl_reference == "base":
            return None
        if config.resume:
            path = self.run_dir / STARTING_ADAPTERS if world.is_main else None
            saved = dict(mx.load(str(path))) if world.is_main and path.is_file() else None
            return world.broadcast_arrays(saved, "receiving the KL reference's adapters")
        if config.adapter_path is None:
            return None
        weights = adapter_weights(self.model)  # alike on every rank (synced at the start)
        if world.is_main:
            atomic_save_safetensors(self.run_dir / STARTING_ADAPTERS, weights)
        return weights

    def restore(self) -> "StepHooks":
        """Continue from the newest checkpoint when resuming; open the logs; build the hooks."""
        from mlx.utils import tree_unflatten

        from .checkpoints import latest_checkpoint, load_checkpoint, truncate_jsonl
        from .tracking import RunTracker
        from .trainer import StepHooks

        world, start = self.world, 0
        if self.config.resume:
            path = latest_checkpoint(self.run_dir) if world.is_main else None

            def read():
                if not world.is_main:
                    return None, None, None
                adapters, optimizer_state, state = load_checkpoint(path)
                check_world_size(state, world, self.run_dir)
                return adapters, optimizer_state, state

            adapters, optimizer_state, state = agreed(world, "reading the checkpoint", read)
            adapters = world.broadcast_arrays(adapters, "receiving the checkpoint's adapters")
            optimizer_state = world.broadcast_arrays(
                optimizer_state, "receiving the checkpoint's optimizer state"
            )
            state = world.from_main(state, "receiving the checkpoint's position")
            self.model.load_weights(list(adapters.items()), strict=False)
            self.optimizer.state = tree_unflatten(list(optimizer_state.items()))
            self.sampler.load_state_dict(state["data"])
            start = self.last_step = state["step"]
            if world.is_main:
                for name in ("metrics.jsonl", "rollouts.jsonl"):
                    truncate_jsonl(self.run_dir / name, start)
            self.display.message(f"resumed from {path} at step {start}")
        if world.is_main:  # rank 0 alone writes the folder, the report and W&B
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
            world=world,
        )

    def on_step(self, step: int, metrics: dict, records: list[dict]) -> None:
        if self.world.is_main:
            self.metrics_log.write([metrics])
            if records:
                self.rollouts_log.write(records)
        self.last_step = step
        if self.tracker is not None:
            self.tracker.after_step(step, metrics)  # reads the logs just written

    def on_save(self, step: int) -> None:
        """Adapters at the top of the run folder, plus a checkpoint to resume from (rank 0's:
        every rank holds the same adapters and optimizer state)."""
        from mlx.utils import tree_flatten

        from .checkpoints import save_checkpoint
        from .model import adapter_weights

        if not self.world.is_main:
            return
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
                "world_size": self.world.size,
                "config": self.config.to_dict(),
            },
            keep=self.config.keep_checkpoints,
        )
        self.display.message(f"step {step}: adapters and checkpoint saved in {self.run_dir}")

    def on_eval(self, step: int) -> dict:
        from .evaluate import evaluate_shared

        result = evaluate_shared(
            self.world,
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


def resume_command(run_dir: Path, trainer: str, world: World | None = None) -> str:
    command = "sft" if trainer.endswith("sft") else "train"
    launcher = f"mlx.launch -n {world.size} … -- " if world and world.is_distributed else ""
    return f"{launcher}mlx-reasoner {command} --resume {run_dir}"


def training_run(
    config, trainer: str, fit, console, live, resolved=None, header=None, world=None
) -> Path | None:
    """The run-folder life cycle shared by ``train`` and ``sft``.

    Checks the cheap inputs, creates (or, with ``--resume``, reopens) the folder, loads data
    and model, writes the resolved ``config.json``, runs ``fit(run)`` under the display, and
    turns Ctrl-C / SIGTERM into a checkpoint plus the exact command that resumes the run. A
    run that failed before writing anything leaves no folder behind.

    In a distributed run (``world``), every rank checks and loads its own inputs and they
    agree before going on (one rank's bad input stops all of them, reported by rank 0); they
    must hold the same data, and start from rank 0's adapters. Only rank 0 has the folder and
    the display; it returns the folder, the others None.
    """
    from .checkpoints import latest_checkpoint
    from .memory import preflight
    from .model import check_adapter_dir
    from .prompts import load_system_prompt
    from .tracking import check_tracking
    from .trainer import StopTraining
    from .ui import QuietDisplay, TrainDisplay

    world = world or current_world()

    def check():
        system_prompt = load_system_prompt(config.system_prompt)
        if config.adapter_path is not None and not config.resume:
            check_adapter_dir(config.adapter_path)
        check_lora_layers(config)
        check_tracking(config)
        # A GRPO step that cannot fit is refused here, before any folder or model (memory.py);
        # each rank holds its share of the step.
        preflight(
            dataclasses.replace(config, batch_size=len(world.share(config.batch_size))),
            system_prompt,
        )
        if config.resume and world.is_main:
            run_dir = Path(config.resume)
            if latest_checkpoint(run_dir) is None:
                raise ReasonerError(f"{run_dir} has no complete checkpoint to resume from")
            return system_prompt, _saved_lora(run_dir)
        return system_prompt, None

    system_prompt, saved_lora = agreed(world, "checking the inputs", check)
    if config.resume:
        run_dir = Path(config.resume) if world.is_main else None
        saved_lora = world.from_main(saved_lora, "receiving the run's LoRA layout")
    else:

        def make_folder():
            if world.is_main:
                return prepare_run_dir(config.run_dir, overwrite=config.overwrite)

        run_dir = agreed(world, "creating the run folder", make_folder)
    started = bool(config.resume)  # once a step has finished, the folder is worth keeping
    try:

        def load():
            examples, held_out = load_train_and_eval_examples(config)
            mx.random.seed(config.seed)
            loaded = setup_model(
                config.model,
                None if config.resume else config.adapter_path,
                config.lora_layers,
                config.lora_rank,
                config.lora_scale,
                saved_lora=saved_lora,
            )
            return examples, held_out, loaded

        examples, held_out, (model, tokenizer, lora, trainable) = agreed(
            world, "loading the data and the model", load
        )
        apply_memory_options(model, config)
        if world.is_distributed:
            check_same_inputs(world, examples, held_out, system_prompt, trainable)
            start_from_main_adapters(world, model)
        if not config.resume and world.is_main:
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
                    "world_size": world.size,
                    "versions": versions(),
                },
            )
        if world.is_main:
            title = trainer.replace(" grpo", " train")
            display = TrainDisplay(config.steps, title=title, console=console, live=live)
        else:
            display = QuietDisplay()
        run = TrainingRun(
            config,
            run_dir,
            {**lora, "model": config.model, "trainer": trainer},
            display,
            world,
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
                if run.tracker is not None:  # the report as of the step the run stopped at
                    run.tracker.finish(stop.step)
                exit_code = stop_exit_code(world, run.signals.received)
                message = (
                    f"{stop.reason}; checkpoint of step {stop.step} saved. Resume with: "
                    f"{resume_command(run_dir, trainer, world)}"
                )
                raise (ReasonerError if world.is_main else RunEnded)(
                    message, exit_code=exit_code
                ) from None
            except KeyboardInterrupt:
                if not world.is_main:  # rank 0 knows the checkpoints
                    raise ReasonerError("interrupted at once", exit_code=130) from None
                found = latest_checkpoint(run_dir)
                where = f"the last checkpoint is {found}" if found else "no checkpoint yet"
                raise ReasonerError(
                    (
                        f"interrupted at once; {where}. Resume with: "
                        f"{resume_command(run_dir, trainer, world)}"
                        if found
                        else f"interrupted; {where}"
                    ),
                    exit_code=130,
                ) from None
            finally:
                started = started or run.last_step > 0
                run.close()
    finally:
        if not started and world.is_main:
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


def stop_exit_code(world: World, received: str | None) -> int:
    """The exit status of a run stopped early: that of the signal some rank received
    (Ctrl-C: 130, SIGTERM: 143), else 1."""
    if world.is_distributed:
        signals = [s for s in world.gather(received, "stopping") if s]
        received = signals[0] if signals else None
    return SIGNAL_EXIT_CODES.get(received, 1)


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


def run_eval(config, console=None, world: World | None = None) -> dict:
    """Run ``mlx-reasoner eval``: evaluate, print a table, write the outputs.

    In a distributed run each rank answers its share of the questions; rank 0 prints the one
    table and writes the outputs.

    Returns:
        ``{"adapter" or "model": summary, "base": summary (with --compare)}``.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    from .checkpoints import atomic_write_text
    from .data import load_examples
    from .evaluate import evaluate_shared
    from .model import adapters_disabled, check_adapter_dir, load_adapters, load_model
    from .prompts import load_system_prompt
    from .ui import console as default_console
    from .ui import eval_table

    console = console or default_console
    world = world or current_world()
    config = main_config(world, config)

    def check():
        config.validate()
        system_prompt = load_system_prompt(config.system_prompt)
        if config.adapter_path is not None:
            check_adapter_dir(config.adapter_path)
        output = Path(config.output) if config.output and world.is_main else None
        if output is not None:
            try:
                output.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ReasonerError(
                    f"cannot create output folder {output}: {exc.strerror}"
                ) from exc
        return system_prompt, output

    system_prompt, output = agreed(world, "checking the options", check)

    def load():
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
        return examples, model, tokenizer

    examples, model, tokenizer = agreed(world, "loading the data and the model", load)
    check_same_inputs(world, examples, [], system_prompt)

    runs = []
    if config.compare:
        runs.append(("base", adapters_disabled))
    runs.append(("adapter" if config.adapter_path else "model", None))
    results = {}
    mine = len(world.share(len(examples)))
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not world.is_main,
    ) as progress:
        for name, context in runs:
            label = f"eval {name}"
            if world.is_distributed:
                label += f" (rank 0's {mine} of {len(examples)})"
            task = progress.add_task(label, total=mine)

            def advance(done, total, task=task):
                progress.update(task, completed=done)

            def run_once():
                return evaluate_shared(
                    world,
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

    summaries = {name: r.summary for name, r in results.items()}
    if not world.is_main:
        return summaries
    console.print(eval_table(summaries))
    main_name = runs[-1][0]
    summary = {
        **results[main_name].summary,
        "model": config.model,
        "adapter_path": config.adapter_path,
        "dataset": config.dataset,
        "split": config.split,
        "config": config.to_dict(),
    }
    if world.is_distributed:
        summary["world_size"] = world.size
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
    return summaries
