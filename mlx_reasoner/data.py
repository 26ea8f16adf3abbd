"""The data stage: load question/answer examples, hold some out for evaluation, and cut the rest
into shuffled, resumable batches.

Examples come from a local JSONL/JSON/CSV/Parquet file, a folder of them with splits (as a hub
download has), a Hugging Face hub dataset (GSM8K by default) or a built-in generated task
(``task:NAME``, see :mod:`mlx_reasoner.tasks`); the gold answer is parsed once here so later
stages compare plain strings. A single file's held-out questions are chosen by a stable hash of
the question, so a question is never on both sides of a split.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .answers import parse_gsm8k_answer
from .errors import ReasonerError
from .examples import TASK_PREFIX, Example, question_hash
from .tasks import task_examples

GSM8K = "openai/gsm8k"
# Generated tasks are unlimited; these sizes apply when no limit is given.
DEFAULT_TASK_TRAIN_SIZE = 5000
DEFAULT_TASK_TEST_SIZE = 500

_LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_FIELD_HINT = "pass --question-field/--answer-field to name the right columns"
# A hub error can be a page of text; the CLI shows one line.
_MAX_INNER_MESSAGE = 200
_HUB_PROBE_TIMEOUT_S = 3.0


def load_examples(
    dataset: str = GSM8K,
    *,
    split: str = "train",
    question_field: str = "question",
    answer_field: str = "answer",
    dataset_config: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    reasoning_field: str = "reasoning",
) -> list[Example]:
    """Load examples from a built-in task, a local file or folder, or the Hugging Face hub.

    ``task:NAME`` (or ``task:NAME:COUNT``) generates examples of a built-in task; a name ending
    in .jsonl/.json/.csv/.parquet, or naming an existing file, is read locally; an existing
    folder is read by ``datasets`` with its splits (``train.jsonl``, ``test.jsonl``, ...);
    anything else is treated as a hub dataset id.

    Args:
        dataset: ``"task:arithmetic"``, a local file or folder, or a hub id such as
            ``"openai/gsm8k"``.
        split: The split to load from the hub or a folder; for a JSON object file, the key
            holding the rows; for a task, ``"train"`` gives the training questions and any
            other name the held-out ones.
        question_field: The column holding the question.
        answer_field: The column holding the gold answer (GSM8K style ``#### 42`` is parsed).
        dataset_config: The hub config name; GSM8K defaults to ``"main"``.
        limit: Keep only the first ``limit`` rows. A task generates ``COUNT`` examples, or
            ``limit`` when no count is given, or 5000 (train) / 500 (held out); ``limit`` also
            caps ``COUNT``.
        seed: Which examples a task generates; ignored by files and the hub.
        reasoning_field: The column holding a worked solution, if any (for SFT). Without it,
            a GSM8K-style answer's text before ``####`` is the worked solution.

    Returns:
        The examples, in file (or generation) order.

    Raises:
        ReasonerError: The file is missing, unreadable or empty, a row lacks a field, the
            hub dataset cannot be loaded, or the task is unknown.
    """
    if limit is not None and limit < 1:
        raise ReasonerError(f"limit must be at least 1, got {limit}")
    if dataset.startswith(TASK_PREFIX):
        return _load_task(dataset, split, limit, seed)
    rows, source = read_rows(dataset, split=split, dataset_config=dataset_config)
    examples = []
    for row_number, row in enumerate(rows, start=1):
        if limit is not None and row_number > limit:
            break
        examples.append(
            _to_example(row, row_number, source, question_field, answer_field, reasoning_field)
        )
    if not examples:
        raise ReasonerError(f"{source} has no rows; pass a dataset with at least one example")
    return examples


def read_rows(
    dataset: str, *, split: str = "train", dataset_config: str | None = None
) -> tuple[Iterable[Any], str]:
    """Raw rows of a local file or hub dataset, and a name for them in error messages."""
    path = Path(dataset).expanduser()
    if path.is_dir():
        return _read_folder(path, dataset_config, split), f"dataset folder {path}"
    if is_local_dataset(dataset):
        source = str(path)
        rows = _read_local(path, split)
    else:
        source = f"hub dataset '{dataset}'"
        rows = _read_hub(dataset, dataset_config, split)
    return rows, source


def is_local_dataset(dataset: str) -> bool:
    """Return whether :func:`load_examples` reads ``dataset`` from one local file, which has
    no splits (a folder has them, as a hub dataset does).

    Args:
        dataset: The dataset string given to :func:`load_examples`.

    Returns:
        True for an existing file or a path ending in .jsonl/.json/.csv/.parquet; False for
        a folder, a built-in task (``task:...``) or a hub id.
    """
    if dataset.startswith(TASK_PREFIX):
        return False
    path = Path(dataset).expanduser()
    if path.is_dir():
        return False
    return path.exists() or path.suffix.lower() in _LOCAL_SUFFIXES


def split_examples(
    examples: Sequence[Example], heldout_fraction: float, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Cut examples into training and held-out parts by a stable hash of each question.

    Membership depends only on the question text (case and spacing ignored) and ``seed``, so
    repeated questions land on the same side, the split survives reordering or adding rows,
    and every run with the same seed holds out the same questions. The held-out part is
    about ``heldout_fraction`` of the questions, not exactly: a tiny file may hold out none.

    Args:
        examples: The examples to split.
        heldout_fraction: The share to hold out, from 0 (none) up to but excluding 1.
        seed: Picks a different split; training and evaluation must use the same one.

    Returns:
        ``(train, heldout)``, each in the original order.

    Raises:
        ReasonerError: The fraction is out of range, or nothing is left to train on.
    """
    if not 0 <= heldout_fraction < 1:
        raise ReasonerError(
            f"held-out fraction must be at least 0 and below 1, got {heldout_fraction}"
        )
    train: list[Example] = []
    heldout: list[Example] = []
    for example in examples:
        side = heldout if question_hash(example.question, seed) < heldout_fraction else train
        side.append(example)
    if examples and not train:
        raise ReasonerError(
            f"holding out {heldout_fraction:.0%} of {len(examples)} examples leaves none to "
            "train on; lower the held-out fraction or add examples"
        )
    return train, heldout


def batch_iterator(examples: Sequence[Example], batch_size: int, seed: int) -> BatchSampler:
    """Return an endless, seeded iterator of batches; see :class:`BatchSampler`.

    Args:
        examples: The examples to draw from.
        batch_size: Examples per batch.
        seed: Seed for the per-epoch shuffles.

    Returns:
        A :class:`BatchSampler`, which also reports and restores its position.
    """
    return BatchSampler(examples, batch_size, seed)


class BatchSampler:
    """Endless batches over shuffled epochs, with a position that can be saved and restored.

    Each epoch is a fresh permutation seeded by ``(seed, epoch)``, so every example appears
    exactly once per epoch and a run is reproducible. Epochs are concatenated: a batch may end
    one epoch and start the next, which also makes ``batch_size > len(examples)`` work.

    Attributes:
        epoch: The epoch (from 0) that the next example comes from.
        position: How many examples of that epoch have already been yielded.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int):
        """Create a sampler at the start of epoch 0.

        Args:
            examples: The examples to draw from; must not be empty.
            batch_size: Examples per batch, at least 1.
            seed: A non-negative seed for the per-epoch shuffles.
        """
        if len(examples) == 0:
            raise ReasonerError("no examples to batch; load a dataset with at least one example")
        if batch_size < 1:
            raise ReasonerError(f"batch size must be at least 1, got {batch_size}")
        if seed < 0:
            raise ReasonerError(f"seed must be a non-negative integer, got {seed}")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._epoch_order(0)

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> list[Example]:
        batch: list[Example] = []
        while len(batch) < self.batch_size:
            take = min(self.batch_size - len(batch), len(self._order) - self.position)
            batch.extend(
                self.examples[i] for i in self._order[self.position : self.position + take]
            )
            self.position += take
            if self.position == len(self._order):
                self._start_epoch(self.epoch + 1)
        return batch

    def state_dict(self) -> dict[str, int]:
        """Return the position as plain ints, ready to be written into a checkpoint.

        Returns:
            ``seed``, ``num_examples``, ``epoch`` and ``position``.
        """
        return {
            "seed": self.seed,
            "num_examples": len(self.examples),
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position, yielding exactly the batches the saved run would have.

        The batch size may differ from the saved run's: the position counts examples.

        Args:
            state: A dict from :meth:`state_dict`.

        Raises:
            ReasonerError: The state was saved with a different seed or number of examples,
                so its order cannot be reproduced.
        """
        if state["seed"] != self.seed or state["num_examples"] != len(self.examples):
            raise ReasonerError(
                f"cannot resume the data order: it was saved with seed {state['seed']} and "
                f"{state['num_examples']} examples, but this run has seed {self.seed} and "
                f"{len(self.examples)} examples; use the same dataset, --limit and --seed"
            )
        if not 0 <= state["position"] < len(self.examples) or state["epoch"] < 0:
            raise ReasonerError(
                f"cannot resume the data order: saved epoch {state['epoch']} position "
                f"{state['position']} is out of range; the checkpoint is damaged"
            )
        self._start_epoch(state["epoch"])
        self.position = state["position"]

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.position = 0
        self._order = self._epoch_order(epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        # Seeding from (seed, epoch) lets a resumed run rebuild any epoch without replaying.
        rng = np.random.default_rng([self.seed, epoch])
        return rng.permutation(len(self.examples)).tolist()


def _load_task(dataset: str, split: str, limit: int | None, seed: int) -> list[Example]:
    """Generate a built-in task's examples from ``task:NAME`` or ``task:NAME:COUNT``."""
    name, _, count_text = dataset[len(TASK_PREFIX) :].partition(":")
    count = None
    if count_text:
        if not count_text.isdigit() or int(count_text) < 1:
            raise ReasonerError(
                f"dataset {dataset}: the count after the task name must be a positive whole "
                f"number, got '{count_text}'; write e.g. task:{name}:1000"
            )
        count = int(count_text)
    task_split = "train" if split == "train" else "test"
    if count is None:
        count = limit or (
            DEFAULT_TASK_TRAIN_SIZE if task_split == "train" else DEFAULT_TASK_TEST_SIZE
        )
    elif limit is not None:
        count = min(count, limit)
    return task_examples(name, split=task_split, count=count, seed=seed)


def _to_example(
    row: Any,
    row_number: int,
    source: str,
    question_field: str,
    answer_field: str,
    reasoning_field: str = "reasoning",
) -> Example:
    """Check one row and turn it into an Example; ``source`` names the file or hub id."""
    if not isinstance(row, dict):
        raise ReasonerError(
            f"{source}: row {row_number} is a {type(row).__name__}, not an object with "
            f"'{question_field}' and '{answer_field}' fields"
        )
    if question_field not in row and "messages" in row:
        return _chat_example(row["messages"], row_number, source)
    for field in (question_field, answer_field):
        if field not in row:
            available = ", ".join(repr(name) for name in row) or "none"
            raise ReasonerError(
                f"{source}: row {row_number} has no field '{field}' (fields: {available}); "
                f"{_FIELD_HINT}"
            )
    question = _field_text(row[question_field], question_field, row_number, source, numbers=False)
    answer = _field_text(row[answer_field], answer_field, row_number, source, numbers=True)
    gold = parse_gsm8k_answer(answer)
    if not gold:
        raise ReasonerError(
            f"{source}: field '{answer_field}' in row {row_number} has no answer left after "
            "parsing; GSM8K-style answers need a value after '####'"
        )
    reasoning = row.get(reasoning_field)
    if isinstance(reasoning, str) and reasoning.strip():
        reasoning = reasoning.strip()
    else:
        reasoning = _worked_solution(answer)
    return Example(question=question, answer=gold, reasoning=reasoning)


def _chat_example(messages: Any, row_number: int, source: str) -> Example:
    """A row in chat form: ``{"messages": [{"role": ..., "content": ...}, ...]}``."""
    ok = isinstance(messages, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if not ok or not messages or messages[-1]["role"] != "assistant":
        raise ReasonerError(
            f"{source}: row {row_number} has 'messages' that are not a list of "
            "{'role', 'content'} objects ending with an assistant message"
        )
    users = [m["content"] for m in messages if m["role"] == "user"]
    return Example(
        question=users[-1] if users else "",
        answer=messages[-1]["content"].strip(),
        messages=tuple((m["role"], m["content"]) for m in messages),
    )


def _worked_solution(answer_text: str) -> str:
    """The steps of a GSM8K-style answer (before ``####``), calculator notes removed.

    >>> _worked_solution("She has 2*3=<<2*3=6>>6 apples.\\n#### 6")
    'She has 2*3=6 apples.'
    """
    if "####" not in answer_text:
        return ""
    steps = answer_text.rsplit("####", 1)[0]
    return re.sub(r"<<[^>]*>>", "", steps).strip()


def _field_text(value: Any, field: str, row_number: int, source: str, *, numbers: bool) -> str:
    """Return a field as stripped, non-empty text; numbers are accepted where ``numbers``."""
    # Columnar files (CSV short rows, Parquet nulls) give None for a blank cell.
    value = "" if value is None else value
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        kind = "a string or number" if numbers else "a string"
        raise ReasonerError(
            f"{source}: field '{field}' in row {row_number} must be {kind}, "
            f"got {type(value).__name__}; {_FIELD_HINT}"
        )
    if not value.strip():
        raise ReasonerError(
            f"{source}: field '{field}' in row {row_number} is empty; fill it in or drop the row"
        )
    return value.strip()


def _read_local(path: Path, split: str) -> Iterable[Any]:
    """Read the rows of a local file, chosen by its extension."""
    if not path.is_file():
        raise ReasonerError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path, split)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path)
    raise ReasonerError(
        f"unsupported dataset file type '{path.suffix}': {path}; "
        "use a .jsonl, .json, .csv or .parquet file"
    )


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with _open_text(path) as lines:
        for line_number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ReasonerError(
                    f"{path}: line {line_number} is not valid JSON ({err.msg}); "
                    "a .jsonl file needs one JSON object per line"
                ) from None
    return rows


def _read_json(path: Path, split: str) -> list[Any]:
    with _open_text(path) as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as err:
            raise ReasonerError(
                f"{path}: not valid JSON at line {err.lineno} ({err.msg})"
            ) from None
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        # The split name is the most specific key, so it wins over the generic ones.
        for key in (split, "data", "examples"):
            if isinstance(data.get(key), list):
                return data[key]
        keys = ", ".join(repr(key) for key in data) or "none"
        raise ReasonerError(
            f"{path}: a JSON object needs its rows as a list under '{split}', 'data' or "
            f"'examples' (keys: {keys}); or make the file a list of objects"
        )
    raise ReasonerError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")


def _read_csv(path: Path) -> list[dict[str, Any]]:
    with _open_text(path) as handle:
        try:
            # Short rows leave None under the missing columns; _field_text reports them.
            return list(csv.DictReader(handle))
        except csv.Error as err:
            raise ReasonerError(f"{path}: not a readable CSV file ({err})") from None


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    # pyarrow is slow to import and only Parquet needs it.
    import pyarrow
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as err:
        raise ReasonerError(f"{path}: not a readable Parquet file ({_one_line(err)})") from None


@contextlib.contextmanager
def _open_text(path: Path) -> Iterator[Any]:
    # utf-8-sig drops the byte-order mark that spreadsheet exports put before the header.
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            yield handle
    except UnicodeDecodeError as err:
        raise ReasonerError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _import_datasets(needed_to: str, instead: str):
    """The ``datasets`` package, or one line saying how to do without it."""
    try:
        import datasets
    except ImportError:
        raise ReasonerError(
            f"the 'datasets' package is needed to {needed_to}; pip install datasets, "
            f"or pass {instead} with --dataset"
        ) from None
    return datasets


def _read_folder(path: Path, dataset_config: str | None, split: str) -> Iterable[Any]:
    """A split of a local dataset folder, read by ``datasets`` as it reads a hub download:
    splits by file name (``train.jsonl``, ``test-00000-of-00001.parquet``), configs from the
    folder's README (``main``)."""
    datasets = _import_datasets("read a dataset folder", "one of its data files")
    try:
        if dataset_config is None:
            configs = datasets.get_dataset_config_names(str(path))
            if len(configs) > 1:
                raise ReasonerError(
                    f"dataset folder {path} holds the configs {', '.join(configs)}; "
                    "pick one with --dataset-config"
                )
        return datasets.load_dataset(str(path), dataset_config, split=split)
    except ReasonerError:
        raise
    except Exception as err:  # noqa: BLE001  (bad split, bad config, no data files, ...)
        raise ReasonerError(
            f"could not read split '{split}' of dataset folder {path} ({type(err).__name__}: "
            f"{_one_line(err)}); name a split and config it holds (the split and "
            "--dataset-config options), or pass one of its data files with --dataset"
        ) from None


def _read_hub(dataset: str, dataset_config: str | None, split: str) -> Iterable[Any]:
    """Load a split from the Hugging Face hub (or its local cache) as an iterable of rows."""
    datasets = _import_datasets("load hub datasets", "a local JSONL/JSON/CSV/Parquet file")
    if dataset == "gsm8k":
        dataset = GSM8K
    if dataset == GSM8K and dataset_config is None:
        dataset_config = "main"
    # When the hub is unreachable its client retries for ~25 s before datasets falls back to
    # the cache; going offline at once reads the same cache and fails in under a second.
    offline_reason = ""
    if _offline_requested():
        offline_reason = "offline mode is set, so only the local cache was tried; "
    elif not _hub_reachable(datasets.config.HF_ENDPOINT):
        offline_reason = "the hub is unreachable, so only the local cache was tried; "
    try:
        with _hub_offline_mode(bool(offline_reason)):
            return datasets.load_dataset(dataset, dataset_config, split=split)
    # The hub stack raises many unrelated types (HTTP, file-not-found, bad split, bad config).
    except Exception as err:  # noqa: BLE001
        raise ReasonerError(
            f"could not load dataset '{dataset}' from the Hugging Face hub "
            f"({offline_reason}{type(err).__name__}: {_one_line(err)}); pass a local "
            "JSONL/JSON/CSV/Parquet file, or a folder of them (such as a download of the "
            "dataset), with --dataset, or check the name, config and split"
        ) from None


def _offline_requested() -> bool:
    """Whether the user asked for offline mode; read now, as the libraries read it at import."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"} for name in names)


def _hub_reachable(endpoint: str, timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub opens within ``timeout`` seconds."""
    url = urllib.parse.urlsplit(endpoint)
    if url.scheme in urllib.request.getproxies():
        return True  # only the proxy knows; let the hub client try through it
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def _hub_offline_mode(offline: bool) -> Iterator[None]:
    """Switch the hub libraries to cache-only while loading, then restore their setting."""
    if not offline:
        yield
        return
    import datasets.config
    import huggingface_hub.constants

    saved = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def _one_line(err: BaseException) -> str:
    """The first line of an exception's message, cut to fit a one-line error."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else "no message"
    if len(text) > _MAX_INNER_MESSAGE:
        text = text[: _MAX_INNER_MESSAGE - 3] + "..."
    return text
