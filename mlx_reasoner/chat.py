"""Chat stage: talk to a trained model, its answer streamed, the reasoning and the answer apart.

Each question is asked afresh with the system prompt the run trained with, as in training,
greedily unless ``--temperature`` says otherwise. ``--compare`` also asks the base model: the
same weights with the adapters bypassed, so no second model is loaded. Generation is mlx-lm's
``stream_generate``; what is shown lives in ``ui`` (``reply_view``, ``reply_text``), which
splits each reply with ``answers.split_completion``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import ReasonerError

DEFAULT_MAX_TOKENS = 512
EXIT_WORDS = {"exit", "quit", "/exit", "/quit", "/bye"}
SYSTEM_PROMPT_FILE = "system_prompt.txt"  # written by export next to the model


@dataclass
class ChatSetup:
    """What a chat session talks to, resolved from a run folder or the options."""

    model: str
    adapter_path: str | None
    system_prompt: str
    max_tokens: int


def resolve_chat(
    run_dir: str | None,
    model: str | None = None,
    adapter_path: str | None = None,
    system_prompt: str | None = None,
    max_tokens: int | None = None,
) -> ChatSetup:
    """Find the model, adapters and system prompt from a run folder or the options.

    The system prompt is ``system_prompt`` if given, else the run's own, else an exported
    model's ``system_prompt.txt``, else the built-in ``reasoning``.

    Raises:
        ReasonerError: in one line, for a missing or adapter-less folder or too few options.
    """
    from .prompts import load_system_prompt

    if run_dir and adapter_path:
        raise ReasonerError("give a RUN_DIR or --adapter-path, not both")
    adapters = run_dir or adapter_path
    saved: dict = {}
    if adapters:
        saved = read_run_folder(Path(adapters))
    base = model or saved.get("model")
    if not base:
        raise ReasonerError("give a RUN_DIR (a training run's folder) or --model MODEL")
    if system_prompt is not None:
        prompt = load_system_prompt(system_prompt)
    elif saved.get("system_prompt_text"):
        prompt = saved["system_prompt_text"]
    elif (Path(base) / SYSTEM_PROMPT_FILE).is_file():
        prompt = (Path(base) / SYSTEM_PROMPT_FILE).read_text(encoding="utf-8")
    else:
        prompt = load_system_prompt()
    limit = max_tokens or saved.get("max_completion_tokens") or DEFAULT_MAX_TOKENS
    return ChatSetup(base, str(adapters) if adapters else None, prompt, int(limit))


def read_run_folder(folder: Path) -> dict:
    """The base model and options a run (or adapter) folder records: its ``config.json``, with
    ``adapter_config.json``'s ``model`` where it has none."""
    from .checkpoints import ADAPTER_CONFIG, ADAPTER_FILE

    if not folder.is_dir():
        raise ReasonerError(f"run folder not found: {folder}")
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_FILE).is_file():
        raise ReasonerError(
            f"{folder} holds no adapters ({ADAPTER_CONFIG} and {ADAPTER_FILE}); pass a run "
            "folder after its first save (--save-every), or --model alone for the base model"
        )
    saved = {}
    for name in (ADAPTER_CONFIG, "config.json"):
        try:
            saved.update(json.loads((folder / name).read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, TypeError, ValueError):
            continue
    return saved


class Chat:
    """The loaded model, asked as the trained model or, adapters off, as the base."""

    def __init__(self, setup: ChatSetup, temperature: float = 0.0):
        from .model import load_adapters, load_model

        self.setup = setup
        self.temperature = temperature
        self.model, self.tokenizer = load_model(setup.model)
        if setup.adapter_path is not None:
            load_adapters(self.model, setup.adapter_path)
        self.model.eval()

    @property
    def has_adapters(self) -> bool:
        return self.setup.adapter_path is not None

    def stream(self, question: str, base: bool = False) -> Iterator[str]:
        """The reply to ``question``, piece by piece (``base``: with the adapters off)."""
        from mlx_lm import stream_generate
        from mlx_lm.sample_utils import make_sampler

        from .model import adapters_disabled
        from .prompts import encode_prompt

        prompt = encode_prompt(self.tokenizer, self.setup.system_prompt, question)
        context = adapters_disabled(self.model) if base else contextlib.nullcontext()
        with context:
            for response in stream_generate(
                self.model,
                self.tokenizer,
                prompt,
                max_tokens=self.setup.max_tokens,
                sampler=make_sampler(self.temperature),
            ):
                yield response.text


def reply_names(chat: Chat, compare: bool) -> list[str]:
    if not chat.has_adapters:
        return ["model"]
    return ["trained", "base"] if compare else ["trained"]


def answer(chat: Chat, question: str, names: list[str], console, live: bool) -> dict[str, str]:
    """Ask ``question`` of each model in ``names``; stream the replies into a live view in a
    terminal, print them whole otherwise. Returns the reply texts by name."""
    from rich.live import Live

    from .ui import reply_text, reply_view

    replies = {name: "" for name in names}
    if not live:
        for name in names:
            replies[name] = "".join(chat.stream(question, base=name == "base"))
        console.out(reply_text(replies, headers=len(names) > 1), highlight=False)
        return replies
    with Live(reply_view(replies), console=console, refresh_per_second=10) as view:
        for name in names:
            for piece in chat.stream(question, base=name == "base"):
                replies[name] += piece
                view.update(reply_view(replies))
    return replies


def run_chat(
    setup: ChatSetup,
    question: str | None = None,
    compare: bool = False,
    temperature: float = 0.0,
    console=None,
    read_question: Callable[[], str | None] | None = None,
) -> int:
    """Answer ``question`` once, or hold a session until EOF or ``exit``.

    Returns:
        How many questions were answered.
    """
    from .ui import console as default_console

    console = console or default_console
    if compare and setup.adapter_path is None:
        raise ReasonerError("--compare needs adapters (a RUN_DIR or --adapter-path) to compare")
    chat = Chat(setup, temperature)
    names = reply_names(chat, compare)
    live = console.is_terminal and not console.is_dumb_terminal
    if question is not None:
        answer(chat, question, names, console, live)
        return 1
    read_question = read_question or _terminal_reader(console, live)
    if live:
        console.print(session_header(setup))
    answered = 0
    while (text := read_question()) is not None:
        text = text.strip()
        if text.lower() in EXIT_WORDS:
            break
        if text:
            answer(chat, text, names, console, live)
            answered += 1
    return answered


def session_header(setup: ChatSetup) -> str:
    adapters = f" + adapters {setup.adapter_path}" if setup.adapter_path else ""
    return (
        f"[bold]mlx-reasoner chat[/bold]: {setup.model}{adapters}; each question is asked "
        "afresh with the run's system prompt. Type exit or press Ctrl-D to leave."
    )


def _terminal_reader(console, live: bool) -> Callable[[], str | None]:
    """Questions from the terminal's prompt, or stdin's lines when it is not a terminal."""
    import sys

    def read() -> str | None:
        try:
            if live:
                return console.input("[bold cyan]question ›[/bold cyan] ")
            line = sys.stdin.readline()
            return line if line else None
        except (EOFError, KeyboardInterrupt):
            if live:
                console.print()  # leave the prompt's line
            return None

    return read
