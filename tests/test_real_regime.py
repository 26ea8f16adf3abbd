"""The real Qwen2.5 tokenizer with a small random model on its 151,936-token vocabulary: chat
template and system prompt, stop tokens, the text handed to rewards, SFT's end of turn, eval."""

import json

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mlx_reasoner.cli import main
from mlx_reasoner.data import Example
from mlx_reasoner.engine import compiled_decode
from mlx_reasoner.evaluate import evaluate
from mlx_reasoner.prompts import encode_prompt, load_system_prompt
from mlx_reasoner.rewards import REWARDS
from mlx_reasoner.rollout import generate_groups
from mlx_reasoner.sft import chat_sequence, example_sequences, render_completion, turn_terminator

END_OF_TEXT, IM_START, IM_END = 151643, 151644, 151645
QUESTION = "A shop sells 6 boxes of 180 pens. How many pens is that?"
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# What a trained model writes before its stop token: non-ASCII, a thousands separator, and no
# newline after </answer> (Qwen stops with "</answer><|im_end|>").
REASONING = "6 × 180 = 1,080 pens — 六箱"
COMPLETION = render_completion(REASONING, "1,080").removesuffix("\n")


def scripted_sampler(script: list[int]):
    """A sampler that writes ``script`` on every row, one token per call.

    Only for the step-by-step decode (``compiled=False``): a compiled step would trace the
    sampler once and freeze its first token.
    """
    calls = iter(range(10**6))

    def sample(logprobs: mx.array) -> mx.array:
        token = script[min(next(calls), len(script) - 1)]
        return mx.full((logprobs.shape[0],), token, dtype=mx.uint32)

    return sample


# --- chat template and system prompt -----------------------------------------------------


def test_prompt_is_chatml_with_our_system_prompt(real_tokenizer):
    system = load_system_prompt("reasoning")
    ids = encode_prompt(real_tokenizer, system, QUESTION)
    text = real_tokenizer.decode(ids)
    assert text == (
        f"<|im_start|>system\n{system}<|im_end|>\n"
        f"<|im_start|>user\n{QUESTION}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert "You are Qwen" not in text  # ours replaces Qwen's default system prompt
    # Each marker is one special token, and the text encodes back to the same ids.
    assert ids.count(IM_START) == 3 and ids.count(IM_END) == 2 and ids[0] == IM_START
    assert ids[-3:] == [IM_START, *real_tokenizer.encode("assistant\n", add_special_tokens=False)]
    assert list(real_tokenizer.encode(text, add_special_tokens=False)) == ids


def test_without_a_system_prompt_qwen_inserts_its_own(real_tokenizer):
    text = real_tokenizer.decode(encode_prompt(real_tokenizer, "", QUESTION))
    assert text.startswith(f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>\n")


# --- stop tokens and the text handed to rewards ------------------------------------------


def test_both_qwen_stop_tokens_end_a_completion(real_tokenizer):
    assert real_tokenizer.eos_token_ids == {IM_END, END_OF_TEXT}
    assert real_tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]) == [
        IM_END,
        END_OF_TEXT,
    ]


@pytest.mark.parametrize("stop", [IM_END, END_OF_TEXT])
def test_rollout_stops_on_each_stop_token_and_hands_rewards_the_text(real_vocab_model, stop):
    model, tokenizer = real_vocab_model
    body = list(tokenizer.encode(COMPLETION, add_special_tokens=False))
    prompt = encode_prompt(tokenizer, load_system_prompt("reasoning"), QUESTION)
    rollouts = generate_groups(
        model, tokenizer, [prompt], 2, 64, scripted_sampler([*body, stop]), compiled=False
    )
    assert rollouts.completion_ids == [[*body, stop]] * 2  # the stop token is kept for the loss
    assert rollouts.finish_reasons == ["stop", "stop"]
    # The text decodes exactly the ids before the stop token, and no stop token.
    assert rollouts.texts == [tokenizer.decode(body)] * 2 == [COMPLETION] * 2
    answers = ["#### 1,080"] * 2
    assert REWARDS["strict_format"](rollouts.texts, answers) == [0.5, 0.5]
    assert REWARDS["correctness"](rollouts.texts, answers) == [2.0, 2.0]
    assert REWARDS["xml_count"](rollouts.texts, answers) == [0.5, 0.5]


@pytest.mark.engine
@pytest.mark.parametrize("stop", [IM_END, END_OF_TEXT])
def test_compiled_decode_stops_on_each_stop_token(real_vocab_model, stop):
    model, tokenizer = real_vocab_model
    word = tokenizer.encode(" pens", add_special_tokens=False)[0]

    def sampler(logprobs):  # row 0 stops at once, row 1 never stops
        return mx.array([stop, word], dtype=mx.uint32)[: logprobs.shape[0]]

    prompt = encode_prompt(tokenizer, "S", QUESTION)
    rollouts = generate_groups(model, tokenizer, [prompt], 2, 5, sampler)
    assert rollouts.decoder in ("fused", "compiled")
    assert rollouts.completion_ids == [[stop], [word] * 5]
    assert rollouts.finish_reasons == ["stop", "length"]
    assert rollouts.texts == ["", " pens" * 5]  # a cut completion keeps every token


# --- SFT's end of turn -------------------------------------------------------------------


def test_sft_turns_end_with_im_end(real_vocab_model):
    _, tokenizer = real_vocab_model
    assert turn_terminator(tokenizer) == IM_END
    system = load_system_prompt("reasoning")
    example = Example(QUESTION, "1080", REASONING)
    ((prompt, answer),) = example_sequences(tokenizer, system, [example], 4096)
    assert prompt == encode_prompt(tokenizer, system, QUESTION)
    assert answer[-1] == IM_END and END_OF_TEXT not in answer and IM_END not in answer[:-1]
    assert tokenizer.decode(answer[:-1]) == render_completion(REASONING, "1080")

    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    _, answer = chat_sequence(tokenizer, messages)
    assert answer == [*tokenizer.encode("4", add_special_tokens=False), IM_END]


def test_sft_without_a_template_still_ends_turns_with_im_end(real_vocab_model):
    # The plain-text layout: the smallest stop id would be <|endoftext|>.
    _, tokenizer = real_vocab_model
    tokenizer._tokenizer.chat_template = None
    assert turn_terminator(tokenizer) == IM_END
    ((_, answer),) = example_sequences(tokenizer, "S", [Example(QUESTION, "1080", "x")], 4096)
    assert answer[-1] == IM_END and END_OF_TEXT not in answer


# --- eval --------------------------------------------------------------------------------


def test_eval_scores_a_qwen_style_stop_as_correct_and_well_formed(real_vocab_model, monkeypatch):
    model, tokenizer = real_vocab_model
    script = [*tokenizer.encode(COMPLETION, add_special_tokens=False), IM_END]
    # Two samples so that eval samples; the step-by-step decode so the script is followed.
    monkeypatch.setattr(
        "mlx_lm.sample_utils.make_sampler", lambda *a, **k: scripted_sampler(script)
    )
    monkeypatch.setattr(compiled_decode, "compiled_decode_supported", lambda model: False)
    result = evaluate(model, tokenizer, [Example(QUESTION, "1080")], "S", max_tokens=64, samples=2)
    assert result.summary["accuracy"] == 1.0 and result.summary["pass@2"] == 1.0
    assert result.summary["strict_format_rate"] == 1.0  # no newline after </answer> needed
    assert result.summary["truncated_rate"] == 0.0
    assert result.summary["mean_completion_tokens"] == len(script)
    assert [s["completion"] for s in result.samples] == [COMPLETION] * 2


def test_eval_cli_on_the_real_vocabulary_and_gsm8k_rows(real_vocab_model_dir, real_dir, tmp_path):
    rows = (real_dir / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    with_commas = next(r for r in rows if "," in json.loads(r)["answer"].rsplit("####")[1])
    data = tmp_path / "gsm8k_slice.jsonl"
    data.write_text("\n".join([rows[0], rows[1], with_commas]) + "\n", encoding="utf-8")
    out = tmp_path / "eval"
    args = ["eval", "--model", str(real_vocab_model_dir), "--dataset", str(data)]
    result = CliRunner().invoke(main, [*args, "--max-completion-tokens", "6", "--output", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "eval.json").read_text())
    assert summary["n"] == 3 and summary["samples"] == 1
    samples = [json.loads(x) for x in (out / "eval_samples.jsonl").read_text().splitlines()]
    gold = [json.loads(r)["answer"].rsplit("####")[1].strip().replace(",", "") for r in rows[:2]]
    assert [s["answer"] for s in samples][:2] == gold
    assert "," not in samples[2]["answer"] and samples[2]["answer"].isdigit()
    assert samples[0]["question"] == json.loads(rows[0])["question"]
    for s in samples:
        assert 1 <= s["completion_tokens"] <= 6
        assert s["truncated"] == (s["completion_tokens"] == 6)
        assert "<|im_end|>" not in s["completion"] and "<|endoftext|>" not in s["completion"]
    assert summary["mean_completion_tokens"] == pytest.approx(
        sum(s["completion_tokens"] for s in samples) / 3
    )
