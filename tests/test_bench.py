"""``mlx-reasoner bench`` on the tiny model: every figure is there, finite and consistent.

Speed targets are not asserted here (timings on a shared machine are noise); the bench prints
them and docs/performance.md records them.
"""

import json
import math

import mlx_lm
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlx_reasoner import backend
from mlx_reasoner.cli import main
from mlx_reasoner.showcase.bench import BenchConfig, build_bench_model, run_bench

POSITIVE_FIGURES = [
    "rollout_tokens_per_s",
    "engine_tokens_per_s",
    "rollout_vs_engine",
    "step_seconds",
    "generate_seconds",
    "score_seconds",
    "train_seconds",
    "train_tokens_per_s",
    "peak_memory_gb",
    "matmul_gflops",
]


def bench_cli(*args):
    return CliRunner().invoke(main, ["bench", *map(str, args)])


def test_bench_cli_writes_every_figure(tiny_model_dir, tmp_path):
    output = tmp_path / "figures" / "bench.json"
    batch, group, tokens = 2, 2, 8
    result = bench_cli(
        "--model",
        tiny_model_dir,
        "--steps",
        3,
        "--batch-size",
        batch,
        "--group-size",
        group,
        "--max-completion-tokens",
        tokens,
        "--micro-batch-size",
        3,
        "--output",
        output,
    )
    assert result.exit_code == 0, result.output
    assert "rollout / engine" in result.output and "step 3/3" in result.output

    figures = json.loads(output.read_text())
    for key in POSITIVE_FIGURES:
        assert isinstance(figures[key], float) and math.isfinite(figures[key]), key
        assert figures[key] > 0, key
    assert figures["blas"] and figures["device"] and figures["versions"]["mlx"]
    assert figures["versions"]["training_streams"] >= 1
    assert figures["parameters"] > figures["trainable_parameters"] > 0
    assert figures["settings"]["beta"] == 0.04 and figures["settings"]["ignore_eos"] is True
    assert figures["measured_steps"] == 2
    assert figures["train_layout"] == "shared prompts"  # a Qwen2 model takes it
    # the fused compiled decode, or mlx-lm's BatchGenerator with the engine off
    assert figures["rollout_decoder"] == ("fused" if backend.engine_enabled() else "BatchGenerator")
    assert [r["warmup"] for r in figures["steps"]] == [True, False, False]
    for record in figures["steps"]:
        # Completions run to full length, in our rollout and in the raw engine alike.
        assert record["completion_tokens"] == batch * group * tokens
        assert record["engine_tokens"] == batch * group * tokens
        # Each completion is scored with its prompt in front (counted G times, though run once).
        assert record["train_tokens"] == group * record["prompt_tokens"] + batch * group * tokens
    assert figures["completion_tokens_per_step"] == batch * group * tokens
    # The estimate's split sits beside the measured peak.
    assert "estimated" in result.output and "KV cache" in result.output
    split = figures["memory_estimate_gb"]
    for part in ("weights", "kv_cache", "activations", "logits", "adapters"):
        assert split[part] > 0, part
    assert split["peak"] == max(split["rollout"], split["training"])
    assert split["training"] == pytest.approx(
        split["weights"] + split["activations"] + split["logits"] + split["adapters"]
    )
    assert figures["memory_estimate_phase"] in ("rollout", "training pass")


def test_bench_compares_peak_memory_with_and_without_the_reference(tiny_model_dir):
    config = BenchConfig(
        model=str(tiny_model_dir),
        steps=2,
        batch_size=1,
        group_size=2,
        max_completion_tokens=4,
        beta=0.0,
        compare_beta=True,
        num_iterations=2,
        loss_type="dr_grpo",
        compile=False,
    )
    figures = run_bench(config)
    assert figures["rollout_decoder"] == "BatchGenerator"  # --no-compile
    assert figures["peak_memory_ratio_beta"] > 0
    compared = figures["compare_beta"]
    assert compared["beta"] == 0.04
    assert compared["peak_memory_gb_beta0"] == figures["peak_memory_gb"]  # --beta 0 ran first
    assert all(r["completion_tokens"] == 1 * 2 * 4 for r in figures["steps"])
    # Two updates per batch: every sequence token is processed twice.
    first = figures["steps"][0]
    assert first["train_tokens"] == 2 * (2 * first["prompt_tokens"] + 2 * 4)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", 1], "--steps must be at least 2 (the first step is a warm-up"),
        (["--group-size", 1], "--group-size must be at least 2"),
        (["--lora-layers", 0], "--lora-layers must be >= 1 or -1"),
        (["--temperature", 0], "--temperature must be > 0"),
        (["--lora-layers", 9], "--lora-layers 9 is more than the model's 2 blocks"),
    ],
)
def test_bad_options_fail_with_one_line(tiny_model_dir, args, message):
    result = bench_cli("--model", tiny_model_dir, *args)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_output_must_be_a_file_and_the_model_must_exist(tiny_model_dir, tmp_path):
    result = bench_cli("--model", tiny_model_dir, "--output", tmp_path)
    assert result.exit_code == 1 and "is a folder" in result.output
    result = bench_cli("--model", tmp_path / "missing")
    assert result.exit_code == 1 and "model directory not found" in result.output


def test_without_a_model_it_builds_the_2_9m_parameter_tiny_model():
    figures = run_bench(
        BenchConfig(steps=2, batch_size=1, group_size=2, max_completion_tokens=2, lora_rank=2)
    )
    assert figures["parameters"] == 2_887_936
    assert figures["model"].startswith("tiny Qwen2")
    assert figures["lora"]["num_layers"] == 4  # -1 resolved to every block


def test_build_bench_model_gives_the_same_model_to_other_tools(tmp_path):
    model, _ = mlx_lm.load(str(build_bench_model(tmp_path / "model")))
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == 2_887_936
