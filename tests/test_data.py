"""Tests for mlx_reasoner.data: local files of every format, clear errors, the offline hub
path, built-in tasks, held-out splits, and the seeded, resumable batch order. All offline; files
are written to tmp_path."""

import csv
import json
import socket
from collections import Counter

import datasets
import datasets.config
import huggingface_hub.constants
import pyarrow
import pyarrow.parquet
import pytest

from mlx_reasoner import data
from mlx_reasoner.data import (
    BatchSampler,
    Example,
    batch_iterator,
    load_examples,
    split_examples,
)
from mlx_reasoner.errors import ReasonerError
from mlx_reasoner.examples import normalize_question, question_hash

ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"},
    {"question": "What is 1,000 + 234?", "answer": "1,000 + 234 = 1,234\n#### 1,234"},
]
EXPECTED = [
    Example("Tom has 3 apples and buys 4. How many?", "7", "3 + 4 = 7"),
    Example("What is 1,000 + 234?", "1234", "1,000 + 234 = 1,234"),
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json(path, payload):
    path.write_text(json.dumps(payload), encoding="utf-8")
    return path


def write_csv(path, rows, fields=("question", "answer")):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path, rows):
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


WRITERS = {
    "jsonl": lambda tmp, rows: write_jsonl(tmp / "d.jsonl", rows),
    "json-list": lambda tmp, rows: write_json(tmp / "d.json", rows),
    "json-data": lambda tmp, rows: write_json(tmp / "d.json", {"data": rows}),
    "json-examples": lambda tmp, rows: write_json(tmp / "d.json", {"examples": rows}),
    "json-split": lambda tmp, rows: write_json(tmp / "d.json", {"train": rows, "test": []}),
    "csv": lambda tmp, rows: write_csv(tmp / "d.csv", rows),
    "parquet": lambda tmp, rows: write_parquet(tmp / "d.parquet", rows),
}


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- loading local files ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(WRITERS))
def test_each_format_loads_and_parses_gsm8k_answers(tmp_path, kind):
    path = WRITERS[kind](tmp_path, ROWS)
    assert load_examples(str(path)) == EXPECTED


def test_custom_field_names(tmp_path):
    rows = [{"problem": "2 + 2?", "solution": "4", "extra": "x"}]
    path = write_csv(tmp_path / "d.csv", rows, fields=("problem", "solution", "extra"))
    examples = load_examples(str(path), question_field="problem", answer_field="solution")
    assert examples == [Example("2 + 2?", "4")]


def test_numeric_answers_and_plain_answers(tmp_path):
    rows = [
        {"question": "q1", "answer": 42},
        {"question": "q2", "answer": 12.50},
        {"question": "  q3  ", "answer": "  72 "},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert load_examples(str(path)) == [
        Example("q1", "42"),
        Example("q2", "12.5"),
        Example("q3", "72"),
    ]


def test_limit_keeps_first_rows(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(10)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert [e.question for e in load_examples(str(path), limit=3)] == ["q0", "q1", "q2"]
    assert len(load_examples(str(path), limit=100)) == 10
    with pytest.raises(ReasonerError, match="limit"):
        load_examples(str(path), limit=0)


def test_limit_skips_checking_rows_it_drops(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], {"question": "no answer"}])
    assert load_examples(str(path), limit=1) == EXPECTED[:1]


def test_blank_jsonl_lines_are_skipped(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1]) + "\n")
    assert load_examples(str(path)) == EXPECTED


def test_csv_with_byte_order_mark(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("\ufeffquestion,answer\nq,5\n", encoding="utf-8")
    assert load_examples(str(path)) == [Example("q", "5")]


# --- errors on local files ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["jsonl", "json-list", "csv", "parquet"])
def test_missing_field_names_file_row_field_and_flags(tmp_path, kind):
    bad_row = {"question": "where is the answer?", "solution": "5"}
    if kind == "csv":
        path = write_csv(tmp_path / "d.csv", [bad_row], fields=("question", "solution"))
        row = "row 1"
    elif kind == "parquet":
        # A column present in any row exists in all of them, so the file holds only the bad row.
        path = write_parquet(tmp_path / "d.parquet", [bad_row])
        row = "row 1"
    else:
        path = WRITERS[kind](tmp_path, [ROWS[0], bad_row])
        row = "row 2"
    with pytest.raises(ReasonerError) as excinfo:
        load_examples(str(path))
    message = one_line_error(excinfo)
    assert str(path) in message
    assert row in message
    assert "'answer'" in message
    assert "'question', 'solution'" in message
    assert "--question-field/--answer-field" in message


@pytest.mark.parametrize("answer", ["  ", None])
def test_empty_field_is_an_error(tmp_path, answer):
    path = write_parquet(tmp_path / "d.parquet", [ROWS[0], {"question": "q", "answer": answer}])
    with pytest.raises(ReasonerError, match=r"field 'answer' in row 2 is empty"):
        load_examples(str(path))


def test_short_csv_row_is_an_empty_field(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("question,answer\nq1,1\nq2\n")
    with pytest.raises(ReasonerError, match=r"field 'answer' in row 2 is empty"):
        load_examples(str(path))


def test_field_of_wrong_type_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": ["a", "list"], "answer": "1"}])
    with pytest.raises(ReasonerError, match=r"field 'question' in row 1 must be a string"):
        load_examples(str(path))


def test_answer_with_nothing_after_marker_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "work\n####"}])
    with pytest.raises(ReasonerError, match=r"row 1 has no answer left"):
        load_examples(str(path))


@pytest.mark.parametrize(
    "name, content",
    [("d.jsonl", ""), ("d.jsonl", "\n\n"), ("d.json", "[]"), ("d.csv", "question,answer\n")],
)
def test_empty_file_is_an_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ReasonerError, match="has no rows") as excinfo:
        load_examples(str(path))
    assert str(path) in one_line_error(excinfo)


def test_bad_json_line_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n{not json\n")
    with pytest.raises(ReasonerError) as excinfo:
        load_examples(str(path))
    message = one_line_error(excinfo)
    assert str(path) in message and "line 3" in message


def test_bad_json_file_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"question": "q",\n oops}\n]')
    with pytest.raises(ReasonerError, match=r"not valid JSON at line 3"):
        load_examples(str(path))


def test_json_object_without_rows_lists_its_keys(tmp_path):
    path = write_json(tmp_path / "d.json", {"rows": []})
    with pytest.raises(ReasonerError, match=r"keys: 'rows'"):
        load_examples(str(path))


def test_json_split_key_is_chosen_by_split(tmp_path):
    payload = {"train": [ROWS[0]], "test": [ROWS[1]]}
    path = write_json(tmp_path / "d.json", payload)
    assert load_examples(str(path), split="test") == EXPECTED[1:]


@pytest.mark.parametrize(
    "name", ["missing.jsonl", "missing.json", "missing.csv", "missing.parquet"]
)
def test_missing_file_is_an_error(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(ReasonerError, match=f"dataset file not found: {path}"):
        load_examples(str(path))


def test_unsupported_existing_file_is_an_error(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("question answer\n")
    with pytest.raises(ReasonerError, match=r"unsupported dataset file type '\.txt'"):
        load_examples(str(path))


def rows_of(split, count):
    return [{"question": f"{split} q{i}", "answer": f"so #### {i}"} for i in range(count)]


@pytest.fixture
def split_folder(tmp_path, monkeypatch):
    """A dataset folder of ``train.jsonl`` (20 rows) and ``test.jsonl`` (3 rows)."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "gsm8k"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows_of("train", 20))
    write_jsonl(folder / "test.jsonl", rows_of("test", 3))
    return folder


def test_a_folder_is_read_by_split_like_a_hub_download(split_folder):
    folder = split_folder
    train = load_examples(str(folder))
    test = load_examples(str(folder), split="test")
    assert [ex.question for ex in train] == [f"train q{i}" for i in range(20)]
    assert [ex.answer for ex in test] == ["0", "1", "2"]
    assert not data.is_local_dataset(str(folder)), "a folder has splits: no hash split"
    with pytest.raises(ReasonerError, match="could not read split 'validation'") as info:
        load_examples(str(folder), split="validation")
    assert "['train', 'test']" in str(info.value) and "\n" not in str(info.value)


def test_training_on_a_folder_holds_out_its_test_split(split_folder):
    from mlx_reasoner.config import TrainConfig
    from mlx_reasoner.run import load_train_and_eval_examples

    folder = split_folder
    config = TrainConfig(dataset=str(folder), eval_every=2)
    examples, held_out = load_train_and_eval_examples(config)
    assert len(examples) == 20, "every training row is kept: none is hashed out"
    assert [ex.question for ex in held_out] == ["test q0", "test q1", "test q2"]
    single = TrainConfig(dataset=str(folder / "train.jsonl"), eval_every=2, eval_fraction=0.25)
    examples, held_out = load_train_and_eval_examples(single)
    assert len(examples) + len(held_out) == 20 and held_out, "one file: a hash split"
    assert all(ex.question.startswith("train") for ex in held_out)


def test_a_folder_with_configs_takes_dataset_config(tmp_path, monkeypatch):
    """The layout of ``openai/gsm8k`` downloaded from the hub: one folder per config of
    Parquet files, and a README that names them."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "gsm8k"
    configs = []
    for config, count in (("main", 4), ("socratic", 2)):
        (folder / config).mkdir(parents=True)
        for split in ("train", "test"):
            table = pyarrow.Table.from_pylist(rows_of(f"{config} {split}", count))
            pyarrow.parquet.write_table(table, folder / config / f"{split}-00000-of-00001.parquet")
        files = [f"  - split: {split}\n    path: {config}/{split}-*" for split in ("train", "test")]
        configs.append(f"- config_name: {config}\n  data_files:\n" + "\n".join(files))
    (folder / "README.md").write_text("---\nconfigs:\n" + "\n".join(configs) + "\n---\n")
    main = load_examples(str(folder), split="test", dataset_config="main")
    assert [ex.question for ex in main] == [f"main test q{i}" for i in range(4)]
    with pytest.raises(ReasonerError, match="holds the configs main, socratic; pick one with"):
        load_examples(str(folder))


def test_an_empty_folder_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReasonerError, match="could not read split 'train' of dataset folder"):
        load_examples(str(tmp_path / "empty"))


def test_corrupt_parquet_is_an_error(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(ReasonerError, match="not a readable Parquet file"):
        load_examples(str(path))


# --- the hub -----------------------------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace datasets.load_dataset; record its arguments and the offline flags it saw."""
    calls = []

    def load_dataset(name, config, split):
        calls.append(
            {
                "name": name,
                "config": config,
                "split": split,
                "offline": (
                    datasets.config.HF_HUB_OFFLINE,
                    huggingface_hub.constants.HF_HUB_OFFLINE,
                ),
            }
        )
        return list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    return calls


@pytest.mark.parametrize("name", ["openai/gsm8k", "gsm8k"])
def test_gsm8k_loads_main_config(fake_hub, monkeypatch, name):
    monkeypatch.setattr(data, "_hub_reachable", lambda endpoint: True)
    assert load_examples(name, split="test") == EXPECTED
    assert fake_hub[0]["name"] == "openai/gsm8k"
    assert (fake_hub[0]["config"], fake_hub[0]["split"]) == ("main", "test")
    assert fake_hub[0]["offline"] == (
        datasets.config.HF_HUB_OFFLINE,
        huggingface_hub.constants.HF_HUB_OFFLINE,
    )


def test_other_hub_dataset_keeps_its_config(fake_hub, monkeypatch):
    monkeypatch.setattr(data, "_hub_reachable", lambda endpoint: True)
    load_examples("someone/maths", dataset_config=None, split="train")
    load_examples("openai/gsm8k", dataset_config="socratic")
    assert [call["config"] for call in fake_hub] == [None, "socratic"]


def test_unreachable_hub_reads_only_the_cache_then_restores_flags(fake_hub, monkeypatch):
    monkeypatch.setattr(data, "_hub_reachable", lambda endpoint: False)
    before = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    assert load_examples() == EXPECTED
    assert fake_hub[0]["offline"] == (True, True)
    assert before == (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)


def test_hub_failure_is_one_actionable_line(monkeypatch):
    def load_dataset(name, config, split):
        raise ConnectionError("Couldn't reach the hub\n" + "details " * 100)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(data, "_hub_reachable", lambda endpoint: True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ReasonerError) as excinfo:
        load_examples("someone/maths")
    message = one_line_error(excinfo)
    assert "could not load dataset 'someone/maths'" in message
    assert "ConnectionError: Couldn't reach the hub" in message
    assert "pass a local JSONL/JSON/CSV/Parquet file, or a folder of them" in message


def test_offline_hub_fails_fast_with_a_clear_error(monkeypatch):
    """The real datasets.load_dataset, with offline mode set: no network, no retries."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(
        data, "_hub_reachable", lambda endpoint: pytest.fail("offline mode must skip the probe")
    )
    with pytest.raises(ReasonerError) as excinfo:
        load_examples("mlx-reasoner-tests/no-such-dataset")
    message = one_line_error(excinfo)
    assert "'mlx-reasoner-tests/no-such-dataset'" in message
    assert "offline mode is set" in message
    assert "pass a local JSONL/JSON/CSV/Parquet file, or a folder of them" in message


def test_hub_probe(monkeypatch):
    monkeypatch.setattr(data.urllib.request, "getproxies", dict)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert data._hub_reachable(f"http://127.0.0.1:{port}", timeout=2)
    # The port was just closed, so nothing listens there now.
    assert not data._hub_reachable(f"http://127.0.0.1:{port}", timeout=2)


def test_hub_probe_trusts_a_proxy(monkeypatch):
    monkeypatch.setattr(data.urllib.request, "getproxies", lambda: {"https": "http://proxy:3128"})
    assert data._hub_reachable("https://hub.invalid", timeout=0.1)


# --- built-in tasks and held-out splits -------------------------------------------------------


def test_example_reasoning_is_optional_and_examples_stay_frozen():
    example = Example("q", "1")
    assert example.reasoning == "" and example == Example("q", "1", "")
    assert Example("q", "1", reasoning="1 = 1") != example
    with pytest.raises(AttributeError):
        example.reasoning = "changed"


def test_task_dataset_sizes_default_and_follow_count_and_limit():
    assert len(load_examples("task:arithmetic")) == data.DEFAULT_TASK_TRAIN_SIZE
    assert len(load_examples("task:letter-count", split="test")) == data.DEFAULT_TASK_TEST_SIZE
    assert len(load_examples("task:arithmetic:40", limit=25)) == 25
    assert load_examples("task:arithmetic:40", limit=25) == load_examples("task:arithmetic:25")
    assert load_examples("task:arithmetic", seed=1, limit=5) != load_examples(
        "task:arithmetic", seed=2, limit=5
    )


@pytest.mark.parametrize("dataset", ["task:arithmetic:many", "task:arithmetic:0"])
def test_task_dataset_with_a_bad_count_is_an_error(dataset):
    with pytest.raises(ReasonerError, match="positive whole number.*task:arithmetic:1000"):
        load_examples(dataset)


def test_task_split_other_than_train_is_the_held_out_one():
    assert load_examples("task:arithmetic", split="validation", limit=5) == load_examples(
        "task:arithmetic", split="test", limit=5
    )


def test_question_hash_is_stable_and_ignores_case_and_spacing():
    assert normalize_question(" How many\n R's?  ") == "how many r's?"
    value = question_hash("Tom has 3 apples.")
    assert 0 <= value < 1
    assert value == question_hash("  tom HAS 3\tapples. ")
    assert value != question_hash("Tom has 3 apples.", seed=1)
    # Pinned so that a change to the hash, which would reshuffle every split, is noticed.
    assert round(value, 6) == 0.911035


LOCAL = [Example(f"Question number {i}?", str(i)) for i in range(1000)]


def test_split_examples_is_deterministic_and_about_the_fraction():
    train, heldout = split_examples(LOCAL, 0.2, seed=0)
    assert (train, heldout) == split_examples(LOCAL, 0.2, seed=0)
    assert len(train) + len(heldout) == len(LOCAL)
    assert 150 < len(heldout) < 250
    assert train == [e for e in LOCAL if e in train]  # original order kept
    assert split_examples(LOCAL, 0.2, seed=1)[1] != heldout
    assert split_examples(LOCAL, 0.0)[1] == []


def test_split_examples_never_puts_a_question_on_both_sides():
    # The same question with other answers, case or spacing must land on one side.
    examples = LOCAL[:300] + [
        Example(e.question.upper() + "  ", str(int(e.answer) + 1)) for e in LOCAL[:300]
    ]
    for seed in range(3):
        train, heldout = split_examples(examples, 0.3, seed=seed)
        assert heldout
        train_questions = {normalize_question(e.question) for e in train}
        assert not train_questions & {normalize_question(e.question) for e in heldout}


def test_split_examples_with_seed_zero_matches_the_task_rule():
    from mlx_reasoner.tasks import HELDOUT_FRACTION, is_heldout

    _, heldout = split_examples(LOCAL, HELDOUT_FRACTION)
    assert heldout == [e for e in LOCAL if is_heldout(e.question)]


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_split_examples_rejects_a_bad_fraction(fraction):
    with pytest.raises(ReasonerError, match="below 1"):
        split_examples(LOCAL, fraction)


def test_split_examples_refuses_to_leave_nothing_to_train_on():
    with pytest.raises(ReasonerError, match="leaves none to train on"):
        split_examples(LOCAL[:1], 0.999)


# --- batches -----------------------------------------------------------------------------------

EXAMPLES = [Example(f"q{i}", str(i)) for i in range(7)]


def take(sampler, count):
    return [next(sampler) for _ in range(count)]


def flatten(batches):
    return [example for batch in batches for example in batch]


def test_same_seed_same_batches_and_other_seed_other_order():
    first = take(batch_iterator(EXAMPLES, 3, seed=1), 10)
    assert first == take(batch_iterator(EXAMPLES, 3, seed=1), 10)
    assert first != take(batch_iterator(EXAMPLES, 3, seed=2), 10)
    assert all(len(batch) == 3 for batch in first)


@pytest.mark.parametrize("batch_size", [1, 3, 7, 10])
def test_every_example_once_per_epoch_and_epochs_reshuffle(batch_size):
    epochs = 5
    batches = take(BatchSampler(EXAMPLES, batch_size, seed=0), -(-epochs * 7 // batch_size))
    stream = flatten(batches)
    orders = [stream[i * 7 : (i + 1) * 7] for i in range(epochs)]
    for order in orders:
        assert Counter(order) == Counter(EXAMPLES)
    assert len({tuple(order) for order in orders}) > 1


def test_epoch_and_position_track_progress():
    sampler = BatchSampler(EXAMPLES, 3, seed=0)
    assert (sampler.epoch, sampler.position) == (0, 0)
    next(sampler)
    assert (sampler.epoch, sampler.position) == (0, 3)
    next(sampler)
    next(sampler)  # 9 examples: one full epoch and 2 of the next
    assert (sampler.epoch, sampler.position) == (1, 2)
    assert iter(sampler) is sampler


@pytest.mark.parametrize("new_batch_size", [3, 2])
def test_state_dict_round_trip_continues_identically(new_batch_size):
    original = BatchSampler(EXAMPLES, 3, seed=4)
    take(original, 5)
    state = json.loads(json.dumps(original.state_dict()))  # as a checkpoint would store it
    resumed = BatchSampler(EXAMPLES, new_batch_size, seed=4)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.position) == (original.epoch, original.position)
    assert flatten(take(original, 6)) == flatten(take(resumed, 6 * 3 // new_batch_size))


def test_state_from_another_order_is_refused():
    state = BatchSampler(EXAMPLES, 3, seed=4).state_dict()
    with pytest.raises(ReasonerError, match="seed 4 and 7 examples"):
        BatchSampler(EXAMPLES, 3, seed=5).load_state_dict(state)
    with pytest.raises(ReasonerError, match="out of range"):
        BatchSampler(EXAMPLES, 3, seed=4).load_state_dict({**state, "position": 7})


@pytest.mark.parametrize(
    "examples, batch_size, seed, match",
    [([], 2, 0, "no examples"), (EXAMPLES, 0, 0, "batch size"), (EXAMPLES, 2, -1, "seed")],
)
def test_bad_sampler_arguments(examples, batch_size, seed, match):
    with pytest.raises(ReasonerError, match=match):
        BatchSampler(examples, batch_size, seed)


def test_reasoning_comes_from_its_field_or_the_gsm8k_steps(tmp_path):
    path = tmp_path / "traces.jsonl"
    rows = [
        {"question": "q1", "answer": "6", "reasoning": "2 * 3 = 6"},
        {"question": "q2", "answer": "She has 2*3=<<2*3=6>>6.\n#### 6"},
        {"question": "q3", "answer": "6"},
        {"question": "q4", "answer": "6", "steps": "custom"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_examples(str(path))
    assert [e.reasoning for e in loaded] == ["2 * 3 = 6", "She has 2*3=6.", "", ""]
    assert load_examples(str(path), reasoning_field="steps")[3].reasoning == "custom"
