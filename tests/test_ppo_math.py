"""Every PPO formula against numbers worked out by hand (comments show the arithmetic)."""

import math

import pytest
import torch

from chemlit.rl import ppo_math as pm


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


MASK = t([[1, 1, 1], [1, 1, 0]])  # row 0: 3 response tokens; row 1: 2 tokens then padding


def test_masked_mean_ignores_padding():
    x = t([[1, 2, 3], [4, 5, 100]])
    assert pm.masked_mean(x, MASK).item() == pytest.approx((1 + 2 + 3 + 4 + 5) / 5)
    assert pm.masked_mean(x, MASK.bool()).item() == pytest.approx(3.0)  # bool masks work too
    assert pm.masked_mean(x, torch.zeros_like(x)).item() == 0.0  # nothing to average: 0, not NaN


def test_masked_whiten_by_hand():
    x = t([[1, 2, 3], [4, 5, 100]])
    # mean 3, biased var = (4 + 1 + 0 + 1 + 4) / 5 = 2
    expected = (x - 3.0) / math.sqrt(2.0 + 1e-8)
    torch.testing.assert_close(pm.masked_whiten(x, MASK), expected)
    torch.testing.assert_close(pm.masked_whiten(x, MASK, shift_mean=False), expected + 3.0)
    whitened = pm.masked_whiten(x, MASK)
    assert pm.masked_mean(whitened, MASK).item() == pytest.approx(0.0, abs=1e-6)
    assert pm.masked_var(whitened, MASK).item() == pytest.approx(1.0, abs=1e-5)


def test_logprobs_from_logits_by_hand():
    logits = torch.log(t([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]]))  # (1, 2, 3), already normalised
    tokens = torch.tensor([[0, 2]])
    torch.testing.assert_close(pm.logprobs_from_logits(logits, tokens), torch.log(t([[0.5, 0.7]])))
    # unnormalised logits give the same answer: log_softmax normalises
    torch.testing.assert_close(pm.logprobs_from_logits(logits + 3.0, tokens), torch.log(t([[0.5, 0.7]])))


def test_kl_estimators_by_hand():
    logp, ref = t([[math.log(0.5)]]), t([[math.log(0.25)]])
    d = math.log(2.0)  # log π - log π_ref
    assert pm.kl_estimate(logp, ref, "k1").item() == pytest.approx(d)
    assert pm.kl_estimate(logp, ref, "k2").item() == pytest.approx(0.5 * d * d)
    # r = π_ref / π = 0.5: (0.5 - 1) - log 0.5 = -0.5 + 0.6931
    assert pm.kl_estimate(logp, ref, "k3").item() == pytest.approx(-0.5 + d)
    assert pm.kl_estimate(ref, logp, "k3").item() == pytest.approx(1.0 - d)  # r = 2: 1 - log 2
    assert pm.kl_estimate(logp, logp, "k3").item() == 0.0
    with pytest.raises(ValueError, match="k4"):
        pm.kl_estimate(logp, ref, "k4")


def test_token_rewards_kl_every_token_score_at_last():
    logp = t([[-1.0, -1.0, -1.0], [-2.0, -2.0, -9.0]])
    ref = t([[-1.5, -1.0, -0.5], [-2.0, -3.0, 0.0]])
    scores = t([2.0, -1.0])
    rewards = pm.token_rewards(scores, logp, ref, MASK, kl_coef=0.1, kind="k1")
    # row 0: kl = [0.5, 0, -0.5] -> -0.1*kl = [-0.05, 0, 0.05]; + 2 at t=2
    # row 1: kl = [0, 1, (pad)] -> [0, -0.1, 0]; score -1 at t=1, padding stays 0
    torch.testing.assert_close(rewards, t([[-0.05, 0.0, 2.05], [0.0, -1.1, 0.0]]))


def test_token_rewards_empty_response_gets_nothing():
    mask = t([[1, 0], [0, 0]])
    rewards = pm.token_rewards(t([1.0, 5.0]), torch.zeros(2, 2), torch.zeros(2, 2), mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, t([[1.0, 0.0], [0.0, 0.0]]))


def test_gae_by_hand():
    rewards = t([[0.0, 0.0, 1.0], [0.5, 2.0, 7.0]])
    values = t([[0.1, 0.2, 0.3], [1.0, 0.5, 9.0]])
    gamma, lam = 0.9, 0.5
    # row 0 (3 tokens): δ2 = 1 - 0.3 = 0.7; A2 = 0.7
    #   δ1 = 0 + 0.9*0.3 - 0.2 = 0.07; A1 = 0.07 + 0.45*0.7 = 0.385
    #   δ0 = 0 + 0.9*0.2 - 0.1 = 0.08; A0 = 0.08 + 0.45*0.385 = 0.25325
    # row 1 (2 tokens, t=2 is padding: its reward 7 and value 9 must not leak in):
    #   δ1 = 2 - 0.5 = 1.5; A1 = 1.5;  δ0 = 0.5 + 0.9*0.5 - 1 = -0.05; A0 = -0.05 + 0.45*1.5 = 0.625
    advantages, returns = pm.gae(rewards, values, MASK, gamma, lam)
    torch.testing.assert_close(advantages, t([[0.25325, 0.385, 0.7], [0.625, 1.5, 0.0]]))
    torch.testing.assert_close(returns, t([[0.35325, 0.585, 1.0], [1.625, 2.0, 0.0]]))


def test_gae_gamma_one_lambda_one_is_reward_to_go():
    rewards = t([[0.0, -0.1, 1.0]])
    values = t([[0.3, 0.2, 0.1]])
    advantages, returns = pm.gae(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    torch.testing.assert_close(returns, t([[0.9, 0.9, 1.0]]))  # sum of the rewards still to come
    torch.testing.assert_close(advantages, returns - values)


def test_policy_loss_unclipped_and_clipped():
    old = torch.zeros(1, 3)
    new = torch.log(t([[1.1, 1.5, 0.5]]))  # ratios 1.1, 1.5, 0.5
    advantages = t([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    loss, clipfrac, approx_kl = pm.policy_loss(new, old, advantages, mask, clip_range=0.2)
    # t0: ratio 1.1 inside the clip: -1.1
    # t1: A>0, ratio 1.5: max(-1.5, -1.2) = -1.2 (no credit beyond 1+ε)
    # t2: A<0, ratio 0.5: max(0.5, 0.8) = 0.8 (the pessimistic term)
    assert loss.item() == pytest.approx((-1.1 - 1.2 + 0.8) / 3)
    assert clipfrac.item() == pytest.approx(2 / 3)  # |1.5-1| and |0.5-1| exceed 0.2
    expected_kl = sum((r - 1) - math.log(r) for r in (1.1, 1.5, 0.5)) / 3
    assert approx_kl.item() == pytest.approx(expected_kl, rel=1e-5)


def test_policy_loss_padding_does_not_count():
    old = torch.zeros(1, 2)
    new = t([[0.0, 5.0]])  # a huge ratio on the padded token
    loss, clipfrac, approx_kl = pm.policy_loss(new, old, t([[2.0, 100.0]]), t([[1, 0]]), 0.2)
    assert loss.item() == pytest.approx(-2.0)
    assert clipfrac.item() == 0.0 and approx_kl.item() == 0.0


def test_policy_loss_gradient_vanishes_when_clipped():
    old = torch.zeros(1, 1)
    new = torch.log(t([[1.5]])).requires_grad_()
    loss, _, _ = pm.policy_loss(new, old, t([[1.0]]), torch.ones(1, 1), 0.2)
    loss.backward()
    assert new.grad.item() == 0.0  # a positive advantage past 1+ε gives no further push


def test_value_loss_clipped_by_hand():
    old_values = t([[0.0, 0.0, 0.0]])
    values = t([[0.1, 1.0, -1.0]])
    returns = t([[1.0, 1.0, 1.0]])
    loss, clipfrac = pm.value_loss(values, old_values, returns, torch.ones(1, 3), clip_range_value=0.2)
    # t0: V=0.1 within ±0.2: (0.1-1)² = 0.81 both ways
    # t1: unclipped (1-1)² = 0; clipped V = 0.2: (0.2-1)² = 0.64 -> max 0.64 (clipped term wins)
    # t2: unclipped (-1-1)² = 4; clipped V = -0.2: 1.44 -> max 4
    assert loss.item() == pytest.approx(0.5 * (0.81 + 0.64 + 4.0) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)


def test_value_loss_padding_ignored():
    loss, clipfrac = pm.value_loss(t([[1.0, 50.0]]), t([[1.0, 0.0]]), t([[0.0, -50.0]]), t([[1, 0]]), 0.2)
    assert loss.item() == pytest.approx(0.5)
    assert clipfrac.item() == 0.0


def test_entropy_by_hand():
    uniform = torch.zeros(1, 1, 4)                         # H = log 4
    certain = t([[[100.0, 0.0, 0.0, 0.0]]])                # H ≈ 0
    logits = torch.cat([uniform, certain, uniform * 0 + t([[[1.0, 2.0, 3.0, 4.0]]])], dim=1)  # (1, 3, 4)
    entropy = pm.token_entropy(logits)                     # (1, 3)
    torch.testing.assert_close(entropy[0, :2], t([math.log(4), 0.0]), atol=1e-6, rtol=0)
    assert pm.masked_mean(entropy, t([[1, 1, 0]])).item() == pytest.approx(math.log(4) / 2, abs=1e-6)


def test_explained_variance():
    target = t([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.ones(1, 4)
    assert pm.explained_variance(target, target, mask).item() == pytest.approx(1.0)
    assert pm.explained_variance(torch.full_like(target, 2.5), target, mask).item() == pytest.approx(0.0)


def test_ppo_loss_adds_its_terms_with_their_weights_and_names_them():
    logprobs, old = t([[-1.0, -2.0]]), t([[-1.1, -2.0]])
    values, old_values, returns = t([[0.5, 0.2]]), t([[0.4, 0.2]]), t([[1.0, 0.0]])
    advantages, mask, ref = t([[1.0, -1.0]]), torch.ones(1, 2), t([[-1.5, -2.0]])
    entropy = t([[2.0, 4.0]])
    spec = pm.LossSpec(clip_range=0.2, clip_range_value=0.2, vf_coef=0.5, ent_coef=0.1, kl_loss_coef=0.3)
    loss, stats = pm.ppo_loss(logprobs, values, old, old_values, advantages, returns, mask, spec,
                              ref_logprobs=ref, entropy=entropy)
    pg, _, _ = pm.policy_loss(logprobs, old, advantages, mask, 0.2)
    vf, _ = pm.value_loss(values, old_values, returns, mask, 0.2)
    k2 = (0.5 * 0.5 ** 2 + 0.0) / 2                       # ½(-1 - -1.5)² on token 0, 0 on token 1
    assert loss.item() == pytest.approx(pg.item() + 0.5 * vf.item() - 0.1 * 3.0 + 0.3 * k2)
    assert stats["kl_loss"].item() == pytest.approx(k2) and stats["entropy"].item() == pytest.approx(3.0)
    assert stats["old_approx_kl"].item() == pytest.approx(-0.05)  # mean of -(log π - log π_old)
    assert stats["ratio_mean"].item() == pytest.approx((math.exp(0.1) + 1.0) / 2)
    assert not any(v.requires_grad for v in stats.values())
    with pytest.raises(ValueError, match="ref_logprobs"):
        pm.ppo_loss(logprobs, values, old, old_values, advantages, returns, mask, spec, entropy=entropy)


def test_whitening_over_shards_equals_whitening_the_whole_batch():
    """masked_whiten with reduce_sum: two 'ranks' that add up their sums whiten like one batch would."""
    torch.manual_seed(0)
    x, mask = torch.randn(6, 5) * 3 + 1, (torch.rand(6, 5) > 0.3).float()
    shards = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    whole = pm.masked_whiten(x, mask)
    calls = []

    def all_reduce(shard_index):   # what an all-reduce returns: the same statistic summed over both shards
        def reduce_sum(local):
            calls.append(local)
            other_x, other_mask = shards[1 - shard_index]
            n = len(calls) - 1     # masked_whiten asks for the mean's sums first, then the variance's
            if n % 2 == 0:
                other = torch.stack([(other_x * other_mask).sum(), other_mask.sum()])
            else:
                mean = pm.masked_mean(x, mask)
                other = torch.stack([((other_x - mean) ** 2 * other_mask).sum(), other_mask.sum()])
            return local + other
        return reduce_sum

    for i, (shard_x, shard_mask) in enumerate(shards):
        calls.clear()
        mine = pm.masked_whiten(shard_x, shard_mask, reduce_sum=all_reduce(i))
        torch.testing.assert_close(mine, whole[:3] if i == 0 else whole[3:])
    assert not torch.allclose(pm.masked_whiten(x[:3], mask[:3]), whole[:3])  # one shard alone whitens differently


def test_ppo_loss_adds_the_written_rationales_mean_nll_with_its_weight():
    logprobs, old = t([[-1.0, -2.0]]), t([[-1.0, -2.0]])
    values, returns, advantages, mask = t([[0.5, 0.2]]), t([[1.0, 0.0]]), t([[1.0, -1.0]]), torch.ones(1, 2)
    written = t([[-0.5, -1.5, -9.0]]).requires_grad_()
    written_mask = torch.tensor([[True, True, False]])      # the third token is not the rationale's
    plain, _ = pm.ppo_loss(logprobs, values, old, values, advantages, returns, mask, pm.LossSpec())
    loss, stats = pm.ppo_loss(logprobs, values, old, values, advantages, returns, mask, pm.LossSpec(anchor_coef=0.5),
                              anchor_logprobs=written, anchor_mask=written_mask)
    assert stats["rationale_nll"].item() == pytest.approx(1.0)          # mean of 0.5 and 1.5
    assert loss.item() == pytest.approx(plain.item() + 0.5 * 1.0)
    loss.backward()
    assert written.grad.tolist() == [[-0.25, -0.25, 0.0]]                # raises the rationale's log-probs
    with pytest.raises(ValueError, match="anchor"):
        pm.ppo_loss(logprobs, values, old, values, advantages, returns, mask, pm.LossSpec(anchor_coef=0.5))


def test_masked_scale_sets_unit_rms_and_keeps_the_mean():
    """Advantages of scores already centred per molecule are scaled, not centred a second time."""
    x = torch.tensor([[1.0, 3.0, 100.0], [2.0, -2.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    scaled = pm.masked_scale(x, mask)
    torch.testing.assert_close(scaled, x / (4.5 + 1e-8) ** 0.5)      # rms over the masked entries: sqrt(18 / 4)
    assert pm.masked_mean(scaled ** 2, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert pm.masked_mean(scaled, mask).item() == pytest.approx(4.0 / 4 / 4.5 ** 0.5)  # mean not moved to 0
