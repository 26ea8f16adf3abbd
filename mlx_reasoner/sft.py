"""SFT stage: LoRA supervised fine-tuning on worked solutions, a warm start for GRPO.

Each example becomes the chat prompt followed by the assistant's answer rendered in the
XML reasoning format; the loss is the mean negative log-likelihood of the assistant's tokens
only (the prompt is context, never a target). It shares the GRPO loop's pieces: the same
packing and chunked log-probabilities, schedule, LoRA layers, run folder and display.
"""

import time
from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from .data import BatchSampler, Example
from .distributed import SINGLE_PROCESS, World
from .errors import ReasonerError
from .logprobs import PackedBatch, completion_logprobs, pack_sequences
from .prompts import apply_chat_template, chat_messages, encode_prompt
from .trainer import StepHooks, current_learning_rate, make_optimizer, optimizer_step

Sequences = list[tuple[list[int], list[int]]]  # (prompt ids, assistant ids) per example

# Assistant content to find in a rendered template (no template trims or rewrites it).
_SENTINEL = "@@mlx-reasoner-turn-sentinel@@"


def render_completion(reasoning: str, answer: str) -> str:
    """The assistant's text in the format the reasoning prompt asks for.

    >>> render_completion("2 + 2 = 4", "4")
    '<reasoning>\\n2 + 2 = 4\\n</reasoning>\\n<answer>\\n4\\n</answer>\\n'
    """
    return f"<reasoning>\n{reasoning}\n</reasoning>\n<answer>\n{answer}\n</answer>\n"


def turn_terminator(tokenizer) -> int:
    """The token that ends an assistant turn in the tokenizer's chat template.

    Renders an exchange whose assistant reply is a sentinel and reads what the template
    writes right after it: the first of those tokens that is a stop token, else the first
    special one. Qwen2.5's template ends turns with ``<|im_end|>`` although the smallest of
    its stop ids is ``<|endoftext|>``. Without a template (or when the template drops the
    reply) this is the tokenizer's EOS token, else its smallest stop id.

    Args:
        tokenizer: an mlx-lm tokenizer wrapper (or a Hugging Face tokenizer).

    Returns:
        The token id to end each assistant turn with.
    """
    eos = set(tokenizer.eos_token_ids)
    own_eos = getattr(tokenizer, "eos_token_id", None)
    fallback = own_eos if own_eos is not None else min(eos)
    if not getattr(tokenizer, "chat_template", None):
        return fallback
    messages = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    _, found, tail = text.rpartition(_SENTINEL)
    if not found:
        return fallback
    ids = list(tokenizer.encode(tail, add_special_tokens=False))
    special = eos | set(getattr(tokenizer, "all_special_ids", None) or ())
    for candidates in (eos, special):
        first = next((t for t in ids if t in candidates), None)
        if first is not None:
            return first
    return fallback


def chat_sequence(
    tokenizer, messages: Sequence[dict], terminator: int | None = None
) -> tuple[list[int], list[int]]:
    """Split a conversation into the prompt and its final assistant turn, as token ids.

    The assistant turn keeps the template's end-of-turn token, so the model learns to stop;
    anything the template adds after it (such as a newline) is dropped.

    Args:
        tokenizer: an mlx-lm tokenizer wrapper with a chat template.
        messages: the conversation, ending with the assistant's turn.
        terminator: ``turn_terminator(tokenizer)``, when the caller has it already.
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ReasonerError("each chat example must end with an assistant message")
    if terminator is None:
        terminator = turn_terminator(tokenizer)
    prompt = apply_chat_template(tokenizer, messages[:-1], add_generation_prompt=True)
    full = apply_chat_template(tokenizer, messages)
    if full[: len(prompt)] == prompt:
        answer = full[len(prompt) :]
    else:  # the template merged tokens across the boundary: encode the turn on its own
        answer = list(tokenizer.encode(messages[-1]["content"], add_special_tokens=False))
    ends = set(tokenizer.eos_token_ids) | {terminator}
    stop = next((i for i, t in enumerate(answer) if t in ends), None)
    answer = answer[: stop + 1] if stop is not None else answer + [terminator]
    return prompt, answer


def example_sequences(
    tokenizer, system_prompt: str, examples: Sequence[Example], max_tokens: int
) -> Sequences:
    """Token ids of each example as (prompt, assistant answer), dropping over-long ones.

    Raises:
        ReasonerError: when examples have no worked solution, or none fits ``max_tokens``.
    """
    missing = sum(1 for ex in examples if not ex.reasoning and not ex.messages)
    if missing:
        raise ReasonerError(
            f"{missing} of {len(examples)} examples have no worked solution to learn from; "
            "give a reasoning column (--reasoning-field), GSM8K-style '#### ' answers, "
            "or a built-in task such as task:letter-count"
        )
    terminator = turn_terminator(tokenizer)
    sequences = []
    for ex in examples:
        if ex.messages:  # a chat row: its own system prompt (if any), its own turns
            prompt, answer = chat_sequence(
                tokenizer, [{"role": r, "content": c} for r, c in ex.messages], terminator
            )
            if len(prompt) + len(answer) <= max_tokens:
                sequences.append((prompt, answer))
            continue
        messages = chat_messages(system_prompt, ex.question)
        if getattr(tokenizer, "chat_template", None):
            messages.append(
                {"role": "assistant", "content": render_completion(ex.reasoning, ex.answer)}
            )
            prompt, answer = chat_sequence(tokenizer, messages, terminator)
        else:
            prompt = encode_prompt(tokenizer, system_prompt, ex.question)
            text = render_completion(ex.reasoning, ex.answer)
            answer = list(tokenizer.encode(text, add_special_tokens=False)) + [terminator]
        if len(prompt) + len(answer) <= max_tokens:
            sequences.append((prompt, answer))
    if not sequences:
        raise ReasonerError(f"every example is longer than --max-seq-tokens {max_tokens}")
    return sequences


def nll_loss(
    model: nn.Module, batch: PackedBatch, step_tokens: int | None = None
) -> tuple[mx.array, mx.array]:
    """Mean negative log-likelihood of the assistant tokens; returns (loss, token count).

    ``step_tokens``: the whole step's assistant tokens, when ``batch`` is one rank's share of
    it (the loss is then that share of the step's mean); default: ``batch``'s own.
    """
    logp = completion_logprobs(model, batch)
    tokens = batch.mask.sum()
    if step_tokens is not None:
        return -(logp * batch.mask).sum() / max(step_tokens, 1), tokens
    return -(logp * batch.mask).sum() / mx.maximum(tokens, 1.0), tokens


def train_sft(
    config,
    model: nn.Module,
    tokenizer,
    sequences: Sequences,
    display,
    order: BatchSampler,
    optimizer: optim.Optimizer | None = None,
    hooks: StepHooks | None = None,
    world: World = SINGLE_PROCESS,
) -> list[dict]:
    """Fine-tune the LoRA adapters on ``sequences``.

    Args:
        config: an ``SFTConfig`` (steps, batch size, clipping, cadences).
        model: policy with LoRA layers attached (base frozen).
        sequences: (prompt ids, assistant ids) pairs from ``example_sequences``.
        display: the training display.
        order: batches of indices into ``sequences`` (seeded, resumable).
        optimizer: from ``make_optimizer`` (possibly restored from a checkpoint).
        hooks: after-step actions and the first step, shared with the GRPO trainer.
        world: the ranks sharing each step: each trains on its share of the batch, its loss
            normalised by the whole batch's tokens, and the ranks sum their gradients.

    Returns:
        Per-step metrics.
    """
    optimizer = optimizer or make_optimizer(config)
    hooks = hooks or StepHooks(config, display, world=world)
    loss_and_grad = nn.value_and_grad(model, nll_loss)
    history = []
    for step in hooks.steps():
        mx.reset_peak_memory()
        start = time.perf_counter()
        display.phase("training")
        picked = [sequences[i] for i in next(order)]
        lr = current_learning_rate(optimizer)
        if world.is_distributed:
            loss, tokens, grads = _shared_step(world, model, loss_and_grad, picked)
        else:
            batch = pack_sequences(
                [p for p, _ in picked], [a for _, a in picked], np.zeros(len(picked))
            )
            (loss, tokens), grads = loss_and_grad(model, batch)
            mx.eval(loss, tokens, grads)
            loss, tokens = loss.item(), int(tokens.item())
        update = optimizer_step(model, optimizer, config.max_grad_norm, compile=False)
        grad_norm, skipped = update.apply(grads, loss)
        elapsed = world.max_figures({"seconds": time.perf_counter() - start})["seconds"]
        metrics = {
            "step": step,
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": lr,
            "skipped_update": skipped,
            "train_tokens": tokens,
            "train_tokens_per_s": float(sum(len(p) + len(a) for p, a in picked) / elapsed),
            "peak_memory_gb": world.max_figures({"gb": mx.get_peak_memory() / 1e9})["gb"],
            "time_train": elapsed,
            "time_step": elapsed,
        }
        history.append(metrics)
        if config.sample_every and step % config.sample_every == 0:
            prompt, answer = picked[0]
            display.sample(
                {
                    "step": step,
                    "question": tokenizer.decode(prompt),
                    "answer": "",
                    "completion": tokenizer.decode(answer),
                    "rewards": [],
                    "index": 0,
                }
            )
        hooks.finish(step, metrics, [], skipped)
    return history


def _shared_step(world: World, model: nn.Module, loss_and_grad, picked: Sequences):
    """This rank's share of one SFT step: loss and gradients of its examples, normalised by
    the whole step's assistant tokens, then summed over the ranks.

    Returns:
        ``(the step's loss, its assistant tokens, the step's gradients)``.
    """
    step_tokens = sum(len(a) for _, a in picked)
    mine = [picked[i] for i in world.share(len(picked))]
    batch = pack_sequences([p for p, _ in mine], [a for _, a in mine], np.zeros(len(mine)))
    (loss, _), grads = loss_and_grad(model, batch, step_tokens)
    mx.eval(loss, grads)
    grads = world.sum_gradients(grads)
    loss = world.sum_figures({"loss": loss.item()})["loss"]
    return loss, step_tokens, grads
