"""Prompts stage: system prompts from ``prompts/`` and chat-formatted prompt token ids."""

from pathlib import Path

from .errors import ReasonerError
from .resources import builtin_dir

DEFAULT_SYSTEM_PROMPT = "reasoning"


def load_system_prompt(name_or_path: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """Return a system prompt: a built-in name (``prompts/<name>.txt``) or a text file.

    Args:
        name_or_path: ``reasoning`` (the default), another built-in name, or a path.
    """
    path = Path(name_or_path)
    if path.suffix == "" and not path.exists():
        path = builtin_dir("prompts") / f"{name_or_path}.txt"
        if not path.is_file():
            available = sorted(p.stem for p in builtin_dir("prompts").glob("*.txt"))
            raise ReasonerError(
                f"unknown system prompt '{name_or_path}'; built-ins: {', '.join(available)}, "
                "or pass a path to a text file"
            )
    if not path.is_file():
        raise ReasonerError(f"system prompt file not found: {name_or_path}")
    return path.read_text(encoding="utf-8")


def chat_messages(system_prompt: str, question: str) -> list[dict]:
    """The system prompt (when there is one) and the user's question, as chat messages."""
    messages = [{"role": "user", "content": question}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def apply_chat_template(tokenizer, messages, **kwargs) -> list[int]:
    """Token ids of ``messages`` through the tokenizer's own chat template, whether the tokenizer
    returns a list or an encoding holding ``input_ids``."""
    ids = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def encode_prompt(tokenizer, system_prompt: str, question: str) -> list[int]:
    """Token ids of a chat prompt (system + user question), ready for the assistant's turn.

    Uses the tokenizer's own chat template, so the model sees the format it was tuned on.
    """
    messages = chat_messages(system_prompt, question)
    if getattr(tokenizer, "chat_template", None):
        return apply_chat_template(tokenizer, messages, add_generation_prompt=True)
    # A model without a chat template gets a plain-text layout.
    text = (system_prompt + "\n\n" if system_prompt else "") + question + "\n"
    return list(tokenizer.encode(text))
