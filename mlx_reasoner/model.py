"""Model stage: load a base model with mlx-lm, attach LoRA adapters, and switch them off.

The reference policy for the KL term is the same base weights with the adapters
bypassed, so no second copy of the model is ever held in memory.
"""

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .config import DEFAULT_LORA_LAYERS
from .errors import ReasonerError

# mlx-lm's default LoRA output scale.
LORA_SCALE = 20.0


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def load_model(
    name_or_path: str, adapter_path: str | None = None, return_config: bool = False
) -> tuple:
    """Load a model and tokenizer with ``mlx_lm.load``.

    Args:
        name_or_path: a Hugging Face hub id (``Qwen/Qwen2.5-3B-Instruct``) or a local
            mlx-lm model directory (quantized models work too: training them is QLoRA).
        adapter_path: an existing adapter folder to apply (``adapter_config.json`` +
            ``adapters.safetensors``).
        return_config: also return the model's ``config.json`` as mlx-lm read it.

    Returns:
        ``(model, tokenizer)``, or ``(model, tokenizer, config)`` with ``return_config``.

    Raises:
        ReasonerError: when the model cannot be loaded, with what to pass instead.
    """
    from mlx_lm import load

    local = _looks_local(name_or_path)
    if local and not Path(name_or_path).expanduser().is_dir():
        raise ReasonerError(f"model directory not found: {name_or_path}")
    if local and not (Path(name_or_path).expanduser() / "config.json").is_file():
        raise ReasonerError(
            f"{name_or_path} is not an mlx-lm model directory (no config.json); "
            "convert a Hugging Face model with `mlx_lm.convert` or pass a hub id"
        )
    if adapter_path is not None:
        check_adapter_dir(adapter_path)
    try:
        return load(
            str(Path(name_or_path).expanduser()) if local else name_or_path,
            adapter_path=adapter_path,
            return_config=return_config,
        )
    except Exception as exc:  # mlx-lm/hf-hub raise many types; all mean "cannot load"
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        if local:
            raise ReasonerError(f"could not load model from {name_or_path} ({reason})") from exc
        raise ReasonerError(
            f"could not load model '{name_or_path}' from the Hugging Face hub ({reason}); "
            "if you are offline, pass a local mlx-lm model directory with --model"
        ) from exc


def check_adapter_dir(adapter_path: str) -> Path:
    """Check that ``adapter_path`` is an adapter folder mlx-lm can load."""
    path = Path(adapter_path)
    if not (path / "adapter_config.json").is_file():
        raise ReasonerError(f"{adapter_path} has no adapter_config.json: not an adapter folder")
    if not (path / "adapters.safetensors").is_file():
        raise ReasonerError(f"{adapter_path} has no adapters.safetensors")
    return path


def lora_config(
    num_layers: int | None, rank: int, scale: float = LORA_SCALE, dropout: float = 0.0
) -> dict:
    """The adapter description mlx-lm stores in ``adapter_config.json``.

    ``num_layers`` is ``--lora-layers`` (None: the default, -1: all); ``attach_lora`` replaces
    it with the number of blocks it adapted, so the saved file holds a count mlx-lm can load.
    """
    return {
        "fine_tune_type": "lora",
        "num_layers": num_layers,
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": dropout},
    }


def lora_blocks(lora_layers: int | None, model_blocks: int) -> int:
    """How many top blocks ``--lora-layers`` adapts on a model of ``model_blocks`` blocks.

    None (not given) is mlx-lm's default, capped at the model's depth; -1 is every block. An
    explicit number above the depth is refused rather than lowered: the run would train other
    adapters than asked, and -1 already says "all".

    >>> lora_blocks(None, 4), lora_blocks(None, 36), lora_blocks(-1, 36), lora_blocks(8, 36)
    (4, 16, 36, 8)

    Raises:
        ReasonerError: ``lora_layers`` is above ``model_blocks``.
    """
    if lora_layers is None:
        return min(DEFAULT_LORA_LAYERS, model_blocks)
    if lora_layers < 0:
        return model_blocks
    if lora_layers > model_blocks:
        raise ReasonerError(
            f"--lora-layers {lora_layers} is more than the model's {model_blocks} blocks; use "
            f"at most {model_blocks}, -1 for all, or leave it out (all blocks, up to "
            f"{DEFAULT_LORA_LAYERS})"
        )
    return lora_layers


def attach_lora(model: nn.Module, config: dict) -> int:
    """Freeze the base model and add LoRA to every linear layer of the top blocks.

    Args:
        model: an mlx-lm model.
        config: from ``lora_config``; ``num_layers`` counts blocks from the top (-1: all,
            None: the default). It is set to the number of blocks adapted.

    Returns:
        The number of trainable parameters.

    Raises:
        ReasonerError: ``num_layers`` is more than the model's blocks (``lora_blocks``).
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    config["num_layers"] = lora_blocks(config["num_layers"], len(model.layers))
    model.freeze()
    linear_to_lora_layers(model, config["num_layers"], config["lora_parameters"])
    return trainable_parameter_count(model)


def parameter_count(model: nn.Module) -> int:
    """Elements of every array the model holds (a quantized matrix counts as packed)."""
    return sum(v.size for _, v in tree_flatten(model.parameters()))


def trainable_parameter_count(model: nn.Module) -> int:
    """How many parameters an optimizer would update (the adapters, or every weight)."""
    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


@contextlib.contextmanager
def modules_replaced(
    model: nn.Module, select: Callable[[nn.Module], bool], replace: Callable[[nn.Module], nn.Module]
) -> Iterator[nn.Module]:
    """Run ``model`` with every module that ``select`` accepts replaced by ``replace(module)``,
    then put the originals back (the replacements may share the originals' arrays)."""
    chosen = [(name, m) for name, m in model.named_modules() if select(m)]
    if chosen:
        model.update_modules(tree_unflatten([(name, replace(m)) for name, m in chosen]))
    try:
        yield model
    finally:
        if chosen:
            model.update_modules(tree_unflatten(chosen))


def adapters_disabled(model: nn.Module) -> contextlib.AbstractContextManager[nn.Module]:
    """Run the base model: every LoRA layer is bypassed inside the block.

    The LoRA modules are swapped for the frozen linear layers they wrap, then put back,
    so the reference policy shares the base weights instead of copying them.
    """
    from mlx_lm.tuner.lora import LoRALinear

    return modules_replaced(model, lambda m: isinstance(m, LoRALinear), lambda m: m.linear)


class _StartingLoRA(nn.Module):
    """A LoRA layer that holds the adapter weights training started from, frozen, and shares
    its base layer with the live one: the KL reference of a run that continues from earlier
    adapters (no dropout, like any reference)."""

    def __init__(self, lora: nn.Module, lora_a: mx.array, lora_b: mx.array):
        super().__init__()
        self.linear = lora.linear
        self.lora_a, self.lora_b, self.scale = lora_a, lora_b, lora.scale
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        low_rank = (x @ self.lora_a) @ self.lora_b
        return self.linear(x) + (self.scale * low_rank).astype(x.dtype)


def reference_policy(
    model: nn.Module, starting_adapters: dict[str, mx.array] | None = None
) -> contextlib.AbstractContextManager[nn.Module]:
    """Run the KL reference: the base model (every adapter bypassed) when
    ``starting_adapters`` is None, else the base with those adapter weights (as
    ``adapter_weights`` names them) in place of the ones being trained.

    Either way the base weights are shared: the reference costs no second model, only the
    starting adapters' own arrays.
    """
    if starting_adapters is None:
        return adapters_disabled(model)
    from mlx_lm.tuner.lora import LoRALinear

    names = {id(m): name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    missing = [name for name in names.values() if f"{name}.lora_a" not in starting_adapters]
    if missing:
        raise ReasonerError(
            f"the starting adapters have no weights for {missing[0]} "
            f"({len(missing)} layers in all): they belong to another adapter layout"
        )

    def frozen(m: nn.Module) -> nn.Module:
        name = names[id(m)]
        return _StartingLoRA(
            m, starting_adapters[f"{name}.lora_a"], starting_adapters[f"{name}.lora_b"]
        )

    return modules_replaced(model, lambda m: isinstance(m, LoRALinear), frozen)


def load_adapters(model: nn.Module, adapter_path: str) -> dict:
    """Attach the LoRA layers an adapter folder describes and load its weights.

    The base stays frozen, so the loaded adapters can be trained further.

    Returns:
        The adapter's LoRA description (``lora_config`` layout).
    """
    from mlx_lm.tuner.utils import load_adapters as mlx_load_adapters

    check_adapter_dir(adapter_path)
    saved = read_adapter_config(adapter_path)
    model.freeze()
    try:
        mlx_load_adapters(model, adapter_path)
    except (ValueError, KeyError) as exc:
        lines = str(exc).strip().splitlines()
        raise ReasonerError(
            f"adapters in {adapter_path} do not fit this model "
            f"(trained on {saved.get('model', 'another model')}?): {lines[-1] if lines else exc}"
        ) from exc
    return lora_config(saved["num_layers"], **saved["lora_parameters"])


def adapter_weights(model: nn.Module) -> dict:
    """The trainable (adapter) parameters, by name, as mlx-lm saves them."""
    return dict(tree_flatten(model.trainable_parameters()))


def read_adapter_config(adapter_path: str) -> dict:
    return json.loads((Path(adapter_path) / "adapter_config.json").read_text())


def prefill_prompt(model: nn.Module, prompt: Sequence[int], step_size: int = 2048) -> list:
    """Run a prompt (all but its last token) through the model once and return its KV cache.

    The last token is left out: the generator feeds it to produce the first completion token.
    """
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    tokens = mx.array(prompt[:-1])[None]
    for start in range(0, tokens.shape[1], step_size):
        model(tokens[:, start : start + step_size], cache=cache)
        mx.eval([c.state for c in cache])
    return cache
