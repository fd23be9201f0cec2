"""From a sampled answer to a score: parse the number, measure the error, grade it by harshness.

    reward = max(1 - |prediction - measured| / tolerance_c, -1)

1 for an exact answer, 0 at an error of ``tolerance_c``, floored at -1 (from twice the tolerance).
A small tolerance is a harsh grader, a large one a lenient grader; the curriculum
(``chemlit.rl.curriculum``) moves the tolerance from lenient to strict. An answer with no number,
or one that never finished (no end token), gets a fixed ``no_answer_penalty``.

The work we build on used a fixed tolerance of 50 °C from step one with a model whose typical
error was about 50 °C: almost every sample scored near 0 and nothing could be learned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch

from chemlit.data.prompts import parse_prediction
from chemlit.rl.ppo_math import ReduceSum, identity, masked_mean

Normalization = Literal["none", "batch", "group", "greedy"]


@dataclass
class RewardSpec:
    """How answers are scored."""

    no_answer_penalty: float = -1.0
    """Score of an answer with no parseable number, or that hit max_new_tokens without ending."""
    success_reward: float = 0.5
    """A sample counts as a success at its harshness level when its reward reaches this
    (0.5 = error within half the tolerance). The curriculum watches the success rate."""
    normalize: Normalization = "group"
    """Score normalisation before PPO: none; batch = whiten over all samples; group = subtract the
    mean of the samples of the same molecule, then scale the deviations to unit std (a per-prompt baseline:
    'which of my K answers was better', the signal single-sample whitening threw away); greedy =
    subtract the reward of the molecule's greedy answer (self-critical training: a sample is good
    when it beats what greedy decoding would answer, so the update moves the greedy answer)."""


def graded_reward(error_c: float, tolerance_c: float) -> float:
    """max(1 - error / tolerance, -1): 1 at zero error, 0 at the tolerance, -1 from twice it."""
    return max(1.0 - error_c / tolerance_c, -1.0)


@dataclass
class ScoredAnswers:
    """What scoring a batch of sampled answers found. All lists are per sample."""

    rewards: torch.Tensor           # (B,) graded reward or the penalty
    predictions: list[Optional[float]]
    errors: list[Optional[float]]   # |prediction - measured|, None without a number
    successes: list[bool]

    @property
    def parse_rate(self) -> float:
        return sum(p is not None for p in self.predictions) / max(len(self.predictions), 1)

    @property
    def mae(self) -> float:
        errors = [e for e in self.errors if e is not None]
        return sum(errors) / len(errors) if errors else math.nan


def score_answers(texts: Sequence[str], finished: Sequence[bool], targets: Sequence[float],
                  tolerance_c: float, spec: RewardSpec) -> ScoredAnswers:
    """Score decoded answers against measured values at one harshness level."""
    rewards, predictions, errors, successes = [], [], [], []
    for text, done, target in zip(texts, finished, targets):
        value = parse_prediction(text) if done else None
        if value is None:
            reward, error = spec.no_answer_penalty, None
        else:
            error = abs(value - target)
            reward = graded_reward(error, tolerance_c)
        rewards.append(reward)
        predictions.append(value)
        errors.append(error)
        successes.append(reward >= spec.success_reward)
    return ScoredAnswers(torch.tensor(rewards, dtype=torch.float32), predictions, errors, successes)


def normalize_scores(scores: torch.Tensor, group_size: int, how: Normalization,
                     baseline: Optional[torch.Tensor] = None, reduce_sum: ReduceSum = identity) -> torch.Tensor:
    """scores (B,) with consecutive groups of ``group_size`` samples of one prompt -> (B,).

    none: unchanged. batch: (s - mean) / std over the batch. group: d = s - mean of its group, then
    d / rms(d) over the batch (one scale for all groups, so a group whose K answers all scored the
    same gives 0 -- nothing to learn there -- and never NaN). greedy: d = s - baseline of its group
    (``baseline``: (prompts,), the reward of each prompt's greedy answer), then d / rms(d) over the
    batch -- scaled but not centred, so 'better than greedy' stays positive. "The batch" is every
    process's samples when ``reduce_sum`` is an all-reduce (``ppo_math.masked_mean``); baselines
    stay per prompt.
    """
    everything = torch.ones_like(scores)

    def rms(x: torch.Tensor) -> torch.Tensor:
        return masked_mean(x ** 2, everything, reduce_sum).sqrt().clamp(min=1e-6)

    if how == "none":
        return scores
    if how == "greedy":
        if baseline is None or baseline.numel() * group_size != scores.numel():
            raise ValueError(f"greedy normalisation needs one baseline reward per group of {group_size} samples")
        centred = scores - baseline.to(scores).repeat_interleave(group_size)   # (B,)
        return centred / rms(centred)
    if how == "batch":
        centred = scores - masked_mean(scores, everything, reduce_sum)         # (B,)
        return centred / rms(centred)
    if how == "group":
        if scores.numel() % group_size:
            raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
        grouped = scores.view(-1, group_size)                       # (prompts, K)
        centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)   # (B,)
        return centred / rms(centred)
    raise ValueError(f"unknown score normalisation {how!r}; use none, batch, group or greedy")
