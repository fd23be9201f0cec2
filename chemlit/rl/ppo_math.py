"""PPO, one formula per function: small pure functions on tensors that you can step through.

Conventions used everywhere in this file:
* B = sequences in the batch, T = response tokens (the prompt is not here), V = vocabulary.
* ``mask`` is a (B, T) float or bool tensor, 1 on response tokens. A response occupies the leading
  positions of its row (right padding), so row b's last response token is ``mask[b].sum() - 1``.
* Nothing here changes its inputs, draws random numbers or knows about models: the stage
  (``chemlit.stages.ppo``) calls these in order -- token_rewards, gae, masked_whiten, then
  ``ppo_loss`` (policy_loss + value_loss + entropy + KL term) for each minibatch.
* Statistics over "the batch" take an optional ``reduce_sum``: with several data-parallel
  processes the stage passes an all-reduce, so a mean or variance is over every process's samples;
  alone it is the identity.

Where the KL penalty goes (``KLSpec.kind`` / ``KLSpec.where``): k1 in the detached reward, or k2
differentiated in the loss. Both have exactly the gradient of KL(π || π_ref) (on-policy); k3 in a
detached reward does not (its score-function gradient Σ π·k3·∇log π points anywhere), so k3 is only
used to *log* the KL's value. ``tests/test_kl_gradient.py`` checks this against autograd.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F

KLKind = Literal["k1", "k2", "k3"]
ReduceSum = Callable[[torch.Tensor], torch.Tensor]


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def masked_mean(x: torch.Tensor, mask: torch.Tensor, reduce_sum: ReduceSum = identity) -> torch.Tensor:
    """mean = sum(x * m) / sum(m), over all elements (of every process, with an all-reduce as
    ``reduce_sum``). A mask with no 1s gives 0 (not NaN)."""
    mask = mask.to(x.dtype)
    sums = reduce_sum(torch.stack([(x * mask).sum(), mask.sum()]))  # (2,) numerator, denominator
    return sums[0] / sums[1].clamp(min=1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor, reduce_sum: ReduceSum = identity) -> torch.Tensor:
    """Biased variance under the mask: masked_mean((x - masked_mean(x))²)."""
    mean = masked_mean(x, mask, reduce_sum)
    return masked_mean((x - mean) ** 2, mask, reduce_sum)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  reduce_sum: ReduceSum = identity) -> torch.Tensor:
    """whiten(x) = (x - mean) / sqrt(var + 1e-8), mean and (biased) var over the masked elements
    (of every process when ``reduce_sum`` is an all-reduce: the whole batch, not one shard of it).

    With ``shift_mean=False`` the mean is added back: only the scale changes. The formula is applied
    to every element; positions outside the mask carry values nobody reads (the losses mask them).
    """
    mean = masked_mean(x, mask, reduce_sum)                     # scalar
    var = masked_mean((x - mean) ** 2, mask, reduce_sum)        # scalar, biased
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def masked_scale(x: torch.Tensor, mask: torch.Tensor, reduce_sum: ReduceSum = identity) -> torch.Tensor:
    """x / sqrt(mean(x²) + 1e-8) over the masked elements (of every process): unit RMS, the mean kept.

    For advantages whose scores were already centred against a baseline (a molecule's group mean, or
    its greedy answer): whitening would centre them a second time.
    """
    return x * torch.rsqrt(masked_mean(x ** 2, mask, reduce_sum) + 1e-8)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(token_t) = log_softmax(logits_t)[token_t].   logits (B, T, V), tokens (B, T) -> (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)               # (B, T, V)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLKind = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from the sampled tokens (Schulman's k1, k2, k3).

    k1 = log π - log π_ref                       (unbiased, can be negative)
    k2 = ½ (log π - log π_ref)²                   (biased, >= 0)
    k3 = (r - 1) - log r,  r = π_ref / π          (unbiased, >= 0, low variance: what chemlit logs)

    As a *penalty*: k1 in the detached reward and k2 differentiated in the loss both give ∇KL;
    k3 is an estimate of the value only (see the module docstring).
    """
    log_ratio = logprobs - ref_logprobs  # (B, T)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio ** 2
    if kind == "k3":
        log_r = -log_ratio               # log(π_ref / π)
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r}; use k1, k2 or k3")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last response token (-1 for an empty row)."""
    return mask.long().sum(dim=1) - 1


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                  mask: torch.Tensor, kl_coef: float, kind: KLKind = "k1") -> torch.Tensor:
    """r_t = -kl_coef · kl_t on every response token, + scores[b] on row b's last response token.

    scores (B,), logprobs / ref_logprobs / mask (B, T) -> rewards (B, T), 0 where mask is 0.
    The task's reward arrives once, at the end; the KL penalty is paid token by token. The stage
    passes kind k1 (the penalty in the reward), or kl_coef 0 when the penalty is in the loss.
    """
    mask = mask.to(logprobs.dtype)
    rewards = -kl_coef * kl_estimate(logprobs, ref_logprobs, kind) * mask  # (B, T)
    last = last_token_index(mask)                                          # (B,)
    rows = torch.nonzero(last >= 0).squeeze(-1)                            # rows with a response
    rewards = rewards.index_put((rows, last[rows]), scores[rows].to(rewards.dtype), accumulate=True)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, right to left along each response.

    δ_t = r_t + γ · V_{t+1} · m_{t+1} - V_t
    A_t = δ_t + γλ · m_{t+1} · A_{t+1}          (V_T = A_T = 0 past the end)
    returns = A + V.  rewards, values, mask (B, T) -> (advantages, returns), both 0 where mask is 0.
    """
    mask = mask.to(values.dtype)
    T = rewards.size(1)
    advantages = torch.zeros_like(values)       # (B, T)
    next_value = torch.zeros_like(values[:, 0])  # (B,)  V_{t+1} · m_{t+1}
    next_advantage = torch.zeros_like(values[:, 0])  # (B,)  A_{t+1} · m_{t+1}
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]          # (B,)
        advantages[:, t] = delta + gamma * lam * next_advantage            # (B,)
        next_value = values[:, t] * mask[:, t]
        next_advantage = advantages[:, t] * mask[:, t]
    advantages = advantages * mask
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clipped surrogate objective (as a loss to minimise).

    ρ = exp(log π - log π_old)
    loss = masked_mean(max(-A · ρ, -A · clip(ρ, 1 - ε, 1 + ε)))
    clipfrac = masked share of tokens with |ρ - 1| > ε
    approx_kl = masked_mean(k3 between π_old and π) = masked_mean((ρ - 1) - log ρ)
    All inputs (B, T); returns three scalars.
    """
    log_ratio = logprobs - old_logprobs                                  # (B, T)
    ratio = torch.exp(log_ratio)                                         # (B, T)
    pg_loss_unclipped = -advantages * ratio                              # (B, T)
    pg_loss_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)  # (B, T)
    loss = masked_mean(torch.maximum(pg_loss_unclipped, pg_loss_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1.0).abs() > clip_range).to(ratio.dtype), mask)
        approx_kl = masked_mean(kl_estimate(old_logprobs, logprobs, "k3"), mask)
    return loss, clipfrac, approx_kl


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: ½ · masked_mean(max((V - R)², (clip(V, V_old - ε, V_old + ε) - R)²)).

    clipfrac = masked share of tokens where the clipped term is the larger one.
    All inputs (B, T); returns two scalars.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)  # (B, T)
    v_loss_unclipped = (values - returns) ** 2          # (B, T)
    v_loss_clipped = (values_clipped - returns) ** 2    # (B, T)
    loss = 0.5 * masked_mean(torch.maximum(v_loss_unclipped, v_loss_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((v_loss_clipped > v_loss_unclipped).to(values.dtype), mask)
    return loss, clipfrac


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """H_t = logsumexp(z_t) - Σ_v softmax(z_t)_v · z_t,v.   logits (B, T, V) -> (B, T)."""
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)                                          # (B, T, V)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)     # (B, T)


@dataclass
class LossSpec:
    """The weights and clip ranges of one minibatch's PPO loss."""

    clip_range: float = 0.2         # ε of the policy ratio
    clip_range_value: float = 0.2   # ε of the value update
    vf_coef: float = 0.1            # weight of the value loss
    ent_coef: float = 0.0           # weight of the entropy bonus
    kl_loss_coef: float = 0.0       # β of a k2 KL term in the loss (0 when the penalty is in the reward)
    anchor_coef: float = 0.0        # weight of the written rationale's negative log-likelihood (drift guard)


def ppo_loss(logprobs: torch.Tensor, values: torch.Tensor, old_logprobs: torch.Tensor, old_values: torch.Tensor,
             advantages: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, spec: LossSpec,
             ref_logprobs: Optional[torch.Tensor] = None, entropy: Optional[torch.Tensor] = None,
             anchor_logprobs: Optional[torch.Tensor] = None, anchor_mask: Optional[torch.Tensor] = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The whole PPO loss of one minibatch, and what to log about it (CleanRL's names).

    loss = policy_loss + vf_coef · value_loss - ent_coef · entropy + kl_loss_coef · masked_mean(k2)
           + anchor_coef · rationale_nll

    logprobs, values (b, T): the current policy and critic (with gradients); old_logprobs,
    old_values, advantages, returns, mask (b, T): from the rollout; ref_logprobs (b, T): the frozen
    reference (needed when kl_loss_coef > 0, where ½(log π - log π_ref)² is differentiated: its
    gradient is ∇KL(π || π_ref) on-policy); entropy (b, T): token entropies (``token_entropy``),
    or None when ent_coef is 0 and it is not logged. anchor_logprobs, anchor_mask (g, L): log-probs
    of the tokens of the molecules' *written* rationales (teacher-forced, the SFT targets) and 1 on
    those tokens: their mean negative log-likelihood, ``rationale_nll``, keeps the rationale the
    model writes from drifting while only the answer line is rewarded (InstructGPT's PPO-ptx, on the
    rationale alone). Returns the scalar loss and detached statistics.
    """
    pg_loss, clipfrac, approx_kl = policy_loss(logprobs, old_logprobs, advantages, mask, spec.clip_range)
    v_loss, v_clipfrac = value_loss(values, old_values, returns, mask, spec.clip_range_value)
    loss = pg_loss + spec.vf_coef * v_loss
    stats = {"policy_loss": pg_loss, "value_loss": v_loss, "clipfrac": clipfrac, "value_clipfrac": v_clipfrac,
             "approx_kl": approx_kl}
    if spec.ent_coef and entropy is None:
        raise ValueError("ppo_loss: ent_coef > 0 needs the token entropies")
    if entropy is not None:
        entropy_mean = masked_mean(entropy, mask)
        loss = loss - spec.ent_coef * entropy_mean
        stats["entropy"] = entropy_mean
    if spec.kl_loss_coef:
        if ref_logprobs is None:
            raise ValueError("ppo_loss: kl_loss_coef > 0 needs ref_logprobs")
        kl_loss = masked_mean(kl_estimate(logprobs, ref_logprobs, "k2"), mask)
        loss = loss + spec.kl_loss_coef * kl_loss
        stats["kl_loss"] = kl_loss
    if spec.anchor_coef:
        if anchor_logprobs is None or anchor_mask is None:
            raise ValueError("ppo_loss: anchor_coef > 0 needs anchor_logprobs and anchor_mask")
        rationale_nll = -masked_mean(anchor_logprobs, anchor_mask)
        loss = loss + spec.anchor_coef * rationale_nll
        stats["rationale_nll"] = rationale_nll
    with torch.no_grad():
        log_ratio = logprobs - old_logprobs
        stats["old_approx_kl"] = masked_mean(-log_ratio, mask)         # k1 between π_old and π
        stats["ratio_mean"] = masked_mean(torch.exp(log_ratio), mask)
    stats["loss"] = loss
    return loss, {name: value.detach() for name, value in stats.items()}


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                       reduce_sum: ReduceSum = identity) -> torch.Tensor:
    """1 - Var(target - predicted) / Var(target) under the mask: 1 = perfect values, <= 0 = useless."""
    return 1.0 - masked_var(target - predicted, mask, reduce_sum) / masked_var(target, mask, reduce_sum).clamp(min=1e-8)
