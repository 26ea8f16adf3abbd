"""Configuration of each command: one dataclass per command, with the help text the CLI shows.

Each field may declare its valid range (``at_least``, ``above``, ``at_most``); ``validate``
checks them all and names the offending ``--flag``, before anything expensive happens.
"""

import dataclasses
import difflib
import math
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from .advantages import SCALE_REWARDS
from .errors import ReasonerError

# Option vocabularies. The objective's lookups (objective.AGGREGATORS, IMPORTANCE_LEVELS) hold
# exactly these names; config stays free of mlx so that the CLI starts fast.
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
IMPORTANCE_LEVELS = ("token", "sequence")
DEFAULT_LORA_LAYERS = 16  # LoRA on the last 16 blocks unless --lora-layers says otherwise

KL_REFERENCES = ("start", "base")
REPORT_SERVICES = ("wandb",)  # tracking.py logs to them


def option(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


def option_flag(name: str) -> str:
    """The command-line flag of a config field: ``loss_type`` -> ``--loss-type``."""
    return "--" + name.replace("_", "-")


def legacy_value(f: dataclasses.Field, value):
    """``value`` as the field takes it now, where an older run or file stored it in another form
    (``scale_rewards: true`` before it had three modes); other values as they are."""
    legacy = f.metadata.get("legacy", {})
    return legacy[value] if isinstance(value, bool) and value in legacy else value


def check_ranges(config) -> None:
    """Raise a ReasonerError for the first field outside its declared range or choices."""
    for f in dataclasses.fields(config):
        value, meta = getattr(config, f.name), f.metadata
        choices = meta.get("choices")
        if choices and value is not None and value not in choices:
            raise ReasonerError(f"{option_flag(f.name)} must be one of {', '.join(choices)}")
        if value is None or isinstance(value, (bool, str, tuple)):
            continue
        if not math.isfinite(value):
            raise ReasonerError(f"{option_flag(f.name)} must be a finite number, got {value}")
        if "at_least" in meta and value < meta["at_least"]:
            problem = f"must be at least {meta['at_least']}"
        elif "above" in meta and value <= meta["above"]:
            problem = f"must be > {meta['above']}"
        elif "at_most" in meta and value > meta["at_most"]:
            problem = f"must be at most {meta['at_most']}"
        elif "below" in meta and value >= meta["below"]:
            problem = f"must be < {meta['below']}"
        else:
            continue
        raise ReasonerError(f"{option_flag(f.name)} {problem}, got {value}")


# train, sft and eval read their data the same way.
DATASET_HELP = (
    "Hub id, task:NAME, a local JSONL/JSON/CSV/Parquet file, or a folder of them by split."
)


@dataclass
class RunConfig:
    """Options shared by the commands that train adapters (``train`` and ``sft``)."""

    model: str = option("Qwen/Qwen2.5-3B-Instruct", "Hub id or local mlx-lm model directory.")
    dataset: str = option("openai/gsm8k", DATASET_HELP)
    dataset_config: str | None = option(None, "Hub dataset configuration (GSM8K: main).")
    split: str = option("train", "Dataset split to train on.")
    question_field: str = option("question", "Field holding the question.")
    answer_field: str = option("answer", "Field holding the gold answer ('… #### 42' is parsed).")
    system_prompt: str = option("reasoning", "Built-in prompt name (prompts/NAME.txt) or a file.")
    adapter_path: str | None = option(None, "Start from these LoRA adapters (an earlier run).")
    steps: int = option(300, "Optimisation steps.", at_least=1)
    batch_size: int = option(2, "Prompts per step.", at_least=1)
    # Qwen2.5's GSM8K answers run ~270 tokens (57% would be cut at 256); 512 fits most.
    max_completion_tokens: int = option(512, "Completion length limit in tokens.", at_least=1)
    learning_rate: float = option(1e-5, "Peak AdamW learning rate.", above=0)
    warmup_steps: int = option(10, "Linear warm-up steps before the cosine decay.", at_least=0)
    min_lr_ratio: float = option(
        0.1, "Cosine decay ends at this fraction of the peak rate.", at_least=0, at_most=1
    )
    weight_decay: float = option(0.01, "AdamW weight decay.", at_least=0)
    max_grad_norm: float = option(
        1.0, "Clip the global gradient norm to this (0 disables).", at_least=0
    )
    lora_rank: int = option(8, "LoRA rank.", at_least=1)
    lora_layers: int | None = option(
        None,
        f"LoRA on all linear layers of this many top blocks (-1: all). Default: "
        f"{DEFAULT_LORA_LAYERS}, or every block of a model with fewer. A number above the "
        "model's blocks is an error, not quietly lowered.",
        at_least=-1,
    )
    lora_scale: float = option(20.0, "LoRA scale (mlx-lm convention).")
    seed: int = option(0, "Random seed (data order, sampling, LoRA init).", at_least=0)
    run_dir: str | None = option(None, "Output folder; default runs/<timestamp>.")
    save_every: int = option(50, "Save adapters every N steps (and at the end).", at_least=0)
    sample_every: int = option(10, "Show a sample completion every N steps (0: never).", at_least=0)
    report_every: int = option(
        0,
        "Rewrite report.html in the run folder every N steps and at the end (0: never; "
        "needs matplotlib: pip install 'mlx-reasoner[report]').",
        at_least=0,
    )
    report_to: str | None = option(
        None,
        "Also log each step's metrics and the report's figures to wandb (Weights & Biases; "
        "pip install 'mlx-reasoner[wandb]'; project: $WANDB_PROJECT or mlx-reasoner).",
        choices=REPORT_SERVICES,
    )
    compile: bool = option(
        True, "mx.compile the training pass and the rollout's decode step (models that allow it)."
    )
    grad_checkpoint: bool = option(
        False, "Recompute block activations in the backward pass (less memory, slower)."
    )
    share_prompts: bool = option(
        True,
        "Training pass: run each prompt once for its whole group (models that allow it, "
        "not with --grad-checkpoint).",
    )
    memory_limit_gb: float | None = option(
        None,
        "Cap the memory MLX may use, in GB; train refuses to start a run whose estimated peak "
        "is above it (default: the device's memory, and MLX's own limit).",
        above=0,
    )
    eval_every: int = option(
        0, "Evaluate on held-out questions every N steps (0: never).", at_least=0
    )
    eval_limit: int = option(50, "Held-out questions per evaluation.", at_least=1)
    eval_split: str = option(
        "test", "Held-out split of a hub dataset, dataset folder or built-in task."
    )
    max_bad_steps: int = option(
        5, "Stop after this many steps in a row with a non-finite loss or gradient.", at_least=1
    )
    keep_checkpoints: int = option(3, "Resumable checkpoints kept in the run folder.", at_least=1)
    resume: str | None = option(None, "Continue the run in this folder from its newest checkpoint.")
    overwrite: bool = option(False, "Replace an existing run in --run-dir.")
    eval_fraction: float = option(
        0.1,
        "Share of a local file held out for --eval-every (never trained on).",
        above=0,
        below=1,
    )

    def validate(self):
        """Reject nonsense before anything expensive happens; returns ``self``."""
        for f in dataclasses.fields(self):  # a resumed older run's values, in today's form
            setattr(self, f.name, legacy_value(f, getattr(self, f.name)))
        check_ranges(self)
        if self.lora_layers == 0:
            raise ReasonerError("--lora-layers must be >= 1 or -1 (all), got 0")
        return self

    def to_dict(self) -> dict:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    def data_options(self) -> dict:
        """Keyword arguments for ``data.load_examples``."""
        return dict(
            question_field=self.question_field,
            answer_field=self.answer_field,
            dataset_config=self.dataset_config,
            seed=self.seed,
        )


@dataclass
class TrainConfig(RunConfig):
    """Everything ``mlx-reasoner train`` needs; the defaults are the classic GSM8K recipe."""

    group_size: int = option(8, "Completions sampled per prompt (G >= 2).")
    temperature: float = option(0.9, "Sampling temperature.", above=0)
    top_p: float = option(1.0, "Nucleus sampling threshold (1 disables).", above=0, at_most=1)
    top_k: int = option(0, "Sample among the k most likely tokens (0 disables).", at_least=0)
    min_p: float = option(
        0.0, "Drop tokens below min_p x the top probability (0 disables).", at_least=0, at_most=1
    )
    epsilon: float = option(0.2, "Lower clip range of the policy ratio.", above=0)
    epsilon_high: float | None = option(
        None, "Upper clip range (DAPO); default: --epsilon.", above=0
    )
    beta: float = option(0.04, "KL weight to the reference policy; 0 skips it.", at_least=0)
    kl_reference: str = option(
        "start",
        "KL reference: 'start', the policy training started from (the base plus the "
        "--adapter-path adapters, if any), or 'base', the bare base model.",
        choices=KL_REFERENCES,
    )
    loss_type: str = option(
        "grpo",
        "Loss aggregation: grpo (mean per completion, then over completions), bnpo or dapo "
        "(mean over all the step's tokens; the same here), dr_grpo (sum / completions x "
        "--max-completion-tokens).",
        choices=LOSS_TYPES,
    )
    scale_rewards: str = option(
        "group",
        "Divide advantages by the reward std of each group, of the whole batch, or none "
        "(--no-scale-rewards: none).",
        choices=SCALE_REWARDS,
        off_flag="none",
        legacy={True: "group", False: "none"},
    )
    importance_sampling_level: str = option(
        "token",
        "Importance ratio per token (GRPO) or per completion, the mean of its tokens' (GSPO).",
        choices=IMPORTANCE_LEVELS,
    )
    mask_truncated: bool = option(
        False,
        "Leave completions cut at --max-completion-tokens out of the loss (they still count in "
        "the rewards and logs).",
    )
    dynamic_sampling: bool = option(
        False,
        "Keep generating groups until the step has --batch-size groups whose rewards differ "
        "(DAPO); equal-reward groups teach nothing.",
    )
    max_resample: int = option(
        3, "Extra generation rounds a step may take for --dynamic-sampling.", at_least=0
    )
    tis_cap: float | None = option(
        None,
        "Truncated importance sampling: weight each token's loss by min(p_train / p_decode, "
        "CAP), correcting for the decode's log-probs differing from the training pass's. "
        "Off by default.",
        at_least=1,
    )
    overlong_buffer: int | None = option(
        None,
        "Tokens before --max-completion-tokens over which the 'overlong' reward falls from 0 "
        "to -1 (DAPO); default: a fifth of --max-completion-tokens.",
        at_least=1,
    )
    num_iterations: int = option(1, "Updates per batch of rollouts (mu).", at_least=1)
    # One completion per pass keeps a 3B bfloat16 step with 512-token completions near 10 GB on
    # a Mac (two: about 14 GB); with memory to spare, 2 or 4 run faster (docs/performance.md).
    micro_batch_size: int = option(
        1, "Completions per forward/backward pass (memory bound).", at_least=1
    )
    memory_check: bool = option(
        True,
        "Refuse a run whose estimated peak memory is over --memory-limit-gb or the device's "
        "memory, before anything is loaded.",
    )
    reward: tuple[str, ...] = option(
        (), "Reward NAME[:WEIGHT]; repeatable. Default: the five GSM8K rewards."
    )
    reward_file: tuple[str, ...] = option(
        (), "Python file whose public functions are added as rewards; repeatable."
    )

    def validate(self) -> "TrainConfig":
        if self.group_size < 2:
            raise ReasonerError(
                "--group-size must be at least 2 (GRPO compares completions within a group), "
                f"got {self.group_size}"
            )
        if self.overlong_buffer is not None and self.overlong_buffer > self.max_completion_tokens:
            raise ReasonerError(
                f"--overlong-buffer ({self.overlong_buffer}) must not exceed "
                f"--max-completion-tokens ({self.max_completion_tokens})"
            )
        return super().validate()


@dataclass
class SFTConfig(RunConfig):
    """Everything ``mlx-reasoner sft`` needs: LoRA fine-tuning on worked solutions."""

    steps: int = option(200, "Optimisation steps.", at_least=1)
    batch_size: int = option(4, "Examples per step.", at_least=1)
    learning_rate: float = option(1e-4, "Peak AdamW learning rate.", above=0)
    reasoning_field: str = option(
        "reasoning", "Field holding the worked solution (GSM8K: the text before ####)."
    )
    max_seq_tokens: int = option(
        1024, "Drop examples longer than this many tokens (prompt + answer).", at_least=8
    )
    sample_every: int = option(0, "Show a sample of the training text every N steps.", at_least=0)

    def data_options(self) -> dict:
        return {**super().data_options(), "reasoning_field": self.reasoning_field}


@dataclass
class EvalConfig:
    """Everything ``mlx-reasoner eval`` needs; by default GSM8K's test split, greedy."""

    model: str = option("Qwen/Qwen2.5-3B-Instruct", "Hub id or local mlx-lm model directory.")
    adapter_path: str | None = option(None, "LoRA adapters to evaluate (a run folder).")
    dataset: str = option("openai/gsm8k", DATASET_HELP)
    dataset_config: str | None = option(None, "Hub dataset configuration (GSM8K: main).")
    split: str = option("test", "Held-out split (hub datasets, dataset folders, built-in tasks).")
    question_field: str = option("question", "Field holding the question.")
    answer_field: str = option("answer", "Field holding the gold answer ('… #### 42' is parsed).")
    system_prompt: str = option("reasoning", "Built-in prompt name (prompts/NAME.txt) or a file.")
    limit: int | None = option(None, "Evaluate only the first N questions.", at_least=1)
    # Qwen2.5's GSM8K answers run ~270 tokens (57% would be cut at 256); 512 fits most.
    max_completion_tokens: int = option(512, "Completion length limit in tokens.", at_least=1)
    samples: int = option(
        1,
        "Completions per question: 1 is greedy; K > 1 samples K for pass@K and maj@K "
        "(the most common answer).",
        at_least=1,
    )
    temperature: float = option(0.7, "Sampling temperature when --samples > 1.", above=0)
    batch_size: int = option(16, "Questions generated together.", at_least=1)
    seed: int = option(0, "Sampling seed (and task generation seed).", at_least=0)
    output: str | None = option(None, "Folder for eval.json and eval_samples.jsonl.")
    compare: bool = option(False, "Also evaluate the base model (adapters off), side by side.")

    def validate(self) -> "EvalConfig":
        check_ranges(self)
        if self.compare and self.adapter_path is None:
            raise ReasonerError("--compare needs --adapter-path (base vs adapters)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_type(annotation):
    """The plain type of a field and whether it may be None: ``int | None`` -> (int, True)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    if optional and len(args) == 1:
        annotation = args[0]
    origin = typing.get_origin(annotation)
    return (origin or annotation), optional


def coerce_value(cls, name: str, value, source: str):
    """Check one value from a config file against the field's type; return it normalised."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        close = difflib.get_close_matches(name, fields, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ReasonerError(f"{source}: unknown option '{name}'{hint}")
    kind, optional = field_type(fields[name].type)
    if value is None and optional:
        return None
    value = legacy_value(fields[name], value)  # an older file's form of this option
    wrong = ReasonerError(
        f"{source}: option '{name}' must be {_KIND_NAMES.get(kind, kind.__name__)}, "
        f"got {value!r}"
    )
    if kind is bool:
        if not isinstance(value, bool):
            raise wrong
    elif kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        value = float(value)
    elif kind is tuple:
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise wrong
        value = tuple(value)
    elif kind is str and not isinstance(value, str):
        raise wrong
    choices = fields[name].metadata.get("choices")
    if choices and value not in choices:
        raise ReasonerError(f"{source}: option '{name}' must be one of {', '.join(choices)}")
    return value


_KIND_NAMES = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    tuple: "a list of strings",
}


def load_config_file(path: str, cls) -> dict:
    """Options from a YAML or TOML file (flat ``name: value`` pairs, dashes or underscores).

    Raises:
        ReasonerError: for a missing or unparsable file, an unknown key or a wrong type.
    """
    file = Path(path)
    if not file.is_file():
        raise ReasonerError(f"config file not found: {path}")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # yaml and tomllib raise their own error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ReasonerError(f"{path} is not valid {file.suffix[1:] or 'YAML'}: {first}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ReasonerError(f"{path} must hold 'option: value' pairs, not a {type(data).__name__}")
    return {
        key.replace("-", "_"): coerce_value(cls, key.replace("-", "_"), value, str(path))
        for key, value in data.items()
    }
