"""The training-signal controls: reward scaling, dapo and GSPO losses, truncated importance
sampling, the decode's log-probs and the mismatch they show, masking truncated completions,
dynamic sampling, the overlong reward and the entropy figure."""

import json

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten, tree_map
from mlx_lm.sample_utils import make_sampler

from mlx_reasoner.advantages import group_advantages, groups_with_spread
from mlx_reasoner.cli import main
from mlx_reasoner.config import TrainConfig, load_config_file
from mlx_reasoner.errors import ReasonerError
from mlx_reasoner.logprobs import completion_logprobs, pack_sequences
from mlx_reasoner.model import attach_lora, lora_config
from mlx_reasoner.objective import (
    LossConfig,
    Normalizer,
    grpo_loss,
    sequence_log_ratio,
    truncated_importance_weights,
)
from mlx_reasoner.rewards import REWARDS, resolve_rewards, score_completions
from mlx_reasoner.rollout import Rollouts, generate_groups
from mlx_reasoner.trainer import (
    GradientComputer,
    _keep_groups,
    micro_batches,
    policy_update,
)

# --- reward scaling --------------------------------------------------------------------------


def test_scale_rewards_modes_on_hand_numbers():
    rewards = np.array([1.0, 0.0, 0.5, 3.0, 3.0, 3.0])
    # Group: [0.5, -0.5, 0] / std([1, 0, 0.5]) = 0.4082 (+ eps 1e-4).
    group = group_advantages(rewards, 3, scale="group")
    np.testing.assert_allclose(group[:3], [0.5 / 0.40835, -0.5 / 0.40835, 0.0], rtol=1e-4)
    # Batch: the same centred values over the std of all six rewards, 1.2829.
    batch = group_advantages(rewards, 3, scale="batch")
    np.testing.assert_allclose(batch, [0.5 / 1.28300, -0.5 / 1.28300, 0, 0, 0, 0], rtol=1e-4)
    np.testing.assert_allclose(group_advantages(rewards, 3, scale="none"), [0.5, -0.5, 0, 0, 0, 0])
    assert np.array_equal(
        group_advantages(rewards, 3, scale=False), group_advantages(rewards, 3, scale="none")
    )
    with pytest.raises(ValueError, match="group, batch, none"):
        group_advantages(rewards, 3, scale="median")


def test_no_scale_rewards_still_means_none(tmp_path):
    runner = CliRunner()
    shown = runner.invoke(main, ["train", "--no-scale-rewards", "--print-config"])
    assert shown.exit_code == 0, shown.output
    assert "scale_rewards: none" in shown.output
    shown = runner.invoke(main, ["train", "--scale-rewards", "batch", "--print-config"])
    assert "scale_rewards: batch" in shown.output
    both = runner.invoke(main, ["train", "--scale-rewards", "batch", "--no-scale-rewards"])
    assert both.exit_code != 0 and "not both" in both.output
    # Config files (and runs) written before the modes held true/false.
    (tmp_path / "old.yaml").write_text("scale-rewards: false\n")
    assert load_config_file(str(tmp_path / "old.yaml"), TrainConfig) == {"scale_rewards": "none"}
    assert TrainConfig(scale_rewards=True).validate().scale_rewards == "group"


# --- loss variants ---------------------------------------------------------------------------


def hand_normalizer(completions=1, tokens=2):
    return Normalizer(completions, tokens, 4)


def test_sequence_level_ratio_clips_whole_completions():
    """Token log-ratios +0.5 and -0.5, advantage 1, epsilon 0.2: per token the first ratio
    (1.65) is clipped at 1.2 and the second (0.61) kept, mean -(1.2 + 0.607) / 2; per completion
    the mean log-ratio is 0, the ratio 1 for both tokens, loss -1."""
    logp = mx.array([[-1.0, -2.0]])
    old = mx.array([[-1.5, -1.5]])
    adv, mask = mx.array([1.0]), mx.ones((1, 2))
    token, _ = grpo_loss(logp, old, None, adv, mask, LossConfig(), hand_normalizer())
    sequence, _ = grpo_loss(
        logp, old, None, adv, mask, LossConfig(importance_sampling_level="sequence"),
        hand_normalizer(),
    )  # fmt: skip
    assert token.item() == pytest.approx(-(1.2 + np.exp(-0.5)) / 2, rel=1e-6)
    assert sequence.item() == pytest.approx(-1.0, rel=1e-6)
    # Padding does not enter a completion's mean.
    padded = sequence_log_ratio(
        mx.array([[0.3, 0.1, 9.0]]), mx.zeros((1, 3)), mx.array([[1.0, 1, 0]])
    )
    np.testing.assert_allclose(np.array(padded), [[0.2, 0.2, 0.2]], rtol=1e-6)


def test_sequence_level_gradient_is_the_length_normalised_policy_gradient():
    """Single update (ratio 1): d/d logp_t of the GSPO loss is -A / (|y| * B) per token."""
    logp = mx.array([[-1.0, -2.0, -0.5], [-0.3, -0.2, 0.0]])
    mask = mx.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = mx.array([1.0, -2.0])
    config = LossConfig(importance_sampling_level="sequence")
    grad = mx.grad(lambda lp: grpo_loss(lp, None, None, adv, mask, config, Normalizer(2, 5, 3))[0])(
        logp
    )
    expected = [[-1 / 6, -1 / 6, -1 / 6], [2 / 4, 2 / 4, 0.0]]
    np.testing.assert_allclose(np.array(grad), expected, rtol=1e-6, atol=1e-7)


def test_dapo_is_the_token_mean_over_the_whole_step():
    per_token_logp = mx.array([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])
    mask = mx.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = mx.array([1.0, -1.0])
    old = per_token_logp + mx.array([[0.1, -0.1, 0.0], [0.05, 0.0, 0.0]])
    norm = Normalizer(4, 7, 3)  # the whole step: 4 completions, 7 tokens
    dapo, _ = grpo_loss(per_token_logp, old, None, adv, mask, LossConfig(loss_type="dapo"), norm)
    bnpo, _ = grpo_loss(per_token_logp, old, None, adv, mask, LossConfig(loss_type="bnpo"), norm)
    ratios = np.exp(np.array([-0.1, 0.1, -0.05]))
    # Advantage +1 clips above 1.2, -1 below 0.8: none of these ratios reach either bound.
    expected = -(ratios[0] + ratios[1] - ratios[2]) / 7
    assert dapo.item() == pytest.approx(expected, rel=1e-6)
    assert dapo.item() == bnpo.item()


# --- truncated importance sampling and the mismatch figures ---------------------------------


def test_truncated_importance_weights_on_hand_numbers():
    old = mx.array([[-1.0, -2.0, -0.7]])
    rollout = mx.array([[-1.5, -1.0, -0.7]])
    weights = truncated_importance_weights(old, rollout, 1.5)
    np.testing.assert_allclose(np.array(weights), [[1.5, np.exp(-1.0), 1.0]], rtol=1e-6)


def test_tis_weights_the_policy_term_and_mismatch_sums_are_exact():
    logp = mx.array([[-1.0, -2.0]])
    rollout = mx.array([[-1.5, -1.0]])  # the decode's log-probs differ by +0.5 and -1
    adv, mask = mx.array([2.0]), mx.ones((1, 2))
    plain, sums = grpo_loss(logp, None, None, adv, mask, LossConfig(), hand_normalizer(), rollout)
    capped, _ = grpo_loss(
        logp, None, None, adv, mask, LossConfig(tis_cap=1.5), hand_normalizer(), rollout
    )
    assert plain.item() == pytest.approx(-2.0, rel=1e-6)  # ratio 1: -A per token, mean
    assert capped.item() == pytest.approx(-2.0 * (1.5 + np.exp(-1.0)) / 2, rel=1e-6)
    assert sums["mismatch_abs_sum"].item() == pytest.approx(1.5, rel=1e-6)
    # k3 of KL(decode || train) from the decode's samples: exp(d) - d - 1 with d = train - decode.
    k3 = sum(np.exp(d) - d - 1 for d in (0.5, -1.0))
    assert sums["mismatch_kl_sum"].item() == pytest.approx(k3, rel=1e-6)
    assert sums["neg_logp_sum"].item() == pytest.approx(3.0, rel=1e-6)
    # Without the decode's log-probs there are no mismatch figures and TIS does nothing.
    _, bare = grpo_loss(logp, None, None, adv, mask, LossConfig(tis_cap=1.5), hand_normalizer())
    assert "mismatch_abs_sum" not in bare


@pytest.mark.parametrize(
    "compiled",
    [pytest.param(True, marks=pytest.mark.engine), False],
    ids=["compiled", "BatchGenerator"],
)
def test_decode_logprobs_match_the_training_pass(tiny_model, compiled):
    """Both decodes keep each sampled token's log-prob at the sampling temperature; in float32
    they agree with the training pass to rounding (16 positions x 2 layers of float32 sums)."""
    model, tokenizer = tiny_model
    attach_lora(model, lora_config(-1, 4))
    mx.random.seed(0)
    prompt = tokenizer.encode("What is 2 + 2?")
    rollouts = generate_groups(
        model, tokenizer, [prompt], 4, 8, make_sampler(0.7),
        compiled=compiled, temperature=0.7,
    )  # fmt: skip
    assert [len(lp) for lp in rollouts.logprobs] == [len(c) for c in rollouts.completion_ids]
    batch = pack_sequences(rollouts.prompt_ids, rollouts.completion_ids, np.zeros(4))
    train = np.array(completion_logprobs(model, batch, 0.7))
    for row, values in enumerate(rollouts.logprobs):
        np.testing.assert_allclose(train[row, : len(values)], values, atol=1e-4)


# --- masking truncated completions -----------------------------------------------------------


def perturbed(model):
    attach_lora(model, lora_config(-1, 4))
    mx.random.seed(1)
    model.update(
        tree_map(lambda p: p + 0.02 * mx.random.normal(p.shape), model.trainable_parameters())
    )


def test_masked_truncated_completions_contribute_no_gradient(tiny_model):
    """With --mask-truncated, a cut completion's gradient is what it would be with a zero
    advantage (beta 0, one update): nothing. Its tokens leave the token count too."""
    model, tokenizer = tiny_model
    perturbed(model)
    prompt = tokenizer.encode("What is 2 + 2?")
    rollouts = Rollouts(
        group_size=4,
        prompt_ids=[prompt] * 4,
        completion_ids=[[5, 6], [7, 8, 9], [10, 11, 12, 13], [14]],
        finish_reasons=["stop", "stop", "length", "stop"],
        texts=[""] * 4,
    )
    advantages = np.array([1.0, -0.5, 1.5, -2.0], dtype=np.float32)
    computer = GradientComputer(model, LossConfig(beta=0.0), 1.0, compile=False)
    norm = Normalizer(4, 6, 4)  # tokens of the three completions that stay in the loss

    def gradients(advantages, in_loss):
        (batch,) = micro_batches(rollouts, advantages, 4, in_loss=in_loss)
        _, _, grads = computer(batch, norm)
        return dict(tree_flatten(grads))

    masked = gradients(advantages, [True, True, False, True])
    zeroed = gradients(np.where(np.arange(4) == 2, 0.0, advantages), None)
    for name, value in masked.items():
        np.testing.assert_allclose(np.array(value), np.array(zeroed[name]), rtol=1e-5, atol=1e-7)
    assert any(np.abs(np.array(v)).max() > 0 for v in masked.values())

    config = TrainConfig(group_size=4, max_completion_tokens=4, beta=0.0, lora_layers=-1,
                         mask_truncated=True, micro_batch_size=4).validate()  # fmt: skip
    stats = policy_update(
        model, optim.SGD(learning_rate=0.0), computer, rollouts, advantages, config
    )
    assert np.isfinite(stats.entropy) and stats.entropy > 0


# --- dynamic sampling ------------------------------------------------------------------------


def test_spread_groups_and_keep_groups_on_hand_numbers():
    assert groups_with_spread(np.array([1, 1, 0, 1, 2, 2]), 2) == [1]

    def part(rewards, prompts):
        group = 2
        rollouts = Rollouts(
            group_size=group,
            prompt_ids=[[p] for p in prompts for _ in range(group)],
            completion_ids=[[i] for i in range(len(rewards))],
            finish_reasons=["stop"] * len(rewards),
            texts=[f"{p}-{j}" for p in prompts for j in range(group)],
            logprobs=[[-0.5]] * len(rewards),
        )
        from mlx_reasoner.rewards import RewardScores

        total = np.array(rewards, dtype=np.float32)
        scores = RewardScores(total, {"r": total})
        return (list(prompts), rollouts, scores, groups_with_spread(total, group))

    first = part([1, 1, 0, 1], ["a", "b"])  # only b has a spread
    second = part([2, 2, 3, 0], ["c", "d"])  # only d
    batch, rollouts, scores, figures = _keep_groups([first, second], 2)
    assert batch == ["b", "d"]
    assert rollouts.texts == ["b-0", "b-1", "d-0", "d-1"]
    assert scores.total.tolist() == [0.0, 1.0, 3.0, 0.0]
    assert rollouts.logprobs == [[-0.5]] * 4
    assert {k: figures[k] for k in ("groups_drawn", "groups_kept", "resample_rounds")} == {
        "groups_drawn": 4, "groups_kept": 2, "resample_rounds": 1
    }  # fmt: skip
    # Too few: the kept ones first, then equal-reward groups in the order drawn.
    batch, _, _, figures = _keep_groups([first], 2)
    assert batch == ["b", "a"] and figures["groups_kept"] == 1


PICKY_REWARD = """
def picky(completions, answers, questions, **kwargs):
    # Only questions with a 7 in them can tell completions apart: the others' groups are flat.
    return [float(len(c) % 3) if "7" in q else 0.0 for c, q in zip(completions, questions)]
"""


@pytest.mark.slow
def test_dynamic_sampling_trains_only_on_groups_whose_rewards_differ(tmp_path, tiny_model_dir):
    """A real run: each step logs what it drew and kept, each kept group (when the step found
    enough) has differing rewards, and the other new figures reach metrics.jsonl."""
    run_dir = tmp_path / "run"
    (tmp_path / "picky.py").write_text(PICKY_REWARD)
    result = CliRunner().invoke(
        main,
        [
            "train", "--model", str(tiny_model_dir), "--dataset", "task:arithmetic",
            "--steps", "3", "--batch-size", "2", "--group-size", "4",
            "--max-completion-tokens", "16", "--dynamic-sampling", "--max-resample", "3",
            "--run-dir", str(run_dir), "--save-every", "0", "--eval-every", "0",
            "--reward-file", str(tmp_path / "picky.py"), "--reward", "picky",
            "--reward", "overlong:0.5",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rollouts = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert len(metrics) == 3
    assert any(m["resample_rounds"] > 0 for m in metrics)  # flat groups made it draw again
    for m in metrics:
        assert m["groups_drawn"] == 2 * (1 + m["resample_rounds"])
        assert 0 <= m["groups_kept"] <= 2
        assert m["groups_kept"] == 2 or m["resample_rounds"] == 3  # it stops only when done
        assert np.isfinite(m["entropy"]) and m["entropy"] > 0
        assert m["mismatch_abs"] < 1e-3  # float32: the decode and the training pass agree
        assert "reward/overlong" in m
        step_rows = [r for r in rollouts if r["step"] == m["step"]]
        assert len(step_rows) == 8  # the step trains on --batch-size groups, no more
        spread = [
            max(r["reward"] for r in step_rows[4 * g : 4 * g + 4])
            > min(r["reward"] for r in step_rows[4 * g : 4 * g + 4])
            for g in range(2)
        ]
        assert sum(spread) >= m["groups_kept"]


# --- the overlong reward ---------------------------------------------------------------------


def test_overlong_reward_is_built_in_off_by_default_and_gets_the_lengths():
    assert "overlong" in REWARDS
    assert "overlong" not in [r.name for r in resolve_rewards()]
    (reward,) = resolve_rewards(["overlong:0.5"])
    scores = score_completions(
        [reward], ["a", "b", "c"], ["", "", ""],
        completion_tokens=[10, 95, 100], max_completion_tokens=100, overlong_buffer=10,
    )  # fmt: skip
    np.testing.assert_allclose(scores.total, [0.0, -0.25, -0.5])
    # The default buffer is a fifth of the limit: 20 tokens here.
    default = REWARDS["overlong"](["a"], [""], completion_tokens=[90], max_completion_tokens=100)
    assert default == [-0.5]
    with pytest.raises(ReasonerError, match="overlong"):
        score_completions([reward], ["a"], [""])


def test_new_options_are_validated():
    with pytest.raises(ReasonerError, match="--overlong-buffer"):
        TrainConfig(max_completion_tokens=64, overlong_buffer=65).validate()
    with pytest.raises(ReasonerError, match="--tis-cap must be at least 1"):
        TrainConfig(tis_cap=0.5).validate()
    with pytest.raises(ReasonerError, match="--importance-sampling-level"):
        TrainConfig(importance_sampling_level="word").validate()
    assert "dapo" in TrainConfig.__dataclass_fields__["loss_type"].metadata["choices"]
