"""PPO, one formula per function: small pure functions on tensors that you can step through.

Conventions used everywhere in this file:
* B = sequences in the batch, T = response tokens (the prompt is not here), V = vocabulary.
* ``mask`` is a (B, T) float or bool tensor, 1 on response tokens. A response occupies the leading
  positions of its row (right padding), so row b's last response token is ``mask[b].sum() - 1``.
* Nothing here changes its inputs, draws random numbers or knows about models: the stage
  (``chemlit.stages.ppo``) calls these in order -- token_rewards, gae, masked_whiten, then
  policy_loss + value_loss + entropy_from_logits for each minibatch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

KLKind = Literal["k1", "k2", "k3"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean = sum(x * m) / sum(m), over all elements. A mask with no 1s gives 0 (not NaN)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1e-8)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Biased variance under the mask: masked_mean((x - masked_mean(x))²)."""
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """whiten(x) = (x - mean) / sqrt(var + 1e-8), mean and (biased) var over the masked elements.

    With ``shift_mean=False`` the mean is added back: only the scale changes. The formula is applied
    to every element; positions outside the mask carry values nobody reads (the losses mask them).
    """
    mean = masked_mean(x, mask)                 # scalar
    var = masked_var(x, mask)                   # scalar
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)  # (B, T)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log π(token_t) = log_softmax(logits_t)[token_t].   logits (B, T, V), tokens (B, T) -> (B, T)."""
    logp = F.log_softmax(logits.float(), dim=-1)               # (B, T, V)
    return logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: KLKind = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π || π_ref) from the sampled tokens (Schulman's k1, k2, k3).

    k1 = log π - log π_ref                       (unbiased, can be negative)
    k2 = ½ (log π - log π_ref)²                   (biased, >= 0)
    k3 = (r - 1) - log r,  r = π_ref / π          (unbiased, >= 0, low variance)
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
    The task's reward arrives once, at the end; the KL penalty is paid token by token.
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


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked mean of the token entropy H_t = logsumexp(z_t) - Σ_v softmax(z_t)_v · z_t,v.

    logits (B, T, V), mask (B, T) -> scalar.
    """
    logits = logits.float()
    probs = F.softmax(logits, dim=-1)                                          # (B, T, V)
    entropy = torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)  # (B, T)
    return masked_mean(entropy, mask)


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var(target - predicted) / Var(target) under the mask: 1 = perfect values, <= 0 = useless."""
    return 1.0 - masked_var(target - predicted, mask) / masked_var(target, mask).clamp(min=1e-8)
