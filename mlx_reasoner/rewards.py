"""The rewards stage: load reward functions from files, choose and weight them by name, and
score completions into a weighted total plus one logged component per reward.

A reward function is a plain top-level function
``fn(completions: list[str], answers: list[str], **kwargs) -> list[float]`` returning one
finite number per completion. The built-ins live in the ``rewards/gsm8k.py`` and
``rewards/shaping.py`` files that ship with the package; users add their own with
``--reward-file``.
"""

import importlib.util
import inspect
import itertools
import math
import numbers
import re
import reprlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ReasonerError
from .resources import builtin_dir

RewardFn = Callable[..., Sequence[float]]

DEFAULT_REWARDS = ["correctness", "integer", "strict_format", "soft_format", "xml_count"]

# Each loaded file gets its own module name, so two files called rewards.py don't clash.
_module_counter = itertools.count()


def _describe_exception(exc: BaseException) -> str:
    """``Type: message`` on one line."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _identifier(text: str) -> str:
    """``text`` with every character that can't appear in a module name replaced by _."""
    return re.sub(r"\W", "_", text)


def load_reward_file(path: str | Path) -> dict[str, RewardFn]:
    """Import a Python file and return the reward functions it defines.

    Every top-level function whose name does not start with ``_`` and that is defined in
    the file itself is returned; functions it imports (``from x import helper``) are not.

    Args:
        path: a ``.py`` file.

    Returns:
        Function name -> function, in the order the file defines them.

    Raises:
        ReasonerError: the file is missing or not ``.py``, raises while importing, or
            defines no public function.
    """
    path = Path(path)
    if not path.exists():
        raise ReasonerError(f"reward file {path} does not exist; pass the path to a .py file")
    if not path.is_file() or path.suffix != ".py":
        raise ReasonerError(f"reward file {path} is not a .py file; pass a Python source file")

    module_name = f"_mlx_reasoner_reward_file_{next(_module_counter)}_{_identifier(path.stem)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ReasonerError(f"reward file {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    # Registered before running, as a normal import would be, so dataclasses and pickling
    # inside the file work.
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ReasonerError(
            f"reward file {path} failed to import: {_describe_exception(exc)}"
        ) from exc

    functions = {
        name: value
        for name, value in vars(module).items()
        if not name.startswith("_")
        and inspect.isfunction(value)
        and value.__module__ == module_name
    }
    if not functions:
        raise ReasonerError(
            f"reward file {path} defines no public top-level function; define "
            "fn(completions, answers, **kwargs) -> list[float] with a name not starting with _"
        )
    return functions


# The built-ins: gsm8k.py's in DEFAULT_REWARDS order (the order it defines them), then the
# shaping rewards, which are used only when named.
REWARDS: dict[str, RewardFn] = {
    **load_reward_file(builtin_dir("rewards") / "gsm8k.py"),
    **load_reward_file(builtin_dir("rewards") / "shaping.py"),
}


@dataclass(frozen=True)
class WeightedReward:
    """A reward function chosen for training, with the name it is logged under."""

    name: str
    fn: Callable
    weight: float = 1.0


@dataclass
class RewardScores:
    """The scores of one batch of completions."""

    total: np.ndarray  # [n] float32, the weighted sum over rewards
    components: dict[str, np.ndarray]  # name -> [n] float32 weight * fn output; sums to total


def parse_reward_spec(spec: str) -> tuple[str, float]:
    """Split a ``--reward`` value into a name and a weight.

    Args:
        spec: ``NAME`` (weight 1.0) or ``NAME:WEIGHT``.

    Returns:
        ``(name, weight)``.

    Raises:
        ReasonerError: the name is empty or the weight is not a finite number.

    >>> parse_reward_spec("correctness"), parse_reward_spec("xml_count:0.5")
    (('correctness', 1.0), ('xml_count', 0.5))
    """
    name, separator, weight_text = spec.partition(":")
    name = name.strip()
    if not name:
        raise ReasonerError(f"reward spec '{spec}' has no name; use NAME or NAME:WEIGHT")
    if not separator:
        return name, 1.0
    try:
        weight = float(weight_text)
    except ValueError:
        weight = math.nan
    if not math.isfinite(weight):
        raise ReasonerError(
            f"reward spec '{spec}' has a bad weight '{weight_text}'; "
            "use NAME:WEIGHT with a number, e.g. correctness:2"
        )
    return name, weight


def resolve_rewards(
    specs: Sequence[str] = (), reward_files: Sequence[str | Path] = ()
) -> list[WeightedReward]:
    """Choose the rewards to train with.

    The available rewards are the built-ins (:data:`REWARDS`) plus every public function
    in ``reward_files``. A file function with the same name as a built-in replaces the
    built-in; the same name in two files is an error.

    Args:
        specs: ``NAME`` or ``NAME:WEIGHT`` strings. When given, exactly these rewards are
            used. When empty, :data:`DEFAULT_REWARDS` plus every file function are used,
            each with weight 1.0.
        reward_files: ``.py`` files of extra reward functions.

    Returns:
        The chosen rewards, in the order given (defaults first, then file order).

    Raises:
        ReasonerError: a file cannot be loaded, a spec is malformed, names an unknown
            reward or repeats a name, or two files define the same name.
    """
    # A lone string would otherwise be iterated character by character.
    specs = [specs] if isinstance(specs, str) else list(specs)
    reward_files = [reward_files] if isinstance(reward_files, (str, Path)) else reward_files

    registry = dict(REWARDS)
    file_origin: dict[str, Path] = {}
    for reward_file in reward_files:
        for name, fn in load_reward_file(reward_file).items():
            if name in file_origin:
                raise ReasonerError(
                    f"reward '{name}' is defined in both {file_origin[name]} and {reward_file}; "
                    "rename one of them"
                )
            file_origin[name] = Path(reward_file)
            registry[name] = fn

    if specs:
        chosen = [parse_reward_spec(spec) for spec in specs]
    else:
        names = DEFAULT_REWARDS + [name for name in file_origin if name not in DEFAULT_REWARDS]
        chosen = [(name, 1.0) for name in names]

    seen: set[str] = set()
    for name, _ in chosen:
        if name in seen:
            raise ReasonerError(f"reward '{name}' is given more than once; give each reward once")
        seen.add(name)
        if name not in registry:
            raise ReasonerError(f"unknown reward '{name}'; available: {', '.join(registry)}")
    return [WeightedReward(name, registry[name], weight) for name, weight in chosen]


def score_completions(
    rewards: list[WeightedReward], completions: list[str], answers: list[str], **kwargs: Any
) -> RewardScores:
    """Score completions with each reward and add up the weighted results.

    Each function is called as ``fn(completions, answers, **kwargs)``, so reward functions
    should accept ``**kwargs`` and ignore what they don't need. The trainer passes
    ``questions: list[str]``, the question text of each completion.

    Args:
        rewards: the rewards to apply, e.g. from :func:`resolve_rewards`.
        completions: model completions (without the EOS token), one per sample.
        answers: gold answers, aligned with ``completions``.
        **kwargs: extra per-completion data handed to every reward function.

    Returns:
        The weighted total and each reward's weighted component.

    Raises:
        ReasonerError: naming the function, when one raises, or returns something other
            than one finite number per completion.
    """
    n = len(completions)
    if len(answers) != n:
        raise ValueError(f"got {n} completions but {len(answers)} answers")

    components: dict[str, np.ndarray] = {}
    for reward in rewards:
        if reward.name in components:
            raise ReasonerError(f"reward '{reward.name}' is given more than once")
        try:
            # Copies, so a function that mutates its input cannot affect the next one.
            raw = reward.fn(list(completions), list(answers), **kwargs)
        except Exception as exc:
            hint = ""
            if isinstance(exc, TypeError) and "unexpected keyword argument" in str(exc):
                hint = "; reward functions must accept **kwargs"
            raise ReasonerError(
                f"{_label(reward)} raised {_describe_exception(exc)}{hint}"
            ) from exc
        values = _check_scores(reward, raw, n)  # [n] float64
        components[reward.name] = (reward.weight * values).astype(np.float32)

    total = np.zeros(n, dtype=np.float64)  # [n]
    for component in components.values():
        total += component
    return RewardScores(total=total.astype(np.float32), components=components)


def _check_scores(reward: WeightedReward, raw: Any, n: int) -> np.ndarray:
    """Turn a reward function's output into a [n] float64 array, or explain what's wrong."""
    label = _label(reward)
    expected = f"it must return a list of {n} numbers, one per completion"
    if isinstance(raw, (list, tuple)):
        if len(raw) != n:
            raise ReasonerError(f"{label} returned {len(raw)} scores for {n} completions")
        for index, value in enumerate(raw):
            # bool is an int, so True/False count as 1/0.
            if not isinstance(value, (numbers.Real, np.bool_)):
                raise ReasonerError(
                    f"{label} returned a non-number at index {index}: {reprlib.repr(value)}"
                )
        values = np.array([float(value) for value in raw], dtype=np.float64)
    elif hasattr(raw, "__array__") and not isinstance(raw, (str, bytes)):
        array = np.asarray(raw)
        if array.ndim != 1 or len(array) != n:
            raise ReasonerError(f"{label} returned an array of shape {array.shape}; {expected}")
        if array.dtype.kind not in "biuf":
            raise ReasonerError(f"{label} returned an array of {array.dtype}; {expected}")
        values = array.astype(np.float64)
    else:
        raise ReasonerError(f"{label} returned {type(raw).__name__}; {expected}")

    not_finite = np.flatnonzero(~np.isfinite(values))
    if not_finite.size:
        index = int(not_finite[0])
        raise ReasonerError(
            f"{label} returned {values[index]} at index {index}; scores must be finite"
        )
    return values


def _label(reward: WeightedReward) -> str:
    """Name a reward function in an error, with where it is defined when known."""
    code = getattr(reward.fn, "__code__", None)
    where = f" ({Path(code.co_filename).name}:{code.co_firstlineno})" if code else ""
    return f"reward function '{reward.name}'{where}"
