"""The KL penalty pulls the policy back towards the reference.

For small categorical policies (one-token answers, every answer enumerated, so the expectation over
the policy is exact, no sampling) this runs what the stage runs to turn log-probs into the KL part of
the objective -- ``token_rewards`` -> ``gae`` -> ``ppo_loss`` for the penalty in the reward, or
``ppo_loss``'s KL term for the penalty in the loss -- differentiates it, and compares the expected
gradient with autograd's ∇ β·KL(π || π_ref). (The stage also whitens advantages over the batch: an
affine map with a positive scale, which keeps this direction; it is left out here.)
"""

import pytest
import torch

from chemlit.rl import ppo_math as pm
from chemlit.rl.kl import KLSpec

V, BETA = 6, 0.05


def drifted_policies(n: int = 20):
    """(policy logits, reference logits) pairs: a random reference and a policy drifted away from it."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(n):
        reference = torch.randn(V, generator=generator)
        yield reference + 1.5 * torch.randn(V, generator=generator), reference


def expected_penalty_gradient(policy_logits: torch.Tensor, reference_logits: torch.Tensor, kind: str,
                              where: str) -> torch.Tensor:
    """Σ_a π(a) · ∇(the stage's objective for the one-token answer a), with the task score 0."""
    theta = policy_logits.clone().requires_grad_(True)
    probs = torch.softmax(theta, -1).detach()
    mask, values, score = torch.ones(1, 1), torch.zeros(1, 1), torch.zeros(1)
    gradient = torch.zeros(V)
    for answer in range(V):
        tokens = torch.tensor([[answer]])
        logprobs = pm.logprobs_from_logits(theta[None, None], tokens)                  # (1, 1) with gradient
        ref_logprobs = pm.logprobs_from_logits(reference_logits[None, None], tokens)   # (1, 1)
        old_logprobs = logprobs.detach()                                               # on-policy: ratio 1
        if where == "reward":  # -β·KL in the detached per-token reward, then GAE, then the clipped loss
            rewards = pm.token_rewards(score, old_logprobs, ref_logprobs, mask, BETA, kind)
            advantages, returns = pm.gae(rewards, values, mask, gamma=1.0, lam=0.95)
            spec = pm.LossSpec(vf_coef=0.0)
        else:                  # no KL in the reward; β·k2 differentiated in the loss
            advantages, returns = torch.zeros(1, 1), torch.zeros(1, 1)
            spec = pm.LossSpec(vf_coef=0.0, kl_loss_coef=BETA)
        loss, _ = pm.ppo_loss(logprobs, values, old_logprobs, values, advantages, returns, mask, spec,
                              ref_logprobs=ref_logprobs)
        gradient += probs[answer] * torch.autograd.grad(loss, theta)[0]
    return gradient


def true_kl_gradient(policy_logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    theta = policy_logits.clone().requires_grad_(True)
    logp, ref_logp = torch.log_softmax(theta, -1), torch.log_softmax(reference_logits, -1)
    kl = (logp.exp() * (logp - ref_logp)).sum()                                       # KL(π || π_ref)
    return torch.autograd.grad(BETA * kl, theta)[0]


def agreement(kind: str, where: str) -> list[tuple[float, float]]:
    """(cosine, norm ratio) of the penalty's gradient against ∇ β·KL for each drifted policy."""
    out = []
    for policy, reference in drifted_policies():
        mine, truth = expected_penalty_gradient(policy, reference, kind, where), true_kl_gradient(policy, reference)
        out.append((torch.nn.functional.cosine_similarity(mine, truth, dim=0).item(),
                    (mine.norm() / truth.norm()).item()))
    return out


@pytest.mark.parametrize("kind, where", sorted({(s.kind, s.where) for s in (KLSpec(), KLSpec(kind="k2", where="loss"))}))
def test_every_allowed_penalty_has_the_gradient_of_the_kl(kind, where):
    for cosine, ratio in agreement(kind, where):
        assert cosine >= 0.999 and ratio == pytest.approx(1.0, abs=0.01), (cosine, ratio)


def test_k3_as_a_detached_reward_does_not_follow_the_kl_gradient_and_is_refused():
    results = agreement("k3", "reward")
    bad = [(c, r) for c, r in results if c < 0.999 or abs(r - 1.0) > 0.01]
    assert len(bad) >= len(results) // 2, results         # most drifted policies get a wrong pull...
    assert any(c < 0 for c, _ in results), results        # ...some of them away from the reference
    for kind, where in (("k3", "reward"), ("k2", "reward"), ("k1", "loss"), ("k3", "loss")):
        with pytest.raises(ValueError, match="does not pull the policy towards the reference"):
            KLSpec(kind=kind, where=where)


def test_default_penalty_is_k1_in_the_reward():
    assert (KLSpec().kind, KLSpec().where) == ("k1", "reward")
