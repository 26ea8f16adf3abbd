"""Rollout: group generation with shared prompt caches, stop handling, ids kept as sampled."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_reasoner.engine.kv_buffers import CACHE_MULTIPLE
from mlx_reasoner.logprobs import pack_sequences
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


def argmax_or_eos(eos_id: int, every: int = 3):
    """Deterministic and EOS-prone: the argmax token, or EOS when the argmax id is a multiple of
    ``every``. Both decoders then give the same tokens, and some rows stop early."""

    def sample(logprobs):
        best = mx.argmax(logprobs, axis=-1)
        return mx.where(best % every == 0, eos_id, best)

    return sample


def test_compiled_decode_is_used_for_plain_kv_cache_models(tiny_model):
    from mlx_reasoner.engine.compiled_decode import compiled_decode_supported

    model, _ = tiny_model
    assert compiled_decode_supported(model)
    assert not compiled_decode_supported(CountingModel(model)), "not an nn.Module"


def test_compiled_decode_is_refused_for_sliding_window_caches(tiny_model):
    from mlx_lm.models.cache import RotatingKVCache

    from mlx_reasoner.engine.compiled_decode import compiled_decode_supported

    model, tokenizer = tiny_model
    model.make_cache = lambda: [RotatingKVCache(max_size=8) for _ in model.layers]
    assert not compiled_decode_supported(model)
    prompts = prompts_for(tokenizer, ["q?"])
    rollouts = generate_groups(model, tokenizer, prompts, 2, 4)  # falls back, still decodes
    assert [len(ids) for ids in rollouts.completion_ids] == [4, 4]


def perturbed_adapters(model, scale: float = 0.5):
    """LoRA on every block, moved away from zero: a random model's greedy output then varies."""
    from mlx_reasoner.model import attach_lora, lora_config

    attach_lora(model, lora_config(-1, 4))
    move_adapters(model, scale)


def move_adapters(model, scale: float):
    from mlx.utils import tree_map

    mx.random.seed(0)
    model.update(
        tree_map(lambda p: p + scale * mx.random.normal(p.shape), model.trainable_parameters())
    )


@pytest.fixture(params=["fused", "compiled"])
def decode_step(request, monkeypatch):
    """Run a test with each compiled decode step: fused_decode's, and mlx-lm's modules
    (``MLX_REASONER_FUSED_DECODE=0``). Gives the decoder name the rollouts report."""
    monkeypatch.setenv("MLX_REASONER_FUSED_DECODE", "1" if request.param == "fused" else "0")
    return request.param


FOUR_QUESTIONS = ["short?", "a much longer question, padded differently?", "one?", "two?"]


def decode_both_ways(tiny_model, group_size: int):
    """The four questions through ``BatchGenerator`` and through the compiled decode."""
    model, tokenizer = tiny_model
    perturbed_adapters(model)
    (eos_id,) = tokenizer.eos_token_ids
    prompts = prompts_for(tokenizer, FOUR_QUESTIONS)
    sampler = argmax_or_eos(eos_id, every=9)
    return [
        generate_groups(model, tokenizer, prompts, group_size, 16, sampler, compiled=compiled)
        for compiled in (False, True)
    ]


@pytest.mark.engine
@pytest.mark.parametrize("group_size", [1, 3])
def test_compiled_decode_gives_the_batch_generators_tokens(tiny_model, group_size, decode_step):
    engine, ours = decode_both_ways(tiny_model, group_size)
    assert ours.decoder == decode_step
    assert ours.completion_ids == engine.completion_ids
    assert ours.finish_reasons == engine.finish_reasons
    assert ours.texts == engine.texts
    assert set(ours.finish_reasons) == {"stop", "length"}, "the sampler should give both"


@pytest.mark.engine
def test_compiled_decode_with_transposed_small_weights_gives_the_same_tokens(
    tiny_model, monkeypatch
):
    """12 rows: the tiny model's MLP inputs and its tied output layer take transposed copies
    (cpu_math.small_weights_transposed) inside the step, and the tokens stay the engine's."""
    import contextlib

    from mlx_reasoner.engine import compiled_decode, cpu_math

    monkeypatch.setenv("MLX_REASONER_FUSED_DECODE", "0")  # the module decode's swap
    monkeypatch.setattr(cpu_math, "small_weights_apply", lambda: True)
    seen = []

    @contextlib.contextmanager
    def recording(model, rows):
        with cpu_math.small_weights_transposed(model, rows):
            seen.extend(type(m).__name__ for _, m in model.named_modules())
            yield model

    monkeypatch.setattr(compiled_decode, "small_weights_transposed", recording)
    engine, ours = decode_both_ways(tiny_model, 3)
    assert {"_RowMajorLinear", "_RowMajorHead"} <= set(seen)
    assert ours.completion_ids == engine.completion_ids
    assert ours.finish_reasons == engine.finish_reasons


@pytest.mark.engine
@pytest.mark.parametrize("max_tokens", [16, CACHE_MULTIPLE + 6])
def test_compiled_decode_samples_what_the_batch_generator_samples(
    tiny_model, max_tokens, decode_step
):
    """Same seed, same sampler, no early stops: the same random draws, so the same tokens,
    also after the KV buffers have grown."""
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = tiny_model
    prompts = prompts_for(tokenizer, ["one?", "and a second, longer one?"])
    sampler = make_sampler(0.9)
    results = []
    for compiled in (False, True):
        mx.random.seed(7)
        results.append(
            generate_groups(
                model, tokenizer, prompts, 4, max_tokens, sampler, True, compiled=compiled
            )
        )
    assert [r.decoder for r in results] == ["BatchGenerator", decode_step]
    assert results[1].completion_ids == results[0].completion_ids
    assert len({tuple(ids) for ids in results[1].completion_ids}) > 1, "samples should differ"


@pytest.mark.engine
def test_compiled_decode_follows_adapter_updates_and_adapters_disabled(
    tiny_model, tiny_model_dir, decode_step
):
    """The compiled step reads the current weights, and a trace made with the adapters on is
    never reused with them off."""
    import mlx_lm

    from mlx_reasoner.model import adapters_disabled

    model, tokenizer = tiny_model
    base, _ = mlx_lm.load(str(tiny_model_dir))
    prompts = prompts_for(tokenizer, ["q?", "another question?"])

    def greedy(m):
        return generate_groups(m, tokenizer, prompts, 2, 12, compiled=True).completion_ids

    base_ids = greedy(base)
    perturbed_adapters(model, scale=0.0)
    assert greedy(model) == base_ids, "LoRA starts at zero"
    move_adapters(model, 0.5)
    adapted = greedy(model)
    assert adapted != base_ids, "the update must reach the compiled step"
    engine = generate_groups(model, tokenizer, prompts, 2, 12, compiled=False)
    assert adapted == engine.completion_ids
    with adapters_disabled(model):
        assert greedy(model) == base_ids
    assert greedy(model) == adapted


@pytest.mark.engine
def test_the_compiled_decode_lets_go_of_a_model_once_another_is_decoded(
    tiny_model_dir, decode_step
):
    import gc
    import weakref

    import mlx_lm

    first, tokenizer = mlx_lm.load(str(tiny_model_dir))
    prompts = prompts_for(tokenizer, ["q?"])
    assert generate_groups(first, tokenizer, prompts, 2, 4).decoder == decode_step
    released = weakref.ref(first)
    del first
    second, _ = mlx_lm.load(str(tiny_model_dir))
    generate_groups(second, tokenizer, prompts, 2, 4)
    gc.collect()
    assert released() is None, "the first model's weights must not be kept alive"
