"""The loss stage: k3 KL, clipped surrogate, aggregation, packing and completion logprobs.

Expected values are computed by hand (or in plain numpy written here), never by calling the
function under test.
"""

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.models import qwen2

from mlx_reasoner.logprobs import (
    completion_logprobs,
    layout_tolerance,
    output_head,
    pack_groups,
    pack_sequences,
    shared_prompts_supported,
)
from mlx_reasoner.objective import (
    LOSS_TYPES,
    LossConfig,
    Normalizer,
    clipped_surrogate,
    grpo_loss,
    token_kl,
)


def as_np(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32), dtype=np.float64)


def k3(logp: np.ndarray, ref_logp: np.ndarray) -> np.ndarray:
    delta = ref_logp - logp
    return np.exp(delta) - delta - 1.0


def aggregate(per_token: np.ndarray, mask: np.ndarray, loss_type: str, max_tokens: int) -> float:
    """Reference aggregation in numpy, for a whole batch."""
    if loss_type == "grpo":
        return float(np.mean((per_token * mask).sum(axis=1) / mask.sum(axis=1)))
    if loss_type in ("bnpo", "dapo"):  # both over the whole step's tokens
        return float((per_token * mask).sum() / mask.sum())
    return float((per_token * mask).sum() / (mask.shape[0] * max_tokens))


# --- a hand-made 2-completion batch -------------------------------------------------------
#
# Completion 0 has 3 tokens and advantage +2; completion 1 has 2 tokens and advantage -1;
# T = 4, so both rows end in padding. old_logp = logp - log(ratio) for chosen ratios.
#
#   row 0 (A = +2): ratio [1.1, 1.5, 0.5]   clip to [0.8, 1.2] -> [1.1, 1.2, 0.8]
#       ratio * A   [2.2, 3.0, 1.0]   clipped * A [2.2, 2.4, 1.6]   min [2.2, 2.4, 1.0]
#       per-token loss [-2.2, -2.4, -1.0]: token 1 is clipped high, token 2 is not clipped
#       (A > 0 and ratio < 1 - eps: the pessimistic bound keeps the unclipped term)
#   row 1 (A = -1): ratio [0.9, 0.5]        clip -> [0.9, 0.8]
#       ratio * A   [-0.9, -0.5]      clipped * A [-0.9, -0.8]      min [-0.9, -0.8]
#       per-token loss [0.9, 0.8]: token 1 is clipped low
#
#   grpo    = ((-2.2 - 2.4 - 1.0) / 3 + (0.9 + 0.8) / 2) / 2 = (-5.6 / 3 + 0.85) / 2
#   bnpo    = (-5.6 + 1.7) / 5 = -0.78
#   dr_grpo = (-5.6 + 1.7) / (2 * 6) = -0.325   (max_completion_tokens = 6, not T)

ADV = np.array([2.0, -1.0])
MASK = np.array([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
LOGP = np.array([[-1.0, -0.5, -2.0, 0.0], [-0.3, -1.2, 0.0, 0.0]])
RATIO = np.array([[1.1, 1.5, 0.5, 1.0], [0.9, 0.5, 1.0, 1.0]])
OLD_LOGP = LOGP - np.log(RATIO)
MAX_TOKENS = 6
EXPECTED = {
    "grpo": (-5.6 / 3 + 0.85) / 2,
    "bnpo": -0.78,
    "dapo": -0.78,  # the same token mean over the whole step
    "dr_grpo": -0.325,
}


def hand_batch(logp=LOGP, old_logp=OLD_LOGP):
    return (
        mx.array(logp, dtype=mx.float32),
        None if old_logp is None else mx.array(old_logp, dtype=mx.float32),
        mx.array(ADV, dtype=mx.float32),
        mx.array(MASK, dtype=mx.float32),
    )


def hand_normalizer() -> Normalizer:
    return Normalizer(num_completions=2, num_tokens=5, max_completion_tokens=MAX_TOKENS)


# --- token_kl -----------------------------------------------------------------------------


def test_token_kl_is_zero_when_policies_agree():
    logp = mx.array([[-0.1, -2.0, -7.5], [0.0, -30.0, -1e-3]])
    np.testing.assert_array_equal(np.array(token_kl(logp, logp)), np.zeros((2, 3)))


def test_token_kl_matches_k3_on_hand_numbers():
    # ref - logp = +0.5: e^0.5 - 0.5 - 1 = 0.1487213;
    # ref - logp = -0.5: e^-0.5 + 0.5 - 1 = 0.1065307.
    logp = mx.array([-1.0, -0.5, -3.0])
    ref = mx.array([-0.5, -1.0, -1.0])
    kl = np.array(token_kl(logp, ref))
    expected = [
        math.exp(0.5) - 0.5 - 1,
        math.exp(-0.5) + 0.5 - 1,
        math.exp(2.0) - 2.0 - 1,
    ]
    np.testing.assert_allclose(kl, expected, rtol=1e-6)
    np.testing.assert_allclose(kl[:2], [0.1487213, 0.1065307], atol=1e-6)
    assert (kl > 0).all()


# --- clipped_surrogate ---------------------------------------------------------------------


def test_clipped_surrogate_on_hand_numbers():
    logp, old_logp, adv, _ = hand_batch()
    per_token, ratio = clipped_surrogate(logp - old_logp, adv, 0.2, 0.2)
    np.testing.assert_allclose(np.array(ratio), RATIO, rtol=1e-6)
    expected = [[-2.2, -2.4, -1.0, -2.0], [0.9, 0.8, 1.0, 1.0]]  # padding: ratio 1, loss -A
    np.testing.assert_allclose(np.array(per_token), expected, rtol=1e-6)


# --- single iteration (old_logp = None) ----------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_single_iteration_loss_is_minus_weighted_mean_advantage(loss_type):
    # ratio = exp(logp - sg(logp)) = 1, so the per-token loss is -A at every real token.
    logp, _, adv, mask = hand_batch()
    loss, sums = grpo_loss(
        logp, None, None, adv, mask, LossConfig(loss_type=loss_type), hand_normalizer()
    )
    expected = {
        "grpo": -(2.0 + -1.0) / 2,  # -mean(A) over completions
        "bnpo": -(2.0 * 3 + -1.0 * 2) / 5,  # -sum(A_i * len_i) / tokens
        "dapo": -(2.0 * 3 + -1.0 * 2) / 5,
        "dr_grpo": -(2.0 * 3 + -1.0 * 2) / (2 * MAX_TOKENS),
    }[loss_type]
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert sums["tokens"].item() == 5
    assert sums["clip_low"].item() == 0 and sums["clip_high"].item() == 0
    assert "kl_sum" not in sums


def test_single_iteration_gradient_is_policy_gradient_and_masked():
    _, _, adv, mask = hand_batch()

    def loss_fn(logp):
        return grpo_loss(logp, None, None, adv, mask, LossConfig(), hand_normalizer())[0]

    grad = np.array(mx.grad(loss_fn)(mx.array(LOGP, dtype=mx.float32)))
    # d loss / d logp_ij = -A_i / len_i / N at real tokens, 0 at padding.
    expected = [[-2 / 3 / 2] * 3 + [0.0], [1 / 2 / 2] * 2 + [0.0, 0.0]]
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=0)
    assert grad[0, 3] == 0.0 and grad[1, 2] == 0.0 and grad[1, 3] == 0.0


# --- aggregation of each loss type --------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_type_on_hand_example(loss_type):
    logp, old_logp, adv, mask = hand_batch()
    loss, _ = grpo_loss(
        logp, old_logp, None, adv, mask, LossConfig(loss_type=loss_type), hand_normalizer()
    )
    assert loss.item() == pytest.approx(EXPECTED[loss_type], rel=1e-5)

    # The same number from a plain numpy re-implementation of the clipped objective.
    clipped = np.clip(RATIO, 0.8, 1.2)
    per_token = -np.minimum(RATIO * ADV[:, None], clipped * ADV[:, None])
    assert loss.item() == pytest.approx(aggregate(per_token, MASK, loss_type, MAX_TOKENS), 1e-5)


def test_loss_types_differ_on_the_hand_example():
    # Guard against the hand example being degenerate (all equal would hide a mix-up); dapo is
    # bnpo under another name, so three distinct values.
    values = sorted(set(EXPECTED.values()))
    assert len(values) == 3 and values[0] < values[1] < values[2]
    assert EXPECTED["dapo"] == EXPECTED["bnpo"]


# --- clipping ------------------------------------------------------------------------------


def test_clipping_values_gradients_and_counts():
    _, old_logp, adv, mask = hand_batch()

    def loss_fn(logp):
        return grpo_loss(logp, old_logp, None, adv, mask, LossConfig(), hand_normalizer())

    logp = mx.array(LOGP, dtype=mx.float32)
    loss, sums = loss_fn(logp)
    grad = np.array(mx.grad(lambda lp: loss_fn(lp)[0])(logp))

    assert loss.item() == pytest.approx(EXPECTED["grpo"], rel=1e-5)
    # Unclipped tokens: d(-ratio * A)/d logp = -ratio * A, then / len_i / N.
    expected = [
        [-1.1 * 2 / 3 / 2, 0.0, -0.5 * 2 / 3 / 2, 0.0],  # token 1 clipped high: no gradient
        [0.9 * 1 / 2 / 2, 0.0, 0.0, 0.0],  # token 1 clipped low: no gradient
    ]
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-9)
    assert grad[0, 1] == 0.0 and grad[1, 1] == 0.0
    assert sums["clip_high"].item() == 1
    assert sums["clip_low"].item() == 1


def test_clip_counts_ignore_padding_and_unclipped_sides():
    # Padding ratios that would count if unmasked: 5 (row 0, A > 0) and 0.1 (row 1, A < 0).
    ratio = RATIO.copy()
    ratio[0, 3], ratio[1, 2], ratio[1, 3] = 5.0, 0.1, 0.1
    logp, old_logp, adv, mask = hand_batch(old_logp=LOGP - np.log(ratio))
    loss, sums = grpo_loss(logp, old_logp, None, adv, mask, LossConfig(), hand_normalizer())
    assert sums["clip_high"].item() == 1  # row 0 token 1 only
    assert sums["clip_low"].item() == 1  # row 1 token 1; row 0 token 2 (A > 0) not counted
    assert loss.item() == pytest.approx(EXPECTED["grpo"], rel=1e-5)


def test_epsilon_high_widens_only_the_upper_side():
    logp, old_logp, adv, mask = hand_batch()
    config = LossConfig(epsilon=0.2, epsilon_high=0.6)
    loss, sums = grpo_loss(logp, old_logp, None, adv, mask, config, hand_normalizer())
    # Row 0 token 1 (ratio 1.5 < 1.6) is no longer clipped: loss -3.0 instead of -2.4.
    # Row 1 token 1 (ratio 0.5) stays clipped at 1 - 0.2 = 0.8, not at 1 - 0.6 = 0.4.
    expected = ((-2.2 - 3.0 - 1.0) / 3 + (0.9 + 0.8) / 2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert sums["clip_high"].item() == 0
    assert sums["clip_low"].item() == 1

    grad = np.array(
        mx.grad(lambda lp: grpo_loss(lp, old_logp, None, adv, mask, config, hand_normalizer())[0])(
            logp
        )
    )
    assert grad[0, 1] == pytest.approx(-1.5 * 2 / 3 / 2, rel=1e-5)
    assert grad[1, 1] == 0.0


def test_epsilon_high_clips_above_its_own_bound():
    logp, _, adv, mask = hand_batch()
    ratio = RATIO.copy()
    ratio[0, 1] = 2.0  # above 1 + 0.6
    old_logp = mx.array(LOGP - np.log(ratio), dtype=mx.float32)
    config = LossConfig(epsilon=0.2, epsilon_high=0.6)
    loss, sums = grpo_loss(logp, old_logp, None, adv, mask, config, hand_normalizer())
    expected = ((-2.2 - 1.6 * 2 - 1.0) / 3 + (0.9 + 0.8) / 2) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert sums["clip_high"].item() == 1


# --- KL ------------------------------------------------------------------------------------

REF_LOGP = np.array([[-0.5, -0.9, -1.0, 3.0], [-0.8, -1.0, -4.0, 2.5]])


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_kl_adds_beta_times_masked_aggregate_of_k3(loss_type):
    logp, old_logp, adv, mask = hand_batch()
    ref_logp = mx.array(REF_LOGP, dtype=mx.float32)
    norm = hand_normalizer()
    beta = 0.05
    base, _ = grpo_loss(logp, old_logp, ref_logp, adv, mask, LossConfig(loss_type=loss_type), norm)
    with_kl, sums = grpo_loss(
        logp, old_logp, ref_logp, adv, mask, LossConfig(beta=beta, loss_type=loss_type), norm
    )

    kl = k3(LOGP, REF_LOGP)
    assert (kl[MASK == 1] > 0).all()
    expected_increase = beta * aggregate(kl, MASK, loss_type, MAX_TOKENS)
    assert with_kl.item() - base.item() == pytest.approx(expected_increase, rel=1e-4)
    assert with_kl.item() == pytest.approx(EXPECTED[loss_type] + expected_increase, rel=1e-5)
    assert sums["kl_sum"].item() == pytest.approx((kl * MASK).sum(), rel=1e-5)


def test_kl_sum_by_hand():
    # Row 0 deltas (ref - logp) [0.5, -0.4, 1.0]; row 1 [-0.5, 0.2]; padding ignored.
    logp, old_logp, adv, mask = hand_batch()
    _, sums = grpo_loss(
        logp,
        old_logp,
        mx.array(REF_LOGP, dtype=mx.float32),
        adv,
        mask,
        LossConfig(beta=0.1),
        hand_normalizer(),
    )
    deltas = [0.5, -0.4, 1.0, -0.5, 0.2]
    assert sums["kl_sum"].item() == pytest.approx(
        sum(math.exp(d) - d - 1 for d in deltas), rel=1e-5
    )


def test_kl_gradient_is_masked_and_matches_k3_derivative():
    # d k3 / d logp = 1 - exp(ref - logp); with old_logp = None the surrogate adds -A / len / N.
    _, _, adv, mask = hand_batch()
    ref_logp = mx.array(REF_LOGP, dtype=mx.float32)
    beta = 0.1

    def loss_fn(logp):
        config = LossConfig(beta=beta)
        return grpo_loss(logp, None, ref_logp, adv, mask, config, hand_normalizer())[0]

    grad = np.array(mx.grad(loss_fn)(mx.array(LOGP, dtype=mx.float32)))
    lengths = MASK.sum(axis=1, keepdims=True)
    dk3 = 1.0 - np.exp(REF_LOGP - LOGP)
    expected = (-ADV[:, None] + beta * dk3) / lengths / 2 * MASK
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_padding_garbage_does_not_change_loss_or_gradient(loss_type):
    logp, old_logp, adv, mask = hand_batch()
    ref_logp = mx.array(REF_LOGP, dtype=mx.float32)
    config = LossConfig(beta=0.1, loss_type=loss_type)
    norm = hand_normalizer()

    def run(lp, old, ref):
        def fn(x):
            return grpo_loss(x, old, ref, adv, mask, config, norm)

        loss, sums = fn(lp)
        grad = mx.grad(lambda x: fn(x)[0])(lp)
        return loss.item(), {k: v.item() for k, v in sums.items()}, np.array(grad)

    clean = run(logp, old_logp, ref_logp)

    # Large but finite garbage (exp of the differences stays within float32).
    pad = MASK == 0
    dirty_logp, dirty_old, dirty_ref = LOGP.copy(), OLD_LOGP.copy(), REF_LOGP.copy()
    dirty_logp[pad] = [30.0, -25.0, 12.0]
    dirty_old[pad] = [-30.0, 20.0, -40.0]
    dirty_ref[pad] = [-50.0, 40.0, 35.0]
    dirty = run(
        mx.array(dirty_logp, dtype=mx.float32),
        mx.array(dirty_old, dtype=mx.float32),
        mx.array(dirty_ref, dtype=mx.float32),
    )

    assert dirty[0] == pytest.approx(clean[0], rel=1e-6)
    assert dirty[1] == pytest.approx(clean[1], rel=1e-6)
    np.testing.assert_allclose(dirty[2], clean[2], rtol=1e-6)
    assert (dirty[2][pad] == 0).all()


def test_huge_padding_garbage_does_not_make_loss_nan():
    logp, old_logp, adv, mask = hand_batch()
    ref_logp = mx.array(REF_LOGP, dtype=mx.float32)
    config = LossConfig(beta=0.1)
    clean, _ = grpo_loss(logp, old_logp, ref_logp, adv, mask, config, hand_normalizer())

    pad = MASK == 0
    dirty_logp, dirty_ref = LOGP.copy(), REF_LOGP.copy()
    dirty_logp[pad] = [1e4, -1e4, 1e4]
    dirty_ref[pad] = [0.0, 1e4, -1e4]
    dirty, _ = grpo_loss(
        mx.array(dirty_logp, dtype=mx.float32),
        old_logp,
        mx.array(dirty_ref, dtype=mx.float32),
        adv,
        mask,
        config,
        hand_normalizer(),
    )
    assert dirty.item() == pytest.approx(clean.item(), rel=1e-6)


# --- micro-batching ------------------------------------------------------------------------

# Four completions of lengths 3, 1, 4, 2 (10 real tokens), packed to T = 4.
MB_LENGTHS = [3, 1, 4, 2]
MB_MASK = np.array([[1.0] * n + [0.0] * (4 - n) for n in MB_LENGTHS])
MB_ADV = np.array([1.5, -0.5, 0.7, -1.2])
_rng = np.random.default_rng(0)
MB_LOGP = _rng.uniform(-3.0, -0.1, size=(4, 4))
MB_OLD = MB_LOGP - _rng.uniform(-0.4, 0.4, size=(4, 4))  # some ratios outside [0.8, 1.2]
MB_REF = MB_LOGP + _rng.uniform(-1.0, 1.0, size=(4, 4))


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batch_losses_add_up_to_full_batch(loss_type):
    config = LossConfig(beta=0.04, loss_type=loss_type)
    norm = Normalizer(num_completions=4, num_tokens=10, max_completion_tokens=MAX_TOKENS)

    def loss_of(rows, width):
        arrays = [mx.array(a[rows, :width], dtype=mx.float32) for a in (MB_LOGP, MB_OLD, MB_REF)]
        mask = mx.array(MB_MASK[rows, :width], dtype=mx.float32)
        adv = mx.array(MB_ADV[rows], dtype=mx.float32)
        loss, sums = grpo_loss(arrays[0], arrays[1], arrays[2], adv, mask, config, norm)
        return loss.item(), {k: v.item() for k, v in sums.items()}

    full, full_sums = loss_of(slice(0, 4), 4)
    # Each micro-batch packed to its own width, as separate pack_sequences calls would.
    first, first_sums = loss_of(slice(0, 2), 3)
    second, second_sums = loss_of(slice(2, 4), 4)

    assert first + second == pytest.approx(full, rel=1e-5)
    for key in full_sums:
        assert first_sums[key] + second_sums[key] == pytest.approx(full_sums[key], rel=1e-5)
    assert full_sums["tokens"] == 10

    # And the full-batch number is right in the first place (numpy reference).
    ratio = np.exp(MB_LOGP - MB_OLD)
    assert ((ratio < 0.8) | (ratio > 1.2))[MB_MASK == 1].any()
    adv = MB_ADV[:, None]
    per_token = -np.minimum(ratio * adv, np.clip(ratio, 0.8, 1.2) * adv)
    per_token = per_token + 0.04 * k3(MB_LOGP, MB_REF)
    assert full == pytest.approx(aggregate(per_token, MB_MASK, loss_type, MAX_TOKENS), rel=1e-5)


# --- edge cases that must not produce NaN ------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("with_old", [False, True], ids=["single-iter", "multi-iter"])
def test_single_token_completion_is_finite(loss_type, with_old):
    # Row 1 emitted EOS first: a single real token.
    mask = mx.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    logp = mx.array([[-0.2, -1.0, -0.7], [-0.01, 0.0, 0.0]])
    old = mx.array([[-0.3, -1.0, -0.5], [-0.02, 0.0, 0.0]]) if with_old else None
    adv = mx.array([0.7, -0.7])
    config = LossConfig(beta=0.1, loss_type=loss_type)
    norm = Normalizer(2, 4, 3)

    def loss_fn(lp):
        return grpo_loss(lp, old, logp - 0.1, adv, mask, config, norm)[0]

    loss, grad = mx.value_and_grad(loss_fn)(logp)
    assert math.isfinite(loss.item())
    assert np.isfinite(np.array(grad)).all()
    assert np.array(grad)[1, 0] != 0.0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_all_zero_advantages_give_exactly_zero_loss(loss_type):
    logp, old_logp, _, mask = hand_batch()
    adv = mx.zeros((2,))
    config = LossConfig(loss_type=loss_type)

    for old in (None, old_logp):

        def loss_fn(lp, old=old):
            return grpo_loss(lp, old, None, adv, mask, config, hand_normalizer())[0]

        loss, grad = mx.value_and_grad(loss_fn)(logp)
        assert loss.item() == 0.0
        np.testing.assert_array_equal(np.abs(np.array(grad)), np.zeros((2, 4)))
        _, sums = grpo_loss(logp, old, None, adv, mask, config, hand_normalizer())
        assert sums["clip_low"].item() == 0 and sums["clip_high"].item() == 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_full_length_completions_are_finite(loss_type):
    # Every completion hit the length limit: the mask is all ones, T = max tokens.
    mask = mx.ones((2, 4))
    logp = mx.array(LOGP[:, :] - 0.5, dtype=mx.float32)
    old = mx.array(OLD_LOGP - 0.5, dtype=mx.float32)
    ref = mx.array(REF_LOGP - 5.0, dtype=mx.float32)
    adv = mx.array(ADV, dtype=mx.float32)
    config = LossConfig(beta=0.1, loss_type=loss_type)
    norm = Normalizer(2, 8, 4)

    loss, grad = mx.value_and_grad(lambda lp: grpo_loss(lp, old, ref, adv, mask, config, norm)[0])(
        logp
    )
    assert math.isfinite(loss.item())
    assert np.isfinite(np.array(grad)).all()
    # With every token real, the three aggregations coincide when T = max tokens.
    ratio = np.exp(LOGP - OLD_LOGP)
    per_token = -np.minimum(ratio * ADV[:, None], np.clip(ratio, 0.8, 1.2) * ADV[:, None])
    per_token = per_token + 0.1 * k3(LOGP - 0.5, REF_LOGP - 5.0)
    assert loss.item() == pytest.approx(per_token.mean(), rel=1e-5)


# --- pack_sequences ------------------------------------------------------------------------


def test_pack_sequences_layout():
    prompts = [[1, 2, 3], [4]]
    completions = [[5, 6], [7, 8, 9]]
    batch = pack_sequences(prompts, completions, np.array([0.5, -0.5]), pad_multiple=4)

    # Longest prompt + completion is 5 -> 8; longest completion is 3 -> 4.
    assert batch.tokens.shape == (2, 8)
    assert batch.tokens.dtype == mx.int32
    assert np.array(batch.tokens).tolist() == [
        [1, 2, 3, 5, 6, 0, 0, 0],
        [4, 7, 8, 9, 0, 0, 0, 0],
    ]
    # Completion token j sits at len(prompt) + j, predicted from len(prompt) - 1 + j.
    assert np.array(batch.positions).tolist() == [[2, 3, 4, 5], [0, 1, 2, 3]]
    assert np.array(batch.targets).tolist() == [[5, 6, 0, 0], [7, 8, 9, 0]]
    assert np.array(batch.mask).tolist() == [[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]]
    assert batch.mask.dtype == mx.float32
    assert np.array(batch.advantages).tolist() == [0.5, -0.5]
    assert batch.advantages.dtype == mx.float32
    assert len(batch) == 2

    # The token after each predicting position is the target, wherever the mask is 1.
    tokens, positions = np.array(batch.tokens), np.array(batch.positions)
    following = np.take_along_axis(tokens, positions + 1, axis=1)
    mask = np.array(batch.mask) == 1
    np.testing.assert_array_equal(following[mask], np.array(batch.targets)[mask])


def test_pack_sequences_pads_to_multiple_and_keeps_positions_in_range():
    # Default multiple 16.
    batch = pack_sequences([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], np.zeros(2))
    assert batch.tokens.shape == (2, 16)
    assert batch.targets.shape == batch.mask.shape == batch.positions.shape == (2, 16)

    # 17 tokens -> 32; completion 10 -> 16.
    batch = pack_sequences([[1] * 7], [[2] * 10], np.zeros(1), pad_multiple=16)
    assert batch.tokens.shape == (1, 32)
    assert batch.mask.shape == (1, 16)
    assert np.array(batch.mask).sum() == 10

    # Padding positions past the end of the row are clamped into range.
    batch = pack_sequences([[1] * 7], [[2]], np.zeros(1), pad_multiple=4)
    assert batch.tokens.shape == (1, 8)
    assert np.array(batch.positions).tolist() == [[6, 7, 7, 7]]


def test_pack_groups_layout():
    prompts = [[1, 2, 3, 4], [5, 6]]
    completions = [[7, 8], [9], [10, 11, 12]]
    batch = pack_groups(prompts, [0, 0, 1], completions, np.array([1.0, -1, 0]), pad_multiple=4)

    assert batch.shares_prompts and len(batch) == 3
    # Each prompt once, all but its last token, left-padded to a multiple of 4.
    assert np.array(batch.prefix).tolist() == [[0, 1, 2, 3], [0, 0, 0, 5]]
    assert np.array(batch.prefix_start).tolist() == [1, 3]
    assert np.array(batch.group_of).tolist() == [0, 0, 1]
    # Each completion row: its prompt's last token, then the completion but its last token.
    assert np.array(batch.tokens).tolist() == [[4, 7, 0, 0], [4, 0, 0, 0], [6, 10, 11, 0]]
    assert np.array(batch.targets).tolist() == [[7, 8, 0, 0], [9, 0, 0, 0], [10, 11, 12, 0]]
    assert np.array(batch.mask).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]]
    assert np.array(batch.positions).tolist() == [[0, 1, 2, 3]] * 3
    assert np.array(batch.advantages).tolist() == [1.0, -1.0, 0.0]
    with pytest.raises(ValueError, match="at least one token"):
        pack_groups([[]], [0], [[1]], np.zeros(1))
    # A one-token prompt has an empty prefix: all padding.
    batch = pack_groups([[3]], [0, 0], [[4, 5], [6]], np.zeros(2), pad_multiple=4)
    assert np.array(batch.prefix_start).tolist() == [4]
    assert np.array(batch.tokens).tolist() == [[3, 4, 0, 0], [3, 0, 0, 0]]


# --- completion_logprobs on a tiny random model --------------------------------------------

VOCAB = 64


def tiny_qwen2(seed: int = 0, tie: bool = True) -> nn.Module:
    mx.random.seed(seed)
    args = qwen2.ModelArgs(
        model_type="qwen2",
        hidden_size=32,
        num_hidden_layers=2,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        vocab_size=VOCAB,
        tie_word_embeddings=tie,
    )
    model = qwen2.Model(args)
    mx.eval(model.parameters())
    return model


PROMPTS = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
COMPLETIONS = [[11, 12, 13, 14, 15], [16, 17, 18], [19]]


def reference_logprobs(model, prompts, completions, temperature):
    """Log-softmax of the full logits, gathered by hand, row by row (real tokens only)."""
    out = []
    for prompt, completion in zip(prompts, completions):
        tokens = mx.array([prompt + completion])
        logits = np.array(model(tokens).astype(mx.float32), dtype=np.float64)[0] / temperature
        logits = logits - logits.max(axis=-1, keepdims=True)
        logsm = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        out.append([logsm[len(prompt) - 1 + j, t] for j, t in enumerate(completion)])
    return out


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "lm_head"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [2, 128])
def test_completion_logprobs_match_full_logits(tie, temperature, chunk_size):
    model = tiny_qwen2(tie=tie)
    batch = pack_sequences(PROMPTS, COMPLETIONS, np.zeros(3), pad_multiple=4)
    assert batch.targets.shape[1] == 8  # chunk_size 2: four chunks

    logp = completion_logprobs(model, batch, temperature=temperature, chunk_size=chunk_size)

    assert logp.shape == batch.mask.shape
    assert logp.dtype == mx.float32
    got = np.array(logp)
    expected = reference_logprobs(model, PROMPTS, COMPLETIONS, temperature)
    for row, exp_row in enumerate(expected):
        np.testing.assert_allclose(got[row, : len(exp_row)], exp_row, rtol=1e-5, atol=1e-5)


# Two completions per prompt, prompts of different lengths (so the prefixes are left-padded).
GROUP_OF = [0, 0, 1, 1, 2, 2]
GROUP_COMPLETIONS = [[11, 12, 13, 14, 15], [16, 17], [18, 19, 20], [21], [22, 23], [24, 25, 26]]


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "lm_head"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("pad_multiple", [1, 16])
def test_shared_prompt_logprobs_match_full_logits(tie, temperature, pad_multiple):
    model = tiny_qwen2(tie=tie)
    batch = pack_groups(
        PROMPTS, GROUP_OF, GROUP_COMPLETIONS, np.zeros(6), pad_multiple=pad_multiple
    )
    logp = completion_logprobs(model, batch, temperature=temperature, chunk_size=2)
    assert logp.shape == batch.mask.shape
    got = np.array(logp)
    expected = reference_logprobs(
        model, [PROMPTS[g] for g in GROUP_OF], GROUP_COMPLETIONS, temperature
    )
    for row, exp_row in enumerate(expected):
        np.testing.assert_allclose(got[row, : len(exp_row)], exp_row, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "lm_head"])
def test_shared_prompt_gradients_match_packed(tie, monkeypatch):
    # The layouts are compared on mlx-lm's own activations; cpu_math's are checked against
    # those in tests/test_cpu_math.py (their rounding differs, and this bound is tight). For
    # the same reason the rows stay on one stream (the split is checked below).
    monkeypatch.setenv("MLX_REASONER_FAST_EXP", "0")
    monkeypatch.setenv("MLX_REASONER_CPU_STREAMS", "1")
    model = tiny_qwen2(seed=4, tie=tie)
    prompts = [PROMPTS[g] for g in GROUP_OF]
    packed = pack_sequences(prompts, GROUP_COMPLETIONS, np.zeros(6), pad_multiple=4)
    shared = pack_groups(PROMPTS, GROUP_OF, GROUP_COMPLETIONS, np.zeros(6), pad_multiple=4)
    assert packed.targets.shape == shared.targets.shape
    weights = mx.array(np.random.default_rng(5).normal(size=packed.mask.shape), dtype=mx.float32)
    weights = weights * packed.mask

    def objective(batch):
        return lambda model: (completion_logprobs(model, batch, 0.7, chunk_size=2) * weights).sum()

    value, grads = nn.value_and_grad(model, objective(shared))(model)
    ref_value, ref_grads = nn.value_and_grad(model, objective(packed))(model)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-5)
    ref = dict(tree_flatten(ref_grads))
    # Each gradient entry sums contributions over the batch's positions, in a different order in
    # each layout: float32 rounding of such a sum is bounded by positions * eps * its scale.
    positions = packed.mask.size
    for name, grad in tree_flatten(grads):
        expected = np.array(ref[name])
        atol = positions * np.finfo(np.float32).eps * np.abs(expected).max()
        np.testing.assert_allclose(np.array(grad), expected, rtol=1e-4, atol=atol)
    # Every prompt token's weights got gradient through the shared prefix pass.
    assert np.abs(np.array(dict(tree_flatten(grads))["model.embed_tokens.weight"][2])).sum() > 0


class _CacheIgnoringStack(nn.Module):
    """A decoder stack that ignores the cache it is handed (so it cannot share prompts)."""

    def __init__(self, stack):
        super().__init__()
        self.stack = stack
        self.embed_tokens = stack.embed_tokens

    @property
    def pipeline_layers(self):
        return self.stack.pipeline_layers

    def __call__(self, tokens, cache=None, input_embeddings=None):
        return self.stack(tokens)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
def test_shared_prompts_supported_only_where_the_layouts_agree(dtype):
    model = tiny_qwen2()
    model.set_dtype(dtype)
    assert shared_prompts_supported(model)
    model.model = _CacheIgnoringStack(model.model)
    assert not shared_prompts_supported(model)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("seed", [0, 3])
def test_a_model_that_ignores_the_stand_in_mask_fails_the_check(dtype, seed, monkeypatch):
    # Attention that always takes "causal" lets a left-padded prompt see its padding: the
    # layouts then differ by about a nat, far over even bfloat16's tolerance.
    model = tiny_qwen2(seed=seed)
    model.set_dtype(dtype)
    assert shared_prompts_supported(model)
    monkeypatch.setattr(qwen2, "create_attention_mask", lambda h, cache=None, **kw: "causal")
    assert not shared_prompts_supported(model)
    assert shared_prompts_supported(model, tolerance=float("inf"))  # no exception: the gap


def test_layout_tolerance_follows_the_dtype():
    # Float32 rounding is far under the floor; bfloat16's is 2^-7 a rounding, about 48 of them.
    assert layout_tolerance(mx.float32) == 0.05
    assert layout_tolerance(mx.float16) == pytest.approx(0.05, rel=0.1)
    assert layout_tolerance(mx.bfloat16) == pytest.approx(48 * 2.0**-7)


def test_sliding_window_models_keep_the_packed_layout(monkeypatch):
    from mlx_lm.models import base

    model = tiny_qwen2()

    def windowed(h, cache=None):
        return base.create_attention_mask(h, cache, window_size=3)

    monkeypatch.setattr(qwen2, "create_attention_mask", windowed)
    assert not shared_prompts_supported(model)


def test_temperature_changes_logprobs():
    model = tiny_qwen2()
    batch = pack_sequences(PROMPTS, COMPLETIONS, np.zeros(3), pad_multiple=4)
    cold = np.array(completion_logprobs(model, batch, temperature=0.7, chunk_size=2))
    warm = np.array(completion_logprobs(model, batch, temperature=1.0, chunk_size=2))
    mask = np.array(batch.mask) == 1
    assert np.abs(cold - warm)[mask].min() > 1e-4


def test_right_padding_does_not_change_real_logprobs():
    model = tiny_qwen2(seed=1)
    batch = pack_sequences(PROMPTS, COMPLETIONS, np.zeros(3), pad_multiple=16)
    together = np.array(completion_logprobs(model, batch, temperature=0.7, chunk_size=2))
    for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        alone = pack_sequences([prompt], [completion], np.zeros(1), pad_multiple=1)
        assert alone.tokens.shape == (1, len(prompt) + len(completion))  # no padding at all
        alone_logp = np.array(completion_logprobs(model, alone, temperature=0.7, chunk_size=2))
        n = len(completion)
        np.testing.assert_allclose(together[row, :n], alone_logp[0, :n], rtol=1e-5, atol=1e-5)


def chunked_and_full_gradients(tie: bool):
    """Gradients of a weighted sum of logprobs: chunked (chunk_size 2) and from full logits."""
    model = tiny_qwen2(seed=2, tie=tie)
    batch = pack_sequences(PROMPTS, COMPLETIONS, np.zeros(3), pad_multiple=4)
    weights = mx.array(np.random.default_rng(3).normal(size=batch.mask.shape), dtype=mx.float32)
    weights = weights * batch.mask
    temperature = 0.7

    def chunked(model):
        return (completion_logprobs(model, batch, temperature, chunk_size=2) * weights).sum()

    def full(model):
        logits = model(batch.tokens).astype(mx.float32) / temperature  # [B, L, V]
        logsm = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        at = mx.take_along_axis(logsm, batch.positions[..., None], axis=1)  # [B, T, V]
        picked = mx.take_along_axis(at, batch.targets[..., None], axis=-1)[..., 0]
        return (picked * weights).sum()

    value, grads = nn.value_and_grad(model, chunked)(model)
    ref_value, ref_grads = nn.value_and_grad(model, full)(model)
    assert value.item() == pytest.approx(ref_value.item(), rel=1e-5)
    return dict(tree_flatten(grads)), dict(tree_flatten(ref_grads))


HEAD_WEIGHTS = ("lm_head.weight", "model.embed_tokens.weight")


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "lm_head"])
def test_chunked_logprob_gradients_match_full_logits_in_decoder(tie):
    # mx.checkpoint recomputes each chunk in the backward pass; the gradient must be exact.
    grads, ref_grads = chunked_and_full_gradients(tie)
    assert grads.keys() == ref_grads.keys()
    decoder = [name for name in ref_grads if name not in HEAD_WEIGHTS]
    assert any(".self_attn.q_proj." in name for name in decoder)
    for name in decoder:
        assert np.abs(np.array(ref_grads[name])).max() > 0, name
        np.testing.assert_allclose(
            np.array(grads[name]), np.array(ref_grads[name]), rtol=1e-4, atol=1e-6, err_msg=name
        )


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "lm_head"])
def test_chunked_logprob_gradients_match_full_logits_in_head(tie):
    grads, ref_grads = chunked_and_full_gradients(tie)
    name = HEAD_WEIGHTS[1] if tie else HEAD_WEIGHTS[0]
    np.testing.assert_allclose(
        np.array(grads[name]), np.array(ref_grads[name]), rtol=1e-4, atol=1e-6, err_msg=name
    )


@pytest.mark.parametrize("layout", ["packed", "shared"])
@pytest.mark.parametrize("streams", [2, 3])
def test_rows_split_over_cpu_streams_give_the_same_logprobs_and_gradients(
    layout, streams, monkeypatch
):
    from mlx_reasoner.engine import streams as engine_streams

    model = tiny_qwen2(seed=6)
    prompts = [PROMPTS[g] for g in GROUP_OF]
    if layout == "packed":
        batch = pack_sequences(prompts, GROUP_COMPLETIONS, np.zeros(6), pad_multiple=4)
    else:
        batch = pack_groups(PROMPTS, GROUP_OF, GROUP_COMPLETIONS, np.zeros(6), pad_multiple=4)
    weights = mx.array(np.random.default_rng(7).normal(size=batch.mask.shape), dtype=mx.float32)
    weights = weights * batch.mask

    def run(setting):
        monkeypatch.setenv(engine_streams.ROW_STREAMS_ENV, setting)
        logp = completion_logprobs(model, batch, 0.7, chunk_size=2)
        value, grads = nn.value_and_grad(
            model, lambda m: (completion_logprobs(m, batch, 0.7, chunk_size=2) * weights).sum()
        )(model)
        return logp, value, dict(tree_flatten(grads))

    monkeypatch.setattr(mx, "default_device", lambda: mx.cpu)
    monkeypatch.setenv(engine_streams.ROW_STREAMS_ENV, str(streams))
    assert [s.stop - s.start for _, s in engine_streams.row_split(6)] == (
        [3, 3] if streams == 2 else [2, 2, 2]
    )
    one_logp, one_value, one_grads = run("1")
    logp, value, grads = run(str(streams))
    mask = np.array(batch.mask) > 0
    np.testing.assert_allclose(np.array(logp)[mask], np.array(one_logp)[mask], rtol=1e-5, atol=1e-6)
    assert value.item() == pytest.approx(one_value.item(), rel=1e-5)
    for name, grad in grads.items():
        np.testing.assert_allclose(np.array(grad), np.array(one_grads[name]), rtol=1e-4, atol=1e-5)


def test_row_streams_setting(monkeypatch):
    from mlx_reasoner.engine import streams as engine_streams

    monkeypatch.setattr(mx, "default_device", lambda: mx.cpu)
    monkeypatch.setenv(engine_streams.ROW_STREAMS_ENV, "1")
    assert engine_streams.row_streams() == 1
    assert len(engine_streams.row_split(8)) == 1
    monkeypatch.setenv(engine_streams.ROW_STREAMS_ENV, "4")
    assert [s.stop - s.start for _, s in engine_streams.row_split(2)] == [
        1,
        1,
    ]  # never more than the rows
    monkeypatch.setenv(engine_streams.ROW_STREAMS_ENV, "two")
    assert engine_streams.row_streams() == 1  # unreadable: no split
    monkeypatch.delenv(engine_streams.ROW_STREAMS_ENV)
    monkeypatch.setattr(engine_streams.os, "cpu_count", lambda: 2)
    assert engine_streams.row_streams() == 2
    monkeypatch.setattr(engine_streams.os, "cpu_count", lambda: 1)
    assert engine_streams.row_streams() == 1
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    monkeypatch.setattr(engine_streams.os, "cpu_count", lambda: 8)
    assert engine_streams.row_streams() == 1  # a GPU: left alone


# --- the model's own head semantics, family by family ----------------------------------------

# Enough fields for a tiny model of each family below; each family reads what it needs.
FAMILY_ARGS = dict(
    hidden_size=32,
    num_hidden_layers=2,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=VOCAB,
    rms_norm_eps=1e-5,
    layer_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=128,
    tie_word_embeddings=False,
    attention_bias=False,
    mlp_bias=False,
    # Gemma 2: soft-capped logits; Cohere: logit_scale; Granite: logits_scaling and
    # multipliers; MiniCPM: hidden states scaled by the width before the head.
    final_logit_softcapping=2.0,
    attn_logit_softcapping=50.0,
    query_pre_attn_scalar=8,
    logit_scale=0.25,
    logits_scaling=4.0,
    attention_multiplier=0.1,
    embedding_multiplier=2.0,
    residual_multiplier=0.5,
    scale_emb=2.0,
    dim_model_base=8,
    scale_depth=1.4,
    sliding_window=64,
    sliding_window_pattern=2,
)
# Families whose __call__ changes the head's output, and some that do not.
RESCALING_FAMILIES = ["gemma2", "cohere", "granite", "minicpm"]
PLAIN_FAMILIES = ["qwen2", "llama", "qwen3", "gemma3_text", "phi3", "starcoder2", "olmo2"]


def family_model(family: str) -> nn.Module:
    import importlib

    module = importlib.import_module(f"mlx_lm.models.{family}")
    mx.random.seed(1)
    model = module.Model(module.ModelArgs.from_dict({**FAMILY_ARGS, "model_type": family}))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("family", RESCALING_FAMILIES + PLAIN_FAMILIES)
def test_output_head_gives_the_models_own_logits(family):
    model = family_model(family)
    tokens = mx.array([[1, 5, 9, 3, 7]])
    _, head = output_head(model)
    expected = np.array(model(tokens).astype(mx.float32))
    got = np.array(head(model.model(tokens)).astype(mx.float32))
    np.testing.assert_array_equal(got, expected)  # the same operations, so the same numbers


@pytest.mark.parametrize("family", RESCALING_FAMILIES)
def test_completion_logprobs_follow_a_rescaling_head(family):
    # The bare projection would score these families on another distribution than they sample.
    model = family_model(family)
    batch = pack_sequences(PROMPTS, COMPLETIONS, np.zeros(3), pad_multiple=4)
    got = np.array(completion_logprobs(model, batch, temperature=0.7, chunk_size=2))
    expected = reference_logprobs(model, PROMPTS, COMPLETIONS, 0.7)
    bare = model.lm_head if "lm_head" in model else model.model.embed_tokens.as_linear
    for row, (prompt, completion) in enumerate(zip(PROMPTS, COMPLETIONS)):
        np.testing.assert_allclose(got[row, : len(completion)], expected[row], atol=1e-5)
        hidden = model.model(mx.array([prompt + completion]))
        logits = np.array(bare(hidden).astype(mx.float32), dtype=np.float64)[0] / 0.7
        logits -= logits.max(axis=-1, keepdims=True)
        logsm = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        unscaled = [logsm[len(prompt) - 1 + j, t] for j, t in enumerate(completion)]
        assert np.abs(np.array(unscaled) - expected[row]).max() > 1e-3
