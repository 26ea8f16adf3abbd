"""Data parallel over MLX's distributed layer: two ranks on loopback (``mlx.launch --backend
ring``) against one process.

What "the same run" means: each rank samples its share of a step with its own random stream,
so two ranks do not draw the completions one process would. The two-rank run (stopped by a
signal on rank 1 and resumed on the way) records the rollouts each rank generated; one process
then trains on exactly those rollouts (its decode replaced by a replay) and must end with the
same logs and adapters, to float32 tolerance: everything after generation (rewards, advantages,
normalisers, gradients, update, logs) is compared, on identical rollouts. SFT and eval have no
sampling here, so they are compared directly.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_reasoner import trainer
from mlx_reasoner.checkpoints import latest_checkpoint
from mlx_reasoner.cli import main
from mlx_reasoner.config import TrainConfig
from mlx_reasoner.distributed import (
    RunEnded,
    World,
    check_batch_split,
    check_world_size,
    launched_rank,
    launched_size,
)
from mlx_reasoner.errors import ReasonerError
from mlx_reasoner.rollout import Rollouts
from mlx_reasoner.trainer import StepHooks

LAUNCH_TIMEOUT_S = 120  # each launch; a hang fails the test instead of blocking CI

# Rewards the tests steer per rank through the environment: the length reward a tiny model's
# completions spread over; on one rank (STOP_RANK) at one call it can send itself a signal,
# be killed, or hang.
REWARDS = """
import os, signal, time

CALLS = []

def length_share(completions, answers, **kwargs):
    rank = os.environ.get("MLX_RANK", "0")
    with open(os.environ["PID_DIR"] + "/" + rank, "w") as f:
        f.write(str(os.getpid()))
    CALLS.append(1)
    action = os.environ.get("ACTION")
    if action and rank == os.environ["STOP_RANK"] and len(CALLS) == int(os.environ["STOP_AT_CALL"]):
        if action == "sleep":
            time.sleep(float(os.environ["SLEEP_S"]))
        else:
            os.kill(os.getpid(), getattr(signal, action))
    return [min(len(c), 40) / 40 for c in completions]
"""

BROKEN_ON_RANK_1 = """
import os
if os.environ.get("MLX_RANK") == "1":
    raise RuntimeError("this machine's copy of the reward file is broken")

def length_share(completions, answers, **kwargs):
    return [len(c) / 40 for c in completions]
"""

# One launch of two ranks runs several commands in turn (a launch mostly costs the start of
# its processes); it records what each rank's decode produced during ``train``, for the replay.
DRIVER = """
import json, os, sys
from mlx_reasoner import backend
backend.start()
from mlx_reasoner import trainer
from mlx_reasoner.cli import main

decode = trainer.generate_groups
path = os.environ["RECORD_PREFIX"] + os.environ["MLX_RANK"]

def recorded(model, tokenizer, prompts, *args, **kwargs):
    rollouts = decode(model, tokenizer, prompts, *args, **kwargs)
    with open(path, "a") as f:
        fields = ("prompt_ids", "completion_ids", "finish_reasons", "texts", "logprobs")
        f.write(json.dumps({k: getattr(rollouts, k) for k in fields}) + "\\n")
    return rollouts

trainer.generate_groups = recorded
for command in json.loads(sys.argv[1]):
    main(command, prog_name="mlx-reasoner", standalone_mode=False)
"""


def free_ports(count: int) -> int:
    """A first port of ``count`` consecutive free ones (the ring takes one per rank)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            first = probe.getsockname()[1]
        if first + count > 65535:
            continue
        try:
            sockets = []
            for port in range(first, first + count):
                s = socket.socket()
                s.bind(("127.0.0.1", port))
                sockets.append(s)
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free ports")


def launch(command: list[str], tmp_path, env=None, ranks: int = 2):
    """Run ``command`` on ``ranks`` local ring ranks with ``mlx.launch``; returns
    ``(exit code, output, seconds)``. The whole process group is killed past the limit."""
    launcher = "from mlx._distributed_utils.launch import main; main()"
    args = [sys.executable, "-c", launcher, "-n", str(ranks), "--backend", "ring"]
    args += ["--starting-port", str(free_ports(ranks)), "--", sys.executable, *command]
    (tmp_path / "pids").mkdir(exist_ok=True)
    full_env = {**os.environ, "PID_DIR": str(tmp_path / "pids"), **(env or {})}
    start = time.monotonic()
    process = subprocess.Popen(
        args,
        cwd=tmp_path,
        env=full_env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"mlx.launch did not end within {LAUNCH_TIMEOUT_S} s:\n{output}")
    return process.returncode, output, time.monotonic() - start


def ranks_ended(tmp_path) -> bool:
    """Whether every rank that ran the reward has exited."""
    for pid_file in (tmp_path / "pids").iterdir():
        try:
            os.kill(int(pid_file.read_text()), 0)
        except ProcessLookupError:
            continue
        return False
    return True


def error_lines(output: str) -> list[str]:
    """Each ``error: …`` message in a launch's output, from ``error:`` on. ``mlx.launch`` writes
    its own warnings into the same stream from other threads, so one may land on the same line
    before the message; a message is one write, so it stays whole."""
    return [line[line.index("error:") :] for line in output.splitlines() if "error:" in line]


def grpo_args(model_dir, rewards, run_dir, steps=4):
    return [
        "train",
        "--model",
        str(model_dir),
        "--dataset",
        "task:arithmetic",
        "--steps",
        str(steps),
        "--batch-size",
        "4",
        "--group-size",
        "3",
        "--max-completion-tokens",
        "8",
        "--lora-layers",
        "-1",
        "--learning-rate",
        "2e-3",
        "--warmup-steps",
        "1",
        "--temperature",
        "1.0",
        "--reward-file",
        str(rewards),
        "--reward",
        "length_share",
        "--loss-type",
        "bnpo",  # normalised by the whole step's tokens: a rank's own count would show
        "--micro-batch-size",
        "4",
        "--dynamic-sampling",  # the rounds are decided on the whole step's rewards
        "--max-resample",
        "1",
        "--num-iterations",
        "2",  # the second update's ratios and clipping use old log-probs from both ranks
        "--save-every",
        "2",
        "--eval-every",
        "2",
        "--eval-limit",
        "4",
        "--sample-every",
        "0",
        "--run-dir",
        str(run_dir),
    ]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_adapters(a_dir, b_dir, typical=1e-6, worst=1e-4):
    """Adapters equal to float32 tolerance: nearly every weight within ``typical``. Adam
    divides each update by the root of its squared gradients, which scales float rounding up
    where a gradient is near zero: a few weights may differ by up to ``worst``."""
    a = mx.load(str(a_dir / "adapters.safetensors"))
    b = mx.load(str(b_dir / "adapters.safetensors"))
    assert a.keys() == b.keys()
    diff = np.concatenate([np.abs(np.array(a[k]) - np.array(b[k])).ravel() for k in a])
    assert np.quantile(diff, 0.99) <= typical and diff.max() <= worst, (diff.max(), diff.mean())


# Figures that do not depend on wall time or memory.
TIMING = {"time_step", "time_generate", "time_score", "time_train", "time_eval"}
UNTIMED_SKIP = TIMING | {"tokens_per_s", "peak_memory_gb", "train_tokens_per_s"}


# The gap between the decode's log-probs and the training pass's: a difference of two nearly
# equal numbers, so it shows the models' float32 rounding differences undiluted.
GAPS = {"mismatch_abs", "mismatch_kl"}


def assert_same_metrics(got_rows, want_rows, rel=1e-4, abs_=1e-6):
    assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows]
    for got, want in zip(got_rows, want_rows):
        assert set(got) == set(want)
        for key in set(want) - UNTIMED_SKIP:
            close = pytest.approx(want[key], rel=rel, abs=1e-5 if key in GAPS else abs_)
            assert got[key] == close, (got["step"], key)


SFT_ARGS = [
    "--dataset",
    "task:letter-count",
    "--steps",
    "3",
    "--batch-size",
    "3",  # two ranks: 2 + 1 examples
    "--learning-rate",
    "3e-3",
    "--lora-layers",
    "-1",
    "--save-every",
    "0",
]


def eval_args(model_dir, adapters):
    return [
        "eval",
        "--model",
        str(model_dir),
        "--adapter-path",
        str(adapters),
        "--dataset",
        "task:letter-count",
        "--limit",
        "6",
        "--batch-size",
        "3",
        "--max-completion-tokens",
        "12",
    ]


@pytest.fixture(scope="module")
def two_ranks(tiny_model_dir, tmp_path_factory):
    """Two launches of two ranks (a launch mostly costs the start of its processes):

    1. 4-step GRPO; SIGINT to rank 1 alone during step 3 stops both ranks after it;
    2. the GRPO run resumed to its end, an SFT run and an evaluation of the GRPO adapters.

    Each rank's rollouts are recorded across both launches.
    """
    tmp_path = tmp_path_factory.mktemp("two_ranks")
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARDS)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    grpo, sft = tmp_path / "grpo", tmp_path / "sft"
    record = {"RECORD_PREFIX": str(tmp_path / "rollouts.rank")}

    signal_on_rank_1 = {"ACTION": "SIGINT", "STOP_RANK": "1", "STOP_AT_CALL": "3", **record}
    commands = [grpo_args(tiny_model_dir, rewards, grpo)]
    code, stopped, seconds = launch([str(driver), json.dumps(commands)], tmp_path, signal_on_rank_1)
    print(f"two ranks, GRPO stopped at step 3: {seconds:.1f} s")
    after_stop = {
        "output": stopped,
        "checkpoint": latest_checkpoint(grpo),
        "steps": [m["step"] for m in read_jsonl(grpo / "metrics.jsonl")],
        "ranks ended": ranks_ended(tmp_path),
    }

    commands = [
        ["train", "--resume", str(grpo)],
        ["sft", "--model", str(tiny_model_dir), *SFT_ARGS, "--run-dir", str(sft)],
        [*eval_args(tiny_model_dir, grpo), "--output", str(tmp_path / "eval")],
    ]
    code, output, seconds = launch([str(driver), json.dumps(commands)], tmp_path, record)
    assert code == 0 and output.count("done: adapters in") == 2, output
    print(f"two ranks, GRPO resumed + SFT + eval: {seconds:.1f} s")
    return {
        "dir": tmp_path,
        "grpo": grpo,
        "sft": sft,
        "eval": tmp_path / "eval",
        "after_stop": after_stop,
        "output": output,
        "rewards": rewards,
        "records": [read_jsonl(tmp_path / f"rollouts.rank{r}") for r in range(2)],
    }


def replay(records):
    """A stand-in for the decode that returns what the two ranks generated, call by call:
    rank 0's share followed by rank 1's, which must be the prompts asked for."""
    calls = iter(zip(*records))

    def generate(model, tokenizer, prompts, group_size, *args, **kwargs):
        parts = next(calls)
        recorded = [p for part in parts for p in part["prompt_ids"][::group_size]]
        assert [list(p) for p in prompts] == recorded, "the ranks' shares are not the batch"

        def joined(name):
            return [x for part in parts for x in part[name]]

        return Rollouts(
            group_size=group_size,
            prompt_ids=joined("prompt_ids"),
            completion_ids=joined("completion_ids"),
            finish_reasons=joined("finish_reasons"),
            texts=joined("texts"),
            prompt_tokens=sum(len(p) for p in prompts),
            generation_seconds=1.0,
            decoder="replay",
            logprobs=joined("logprobs"),
        )

    return generate


@pytest.mark.slow
def test_two_ranks_match_one_process_on_the_same_rollouts(
    two_ranks, tiny_model_dir, tmp_path, monkeypatch
):
    run = two_ranks
    assert not (run["dir"] / "runs").exists(), "only rank 0 writes, into --run-dir"
    config = json.loads((run["grpo"] / "config.json").read_text())
    assert config["world_size"] == 2
    monkeypatch.setenv("PID_DIR", str(tmp_path))
    monkeypatch.setattr(trainer, "generate_groups", replay(run["records"]))
    single = tmp_path / "single"
    result = CliRunner().invoke(main, grpo_args(tiny_model_dir, run["rewards"], single))
    assert result.exit_code == 0, result.output

    two, one = read_jsonl(run["grpo"] / "metrics.jsonl"), read_jsonl(single / "metrics.jsonl")
    assert max(abs(m["loss"]) for m in one) > 0 and max(m["grad_norm"] for m in one) > 0
    assert max(m["clip_fraction"] for m in one) > 0, "the second update's ratios moved"
    assert sum("eval/accuracy" in m for m in two) == 2
    assert_same_metrics(two, one)
    assert_same_adapters(run["grpo"], single)
    two_records = read_jsonl(run["grpo"] / "rollouts.jsonl")
    one_records = read_jsonl(single / "rollouts.jsonl")
    assert len(two_records) == len(one_records) == 4 * 4 * 3
    for got, want in zip(two_records, one_records):
        assert got["prompt"] == want["prompt"] and got["completion"] == want["completion"]
        assert got["reward"] == want["reward"] and got["advantage"] == want["advantage"]


@pytest.mark.slow
def test_a_signal_on_rank_1_stops_both_after_the_same_step_and_the_run_resumes(two_ranks):
    """SIGINT to rank 1 alone during step 3: both ranks finish step 3, rank 0 checkpoints and
    prints the resume command, and nobody is left running. The run resumes on two ranks (and
    ends matching one process: the test above), not on one."""
    stop, run_dir = two_ranks["after_stop"], two_ranks["grpo"]
    assert "stopped by SIGINT on rank 1; checkpoint of step 3 saved" in stop["output"], stop
    assert f"mlx-reasoner train --resume {run_dir}" in stop["output"]
    assert stop["checkpoint"].name == "step_0000003" and stop["steps"] == [1, 2, 3]
    assert stop["ranks ended"]
    assert "resumed from" in two_ranks["output"]
    result = CliRunner().invoke(main, ["train", "--resume", str(run_dir)])  # one process
    assert result.exit_code == 1
    assert "was trained on 2 processes and this resume has 1; resume it on 2" in result.output


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_with_one_line_from_rank_0(tiny_model_dir, tmp_path):
    rewards = tmp_path / "rewards.py"
    rewards.write_text(REWARDS)
    args = grpo_args(tiny_model_dir, rewards, tmp_path / "run")
    env = {"ACTION": "SIGKILL", "STOP_RANK": "1", "STOP_AT_CALL": "1"}
    code, output, seconds = launch(["-m", "mlx_reasoner.cli", *args], tmp_path, env)
    errors = error_lines(output)
    assert errors and errors[0].startswith("error: lost contact with the other ranks"), output
    assert ranks_ended(tmp_path)


# Rank 0 leaving its training run with an error, then stopped by ``mlx.launch`` (which sends
# SIGTERM to the survivors once one rank died) before its report is out. The other ranks keep
# the usual SIGTERM: rank 0 speaks for the run, and they may be waiting for it to end.
LATE_SIGTERM = """
import os, signal
from mlx_reasoner.run import StopSignals
from mlx_reasoner.ui import QuietDisplay

try:
    with StopSignals(QuietDisplay(), hang_up=DISTRIBUTED, reports=DISTRIBUTED):
        raise RuntimeError("connection to a peer was lost")
except RuntimeError:
    os.kill(os.getpid(), signal.SIGTERM)
    print("error: lost contact with the other ranks", flush=True)
"""


@pytest.mark.parametrize("distributed", [True, False])
def test_rank_0_ending_with_an_error_is_not_cut_off_by_sigterm(distributed):
    script = LATE_SIGTERM.replace("DISTRIBUTED", str(distributed))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    if distributed:
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("error: lost contact"), done.stdout
    else:  # one process keeps the usual meaning of SIGTERM once its run has ended
        assert done.returncode == -signal.SIGTERM and done.stdout == ""


KILLED_ON_RANK_1 = """
import os, signal
if os.environ.get("MLX_RANK") == "1":
    os.kill(os.getpid(), signal.SIGKILL)  # dies while the ranks check their inputs

def length_share(completions, answers, **kwargs):
    return [len(c) / 40 for c in completions]
"""


@pytest.mark.slow
def test_a_rank_killed_before_training_ends_the_run_with_one_line_from_rank_0(
    tiny_model_dir, tmp_path
):
    rewards = tmp_path / "rewards.py"
    rewards.write_text(KILLED_ON_RANK_1)
    args = grpo_args(tiny_model_dir, rewards, tmp_path / "run")
    _, output, _ = launch(["-m", "mlx_reasoner.cli", *args], tmp_path)
    errors = error_lines(output)
    # Rank 0 learns it either way first: from the closed connection, or from the launcher.
    said = ("error: lost contact with the other ranks", "error: stopped by SIGTERM; under mlx")
    assert len(errors) == 1 and errors[0].startswith(said), output
    assert not (tmp_path / "run").exists(), "nothing was started: no folder is left"


# Rank 0 stopped by the launcher outside a training run (loading, evaluating), or once its
# error is on the way out; a rank other than 0 keeps the usual SIGTERM.
LAUNCHER_STOP = """
import os, signal, time
from mlx_reasoner import ui
from mlx_reasoner.cli import user_errors
from mlx_reasoner.errors import ReasonerError

if os.environ["CASE"] == "late":
    report = ui.on_error

    def late(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        report(*args, **kwargs)

    ui.on_error = late
with user_errors(False):
    if os.environ["CASE"] == "late":
        raise ReasonerError("lost contact with the other ranks while loading")
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
"""


@pytest.mark.parametrize(
    "rank, case, code, line",
    [
        ("0", "stop", 143, "error: stopped by SIGTERM; under mlx.launch this means another rank"),
        ("0", "late", 1, "error: lost contact with the other ranks while loading"),
        ("1", "stop", -signal.SIGTERM, ""),
    ],
)
def test_rank_0_says_why_the_launcher_stopped_it(rank, case, code, line):
    env = {**os.environ, "MLX_RANK": rank, "MLX_WORLD_SIZE": "2", "CASE": case}
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER_STOP], env=env, capture_output=True, text=True, timeout=25
    )
    assert done.returncode == code, done.stderr
    assert done.stderr.strip().startswith(line) and len(done.stderr.strip().splitlines()) <= 1


@pytest.mark.slow
def test_bad_input_on_one_rank_is_reported_by_rank_0(tiny_model_dir, tmp_path):
    rewards = tmp_path / "rewards.py"
    rewards.write_text(BROKEN_ON_RANK_1)
    args = grpo_args(tiny_model_dir, rewards, tmp_path / "run")
    code, output, _ = launch(["-m", "mlx_reasoner.cli", *args], tmp_path)
    errors = error_lines(output)
    assert len(errors) == 1, output
    assert errors[0].startswith("error: rank 1 of 2 could not go on")
    assert "this machine's copy of the reward file is broken" in errors[0]
    assert not (tmp_path / "run").exists(), "nothing was started: no folder is left"


@pytest.mark.slow
def test_sft_on_two_ranks_matches_one_process(two_ranks, tiny_model_dir, tmp_path):
    assert "2+1, the step waits for the ranks with more" in two_ranks["output"]
    one = tmp_path / "one"
    args = ["sft", "--model", str(tiny_model_dir), *SFT_ARGS, "--run-dir", str(one)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    sft = two_ranks["sft"]
    assert_same_metrics(read_jsonl(sft / "metrics.jsonl"), read_jsonl(one / "metrics.jsonl"))
    assert_same_adapters(sft, one)


@pytest.mark.slow
def test_eval_on_two_ranks_gives_one_table_matching_one_process(
    two_ranks, tiny_model_dir, tmp_path
):
    assert two_ranks["output"].count("evaluation") == 1
    args = [*eval_args(tiny_model_dir, two_ranks["grpo"]), "--output", str(tmp_path / "one")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    two = json.loads((two_ranks["eval"] / "eval.json").read_text())
    one = json.loads((tmp_path / "one" / "eval.json").read_text())
    assert two["n"] == one["n"] == 6 and two["world_size"] == 2
    for key in ("accuracy", "strict_format_rate", "mean_completion_tokens", "truncated_rate"):
        assert two[key] == pytest.approx(one[key]), key
    two_samples = read_jsonl(two_ranks["eval"] / "eval_samples.jsonl")
    one_samples = read_jsonl(tmp_path / "one" / "eval_samples.jsonl")
    assert [s["index"] for s in two_samples] == list(range(6))
    assert [s["completion"] for s in two_samples] == [s["completion"] for s in one_samples]


# Without a launcher: nothing distributed happens.


def test_one_process_without_a_launcher_is_a_world_of_one(monkeypatch):
    for name in ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert launched_size() == 1 and launched_rank() is None
    world = World()
    assert world.share(5) == range(0, 5) and world.sampling_seed(1234) == 1234
    figures = {"loss": 0.5}
    assert world.gather(figures) == [figures] and world.sum_figures(figures) is figures
    grads = {"w": mx.ones((2,))}
    assert world.sum_gradients(grads) is grads
    world.agree(None, "nothing")
    with pytest.raises(ValueError, match="mine"):
        world.agree(ValueError("mine"), "something")


def test_launcher_settings_are_read_without_mlx(tmp_path, monkeypatch):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(json.dumps([["127.0.0.1:5000"], ["127.0.0.1:5001"]]))
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))
    monkeypatch.setenv("MLX_RANK", "1")
    assert launched_size() == 2 and launched_rank() == 1
    hostfile.write_text("\n")  # mlx.launch -n 1 leaves it empty: one process
    assert launched_size() == 1 and launched_rank() is None


def test_shares_cover_the_batch_in_order_and_differ_by_one_at_most():
    for size in (1, 2, 3, 4):
        for count in range(size, 12):
            shares = World(rank=0, size=size).shares(count)
            assert [i for share in shares for i in share] == list(range(count))
            assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_each_rank_samples_its_own_stream_and_rank_0_that_of_one_process():
    seeds = [World(rank=r, size=3).sampling_seed(42) for r in range(3)]
    assert seeds[0] == 42 and len(set(seeds)) == 3
    assert World(rank=1, size=3).sampling_seed(42) == seeds[1]  # reproducible


def test_resume_on_another_number_of_processes_is_refused(tmp_path):
    with pytest.raises(ReasonerError, match="trained on 2 processes and this resume has 1"):
        check_world_size({"world_size": 2}, World(), tmp_path)
    check_world_size({}, World(), tmp_path)  # checkpoints from before: one process


def test_batch_smaller_than_the_ranks_is_refused():
    config = TrainConfig(batch_size=1)
    with pytest.raises(ReasonerError, match="--batch-size 1 cannot be shared by 2 processes"):
        check_batch_split(config, World(rank=0, size=2), "prompt")
    check_batch_split(config, World(), "prompt")


HANGING_COLLECTIVE = """
import time
from mlx_reasoner.distributed import World
with World(rank=0, size=2, timeout=0.5).waiting("sharing the step's rollouts"):
    time.sleep(30)  # a peer that never answers
"""


def test_a_collective_with_no_answer_ends_the_process_after_the_peer_timeout():
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", HANGING_COLLECTIVE], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 1 and time.monotonic() - start < 15
    assert result.stderr.startswith(
        "error: no answer from the other ranks for 0.5 s while sharing the step's rollouts"
    )


def test_one_process_never_touches_mx_distributed(tiny_model_dir, tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("one process called mx.distributed")

    for name in ("init", "all_sum", "all_gather", "is_available"):
        monkeypatch.setattr(mx.distributed, name, refuse)
    runner = CliRunner()
    model = ["--model", str(tiny_model_dir), "--lora-layers", "-1"]
    short = ["--steps", "2", "--max-completion-tokens", "4", "--eval-every", "2"]
    grpo = tmp_path / "grpo"
    args = ["train", *model, *short, "--dataset", "task:arithmetic", "--group-size", "2"]
    result = runner.invoke(main, [*args, "--eval-limit", "2", "--run-dir", str(grpo)])
    assert result.exit_code == 0, result.output
    assert json.loads((grpo / "config.json").read_text())["world_size"] == 1
    result = runner.invoke(
        main,
        [
            "sft",
            *model,
            "--steps",
            "2",
            "--dataset",
            "task:letter-count",
            "--run-dir",
            str(tmp_path / "s"),
        ],
    )
    assert result.exit_code == 0, result.output
    result = runner.invoke(
        main,
        ["eval", "--model", str(tiny_model_dir), "--adapter-path", str(grpo), "--limit", "2"]
        + ["--dataset", "task:arithmetic", "--max-completion-tokens", "4"],
    )
    assert result.exit_code == 0, result.output


@dataclass(frozen=True)
class ScriptedWorld(World):
    """A rank of a two-rank world whose peer's answers to ``gather`` are given."""

    peer: object = None

    def gather(self, obj, what=""):
        return [obj, self.peer] if self.rank == 0 else [self.peer, obj]


def test_ranks_holding_other_data_are_refused_by_rank_0_and_quiet_elsewhere():
    mine, theirs = {"examples": "7473, digest aa"}, {"examples": "7000, digest bb"}
    fix = "every machine needs the same dataset"
    with pytest.raises(ReasonerError) as refused:
        ScriptedWorld(rank=0, size=2, peer=theirs).check_same(mine, "comparing", fix)
    assert not isinstance(refused.value, RunEnded)
    assert str(refused.value) == (
        "rank 1 has other examples than rank 0 (7000, digest bb vs 7473, digest aa); " + fix
    )
    with pytest.raises(RunEnded):
        ScriptedWorld(rank=1, size=2, peer=mine).check_same(theirs, "comparing", fix)
    ScriptedWorld(rank=0, size=2, peer=mine).check_same(mine, "comparing", fix)


def test_one_rank_failing_to_start_stops_every_rank_with_its_message():
    with pytest.raises(RunEnded, match=r"rank 1 of 2 could not go on \(loading\): no such file"):
        ScriptedWorld(rank=0, size=2, peer="no such file").agree(None, "loading")
    with pytest.raises(RunEnded, match="rank 0 of 2 could not go on"):
        ScriptedWorld(rank=1, size=2, peer="disk full").agree(None, "loading")
    own = ReasonerError("disk full")
    with pytest.raises(ReasonerError, match="disk full"):
        ScriptedWorld(rank=0, size=2, peer=None).agree(own, "loading")
    ScriptedWorld(rank=0, size=2, peer=None).agree(None, "loading")


def test_a_stop_asked_on_any_rank_stops_every_rank():
    config = TrainConfig(steps=5)
    hooks = StepHooks(
        config,
        display=None,
        should_stop=lambda: None,
        world=ScriptedWorld(rank=0, size=2, peer="stopped by SIGTERM"),
    )
    assert hooks._stop_reason() == "stopped by SIGTERM on rank 1"
    hooks.world = ScriptedWorld(rank=0, size=2, peer=None)
    assert hooks._stop_reason() is None
