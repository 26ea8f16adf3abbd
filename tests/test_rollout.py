"""Rollout: group generation with shared prompt caches, stop handling, ids kept as sampled."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_reasoner.loss import pack_sequences
from mlx_reasoner.prompts import encode_prompt, load_system_prompt
from mlx_reasoner.rollout import generate_groups


class CountingModel:
    """Forwards to a model and records the shape of every input it is called with."""

    def __init__(self, model):
        self.model = model
        self.layers = model.layers
        self.calls = []

    def __call__(self, inputs, cache=None, **kwargs):
        self.calls.append(tuple(inputs.shape))
        return self.model(inputs, cache=cache, **kwargs)


def eos_heavy_sampler(eos_id: int, boost: float = 4.0):
    """Sample with EOS made much likelier, so some completions stop early and some do not."""

    def sample(logprobs):
        bias = mx.zeros((logprobs.shape[-1],)).at[eos_id].add(boost)
        return mx.random.categorical(logprobs + bias)

    return sample


def prompts_for(tokenizer, questions):
    system = load_system_prompt()
    return [encode_prompt(tokenizer, system, q) for q in questions]


def test_group_of_g_for_one_prompt_stops_at_eos(tiny_model):
    model, tokenizer = tiny_model
    eos = tokenizer.eos_token_ids
    (eos_id,) = eos
    mx.random.seed(3)
    prompt = prompts_for(tokenizer, ["How many r are in strawberry?"])
    rollouts = generate_groups(
        model, tokenizer, prompt, group_size=6, max_tokens=12, sampler=eos_heavy_sampler(eos_id)
    )
    assert len(rollouts) == 6
    assert rollouts.prompt_ids == [prompt[0]] * 6
    reasons = set(rollouts.finish_reasons)
    assert reasons == {"stop", "length"}, "the boost should give both outcomes"
    for ids, reason, text in zip(rollouts.completion_ids, rollouts.finish_reasons, rollouts.texts):
        assert 1 <= len(ids) <= 12
        if reason == "stop":
            assert ids[-1] == eos_id and eos_id not in ids[:-1]
            assert text == tokenizer.decode(ids[:-1])
        else:
            assert len(ids) == 12 and eos_id not in ids
            assert text == tokenizer.decode(ids)


def test_completion_mask_covers_tokens_up_to_and_including_eos(tiny_model):
    model, tokenizer = tiny_model
    (eos_id,) = tokenizer.eos_token_ids
    mx.random.seed(5)
    prompts = prompts_for(tokenizer, ["a?", "a longer question with more words?"])
    rollouts = generate_groups(model, tokenizer, prompts, 4, 10, sampler=eos_heavy_sampler(eos_id))
    batch = pack_sequences(rollouts.prompt_ids, rollouts.completion_ids, np.zeros(len(rollouts)))
    mask = np.array(batch.mask)
    targets = np.array(batch.targets)
    for row, ids in enumerate(rollouts.completion_ids):
        assert mask[row].sum() == len(ids)
        assert targets[row, : len(ids)].tolist() == ids


def test_each_prompt_is_prefilled_once_per_group(tiny_model):
    model, tokenizer = tiny_model
    counting = CountingModel(model)
    prompts = prompts_for(tokenizer, ["first question?", "second, a little longer, question?"])
    generate_groups(counting, tokenizer, prompts, group_size=8, max_tokens=4)
    multi_token_calls = [shape for shape in counting.calls if shape[1] > 1]
    # One prefill call per prompt, batch 1, covering all but the last prompt token.
    assert multi_token_calls == [(1, len(p) - 1) for p in prompts]
    decode_calls = [shape for shape in counting.calls if shape[1] == 1]
    assert decode_calls and all(shape[0] <= 16 for shape in decode_calls)
    assert max(shape[0] for shape in decode_calls) == 16, "all completions decode together"


def test_greedy_tokens_match_a_full_forward_pass(tiny_model):
    """Shared, left-padded prompt caches must give the same tokens as scoring from scratch."""
    model, tokenizer = tiny_model
    prompts = prompts_for(tokenizer, ["short?", "a much longer question, padded differently?"])
    rollouts = generate_groups(model, tokenizer, prompts, group_size=2, max_tokens=6)
    for prompt, ids in zip(rollouts.prompt_ids, rollouts.completion_ids):
        sequence = mx.array(prompt + ids)[None]
        logits = model(sequence)[0]  # [L, V]
        for j, token in enumerate(ids):
            predicted = mx.argmax(logits[len(prompt) - 1 + j]).item()
            assert predicted == token


def test_ignore_eos_runs_every_completion_to_the_limit(tiny_model):
    model, tokenizer = tiny_model
    (eos_id,) = tokenizer.eos_token_ids
    mx.random.seed(0)
    prompts = prompts_for(tokenizer, ["q?"])
    rollouts = generate_groups(
        model,
        tokenizer,
        prompts,
        4,
        8,
        sampler=eos_heavy_sampler(eos_id, boost=8.0),
        ignore_eos=True,
    )
    assert all(len(ids) == 8 for ids in rollouts.completion_ids)
    assert set(rollouts.finish_reasons) == {"length"}
    assert rollouts.tokens_per_second > 0


@pytest.mark.parametrize("group_size", [2, 5])
def test_grouping_order(tiny_model, group_size):
    model, tokenizer = tiny_model
    prompts = prompts_for(tokenizer, ["one?", "two?", "three?"])
    rollouts = generate_groups(model, tokenizer, prompts, group_size, 3)
    assert len(rollouts) == 3 * group_size
    for i, prompt in enumerate(rollouts.prompt_ids):
        assert prompt == prompts[i // group_size]
