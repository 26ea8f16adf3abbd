"""The one configuration object of a training run, with the help text the CLI shows."""

import dataclasses
from dataclasses import dataclass, field

from .errors import ReasonerError
from .loss import LOSS_TYPES


def _opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class TrainConfig:
    """Everything ``mlx-reasoner train`` needs; the defaults are the classic GSM8K recipe."""

    model: str = _opt("Qwen/Qwen2.5-3B-Instruct", "Hub id or local mlx-lm model directory.")
    dataset: str = _opt("openai/gsm8k", "Hub id or local JSONL/JSON/CSV/Parquet file.")
    dataset_config: str | None = _opt(None, "Hub dataset configuration (GSM8K: main).")
    split: str = _opt("train", "Dataset split to train on.")
    question_field: str = _opt("question", "Field holding the question.")
    answer_field: str = _opt("answer", "Field holding the gold answer ('… #### 42' is parsed).")
    system_prompt: str = _opt("reasoning", "Built-in prompt name (prompts/NAME.txt) or a file.")
    adapter_path: str | None = _opt(None, "Start from these LoRA adapters (an earlier run).")
    steps: int = _opt(300, "Optimisation steps (each samples a fresh batch of prompts).")
    batch_size: int = _opt(2, "Prompts per step.")
    group_size: int = _opt(8, "Completions sampled per prompt (G >= 2).")
    max_completion_tokens: int = _opt(256, "Completion length limit in tokens.")
    temperature: float = _opt(0.9, "Sampling temperature.")
    top_p: float = _opt(1.0, "Nucleus sampling threshold (1 disables).")
    top_k: int = _opt(0, "Sample among the k most likely tokens (0 disables).")
    min_p: float = _opt(0.0, "Drop tokens below min_p x the top probability (0 disables).")
    learning_rate: float = _opt(1e-5, "Peak AdamW learning rate.")
    warmup_steps: int = _opt(10, "Linear warm-up steps before the cosine decay.")
    min_lr_ratio: float = _opt(0.1, "Cosine decay ends at this fraction of the peak rate.")
    weight_decay: float = _opt(0.01, "AdamW weight decay.")
    max_grad_norm: float = _opt(1.0, "Clip the global gradient norm to this (0 disables).")
    lora_rank: int = _opt(8, "LoRA rank.")
    lora_layers: int = _opt(16, "LoRA on all linear layers of this many top blocks (-1: all).")
    lora_scale: float = _opt(20.0, "LoRA scale (mlx-lm convention).")
    epsilon: float = _opt(0.2, "Lower clip range of the policy ratio.")
    epsilon_high: float | None = _opt(None, "Upper clip range (DAPO); default: --epsilon.")
    beta: float = _opt(0.04, "KL weight to the base model (adapters off); 0 skips it.")
    loss_type: str = _opt("grpo", "Loss aggregation.", choices=LOSS_TYPES)
    scale_rewards: bool = _opt(True, "Divide advantages by the group's reward std.")
    num_iterations: int = _opt(1, "Updates per batch of rollouts (mu).")
    micro_batch_size: int = _opt(4, "Completions per forward/backward pass (memory bound).")
    reward: tuple[str, ...] = _opt(
        (), "Reward NAME[:WEIGHT]; repeatable. Default: the five GSM8K rewards.", multiple=True
    )
    reward_file: tuple[str, ...] = _opt(
        (), "Python file whose public functions are added as rewards; repeatable.", multiple=True
    )
    seed: int = _opt(0, "Random seed (data order, sampling, LoRA init).")
    run_dir: str | None = _opt(None, "Output folder; default runs/<timestamp>.")
    save_every: int = _opt(50, "Save adapters every N steps (and at the end).")
    sample_every: int = _opt(10, "Show a sample completion every N steps (0: never).")
    compile: bool = _opt(True, "mx.compile the training pass.")
    eval_every: int = _opt(0, "Evaluate on held-out questions every N steps (0: never).")
    eval_limit: int = _opt(50, "Held-out questions per evaluation.")
    eval_split: str = _opt("test", "Held-out split of a hub dataset or built-in task.")
    eval_fraction: float = _opt(
        0.1, "Share of a local file held out for --eval-every (never trained on)."
    )

    def validate(self) -> "TrainConfig":
        """Reject nonsense before anything expensive happens."""
        positive = (
            "steps",
            "batch_size",
            "max_completion_tokens",
            "lora_rank",
            "num_iterations",
            "micro_batch_size",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ReasonerError(
                    f"--{_flag(name)} must be at least 1, got {getattr(self, name)}"
                )
        if self.group_size < 2:
            raise ReasonerError(
                f"--group-size must be at least 2 (GRPO compares completions within a group), "
                f"got {self.group_size}"
            )
        if self.temperature <= 0:
            raise ReasonerError(f"--temperature must be > 0 for sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ReasonerError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.eval_limit < 1:
            raise ReasonerError(f"--eval-limit must be at least 1, got {self.eval_limit}")
        if not 0 < self.eval_fraction < 1:
            raise ReasonerError(f"--eval-fraction must be in (0, 1), got {self.eval_fraction}")
        for name in ("top_k", "warmup_steps", "save_every", "sample_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ReasonerError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("min_p", "min_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise ReasonerError(f"--{_flag(name)} must be in [0, 1], got {getattr(self, name)}")
        for name in ("learning_rate", "epsilon"):
            if getattr(self, name) <= 0:
                raise ReasonerError(f"--{_flag(name)} must be > 0, got {getattr(self, name)}")
        if self.epsilon_high is not None and self.epsilon_high <= 0:
            raise ReasonerError(f"--epsilon-high must be > 0, got {self.epsilon_high}")
        for name in ("beta", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ReasonerError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.loss_type not in LOSS_TYPES:
            raise ReasonerError(f"--loss-type must be one of {', '.join(LOSS_TYPES)}")
        if self.lora_layers == 0 or self.lora_layers < -1:
            raise ReasonerError(f"--lora-layers must be >= 1 or -1 (all), got {self.lora_layers}")
        return self

    def to_dict(self) -> dict:
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }


def _flag(name: str) -> str:
    return name.replace("_", "-")


@dataclass
class EvalConfig:
    """Everything ``mlx-reasoner eval`` needs; by default GSM8K's test split, greedy."""

    model: str = _opt("Qwen/Qwen2.5-3B-Instruct", "Hub id or local mlx-lm model directory.")
    adapter_path: str | None = _opt(None, "LoRA adapters to evaluate (a run folder).")
    dataset: str = _opt(
        "openai/gsm8k", "Hub id, task:NAME, or a local JSONL/JSON/CSV/Parquet file."
    )
    dataset_config: str | None = _opt(None, "Hub dataset configuration (GSM8K: main).")
    split: str = _opt("test", "Held-out split (hub datasets and built-in tasks).")
    question_field: str = _opt("question", "Field holding the question.")
    answer_field: str = _opt("answer", "Field holding the gold answer ('… #### 42' is parsed).")
    system_prompt: str = _opt("reasoning", "Built-in prompt name (prompts/NAME.txt) or a file.")
    limit: int | None = _opt(None, "Evaluate only the first N questions.")
    max_completion_tokens: int = _opt(256, "Completion length limit in tokens.")
    samples: int = _opt(1, "Completions per question: 1 is greedy; K > 1 samples for pass@K.")
    temperature: float = _opt(0.7, "Sampling temperature when --samples > 1.")
    batch_size: int = _opt(16, "Questions generated together.")
    seed: int = _opt(0, "Sampling seed (and task generation seed).")
    output: str | None = _opt(None, "Folder for eval.json and eval_samples.jsonl.")
    compare: bool = _opt(False, "Also evaluate the base model (adapters off), side by side.")

    def validate(self) -> "EvalConfig":
        for name in ("max_completion_tokens", "samples", "batch_size"):
            if getattr(self, name) < 1:
                raise ReasonerError(
                    f"--{_flag(name)} must be at least 1, got {getattr(self, name)}"
                )
        if self.limit is not None and self.limit < 1:
            raise ReasonerError(f"--limit must be at least 1, got {self.limit}")
        if self.samples > 1 and self.temperature <= 0:
            raise ReasonerError(f"--temperature must be > 0 for sampling, got {self.temperature}")
        if self.compare and self.adapter_path is None:
            raise ReasonerError("--compare needs --adapter-path (base vs adapters)")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
