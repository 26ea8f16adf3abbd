"""`mlx-reasoner export`: adapters fused into the base with mlx-lm's code; the folder generates
what the adapters do, quantizes, carries tokenizer, chat template, system prompt and model card,
and is never written half or over another."""

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import mlx.nn as nn
import mlx_lm
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlx_reasoner import export as export_module
from mlx_reasoner.cli import main
from mlx_reasoner.export import export_model
from mlx_reasoner.prompts import encode_prompt, load_system_prompt

PROMPTS = [
    "How many r's are in strawberry?",
    "What is 7 times 6?",
    "Name a colour.",
    "Count the letters in banana.",
    "Is 17 even or odd?",
]


def greedy(model, tokenizer, max_tokens: int = 12) -> list[str]:
    system = load_system_prompt("reasoning")
    return [
        mlx_lm.generate(
            model, tokenizer, encode_prompt(tokenizer, system, p), max_tokens=max_tokens
        )
        for p in PROMPTS
    ]


def quiet(_line: str) -> None:
    pass


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    """The tiny model with adapters moved well away from zero, and their unquantized export."""
    from mlx.utils import tree_map

    from mlx_reasoner.checkpoints import save_adapters
    from mlx_reasoner.model import adapter_weights, attach_lora, lora_config

    model, _ = mlx_lm.load(str(tiny_model_dir))
    config = lora_config(2, 4)
    attach_lora(model, config)
    import mlx.core as mx

    mx.random.seed(0)
    model.update(
        tree_map(lambda p: p + 0.3 * mx.random.normal(p.shape), model.trainable_parameters())
    )
    root = tmp_path_factory.mktemp("export")
    adapters = root / "adapters"
    adapters.mkdir()
    save_adapters(adapters, adapter_weights(model), {**config, "model": str(tiny_model_dir)})
    return adapters, export_model(adapters, root / "fused", log=quiet)


@pytest.mark.slow
def test_exported_model_generates_what_the_adapters_do(tiny_model_dir, exported):
    adapters, folder = exported
    with_adapters = greedy(*mlx_lm.load(str(tiny_model_dir), adapter_path=str(adapters)))
    fused_model, fused_tokenizer = mlx_lm.load(str(folder))
    assert greedy(fused_model, fused_tokenizer) == with_adapters
    assert greedy(*mlx_lm.load(str(tiny_model_dir))) != with_adapters, "the adapters matter"
    names = [k for k, _ in tree_flatten(fused_model.parameters())]
    assert not any("lora" in k for k in names), "fused: no adapter layers left"
    assert "quantization" not in json.loads((folder / "config.json").read_text())
    _, base_tokenizer = mlx_lm.load(str(tiny_model_dir))
    assert fused_tokenizer.chat_template == base_tokenizer.chat_template
    assert fused_tokenizer.chat_template
    assert not list(folder.parent.glob(".fused.tmp-*"))


@pytest.mark.slow
@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_export_loads_and_generates(exported, tmp_path, bits):
    adapters, unquantized = exported
    out = tmp_path / f"q{bits}"
    result = CliRunner().invoke(
        main, ["export", str(adapters), "--output", str(out), "--quantize", str(bits)]
    )
    assert result.exit_code == 0, result.output
    assert "bits per weight" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == bits
    model, tokenizer = mlx_lm.load(str(out))
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())
    answers = greedy(model, tokenizer, max_tokens=6)
    assert all(answers) and len(answers) == len(PROMPTS)
    size = (out / "model.safetensors").stat().st_size
    assert size < 0.5 * (unquantized / "model.safetensors").stat().st_size


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_mlx_lm_server_serves_the_export_as_mlx_lm_generates_it(exported):
    """The OpenAI-style chat endpoint of ``mlx_lm server`` answers greedily what
    ``mlx_lm.generate`` gives on the same folder."""
    _, folder = exported
    want = greedy(*mlx_lm.load(str(folder)))[0]
    port = free_port()
    command = [sys.executable, "-m", "mlx_lm", "server", "--model", str(folder)]
    server = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port), "--log-level", "ERROR"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120  # the server's start: its imports and the model
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                urllib.request.urlopen(f"{base}/models", timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "mlx_lm server did not start"
                time.sleep(0.2)
        messages = [
            {"role": "system", "content": load_system_prompt("reasoning")},
            {"role": "user", "content": PROMPTS[0]},
        ]
        body = {"messages": messages, "max_tokens": 12, "temperature": 0.0}
        request = urllib.request.Request(
            f"{base}/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert answer["choices"][0]["message"]["content"] == want


@pytest.mark.slow
def test_model_card_of_a_real_run(tiny_run_dir, tmp_path):
    out = tmp_path / "model"
    export_model(tiny_run_dir, out, log=quiet)
    card = (out / "README.md").read_text()
    config = json.loads((tiny_run_dir / "config.json").read_text())
    assert card.startswith("---\nlibrary_name: mlx\n")
    assert f"base_model: {json.dumps(config['model'])}" in card
    assert "mlx-reasoner grpo" in card and "for 4 of 4 steps" in card and "unquantized" in card
    assert "| group_size | 4 |" in card and "| dataset | task:letter-count |" in card
    assert "| held-out accuracy | 0.0% (step 4) |" in card
    assert f"mlx_lm.server --model {out}" in card
    assert (out / "system_prompt.txt").read_text() == config["system_prompt_text"]
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"):
        assert (out / name).is_file(), name


@pytest.mark.slow
def test_base_that_moved_is_named_with_base(exported, tiny_model_dir, tmp_path):
    adapters, _ = exported
    moved = tmp_path / "adapters"
    shutil.copytree(adapters, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**config, "model": "/gone/model"}))
    result = CliRunner().invoke(main, ["export", str(moved), "-o", str(tmp_path / "a")])
    assert result.exit_code == 1 and "pass --base MODEL" in result.output
    assert not (tmp_path / "a").exists()
    result = CliRunner().invoke(
        main, ["export", str(moved), "-o", str(tmp_path / "b"), "--base", str(tiny_model_dir)]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b" / "model.safetensors").is_file()


def test_bad_input_gives_one_line(tmp_path, exported):
    adapters, fused = exported
    (tmp_path / "empty").mkdir()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    cases = [
        ([str(tmp_path / "missing"), "-o", str(tmp_path / "x")], "run folder not found"),
        ([str(tmp_path / "empty"), "-o", str(tmp_path / "x")], "holds no adapters"),
        ([str(adapters), "-o", str(tmp_path / "taken")], "already exists; pick another"),
        ([str(adapters), "-o", str(fused)], "export never overwrites"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(main, ["export", *args])
        assert result.exit_code == 1, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "x").exists()


def test_a_failed_export_leaves_nothing(exported, tmp_path, monkeypatch):
    adapters, _ = exported

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "write_extras", fail)
    with pytest.raises(OSError, match="disk full"):
        export_model(adapters, tmp_path / "out", log=quiet)
    assert list(tmp_path.iterdir()) == [], "no output, no temporary folder"
