"""Tiny random Qwen2 models with an in-process BPE tokenizer, for tests, demos and benchmarks.

This module owns building such a model directory offline: a built-in corpus, the tokenizer trained
on it, and the weights and config files. The result loads with ``mlx_lm.load(path)``, the same path
users take for real checkpoints, so code under test sees no difference.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.qwen2 import Model, ModelArgs
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    trainers,
)

# Ids follow the order of this list: 0, 1, 2.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
# Ordinary added tokens: each is one id, and decoding keeps them in the text.
XML_TAGS = ["<reasoning>", "</reasoning>", "<answer>", "</answer>"]

# ChatML as Qwen2.5 renders it, without Qwen's default system prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

# Qwen2's split: contractions, words with one leading non-letter, single digits, punctuation runs,
# newlines and spaces. Single digits keep arithmetic learnable.
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

MAX_POSITION_EMBEDDINGS = 2048
RMS_NORM_EPS = 1e-6
ROPE_THETA = 1_000_000.0

# fmt: off
_NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty",
]
_SPELLING_WORDS = [
    "strawberry", "banana", "mississippi", "apple", "letter", "balloon", "committee", "bookkeeper",
    "raspberry", "address", "coffee", "parallel", "success", "pepper", "tomorrow", "butterfly",
    "programming", "reasoning", "answer", "question", "elephant", "occurrence", "bubble", "cherry",
]
# fmt: on
_NAMES = ["Tom", "Anna", "Li", "Maria", "Sam", "Priya", "Omar", "Julia", "Ken", "Zoe"]
_ITEMS = ["apples", "books", "coins", "pencils", "cookies", "marbles", "stickers", "cards"]
_SUBJECTS = ["The cat", "A student", "My friend", "The teacher", "Our team", "The old man"]
_VERBS = ["reads", "finds", "counts", "writes", "sees", "likes", "checks", "solves"]
_OBJECTS = ["a long book", "the answer", "three words", "every letter", "the problem", "a number"]
_ENDINGS = ["today.", "every morning.", "before lunch.", "in the garden.", "with care.", "again."]


def _xml_completion(reasoning: str, answer: str) -> str:
    """Render a completion in the reasoning/answer format that training rewards."""
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>\n"


def make_default_corpus(seed: int = 0) -> list[str]:
    """Generate a varied English, arithmetic and spelling corpus for tokenizer training.

    Args:
        seed: Seed for the sentence choices; the same seed gives the same corpus.

    Returns:
        A list of short documents (sentences, problems and XML-formatted completions).
    """
    rng = random.Random(seed)
    corpus = [_xml_completion("The answer is 42.", "42")]
    for value, word in enumerate(_NUMBER_WORDS):
        corpus.append(f"The number {value} is written as {word}.")
        corpus.append(f"{word.capitalize()} plus one is {value + 1}.")
    for word in _SPELLING_WORDS:
        spelled = "-".join(word)
        corpus.append(f"The word '{word}' is spelled {spelled} and has {len(word)} letters.")
        for letter in sorted(set(word)):
            count = word.count(letter)
            question = f"How many times does the letter {letter} appear in '{word}'?"
            corpus.append(question)
            corpus.append(
                question
                + "\n"
                + _xml_completion(
                    f"Spell it out: {spelled}. The letter {letter} appears {count} times.",
                    str(count),
                )
            )
    for _ in range(600):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        corpus.append(f"{a} + {b} = {a + b}")
        corpus.append(f"{max(a, b)} - {min(a, b)} = {max(a, b) - min(a, b)}")
        corpus.append(f"{a % 13} * {b % 13} = {(a % 13) * (b % 13)}")
    for _ in range(300):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        have, more = rng.randint(1, 30), rng.randint(1, 30)
        question = (
            f"{name} has {have} {item} and gets {more} more. "
            f"How many {item} does {name} have now?"
        )
        reasoning = f"{name} starts with {have} {item}.\n{have} + {more} = {have + more}"
        corpus.append(question + "\n" + _xml_completion(reasoning, str(have + more)))
    for _ in range(400):
        corpus.append(
            " ".join(
                [
                    rng.choice(_SUBJECTS),
                    rng.choice(_VERBS),
                    rng.choice(_OBJECTS),
                    rng.choice(_ENDINGS),
                ]
            )
        )
    corpus.append(
        "Respond in the following format: <reasoning> ... </reasoning> <answer> ... </answer>"
    )
    corpus.append("system user assistant")
    return corpus


DEFAULT_CORPUS: list[str] = make_default_corpus()


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 512) -> Tokenizer:
    """Train a byte-level BPE tokenizer in the style of Qwen2 on ``corpus``.

    Args:
        corpus: Training texts. The same corpus gives the same tokenizer.
        vocab_size: Target size of the whole vocabulary, special tokens and XML tags included.

    Returns:
        The trained tokenizer; its size is at most ``vocab_size`` (smaller for a small corpus).
    """
    min_size = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS) + len(XML_TAGS)
    if vocab_size < min_size:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must be at least {min_size} "
            "(256 byte tokens plus the special tokens and XML tags)."
        )
    tokenizer = Tokenizer(models.BPE())
    # The same pipeline transformers' Qwen2Tokenizer rebuilds at load time (it keeps only vocab and
    # merges from tokenizer.json), so training and use agree. The regex splits digits one by one.
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        # Leave room for the XML tags, which are added after training.
        vocab_size=vocab_size - len(XML_TAGS),
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        # The full byte alphabet, so any text encodes without unknown tokens.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    tokenizer.add_tokens([AddedToken(tag, normalized=False, special=False) for tag in XML_TAGS])
    return tokenizer


def _tokenizer_config(tokenizer: Tokenizer) -> dict:
    """The ``tokenizer_config.json`` that transformers needs to load ``tokenizer.json`` offline."""
    added_tokens_decoder = {
        str(tokenizer.token_to_id(token)): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token in SPECIAL_TOKENS,
        }
        for token in SPECIAL_TOKENS + XML_TAGS
    }
    return {
        # transformers 5 loads every qwen2 model with this class whatever the file says; naming it
        # keeps the file honest.
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (EOS_TOKEN, PAD_TOKEN)],
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "chat_template": CHAT_TEMPLATE,
        # False keeps decode(encode(text)) == text; cleanup would drop spaces before punctuation.
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "padding_side": "left",
    }


def _model_args(
    vocab_size: int,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    intermediate_size: int,
    rope_theta: float = ROPE_THETA,
) -> ModelArgs:
    """Validate the sizes and turn them into mlx-lm's Qwen2 ``ModelArgs``."""
    if hidden_size % num_attention_heads != 0:
        raise ValueError(
            f"hidden_size={hidden_size} must be divisible by "
            f"num_attention_heads={num_attention_heads}."
        )
    if num_attention_heads % num_key_value_heads != 0:
        raise ValueError(
            f"num_attention_heads={num_attention_heads} must be divisible by "
            f"num_key_value_heads={num_key_value_heads}."
        )
    return ModelArgs(
        model_type="qwen2",
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads,
        rms_norm_eps=RMS_NORM_EPS,
        vocab_size=vocab_size,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rope_theta=rope_theta,
        tie_word_embeddings=True,
    )


def _model_config(args: ModelArgs, tokenizer: Tokenizer) -> dict:
    """The Hugging Face style ``config.json`` for ``args``."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": args.hidden_size,
        "num_hidden_layers": args.num_hidden_layers,
        "intermediate_size": args.intermediate_size,
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_position_embeddings,
        "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta,
        "tie_word_embeddings": args.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "bos_token_id": tokenizer.token_to_id(PAD_TOKEN),
        "eos_token_id": tokenizer.token_to_id(EOS_TOKEN),
        "torch_dtype": "float32",
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tiny_model(
    out_dir: str | Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    corpus: Iterable[str] | None = None,
    seed: int = 0,
    rope_theta: float = ROPE_THETA,
) -> Path:
    """Build a random Qwen2 model and a freshly trained tokenizer as a model directory.

    The directory holds ``config.json``, ``model.safetensors``, ``tokenizer.json``,
    ``tokenizer_config.json``, ``special_tokens_map.json`` and ``generation_config.json``, and
    loads with ``mlx_lm.load(str(out_dir))``. The model's vocabulary is exactly the tokenizer's,
    so every id the model can sample decodes. Seeds MLX's global random state with ``seed``.

    Args:
        out_dir: Directory to write; created if missing, existing files are overwritten.
        vocab_size: Target tokenizer size, special tokens and XML tags included.
        hidden_size: Width of the residual stream.
        num_hidden_layers: Number of transformer blocks.
        num_attention_heads: Query heads; must divide ``hidden_size``.
        num_key_value_heads: Key/value heads; must divide ``num_attention_heads``.
        intermediate_size: Width of the MLP.
        corpus: Tokenizer training texts; ``DEFAULT_CORPUS`` when None.
        seed: Seed for the weight initialisation.
        rope_theta: RoPE base; Qwen2.5's 1e6 by default.

    Returns:
        The model directory as a ``Path``.
    """
    tokenizer = train_tokenizer(DEFAULT_CORPUS if corpus is None else corpus, vocab_size)
    args = _model_args(
        tokenizer.get_vocab_size(with_added_tokens=True),
        hidden_size,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        intermediate_size,
        rope_theta,
    )
    out_path = Path(out_dir)
    # Created only after the sizes are validated, so a bad call leaves nothing behind.
    out_path.mkdir(parents=True, exist_ok=True)

    mx.random.seed(seed)
    model = Model(args)
    # mlx-lm's parameter names already match the Hugging Face Qwen2 checkpoint names.
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out_path / "model.safetensors"), weights, metadata={"format": "mlx"})

    tokenizer.save(str(out_path / "tokenizer.json"))
    _write_json(out_path / "tokenizer_config.json", _tokenizer_config(tokenizer))
    _write_json(
        out_path / "special_tokens_map.json",
        {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN},
    )
    config = _model_config(args, tokenizer)
    _write_json(out_path / "config.json", config)
    _write_json(
        out_path / "generation_config.json",
        {
            "bos_token_id": config["bos_token_id"],
            "eos_token_id": config["eos_token_id"],
            "pad_token_id": tokenizer.token_to_id(PAD_TOKEN),
        },
    )
    return out_path
