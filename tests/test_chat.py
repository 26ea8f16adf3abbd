"""`mlx-reasoner chat`: one question with --prompt, a session over standard input, --compare,
the reasoning and the answer apart, and bad folders in one line."""

import io
import json

import mlx_lm
import pytest
from click.testing import CliRunner
from rich.console import Console

from mlx_reasoner.answers import split_completion
from mlx_reasoner.chat import resolve_chat
from mlx_reasoner.cli import main
from mlx_reasoner.errors import ReasonerError
from mlx_reasoner.prompts import encode_prompt
from mlx_reasoner.ui import reply_text, reply_view

QUESTION = "How many r's are in strawberry?"


def greedy_reply(model_dir, adapters, system_prompt: str, max_tokens: int) -> str:
    model, tokenizer = mlx_lm.load(str(model_dir), adapter_path=adapters and str(adapters))
    prompt = encode_prompt(tokenizer, system_prompt, QUESTION)
    return mlx_lm.generate(model, tokenizer, prompt, max_tokens=max_tokens)


@pytest.mark.slow
def test_prompt_answers_once_with_the_runs_system_prompt(tiny_run_dir, tiny_model_dir):
    result = CliRunner().invoke(
        main, ["chat", str(tiny_run_dir), "--prompt", QUESTION, "--max-tokens", "10"]
    )
    assert result.exit_code == 0, result.output
    system_prompt = json.loads((tiny_run_dir / "config.json").read_text())["system_prompt_text"]
    expected = greedy_reply(tiny_model_dir, tiny_run_dir, system_prompt, 10)
    assert result.output == reply_text({"trained": expected}) + "\n"
    assert result.output.startswith("reasoning:\n") and "\nanswer:\n" in result.output


@pytest.mark.slow
def test_compare_puts_the_base_models_answer_next_to_it(tiny_model_dir, eval_adapter):
    args = ["chat", "--adapter-path", str(eval_adapter), "--prompt", QUESTION, "--compare"]
    result = CliRunner().invoke(main, [*args, "--max-tokens", "8"])
    assert result.exit_code == 0, result.output
    system_prompt = resolve_chat(None, adapter_path=str(eval_adapter)).system_prompt
    trained = greedy_reply(tiny_model_dir, eval_adapter, system_prompt, 8)
    base = greedy_reply(tiny_model_dir, None, system_prompt, 8)
    assert trained != base, "the adapters change the reply"
    assert result.output == reply_text({"trained": trained, "base": base}, headers=True) + "\n"


@pytest.mark.slow
def test_a_session_answers_each_line_until_exit(tiny_run_dir):
    result = CliRunner().invoke(
        main,
        ["chat", str(tiny_run_dir), "--max-tokens", "4"],
        input="first question\n\nsecond question\nexit\nnever asked\n",
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("answer:\n") == 2
    result = CliRunner().invoke(main, ["chat", str(tiny_run_dir), "--max-tokens", "4"], input="")
    assert result.exit_code == 0 and result.output == ""  # end of input ends the session


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/missing"], "run folder not found: {tmp}/missing"),
        (["{tmp}"], "holds no adapters"),
        ([], "give a RUN_DIR (a training run's folder) or --model MODEL"),
        (["{tmp}", "--adapter-path", "{tmp}"], "give a RUN_DIR or --adapter-path, not both"),
        (["--model", "{tmp}", "--compare"], "--compare needs adapters"),
        (["--model", "{tmp}/nowhere", "--prompt", "hi"], "model directory not found"),
        (["--model", "{tmp}", "--system-prompt", "nope"], "unknown system prompt 'nope'"),
    ],
)
def test_bad_input_gives_one_line(tmp_path, args, message):
    (tmp_path / "config.json").write_text(json.dumps({"command": "mlx-reasoner grpo"}))
    args = [a.format(tmp=tmp_path) for a in args]
    result = CliRunner().invoke(main, ["chat", *args])
    assert result.exit_code == 1
    assert message.format(tmp=tmp_path) in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_system_prompt_comes_from_the_run_or_an_exported_model(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "adapter_config.json").write_text(json.dumps({"model": "base-model"}))
    (run / "adapters.safetensors").write_bytes(b"")
    (run / "config.json").write_text(
        json.dumps({"system_prompt_text": "Think first.", "max_completion_tokens": 77})
    )
    setup = resolve_chat(str(run))
    assert (setup.model, setup.adapter_path, setup.system_prompt) == (
        "base-model",
        str(run),
        "Think first.",
    )
    assert setup.max_tokens == 77 and resolve_chat(str(run), max_tokens=5).max_tokens == 5
    assert resolve_chat(str(run), model="other").model == "other"
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "system_prompt.txt").write_text("Exported prompt.")
    assert resolve_chat(None, model=str(exported)).system_prompt == "Exported prompt."
    assert "<reasoning>" in resolve_chat(None, model=str(tmp_path)).system_prompt  # built-in
    with pytest.raises(ReasonerError):
        resolve_chat(str(tmp_path / "missing"))


@pytest.mark.parametrize(
    "text, parts",
    [
        ("<reasoning>\n3 r's\n</reasoning>\n<answer>\n3\n</answer>\n", ("3 r's", "3")),
        ("<reasoning>\ns-t-r-a", ("s-t-r-a", "")),  # still streaming
        ("<reasoning>\ncounted\n<answer>\n3", ("counted", "3")),  # reasoning never closed
        ("counted first\n<answer>3</answer>", ("counted first", "3")),  # no opening tag
        ("Three.", ("", "Three.")),  # no format at all: the whole reply is the answer
        ("", ("", "")),
    ],
)
def test_split_completion(text, parts):
    assert split_completion(text) == parts


def test_reply_view_shows_reasoning_and_answer_panels_side_by_side():
    console = Console(width=100, record=True, file=io.StringIO())
    console.print(
        reply_view(
            {
                "trained": "<reasoning>\ns, t, r, a, w, b, e, r, r, y\n</reasoning>"
                "\n<answer>3</answer>",
                "base": "<reasoning>\nlooks like two",
            }
        )
    )
    lines = console.export_text().splitlines()
    titles = next(line for line in lines if "trained · reasoning" in line)
    assert "base · reasoning" in titles, "the two models stand side by side"
    answers = next(line for line in lines if "trained · answer" in line)
    assert "base · answer" in answers
    body = "\n".join(lines)
    assert "s, t, r, a, w, b, e, r, r, y" in body and "looks like two" in body
    assert any("3" in line and "…" in line for line in lines), "base's answer still pending"
