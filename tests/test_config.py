"""Configuration: ranges, config files, precedence, --print-config, and fuzzed bad input."""

import json
import random

import pytest
import yaml
from click.testing import CliRunner

from mlx_reasoner.cli import main
from mlx_reasoner.config import SFTConfig, TrainConfig, load_config_file
from mlx_reasoner.errors import ReasonerError


def test_yaml_and_toml_files_load_with_dashes_or_underscores(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("steps: 5\ngroup-size: 4\nreward: correctness\nbeta: 0\n")
    toml_file = tmp_path / "run.toml"
    toml_file.write_text('steps = 5\ngroup_size = 4\nreward = ["correctness"]\nbeta = 0\n')
    for path in (yaml_file, toml_file):
        values = load_config_file(str(path), TrainConfig)
        assert values == {"steps": 5, "group_size": 4, "reward": ("correctness",), "beta": 0.0}


@pytest.mark.parametrize(
    "text, message",
    [
        ("stepz: 3\n", "unknown option 'stepz' (did you mean 'steps'?)"),
        ("steps: abc\n", "option 'steps' must be an integer, got 'abc'"),
        ("steps: 2.5\n", "option 'steps' must be an integer"),
        ("compile: yes please\n", "option 'compile' must be true or false"),
        ("beta: [1]\n", "option 'beta' must be a number"),
        ("reward: [1, 2]\n", "option 'reward' must be a list of strings"),
        ("loss_type: ppo\n", "option 'loss_type' must be one of grpo, bnpo, dr_grpo"),
        ("- just\n- a list\n", "must hold 'option: value' pairs"),
        ("steps: [unclosed\n", "is not valid yaml"),
    ],
)
def test_bad_config_files_name_the_key(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ReasonerError, match="run.yaml") as info:
        load_config_file(str(path), TrainConfig)
    assert message in str(info.value)


def test_sft_only_options_are_not_train_options(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_seq_tokens: 512\n")
    assert load_config_file(str(path), SFTConfig) == {"max_seq_tokens": 512}
    with pytest.raises(ReasonerError, match="unknown option 'max_seq_tokens'"):
        load_config_file(str(path), TrainConfig)


def test_flags_beat_the_file_which_beats_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 5\ngroup_size: 4\ntemperature: 0.5\n")
    result = CliRunner().invoke(
        main, ["train", "--config", str(path), "--steps", "9", "--print-config"]
    )
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.output)
    assert resolved["steps"] == 9 and resolved["group_size"] == 4
    assert resolved["temperature"] == 0.5 and resolved["batch_size"] == TrainConfig.batch_size


def test_print_config_validates_first(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("group_size: 1\n")
    result = CliRunner().invoke(main, ["train", "--config", str(path), "--print-config"])
    assert result.exit_code == 1 and "--group-size must be at least 2" in result.output


def test_missing_config_file():
    result = CliRunner().invoke(main, ["train", "--config", "/nonexistent/run.yaml"])
    assert result.exit_code == 1 and "config file not found" in result.output


GARBAGE_VALUES = ["", "-1", "0", "nan", "inf", "1e400", "abc", "--", "[]", "{}", "ä", "  ", "1.5"]
INT_OPTIONS = [
    "--steps",
    "--batch-size",
    "--group-size",
    "--max-completion-tokens",
    "--lora-rank",
    "--micro-batch-size",
    "--num-iterations",
    "--eval-limit",
]
FLOAT_OPTIONS = [
    "--learning-rate",
    "--temperature",
    "--top-p",
    "--epsilon",
    "--beta",
    "--min-p",
    "--eval-fraction",
]
BAD_ROWS = [
    "not json at all",
    "[1, 2, 3]",
    '{"question": null, "answer": "1"}',
    '{"question": "q", "answer": ""}',
    '{"question": ["list"], "answer": "1"}',
    '{"question": "q"}',
    '{"answer": "1"}',
    '"just a string"',
    '{"question": "q", "answer": "####"}',
]


def fuzz_cases(seed=1234, count=40):
    """Seeded random bad inputs: option values, dataset rows and config files."""
    rng = random.Random(seed)
    for _ in range(count):
        kind = rng.choice(["option", "rows", "config"])
        if kind == "option":
            flag = rng.choice(INT_OPTIONS + FLOAT_OPTIONS)
            # Values a parser accepts must still be out of range for the option.
            value = rng.choice(GARBAGE_VALUES + ["-3", "0"])
            yield kind, ([flag, value], None, None)
        elif kind == "rows":
            rows = rng.sample(BAD_ROWS, rng.randint(1, 3))
            yield kind, ([], "\n".join(rows) + "\n", None)
        else:
            key = rng.choice(["steps", "group_size", "beta", "stepz", "reward", "loss_type"])
            value = rng.choice(["abc", -5, [1, 2], {"a": 1}, True, None, "0", 1.5])
            yield kind, ([], None, {key: value})


def acceptable(kind, args, config):
    """Whether a random draw is in fact valid input (such draws are left out of the fuzz)."""
    if kind == "option":
        flag, value = args
        try:
            number = float(value)
        except ValueError:
            return False
        valid = {
            "--beta": number >= 0,
            "--min-p": 0 <= number <= 1,
            "--top-p": 0 < number <= 1,
            "--eval-fraction": 0 < number < 1,
        }.get(flag, number > 0 and (flag in FLOAT_OPTIONS or number.is_integer()))
        if flag == "--group-size":
            valid = valid and number >= 2
        return valid and number == number and abs(number) != float("inf")
    if kind == "config":
        ((key, value),) = config.items()
        if key == "beta" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return value >= 0
        if key == "reward" and value is None:
            return False
        return key in ("beta", "reward") and value is None
    return False


BAD_CASES = [c for c in fuzz_cases() if not acceptable(c[0], c[1][0], c[1][2])]


def test_the_fuzz_covers_every_kind_of_input():
    assert {kind for kind, _ in BAD_CASES} == {"option", "rows", "config"}
    assert len(BAD_CASES) >= 30


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda c: c[0])
def test_fuzzed_bad_input_fails_cleanly(tiny_model_dir, tmp_path, case, monkeypatch):
    kind, (args, rows, config) = case
    # Where the BLAS is slow, its notice comes first (tested in test_slow_blas_notice.py).
    monkeypatch.setattr("mlx_reasoner.ui.show_slow_blas_notice", lambda command: False)
    data = tmp_path / "data.jsonl"
    data.write_text(rows if rows is not None else '{"question": "q", "answer": "1"}\n')
    extra = []
    if config is not None:
        config_file = tmp_path / "run.yaml"
        config_file.write_text(yaml.safe_dump(config))
        extra = ["--config", str(config_file)]
    run_dir = tmp_path / "run"
    base = {"steps": "1", "group_size": "2", "max_completion_tokens": "2", "lora_layers": "1"}
    # A flag would override the config file's value under test, so leave that one out.
    flags = [
        x
        for key, value in base.items()
        if key not in (config or {})
        for x in ("--" + key.replace("_", "-"), value)
    ]
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(data),
            "--run-dir",
            str(run_dir),
            *flags,
            *extra,
            *args,
        ],
    )
    assert result.exit_code in (1, 2), (case, result.output)  # 2: click's usage errors
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert not run_dir.exists(), "a rejected run leaves no folder or partial files"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines, "an error message is printed"
    if result.exit_code == 1:
        assert lines[-1].startswith("error: ") and len(lines) == 1, result.output


def test_config_json_of_a_run_round_trips_as_a_config_file(tmp_path):
    config = TrainConfig(steps=3, reward=("correctness",))
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    assert TrainConfig(**load_config_file(str(path), TrainConfig)) == config
    assert json.dumps(config.to_dict())
