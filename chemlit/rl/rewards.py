"""From sampled answers to scores: parse the number, measure the error, grade it by harshness.

The grade of one answer with error e at the curriculum's tolerance ``tolerance_c`` (``kernel``):

    hyperbolic (default):  reward = tolerance_c / (tolerance_c + e)
    linear_floor (seed):   reward = max(1 - e / tolerance_c, -1)

PPO sees scores after group centring and scaling to unit RMS, which erase any affine change of the
reward. ``linear_floor`` -- the reward of the run we build on -- is linear up to its floor, so moving
its tolerance only rescales it (nothing new to learn) and moves where the floor begins (every answer
beyond twice the tolerance scores the same, as low as no answer). ``hyperbolic`` changes *shape*
with the tolerance: lenient (large tolerance) it is nearly linear, 1 - e/tolerance; strict (small
tolerance) it is nearly tolerance/e, where halving an error of 10 °C matters as much as halving one of
100 °C. It is strictly decreasing in the error at every level, never flat, in (0, 1], so any parsed
number scores above the negative ``no_answer_penalty``.

Two objectives (``objective``):

    sample:       each answer is scored by its own grade (above).
    kernel_score: the molecule's K answers are scored together, as the distribution the product
                  answers with (their median and interval). Its kernel score, with the grade as kernel,
                      S = 1/2 mean_ij k(x_i, x_j) - mean_i k(x_i, y) + 1/2,   k(a, b) = tol / (tol + |a - b|)
                  (a proper scoring rule: 1/2 ||mean_i phi(x_i) - phi(y)||^2 in the kernel's feature
                  space, in [0, 1], lower is better; for a lenient tolerance S ~ CRPS / tolerance), is
                  shared out by leave-one-out credit: sample i scores S(group without i) - S(group),
                  how much better the group's distribution is with it (Distribution-Aware Reward,
                  arXiv 2605.20740). Unlike the grade, a credit is not monotone in the sample's own
                  error: a far sample that widens a too-narrow group earns back some credit (that
                  is what keeps the K samples from collapsing onto one number).

An answer with no number, or one that never finished (no end token), gets ``no_answer_penalty``
(below every parsed answer's score in both objectives). The curriculum (``chemlit.rl.curriculum``)
moves the tolerance from lenient to strict: it grades both objectives, since both use the kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch

from chemlit.data.prompts import parse_prediction
from chemlit.rl.ppo_math import ReduceSum, identity, masked_mean

Normalization = Literal["none", "batch", "group", "greedy"]
Kernel = Literal["hyperbolic", "linear_floor"]
Objective = Literal["sample", "kernel_score"]


@dataclass
class RewardSpec:
    """How answers are scored."""

    kernel: Kernel = "hyperbolic"
    """Grade of one answer: hyperbolic = tolerance / (tolerance + error) (its shape follows the
    curriculum's tolerance); linear_floor = max(1 - error / tolerance, -1), the seed run's reward."""
    objective: Objective = "sample"
    """sample: each answer scored alone by its grade; kernel_score: the K answers of a molecule
    scored as a distribution (kernel score with the grade as kernel), leave-one-out credit per answer."""
    no_answer_penalty: float = -1.0
    """Score of an answer with no parseable number, or that hit max_new_tokens without ending. With
    kernel hyperbolic it must be < 0 and with objective kernel_score <= -1: below every parsed answer."""
    success_reward: float = 0.5
    """A sample counts as a success at its harshness level when its grade reaches this (0.5 = error
    within the tolerance for hyperbolic, within half of it for linear_floor). The curriculum watches
    the success rate."""
    normalize: Normalization = "group"
    """Score normalisation before PPO: none; batch = whiten over all samples; group = subtract the
    mean of the samples of the same molecule, then scale the deviations to unit RMS (a per-prompt baseline:
    'which of my K answers was better', the signal single-sample whitening threw away); greedy =
    subtract the reward of the molecule's greedy answer (self-critical training: a sample is good
    when it beats what greedy decoding would answer, so the update moves the greedy answer)."""

    def __post_init__(self):
        if self.kernel not in ("hyperbolic", "linear_floor"):
            raise ValueError(f"reward.kernel must be hyperbolic or linear_floor, got {self.kernel!r}")
        if self.objective not in ("sample", "kernel_score"):
            raise ValueError(f"reward.objective must be sample or kernel_score, got {self.objective!r}")
        if self.objective == "kernel_score" and self.kernel != "hyperbolic":
            raise ValueError("reward.objective kernel_score needs reward.kernel hyperbolic (a proper kernel)")
        # parsed answers score in (0, 1] (hyperbolic grade) or (-1, 1) (leave-one-out credit)
        if self.objective == "kernel_score" and self.no_answer_penalty > -1:
            raise ValueError(f"reward.no_answer_penalty {self.no_answer_penalty} must be <= -1 with objective "
                             "kernel_score: a credit can be as low as -1, and no answer must score below any number")
        if self.kernel == "hyperbolic" and self.no_answer_penalty >= 0:
            raise ValueError(f"reward.no_answer_penalty {self.no_answer_penalty} must be < 0 with kernel "
                             "hyperbolic: every parsed answer scores above 0, and no answer must score below it")


def graded_reward(error_c: float, tolerance_c: float, kernel: Kernel = "hyperbolic") -> float:
    """The grade of one answer: hyperbolic tolerance / (tolerance + error), 1 at zero error, 1/2 at the
    tolerance, > 0 always; linear_floor max(1 - error / tolerance, -1), 0 at the tolerance, -1 from twice it."""
    if kernel == "hyperbolic":
        return tolerance_c / (tolerance_c + error_c)
    if kernel == "linear_floor":
        return max(1.0 - error_c / tolerance_c, -1.0)
    raise ValueError(f"unknown reward kernel {kernel!r}")


def kernel_score(samples: torch.Tensor, target: torch.Tensor, tolerance_c: float,
                 weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Kernel score of the empirical distribution of ``samples`` (G, K) against ``target`` (G,) -> (G,).

        S = 1/2 sum_ij w_i w_j k(x_i, x_j) / n^2 - sum_i w_i k(x_i, y) / n + 1/2,   n = sum_i w_i
        k(a, b) = tolerance / (tolerance + |a - b|)

    ``weights`` (G, K) of 0/1 select the samples (default all); a group with none scores 1, the worst
    a distribution can. Lower is better; 0 only when every sample equals the target.
    """
    weights = torch.ones_like(samples) if weights is None else weights.to(samples)    # (G, K)
    x = torch.where(weights > 0, samples, torch.zeros_like(samples))                 # (G, K) no NaN into k
    k_xx = tolerance_c / (tolerance_c + (x[:, :, None] - x[:, None, :]).abs())       # (G, K, K)
    k_xy = tolerance_c / (tolerance_c + (x - target[:, None]).abs())                 # (G, K)
    n = weights.sum(1)                                                               # (G,)
    pairs = torch.einsum("gi,gij,gj->g", weights, k_xx, weights)                     # (G,)
    score = 0.5 * pairs / n.clamp(min=1) ** 2 - (weights * k_xy).sum(1) / n.clamp(min=1) + 0.5
    return torch.where(n > 0, score, torch.ones_like(score))


def leave_one_out_credit(samples: torch.Tensor, target: torch.Tensor, tolerance_c: float,
                         answered: torch.Tensor) -> torch.Tensor:
    """Each answered sample's share of its group's kernel score: S(group without i) - S(group). (G, K).

    ``samples`` (G, K) numbers, ``answered`` (G, K) bool (False: no number; not part of the
    distribution, its credit is 0 here and the caller gives it the penalty). Positive: the group's
    distribution is better with sample i. A group's only answered sample gets 1 - S({x}) = k(x, y),
    its own grade; the credit lies in (-1, 1).
    """
    weights = answered.to(samples.dtype)                                             # (G, K)
    whole = kernel_score(samples, target, tolerance_c, weights)                      # (G,)
    K = samples.size(1)
    without = torch.stack([kernel_score(samples, target, tolerance_c,
                                        weights * (torch.arange(K, device=samples.device) != i))
                           for i in range(K)], dim=1)                                # (G, K) S(group without i)
    return (without - whole[:, None]) * weights


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
                  tolerance_c: float, spec: RewardSpec, group_size: int = 1) -> ScoredAnswers:
    """Score decoded answers against measured values at one harshness level.

    ``rewards`` is what PPO optimises (spec.objective: each answer's grade, or its leave-one-out
    credit in its group of ``group_size`` consecutive answers); ``successes`` always read the grade.
    """
    predictions, errors, grades = [], [], []
    for text, done, target in zip(texts, finished, targets):
        value = parse_prediction(text) if done else None
        error = None if value is None else abs(value - target)
        predictions.append(value)
        errors.append(error)
        grades.append(None if error is None else graded_reward(error, tolerance_c, spec.kernel))
    answered = torch.tensor([g is not None for g in grades])                        # (B,)
    if spec.objective == "kernel_score":
        numbers = torch.tensor([math.nan if p is None else p for p in predictions], dtype=torch.float64)
        measured = torch.tensor(list(targets), dtype=torch.float64)[::group_size]
        credit = leave_one_out_credit(numbers.view(-1, group_size), measured, tolerance_c,
                                      answered.view(-1, group_size)).reshape(-1)   # (B,)
    else:
        credit = torch.tensor([0.0 if g is None else g for g in grades], dtype=torch.float64)
    rewards = torch.where(answered, credit, torch.full_like(credit, spec.no_answer_penalty)).float()
    successes = [g is not None and g >= spec.success_reward for g in grades]
    return ScoredAnswers(rewards, predictions, errors, successes)


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
