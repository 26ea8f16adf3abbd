"""The advantages stage: group-relative normalisation of rewards, on hand-computed numbers."""

import doctest
import math

import numpy as np
import pytest

import mlx_reasoner.advantages
from mlx_reasoner.advantages import group_advantages, zero_std_fraction

EPS = 1e-4  # the default ``eps`` of group_advantages


def test_seed_example_matches_hand_numbers():
    # Rewards [1, 0, 0.5]: mean 0.5, deviations [0.5, -0.5, 0],
    # population variance (0.25 + 0.25 + 0) / 3 = 1/6, std sqrt(1/6) = 0.40825.
    rewards = np.array([1.0, 0.0, 0.5])
    std = math.sqrt(1 / 6)
    assert rewards.mean() == 0.5
    assert std == pytest.approx(0.408, abs=5e-4)

    adv = group_advantages(rewards, 3)

    assert adv.dtype == np.float32
    assert adv.shape == (3,)
    assert [round(float(a), 2) for a in adv] == [1.22, -1.22, 0.0]
    expected = np.array([0.5 / (std + EPS), -0.5 / (std + EPS), 0.0])
    np.testing.assert_allclose(adv, expected, rtol=1e-6, atol=0)
    assert adv[2] == 0.0


def test_docstring_example_runs():
    result = doctest.testmod(mlx_reasoner.advantages)
    assert result.attempted >= 1
    assert result.failed == 0


def test_groups_are_normalised_independently():
    # Group 2 is [2, 4, 9]: mean 5, deviations [-3, -1, 4], variance 26/3.
    rewards = np.array([1.0, 0.0, 0.5, 2.0, 4.0, 9.0])
    std_a, std_b = math.sqrt(1 / 6), math.sqrt(26 / 3)
    expected = np.array(
        [0.5 / (std_a + EPS), -0.5 / (std_a + EPS), 0.0]
        + [-3 / (std_b + EPS), -1 / (std_b + EPS), 4 / (std_b + EPS)]
    )

    adv = group_advantages(rewards, 3)

    np.testing.assert_allclose(adv, expected, rtol=1e-6)
    # Each group is centred on its own mean, not the batch mean (2.75).
    np.testing.assert_allclose(adv.reshape(2, 3).sum(axis=1), [0.0, 0.0], atol=1e-6)
    # Swapping the groups swaps the advantages and nothing else.
    swapped = group_advantages(np.concatenate([rewards[3:], rewards[:3]]), 3)
    np.testing.assert_array_equal(swapped, np.concatenate([adv[3:], adv[:3]]))


def test_group_size_decides_the_grouping():
    # The same four rewards as one group of 4 or as two groups of 2.
    rewards = np.array([0.0, 1.0, 3.0, 3.0])
    one_group = group_advantages(rewards, 4)
    two_groups = group_advantages(rewards, 2)
    # G=4: mean 1.75, deviations [-1.75, -0.75, 1.25, 1.25], variance 6.75 / 4.
    std = math.sqrt(6.75 / 4)
    np.testing.assert_allclose(
        one_group, np.array([-1.75, -0.75, 1.25, 1.25]) / (std + EPS), rtol=1e-6
    )
    # G=2: [0, 1] has std 0.5, [3, 3] has std 0.
    np.testing.assert_allclose(two_groups, [-0.5 / (0.5 + EPS), 0.5 / (0.5 + EPS), 0.0, 0.0])


def test_equal_rewards_give_exact_zeros_not_nan():
    rewards = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.5, 2.0, 2.0, 2.0])

    adv = group_advantages(rewards, 3)

    assert np.isfinite(adv).all()
    np.testing.assert_array_equal(adv[:6], np.zeros(6))
    np.testing.assert_array_equal(adv[9:], np.zeros(3))
    assert adv[6] > 1.2  # the one varied group still carries signal


def test_equal_non_dyadic_rewards_give_exact_zeros():
    rewards = np.array([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])
    adv = group_advantages(rewards, 3)
    np.testing.assert_array_equal(adv, np.zeros(6))


def test_scale_false_only_centres():
    rewards = np.array([1.0, 0.0, 0.5, 2.0, 4.0, 9.0, 3.0, 3.0, 3.0])

    adv = group_advantages(rewards, 3, scale=False)

    assert adv.dtype == np.float32
    np.testing.assert_allclose(adv, [0.5, -0.5, 0.0, -3.0, -1.0, 4.0, 0.0, 0.0, 0.0])


def test_eps_is_added_to_the_std():
    # [0, 2]: std 1, so eps=1 halves the advantages.
    np.testing.assert_allclose(group_advantages(np.array([0.0, 2.0]), 2, eps=1.0), [-0.5, 0.5])


@pytest.mark.parametrize(
    "rewards",
    [np.zeros(4), np.zeros(5), np.zeros((2, 3))],
    ids=["4-not-multiple-of-3", "5-not-multiple-of-3", "2d"],
)
def test_wrong_length_or_shape_raises(rewards):
    with pytest.raises(ValueError, match="multiple of 3"):
        group_advantages(rewards, 3)


def test_zero_std_fraction_counts_equal_groups():
    rewards = np.array(
        [
            *[1.0, 1.0, 1.0],  # equal
            *[0.0, 1.0, 0.0],
            *[0.5, 0.5, 0.5],  # equal
            *[0.0, 0.0, 1e-9],  # tiny, but not equal
        ]
    )
    assert zero_std_fraction(rewards, 3) == 0.5
    assert zero_std_fraction(rewards[:3], 3) == 1.0
    assert zero_std_fraction(rewards[3:6], 3) == 0.0
    assert zero_std_fraction(rewards[:9], 3) == pytest.approx(2 / 3)
    # As groups of 2: [1, 1] [1, 0] [1, 0] [0.5, 0.5], two of them equal.
    assert zero_std_fraction(rewards[:8], 2) == 0.5
