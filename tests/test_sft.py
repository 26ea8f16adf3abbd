"""SFT: sequences with the loss on the assistant's tokens only, chat rows, and the CLI."""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_reasoner.cli import main
from mlx_reasoner.data import Example
from mlx_reasoner.errors import ReasonerError
from mlx_reasoner.logprobs import pack_sequences
from mlx_reasoner.prompts import encode_prompt
from mlx_reasoner.sft import (
    chat_sequence,
    example_sequences,
    nll_loss,
    render_completion,
    turn_terminator,
)


def test_example_becomes_prompt_plus_xml_answer_ending_in_end_of_turn(tiny_model):
    _, tokenizer = tiny_model
    (eos,) = tokenizer.eos_token_ids
    example = Example("How many r in 'rr'?", "2", "r(1) r(2)\nTotal: 2")
    ((prompt, answer),) = example_sequences(tokenizer, "SYS", [example], 1024)
    assert prompt == encode_prompt(tokenizer, "SYS", example.question)
    assert answer[-1] == eos and eos not in answer[:-1]
    assert tokenizer.decode(answer[:-1]) == render_completion(example.reasoning, "2")


def test_loss_counts_only_the_assistant_tokens(tiny_model):
    model, tokenizer = tiny_model
    example = Example("q?", "1", "one")
    ((prompt, answer),) = example_sequences(tokenizer, "", [example], 1024)
    batch = pack_sequences([prompt], [answer], np.zeros(1))
    loss, tokens = nll_loss(model, batch)
    assert tokens.item() == len(answer)
    # Changing the prompt's last token changes the context, never the number of targets.
    other = pack_sequences([prompt[:-1] + [5]], [answer], np.zeros(1))
    assert nll_loss(model, other)[1].item() == len(answer)
    logits = model(mx.array([prompt + answer]))[0].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    expected = -np.mean([logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(answer)])
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_chat_rows_train_on_the_final_assistant_turn(tiny_model):
    _, tokenizer = tiny_model
    (eos,) = tokenizer.eos_token_ids
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<answer>\n4\n</answer>"},
    ]
    prompt, answer = chat_sequence(tokenizer, messages)
    assert tokenizer.decode(answer[:-1]) == "<answer>\n4\n</answer>" and answer[-1] == eos
    assert "hello" in tokenizer.decode(prompt) and tokenizer.decode(prompt).endswith(
        "<|im_start|>assistant\n"
    )
    with pytest.raises(ReasonerError, match="end with an assistant message"):
        chat_sequence(tokenizer, messages[:-1])


def test_turn_terminator_of_the_tiny_template_is_im_end(tiny_model):
    _, tokenizer = tiny_model
    assert turn_terminator(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_turn_terminator_finds_a_special_token_outside_the_stop_ids(tiny_model):
    _, tokenizer = tiny_model
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert end_of_text not in tokenizer.eos_token_ids
    # A template whose turns end with another special token (as Gemma's <end_of_turn>).
    tokenizer._tokenizer.chat_template = (
        "{%- for m in messages %}{{- m['role'] + ': ' + m['content'] + '<|endoftext|>\\n' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}"
    )
    assert turn_terminator(tokenizer) == end_of_text
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    _, answer = chat_sequence(tokenizer, messages)
    assert answer[-1] == end_of_text and tokenizer.decode(answer[:-1]) == "4"


class _NoTemplateTokenizer:
    chat_template = None

    def __init__(self, eos_token_id, eos_token_ids):
        self.eos_token_id, self.eos_token_ids = eos_token_id, eos_token_ids

    def encode(self, text, add_special_tokens=True):
        # A BOS-adding tokenizer: one must not land inside the assistant's answer.
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]


def test_turn_terminator_without_a_template_is_the_eos_token():
    assert turn_terminator(_NoTemplateTokenizer(7, {3, 7})) == 7
    assert turn_terminator(_NoTemplateTokenizer(None, {9, 3})) == 3


def test_plain_layout_ends_with_the_eos_token_not_the_smallest_stop_id():
    tokenizer = _NoTemplateTokenizer(7, {3, 7})
    ((prompt, answer),) = example_sequences(tokenizer, "S", [Example("q", "1", "x")], 1024)
    assert answer[-1] == 7 and 3 not in answer and 1 not in answer
    assert "".join(map(chr, answer[:-1])) == render_completion("x", "1")
    assert prompt[0] == 1  # the prompt keeps its BOS


def test_examples_without_worked_solutions_are_refused(tiny_model):
    _, tokenizer = tiny_model
    with pytest.raises(ReasonerError, match="1 of 2 examples have no worked solution"):
        example_sequences(tokenizer, "", [Example("a", "1", "x"), Example("b", "2")], 1024)


def test_too_long_examples_are_dropped_or_refused(tiny_model):
    _, tokenizer = tiny_model
    short, long = Example("q", "1", "x"), Example("q", "1", "x " * 300)
    assert len(example_sequences(tokenizer, "", [short, long], 100)) == 1
    with pytest.raises(ReasonerError, match="--max-seq-tokens 100"):
        example_sequences(tokenizer, "", [long], 100)


@pytest.mark.slow
def test_sft_cli_learns_the_format_and_grpo_continues_from_it(tiny_model_dir, tmp_path):
    runner = CliRunner()
    sft_dir = tmp_path / "sft"
    result = runner.invoke(
        main,
        [
            "sft",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            "task:letter-count",
            "--steps",
            "30",
            "--batch-size",
            "8",
            "--learning-rate",
            "3e-3",
            "--lora-layers",
            "-1",
            "--save-every",
            "0",
            "--run-dir",
            str(sft_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"mlx-reasoner train --adapter-path {sft_dir}" in result.output
    metrics = [json.loads(x) for x in (sft_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 30 and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    adapter_config = json.loads((sft_dir / "adapter_config.json").read_text())
    assert adapter_config["trainer"] == "mlx-reasoner sft"

    grpo_dir = tmp_path / "grpo"
    result = runner.invoke(
        main,
        [
            "train",
            "--model",
            str(tiny_model_dir),
            "--adapter-path",
            str(sft_dir),
            "--dataset",
            "task:letter-count",
            "--steps",
            "1",
            "--batch-size",
            "1",
            "--group-size",
            "2",
            "--max-completion-tokens",
            "8",
            "--run-dir",
            str(grpo_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    before = mx.load(str(sft_dir / "adapters.safetensors"))
    after = mx.load(str(grpo_dir / "adapters.safetensors"))
    assert before.keys() == after.keys()  # the SFT adapters' layout carried over


def test_sft_on_chat_rows_from_a_file(tiny_model_dir, tmp_path):
    data = tmp_path / "chats.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"say {i}"},
                {"role": "assistant", "content": str(i)},
            ]
        }
        for i in range(4)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(
        main,
        [
            "sft",
            "--model",
            str(tiny_model_dir),
            "--dataset",
            str(data),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--lora-layers",
            "1",
            "--run-dir",
            str(run_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "4 of 4 examples fit" in result.output
    assert (run_dir / "adapters.safetensors").exists()


def test_reasoning_field_option_reaches_the_loader(tiny_model_dir, tmp_path):
    data = tmp_path / "traces.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "1", "steps": "one step"}) + "\n")
    args = [
        "sft",
        "--model",
        str(tiny_model_dir),
        "--dataset",
        str(data),
        "--steps",
        "1",
        "--lora-layers",
        "1",
    ]
    refused = CliRunner().invoke(main, [*args, "--run-dir", str(tmp_path / "a")])
    assert refused.exit_code == 1 and "no worked solution" in refused.output
    assert not (tmp_path / "a").exists(), "a run that never started leaves nothing behind"
    result = CliRunner().invoke(
        main, [*args, "--reasoning-field", "steps", "--run-dir", str(tmp_path / "b")]
    )
    assert result.exit_code == 0, result.output
