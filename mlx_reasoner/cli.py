"""The ``mlx-reasoner`` command line: a thin click layer over the library modules."""

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import click

from . import __version__
from .config import EvalConfig, SFTConfig, TrainConfig, field_type, option_flag
from .distributed import launched_rank, launcher_stop_reported
from .errors import ReasonerError


@contextlib.contextmanager
def user_errors(debug: bool) -> Iterator[None]:
    """Turn known problems into a one-line message and exit status 1 (traceback with --debug).

    In a distributed run, rank 0 speaks for the run: the other ranks say only what happened
    to them alone, prefixed with their rank (``quiet_if_reported``).
    """
    from .ui import on_error

    rank = launched_rank()
    prefix = f"rank {rank}: " if rank else ""  # rank 0 speaks for the run, unprefixed
    try:
        with launcher_stop_reported():
            yield
    except ReasonerError as exc:
        if rank:
            quiet_if_reported(exc)
        on_error(f"{prefix}{exc}", debug, exit_code=exc.exit_code)
    except KeyboardInterrupt:
        on_error(f"{prefix}interrupted", debug, exit_code=130)


def quiet_if_reported(exc: ReasonerError) -> None:
    """On a rank other than 0: when every rank learnt together why the run ends (``RunEnded``),
    leave the report to rank 0 and end after it, silently. Any other error is this rank's
    own, and it ends at once: the others learn it from its closed connection."""
    from .distributed import PeerLost, RunEnded, current_world

    if isinstance(exc, RunEnded) and not isinstance(exc, PeerLost):
        current_world().outlive_main()
        raise SystemExit(exc.exit_code)


def start_backend(command: str) -> None:
    """Before a command that computes, and before anything imports mlx: load what the backend
    needs (on Linux, a fast BLAS for MLX's CPU matmuls) and warn where MLX will be slow
    (rank 0 alone, in a distributed run)."""
    from . import backend
    from .ui import show_slow_blas_notice

    backend.start()
    if not launched_rank():
        show_slow_blas_notice(command)


OFF_SUFFIX = "__off"  # the parameter behind a --no-NAME alias of a choice option


def config_options(cls):
    """Click options generated from a config dataclass: one field, one ``--flag``, same help."""

    def decorate(command):
        for f in reversed(dataclasses.fields(cls)):
            flag = option_flag(f.name)
            kind, _ = field_type(f.type)
            help_text = f.metadata.get("help", "")
            if kind is bool:
                option = click.option(
                    f"{flag}/--no-{flag[2:]}",
                    f.name,
                    default=f.default,
                    show_default=True,
                    help=help_text,
                )
            elif kind is tuple:  # a repeatable option (all of ours are strings)
                option = click.option(flag, f.name, multiple=True, type=str, help=help_text)
            else:
                choices = f.metadata.get("choices")
                option = click.option(
                    flag,
                    f.name,
                    default=f.default,
                    type=click.Choice(choices) if choices else kind,
                    show_default=f.default is not None,
                    help=help_text,
                )
            if "off_flag" in f.metadata:  # e.g. --no-scale-rewards for --scale-rewards none
                command = click.option(
                    f"--no-{flag[2:]}",
                    f"{f.name}{OFF_SUFFIX}",
                    is_flag=True,
                    help=f"Same as {flag} {f.metadata['off_flag']}.",
                )(command)
            command = option(command)
        return command

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mlx-reasoner")
def main() -> None:
    """Turn a chat LLM into a reasoning model with GRPO + LoRA on MLX."""


def resolve_config(cls, options: dict, config_file: str | None):
    """Defaults < config file < the run being resumed < flags given on the command line."""
    from click.core import ParameterSource

    from .config import load_config_file

    ctx = click.get_current_context()
    values = {}
    if config_file:
        values.update(load_config_file(config_file, cls))
    resume = options.get("resume") or values.get("resume")
    if resume and launched_rank():
        values["resume"] = resume  # another machine: the run's options come from rank 0
    elif resume:
        saved = Path(resume) / "config.json"
        if not saved.is_file():
            raise ReasonerError(f"{resume} is not a run folder (no config.json) to resume")
        known = {f.name for f in dataclasses.fields(cls)}
        stored = json.loads(saved.read_text())
        values.update(
            {k: tuple(v) if isinstance(v, list) else v for k, v in stored.items() if k in known}
        )
        values["resume"] = resume
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in options.items():
        if name.endswith(OFF_SUFFIX):
            continue
        if name not in values or ctx.get_parameter_source(name) in (
            ParameterSource.COMMANDLINE,
            ParameterSource.ENVIRONMENT,
        ):
            values[name] = value
    for name in [n for n in options if n.endswith(OFF_SUFFIX) and options[n]]:  # --no-NAME
        base = name.removesuffix(OFF_SUFFIX)
        if ctx.get_parameter_source(base) == ParameterSource.COMMANDLINE:
            raise ReasonerError(
                f"give either {option_flag(base)} or --no-{option_flag(base)[2:]}, not both"
            )
        values[base] = fields[base].metadata["off_flag"]
    return cls(**values)


def show_config(config) -> None:
    import yaml

    click.echo(yaml.safe_dump(config.to_dict(), sort_keys=False), nl=False)


def run_training_command(cls, run: str, options, config_file, print_config, debug, next_step):
    """Resolve and check the configuration, then print it or run it (``run.<run>``) and say
    what comes next."""
    with user_errors(debug):
        config = resolve_config(cls, options, config_file).validate()
        if print_config:
            show_config(config)
            return
        start_backend("sft" if cls is SFTConfig else "train")
        from . import run as pipeline  # imports mlx: only once the backend has started

        run_dir = getattr(pipeline, run)(config)
        if run_dir is not None:  # None: a rank other than 0 of a distributed run
            click.echo(f"done: adapters in {run_dir} ({next_step.format(run_dir=run_dir)})")


def training_command(cls):
    """The options every training command shares besides its config fields."""

    def decorate(command):
        command = click.option("--debug", is_flag=True, help="Show full tracebacks.")(command)
        command = click.option(
            "--print-config", is_flag=True, help="Print the resolved configuration and exit."
        )(command)
        command = click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            help="YAML or TOML file of options; flags on the command line win.",
        )(command)
        return config_options(cls)(command)

    return decorate


@main.command()
@training_command(TrainConfig)
def train(debug: bool, print_config: bool, config_file: str | None, **options) -> None:
    """Train LoRA adapters with GRPO (default: Qwen2.5-3B-Instruct on GSM8K).

    Each step samples --batch-size questions, generates --group-size completions for each,
    scores them with the rewards, and updates the adapters towards the better ones.
    """
    run_training_command(
        TrainConfig,
        "run_train",
        options,
        config_file,
        print_config,
        debug,
        "try: mlx-reasoner chat {run_dir}; mlx-reasoner report {run_dir}",
    )


@main.command()
@training_command(SFTConfig)
def sft(debug: bool, print_config: bool, config_file: str | None, **options) -> None:
    """Supervised LoRA fine-tuning on worked solutions (a warm start for GRPO).

    Each example's worked solution and answer are rendered in the reasoning format and the
    model learns the assistant's tokens. Continue with GRPO:
    mlx-reasoner train --adapter-path runs/<this run>.
    """
    run_training_command(
        SFTConfig,
        "run_sft",
        options,
        config_file,
        print_config,
        debug,
        "continue with GRPO: mlx-reasoner train --adapter-path {run_dir}",
    )


@main.command("eval")
@config_options(EvalConfig)
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def eval_command(debug: bool, **options) -> None:
    """Measure a model, with or without adapters, on held-out questions.

    Greedy by default; --samples K draws K completions per question and reports pass@K (one
    is right) and maj@K (the most common answer is right) next to the mean accuracy.
    --compare puts the base model and the adapters side by side on the same questions.
    """
    start_backend("eval")
    from .run import run_eval

    with user_errors(debug):
        run_eval(EvalConfig(**options))


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    help="HTML file to write.  [default: RUN_DIR/report.html]",
)
@click.option(
    "--png",
    "png_dir",
    type=click.Path(file_okay=False),
    help="Also write each figure as DIR/NAME.png.",
)
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def report(run_dir: str, output: str | None, png_dir: str | None, debug: bool) -> None:
    """One self-contained HTML page telling a run's story (opens from disk, no network).

    Reward and each component, held-out accuracy, KL, clipping, completion lengths, zero-spread
    groups, learning rate, step time and memory against the step, smoothed over the raw points;
    the best and worst completions of an early and a late group; the configuration. Works on a
    run still going, on SFT runs and on the demo's folder. Needs matplotlib
    (pip install 'mlx-reasoner[report]').
    """
    from .report import write_report  # no mlx: a report needs no backend

    with user_errors(debug):
        click.echo(f"wrote {write_report(run_dir, output, png_dir)}")


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option(
    "--output",
    "-o",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder to create (refused if it exists and is not empty).",
)
@click.option(
    "--quantize",
    type=click.Choice(["4", "8"]),
    default=None,
    help="Quantize the fused model to 4 or 8 bits (mlx-lm's affine quantization).",
)
@click.option("--base", default=None, help="Base model, if not the run's --model (e.g. it moved).")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def export(run_dir: str, output: str, quantize: str | None, base: str | None, debug: bool) -> None:
    """Fuse a run's adapters into its base model: a folder mlx-lm loads, generates and serves.

    mlx-lm's own fuse and quantize code; the tokenizer, chat template, the run's system prompt
    (system_prompt.txt) and a model card (README.md: base, recipe, steps, final figures) go
    with the weights. Then: mlx_lm.generate --model OUTPUT, mlx_lm.server --model OUTPUT, or
    mlx-reasoner chat --model OUTPUT.
    """
    start_backend("export")
    from .export import export_model
    from .ui import console

    with user_errors(debug):
        folder = export_model(
            run_dir, output, int(quantize) if quantize else None, base, log=console.print
        )
        console.print(f"wrote {folder}; try: mlx-reasoner chat --model {folder}")


@main.command()
@click.argument("run_dir", required=False, type=click.Path())
@click.option(
    "--model",
    default=None,
    help="Base model (hub id or folder; an exported model too). Default: the run's.",
)
@click.option("--adapter-path", default=None, help="Adapters to use, when not given as RUN_DIR.")
@click.option(
    "--system-prompt",
    default=None,
    help="Built-in name or file. Default: the run's own prompt, an exported model's "
    "system_prompt.txt, or 'reasoning'.",
)
@click.option("--prompt", "question", default=None, help="Answer this one question and exit.")
@click.option(
    "--compare", is_flag=True, help="Show the base model's answer (adapters off) next to it."
)
@click.option(
    "--max-tokens",
    type=click.IntRange(1),
    default=None,
    help="Reply length limit in tokens. Default: the run's --max-completion-tokens, or 512.",
)
@click.option(
    "--temperature",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    help="Sampling temperature; 0 is greedy.",
)
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def chat(
    run_dir, model, adapter_path, system_prompt, question, compare, max_tokens, temperature, debug
):
    """Talk to a trained model: mlx-reasoner chat runs/<name>.

    Each question is asked with the run's system prompt; the answer streams in, its reasoning
    and its answer in separate panels. --compare shows the base model's answer next to it;
    --prompt "..." answers once and exits (plain text when the output is not a terminal).
    Questions may also come on standard input, one a line. Leave with exit or Ctrl-D.
    """
    with user_errors(debug):
        from .chat import resolve_chat  # no mlx: bad options fail before anything loads

        setup = resolve_chat(run_dir, model, adapter_path, system_prompt, max_tokens)
        if compare and setup.adapter_path is None:
            raise ReasonerError("--compare needs adapters (a RUN_DIR or --adapter-path)")
        start_backend("chat")
        from .chat import run_chat

        run_chat(setup, question, compare, temperature)


@main.command("strawberry-test")
@click.option(
    "--model",
    default="Qwen/Qwen2.5-3B-Instruct",
    show_default=True,
    help="Hub id or local mlx-lm model directory.",
)
@click.option("--adapter-path", default=None, help="Trained adapters (a run folder) to compare.")
@click.option(
    "--system-prompt",
    default="reasoning",
    show_default=True,
    help="Built-in prompt name (prompts/NAME.txt) or a file.",
)
@click.option(
    "--max-completion-tokens",
    default=256,
    show_default=True,
    type=click.IntRange(1),
    help="Completion length limit in tokens.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON result instead of panels.")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def strawberry_test(model, adapter_path, system_prompt, max_completion_tokens, as_json, debug):
    """Ask "How many R's are in strawberry?" and 7 variants, before and after training.

    Greedy answers of the base model and (with --adapter-path) the trained model, side by side.
    """
    import json

    start_backend("strawberry-test")
    from .showcase.demo import run_strawberry_test, score_line
    from .ui import console, strawberry_view

    with user_errors(debug):
        results = run_strawberry_test(model, adapter_path, system_prompt, max_completion_tokens)
        if as_json:
            payload = {
                name: {
                    "score": sum(r["correct"] for r in records),
                    "total": len(records),
                    "results": records,
                }
                for name, records in results.items()
            }
            click.echo(json.dumps(payload, indent=2, ensure_ascii=False))
            return
        console.print(strawberry_view(results))
        console.print(f"[bold]score:[/bold] {score_line(results)}")


@main.command()
@click.option(
    "--run-dir",
    default="runs/demo",
    show_default=True,
    help="Folder for the model, both runs and summary.json (an earlier demo is replaced).",
)
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Random seed.")
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def demo(run_dir, seed, debug):
    """Offline, in a few minutes: a tiny model from scratch learns to reason with SFT + GRPO.

    Builds a tiny Qwen2-architecture model and tokenizer from scratch, warm-starts it on a
    built-in task (task:parity) until it follows the reasoning format, runs GRPO on LoRA
    adapters, and compares held-out accuracy after the warm start and after GRPO, ending with
    strawberry-style before/after panels. Writes summary.json in --run-dir.
    """
    start_backend("demo")
    from .showcase.demo import run_demo

    with user_errors(debug):
        run_demo(run_dir, seed)


def _bench_options(command):
    from .showcase.bench import BenchConfig

    return config_options(BenchConfig)(command)


@main.command()
@_bench_options
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
def bench(debug: bool, **options) -> None:
    """Time GRPO steps, and the rollout against mlx-lm's raw batched engine.

    Runs --steps GRPO steps (the first is a warm-up) on fixed prompts with completions forced to
    full length, and times mlx-lm's BatchGenerator alone on the same prompts. Without --model it
    builds a tiny 2.9M-parameter Qwen2 offline. --output FILE writes the figures as JSON.
    """
    start_backend("bench")
    from .showcase.bench import BenchConfig, bench_table, run_bench
    from .ui import console

    with user_errors(debug):
        result = run_bench(BenchConfig(**options), log=console.print)
        console.print(bench_table(result))
        if options["output"]:
            console.print(f"wrote {options['output']}")


if __name__ == "__main__":
    main()
