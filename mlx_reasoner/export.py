"""Export stage: a run's adapters fused into its base model, as a model folder to ship.

Fusing and quantizing are mlx-lm's own, as ``mlx_lm.fuse`` and ``mlx_lm.convert`` run them
(``LoRALinear.fuse``, ``utils.quantize_model``, ``utils.save``), so the folder loads with
``mlx_lm.load``, ``mlx_lm.generate`` and ``mlx_lm.server``. Next to the weights, tokenizer and
chat template go the run's system prompt and a short model card. The folder is written under a
temporary name and renamed into place when complete; an existing one is never replaced.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .checkpoints import ADAPTER_CONFIG, atomic_write_text, fsync_dir
from .errors import ReasonerError
from .report import METRICS_FILE, headline, read_json, read_jsonl, recipe

QUANTIZE_BITS = (4, 8)
SYSTEM_PROMPT_FILE = "system_prompt.txt"  # chat --model reads it from an exported folder
CARD_FILE = "README.md"
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


@dataclass
class ExportSource:
    """What a run folder says about the model to export."""

    run_dir: Path
    base: str  # the base model the adapters were trained on
    base_from_run: bool  # False when --base named it
    adapter_config: dict
    config: dict  # the run's config.json; {} for a bare adapter folder


def export_source(run_dir: str | Path, base: str | None = None) -> ExportSource:
    """Read a run folder (or any mlx-lm adapter folder) and find its base model.

    Raises:
        ReasonerError: the folder is missing, holds no adapters, or names no base model.
    """
    from .model import check_adapter_dir

    folder = Path(run_dir)
    if not folder.is_dir():
        raise ReasonerError(f"run folder not found: {folder}")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise ReasonerError(
            f"{folder} holds no adapters ({ADAPTER_CONFIG}); pass a run folder after its first "
            "save (--save-every) or an mlx-lm adapter folder"
        )
    check_adapter_dir(str(folder))
    adapter_config = read_json(folder / ADAPTER_CONFIG)
    config = read_json(folder / "config.json")
    found = base or adapter_config.get("model") or config.get("model")
    if not found:
        raise ReasonerError(f"{folder} does not say which base model it adapts; pass --base MODEL")
    return ExportSource(folder, found, base is None, adapter_config, config)


def check_output(output: str | Path) -> Path:
    """The output folder: refused when it exists and is not empty; its parent is created."""
    path = Path(output)
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise ReasonerError(
            f"{path} already exists; pick another --output (export never overwrites)"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReasonerError(f"cannot create {path.parent}: {exc.strerror or exc}") from exc
    return path


def fuse_adapters(model) -> int:
    """Merge every LoRA layer into its base layer with mlx-lm's ``fuse`` (as ``mlx_lm.fuse``
    does); returns how many layers were fused."""
    from mlx.utils import tree_unflatten

    fused = [(name, m.fuse()) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    return len(fused)


def quantize(model, config: dict, bits: int) -> tuple[object, dict, str]:
    """mlx-lm's ``quantize_model`` (affine, groups of 64, as ``mlx_lm.convert -q``); returns
    the model, its config and mlx-lm's line on the bits per weight."""
    from mlx_lm.utils import quantize_model

    if "quantization" in config:
        raise ReasonerError(
            "the base model is quantized already; leave out --quantize (the adapters are fused "
            "into its quantized weights as they are)"
        )
    said = io.StringIO()
    with contextlib.redirect_stdout(said):  # mlx-lm prints its bits per weight
        model, config = quantize_model(model, config, group_size=None, bits=bits)
    return model, config, said.getvalue().strip().removeprefix("[INFO] ")


def local_model_path(name: str) -> Path:
    """The folder holding a model: the path itself, or the hub cache's copy that loading made."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    from mlx_lm.utils import hf_repo_to_path

    return hf_repo_to_path(name)


def export_model(
    run_dir: str | Path,
    output: str | Path,
    quantize_bits: int | None = None,
    base: str | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Fuse a run's adapters into its base model and write the folder ``output``.

    Args:
        run_dir: a run folder (or an mlx-lm adapter folder).
        output: the folder to create; refused if it exists and is not empty.
        quantize_bits: 4 or 8 to quantize the fused model; None keeps the base's precision.
        base: the base model, if not the one the run names (e.g. it moved).
        log: where progress lines go.

    Returns:
        The folder written.

    Raises:
        ReasonerError: for a bad run folder, an existing output, or a base that cannot load.
    """
    from mlx_lm.utils import save

    from .model import load_model

    if quantize_bits is not None and quantize_bits not in QUANTIZE_BITS:
        raise ReasonerError(f"--quantize must be 4 or 8, got {quantize_bits}")
    source = export_source(run_dir, base)
    out = check_output(output)
    log(f"loading {source.base} with the adapters of {source.run_dir}")
    try:
        model, tokenizer, config = load_model(
            source.base, adapter_path=str(source.run_dir), return_config=True
        )
    except ReasonerError as exc:
        if not source.base_from_run:
            raise
        raise ReasonerError(f"{exc}; if the base model moved, pass --base MODEL") from exc
    log(f"fused {fuse_adapters(model)} LoRA layers into the base weights")
    if quantize_bits is not None:
        model, config, said = quantize(model, config, quantize_bits)
        log(said or f"quantized to {quantize_bits} bits")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tmp, local_model_path(source.base), model, tokenizer, config, donate_model=False)
        copy_chat_template(local_model_path(source.base), tmp)
        write_extras(tmp, str(out), source, quantize_bits)
        os.replace(tmp, out)  # onto nothing, or an empty folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    return out


def copy_chat_template(source: Path, folder: Path) -> None:
    """The base's chat template files, where the tokenizer did not write its own copy."""
    for name in CHAT_TEMPLATE_FILES:
        if (source / name).is_file() and not (folder / name).exists():
            shutil.copy2(source / name, folder / name)


def write_extras(folder: Path, name: str, source: ExportSource, quantize_bits: int | None) -> None:
    """The run's system prompt and the model card (replacing mlx-lm's bare one); ``name`` is
    the folder's final path, for the card's commands."""
    prompt = source.config.get("system_prompt_text")
    if prompt:
        atomic_write_text(folder / SYSTEM_PROMPT_FILE, prompt)
    atomic_write_text(folder / CARD_FILE, model_card(name, source, quantize_bits, prompt))


def model_card(name: str, source: ExportSource, quantize_bits: int | None, prompt) -> str:
    """A short Hugging Face style card: base model, recipe, steps, final figures, usage."""
    adapter, config = source.adapter_config, source.config
    trainer = adapter.get("trainer") or config.get("command") or "mlx-reasoner"
    steps = adapter.get("step")
    total = config.get("steps")
    trained = f"{steps} of {total}" if steps and total else str(steps or total or "?")
    precision = f"quantized to {quantize_bits} bits" if quantize_bits else "unquantized"
    metrics, _ = read_jsonl(source.run_dir / METRICS_FILE)
    figures = headline(metrics)
    lines = [
        "---",
        "library_name: mlx",
        "pipeline_tag: text-generation",
        f"base_model: {json.dumps(source.base)}",
        "tags: [mlx, mlx-reasoner, lora, grpo, reasoning]",
        "---",
        "",
        "# Reasoning model fine-tuned with mlx-reasoner",
        "",
        f"`{source.base}` with LoRA adapters trained by {trainer} (mlx-reasoner {__version__}) "
        f"for {trained} steps, fused into the weights with mlx-lm ({precision}).",
        "",
        "## Recipe",
        "",
        "| option | value |",
        "|---|---|",
        *[f"| {k} | {_cell(v)} |" for k, v in recipe(config).items()],
    ]
    if not config:
        lines.append(f"| adapters | {_cell(json.dumps(adapter, sort_keys=True))} |")
    if figures:
        lines += ["", "## Final figures", "", "| figure | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in figures.items()]
    lines += ["", "## Use", "", "```bash"]
    system = f' --system-prompt "$(cat {name}/{SYSTEM_PROMPT_FILE})"' if prompt else ""
    lines += [
        f'mlx_lm.generate --model {name}{system} --prompt "How many r\'s are in strawberry?"',
        f"mlx-reasoner chat --model {name}",
        f"mlx_lm.server --model {name}",
        "```",
    ]
    if prompt:
        lines += [
            "",
            "The model was trained with this system prompt (also in "
            f"`{SYSTEM_PROMPT_FILE}`); give it the same (`$(cat ...)` drops the file's last "
            "newline; `mlx-reasoner chat --model` reads it exactly):",
            "",
            "```text",
            prompt.strip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")
