"""mlx_reasoner.showcase.tiny: the built directory must behave like a real Qwen2 checkpoint."""

import json

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.generate import batch_generate
from tokenizers import Tokenizer

from mlx_reasoner.showcase.tiny import (
    DEFAULT_CORPUS,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    XML_TAGS,
    build_tiny_model,
    train_tokenizer,
)

SMALL_CORPUS = ["1 + 2 = 3", "the cat sat on the mat", "<answer>\n3\n</answer>"] * 5


def test_directory_has_files_and_config(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names

    config = json.loads((tiny_model_dir / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    assert config["model_type"] == "qwen2"
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert config["vocab_size"] == tokenizer.get_vocab_size(with_added_tokens=True)
    assert config["eos_token_id"] == tokenizer.token_to_id(EOS_TOKEN)


def test_default_corpus_fills_target_vocab(tiny_model):
    _, tok = tiny_model
    assert len(DEFAULT_CORPUS) > 1000
    assert len(tok) == 512


def test_weights_load_strictly_and_forward_shape(tiny_model):
    model, tok = tiny_model
    logits = model(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, len(tok))
    assert logits.dtype == mx.float32
    assert mx.all(mx.isfinite(logits)).item()
    # Tied embeddings: no separate output projection was saved or created.
    assert not hasattr(model, "lm_head")


def test_same_seed_same_directory_other_seed_other_weights(tmp_path, tiny_model_dir):
    same = build_tiny_model(tmp_path / "same", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    base_weights = mx.load(str(tiny_model_dir / "model.safetensors"))
    same_weights = mx.load(str(same / "model.safetensors"))
    other_weights = mx.load(str(other / "model.safetensors"))
    assert base_weights.keys() == same_weights.keys() == other_weights.keys()
    assert all(mx.array_equal(base_weights[k], same_weights[k]) for k in base_weights)
    embed = "model.embed_tokens.weight"
    assert not mx.array_equal(base_weights[embed], other_weights[embed])
    # The tokenizer depends on the corpus only.
    assert (same / "tokenizer.json").read_text() == (tiny_model_dir / "tokenizer.json").read_text()


def test_special_tokens_and_eos(tiny_model):
    _, tok = tiny_model
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == [0, 1, 2]
    im_end = tok.convert_tokens_to_ids(EOS_TOKEN)
    assert tok.eos_token == EOS_TOKEN
    assert im_end in tok.eos_token_ids
    assert tok.pad_token == PAD_TOKEN
    assert tok.bos_token is None
    # No BOS or EOS is added when encoding plain text.
    assert tok.encode("hi")[0] != tok.convert_tokens_to_ids(PAD_TOKEN)
    assert im_end not in tok.encode("hi")


def test_xml_tags_are_single_kept_tokens(tiny_model):
    _, tok = tiny_model
    text = "<reasoning>\n12 + 7\n</reasoning>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    for tag in XML_TAGS:
        tag_ids = tok.encode(tag)
        assert len(tag_ids) == 1
        # Not special: skipping special tokens must keep the tags.
        assert tok.decode(tag_ids, skip_special_tokens=True) == tag


def test_digits_are_single_tokens(tiny_model):
    _, tok = tiny_model
    ids = tok.encode("12345 + 678 = 13023")
    digit_tokens = [t for t in tok.convert_ids_to_tokens(ids) if any(c.isdigit() for c in t)]
    assert digit_tokens == list("12345678") + list("13023")


@pytest.mark.parametrize(
    "text",
    ["Héllo wörld! 🙂 日本語", "tabs\tand  two spaces\n\n", "How many r's in 'strawberry'?"],
)
def test_any_text_round_trips(tiny_model, text):
    _, tok = tiny_model
    assert tok.decode(tok.encode(text)) == text


def test_loaded_tokenizer_matches_tokenizer_json(tiny_model_dir, tiny_model):
    # transformers 5 rebuilds Qwen2's normalizer and pre-tokenizer at load time, keeping only vocab
    # and merges from tokenizer.json; the trained pipeline must match it. "'Sam'" splits as
    # "'S" + "am" under Qwen2's case-insensitive contraction rule but "'" + "Sam" under GPT-2's.
    _, tok = tiny_model
    trained = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    texts = DEFAULT_CORPUS[::50] + ["'Sam' met 'Tom'.\n\n  Don't 3.14", "x<answer>y</answer>"]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == trained.encode(text).ids, text


def test_chat_template_renders_chatml(tiny_model):
    _, tok = tiny_model
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True) by default;
    # mlx-lm's TokenizerWrapper passes return_dict=False, so through mlx_lm.load it is list[int].
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    expected = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
    assert tok.decode(ids) == expected + "<|im_start|>assistant\n"
    text = tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
    assert text == expected


def test_batch_generate_follows_model_argmax(tiny_model):
    model, tok = tiny_model
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True
    )
    response = batch_generate(model, tok, [prompt], max_tokens=5, return_token_ids=True)
    generated = response.token_ids[0]
    assert 1 <= len(generated) <= 5
    assert all(0 <= t < len(tok) for t in generated)
    # Default sampling is greedy, so the first token is the argmax after the prompt.
    first = mx.argmax(model(mx.array([prompt]))[0, -1]).item()
    assert generated[0] == first


def test_custom_corpus_and_sizes(tmp_path):
    out = build_tiny_model(
        tmp_path / "custom",
        vocab_size=300,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=48,
        corpus=SMALL_CORPUS,
    )
    model, tok = mlx_lm.load(str(out))
    # A small corpus yields fewer merges than asked for; the model's vocab follows the tokenizer.
    assert len(tok) < 300
    assert len(model.layers) == 1
    assert model(mx.array([[0, 1]])).shape == (1, 2, len(tok))


def test_tokenizer_training_is_deterministic():
    first = train_tokenizer(SMALL_CORPUS * 3, vocab_size=300).to_str()
    assert train_tokenizer(SMALL_CORPUS * 3, vocab_size=300).to_str() == first


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vocab_size": 100}, "vocab_size=100"),
        ({"hidden_size": 30}, "hidden_size=30"),
        ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
    ],
)
def test_bad_sizes_raise_actionable_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_tiny_model(tmp_path / "bad", corpus=SMALL_CORPUS, **kwargs)
