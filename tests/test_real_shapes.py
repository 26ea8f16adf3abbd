"""Random-weight model folders in the Qwen2.5 shapes (``mlx_reasoner.showcase.shapes``)."""

import json

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.qwen2 import Model

from mlx_reasoner.showcase import shapes
from mlx_reasoner.showcase.shapes import build_shaped_model, main, model_args

ARCHITECTURE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "tie_word_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "max_position_embeddings",
    "hidden_act",
    "use_sliding_window",
    "bos_token_id",
)


@pytest.mark.parametrize(
    "shape, parameters",
    # The published sizes of Qwen2.5-0.5B, -1.5B and -3B (embeddings tied).
    [("0.5B", 494_032_768), ("1.5B", 1_543_714_304), ("3B", 3_085_938_688)],
)
def test_shapes_have_the_qwen25_parameter_counts(shape, parameters):
    # Never evaluated: counting the lazy parameters allocates nothing.
    model = Model(model_args(shape))
    assert sum(p.size for _, p in tree_flatten(model.parameters())) == parameters


def test_half_b_config_matches_the_real_qwen_config(real_dir):
    real = json.loads(
        (real_dir / "qwen2.5-configs" / "Qwen2.5-0.5B-Instruct-config.json").read_text()
    )
    generation = json.loads((real_dir / "qwen2.5-tokenizer" / "generation_config.json").read_text())
    ours = shapes.model_config(model_args("0.5B"), "bfloat16", generation)
    assert {k: ours[k] for k in ARCHITECTURE_KEYS} == {k: real[k] for k in ARCHITECTURE_KEYS}
    assert ours["eos_token_id"] == [151645, 151643] and ours["torch_dtype"] == "bfloat16"


def test_three_b_has_the_published_sizes():
    args = model_args("3B")
    sizes = (args.hidden_size, args.num_hidden_layers, args.num_attention_heads)
    assert sizes == (2048, 36, 16)
    assert (args.num_key_value_heads, args.intermediate_size, args.vocab_size) == (2, 11008, 151936)
    assert args.tie_word_embeddings and args.rope_theta == 1e6


def test_built_folder_loads_with_mlx_lm(tiny_model_dir, tmp_path):
    out = build_shaped_model(
        tmp_path / "model", "vocab-test", tokenizer_dir=tiny_model_dir, num_layers=3
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["num_hidden_layers"] == 3
    assert config["eos_token_id"] == generation["eos_token_id"]

    model, tokenizer = mlx_lm.load(str(out))
    assert len(model.layers) == 3 and model.args.vocab_size == 151_936
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    assert model.layers[0].self_attn.q_proj.bias is not None  # Qwen2 has q/k/v biases
    logits = model(mx.array([[1, 2, 3, 4]])).astype(mx.float32)
    assert logits.shape == (1, 4, 151_936) and mx.isfinite(logits).all().item()
    # Not degenerate: spread over the vocabulary, and different at different positions.
    assert logits[0, -1].std().item() > 0.01
    assert not mx.allclose(logits[0, 0], logits[0, 1]).item()
    assert tokenizer.eos_token_ids == {generation["eos_token_id"]}


def test_same_seed_same_weights(tiny_model_dir, tmp_path):
    def build(name, seed):
        folder = build_shaped_model(
            tmp_path / name, "vocab-test", tokenizer_dir=tiny_model_dir, dtype="float32", seed=seed
        )
        return mx.load(str(folder / "model.safetensors"))

    first, again, other = build("a", 0), build("b", 0), build("c", 1)
    assert first.keys() == again.keys() == other.keys()
    assert all(mx.array_equal(first[k], again[k]).item() for k in first)
    embeddings = "model.embed_tokens.weight"
    assert first[embeddings].dtype == mx.float32
    assert not mx.array_equal(first[embeddings], other[embeddings]).item()
    # Qwen2's initialisation: std 0.02 matrices, unit norms, zero biases.
    assert first[embeddings].std().item() == pytest.approx(0.02, rel=0.05)
    assert (first["model.norm.weight"] == 1).all().item()
    assert (first["model.layers.0.self_attn.q_proj.bias"] == 0).all().item()


def test_big_matrices_are_sampled_in_blocks(monkeypatch):
    # Blocks of rows fill the whole matrix with independent noise, none left at zero.
    monkeypatch.setattr(shapes, "_BLOCK_ELEMENTS", 64 * 10)
    weight = shapes._random_normal((95, 64), mx.float32, mx.random.key(0))
    assert weight.shape == (95, 64)
    assert (weight.abs().max(axis=1) > 0).all().item()
    assert not mx.array_equal(weight[:10], weight[10:20]).item()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shape": "7B"}, "unknown shape '7B'; choose one of 0.5B, 1.5B, 3B, vocab-test"),
        ({"dtype": "int8"}, "unknown dtype 'int8'"),
        ({"num_layers": 0}, "num_layers must be at least 1"),
        ({"tokenizer_dir": "missing"}, "lacks tokenizer.json, tokenizer_config.json"),
    ],
)
def test_bad_arguments_are_refused_before_writing(tiny_model_dir, tmp_path, kwargs, message):
    call = {"shape": "vocab-test", "tokenizer_dir": tiny_model_dir, **kwargs}
    if call["tokenizer_dir"] == "missing":
        call["tokenizer_dir"] = tmp_path / "missing"
    with pytest.raises(ValueError, match=message):
        build_shaped_model(tmp_path / "model", **call)
    assert not (tmp_path / "model").exists()


def test_a_failed_write_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(shapes.mx, "save_safetensors", disk_full)
    with pytest.raises(OSError, match="No space"):
        build_shaped_model(tmp_path / "model", "vocab-test", tokenizer_dir=tiny_model_dir)
    assert list(tmp_path.iterdir()) == []


def test_a_full_folder_is_replaced_only_when_asked(tiny_model_dir, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(ValueError, match="already exists and is not empty"):
        build_shaped_model(out, "vocab-test", tokenizer_dir=tiny_model_dir)
    assert (out / "old.txt").exists()
    build_shaped_model(out, "vocab-test", tokenizer_dir=tiny_model_dir, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing left aside


def test_command_line(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "model"
    args = ["vocab-test", str(out), "--tokenizer", str(tiny_model_dir)]
    assert main([*args, "--dtype", "float32", "--layers", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["num_hidden_layers"] == 1

    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--overwrite" in err and err.count("\n") == 1
