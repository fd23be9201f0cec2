"""How strongly the policy is held to the frozen reference: a fixed or an adaptive KL coefficient β.

The adaptive controller (Ziegler et al. 2019) nudges β so the measured KL tracks a target:

    error = clip(KL / target - 1, -0.2, 0.2)
    β ← β · (1 + error · n / horizon)

``n`` is the number of samples in the update and ``horizon`` is in samples too. The run we build on
used n = 1 with horizon 10,000, so β moved by at most 0.002 % per step and never moved at all;
with 128 samples per update and a horizon of 2,000 it can change by ~1 % per update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from chemlit.rl.ppo_math import KLKind

# (estimator, where) pairs whose gradient is ∇KL(π || π_ref); tests/test_kl_gradient.py checks both
# against autograd, and shows k3 in the reward failing.
UNBIASED_PENALTIES = {("k1", "reward"), ("k2", "loss")}


@dataclass
class KLSpec:
    """The KL penalty to the frozen reference model."""

    coef: float = 0.02
    """β at the start (fixed controller: always)."""
    controller: Literal["fixed", "adaptive"] = "fixed"
    """fixed: β stays at coef. adaptive: β follows the measured KL towards `target`."""
    target: float = 1.0
    """adaptive: desired KL per sequence (sum over its tokens), in nats."""
    horizon: int = 2000
    """adaptive: samples over which a full correction is applied (counted in samples, not steps)."""
    kind: KLKind = "k1"
    """Per-token estimator of the penalty: k1 = log π - log π_ref (with where=reward) or
    k2 = ½(log π - log π_ref)² (with where=loss). k3 is only logged (ppo/kl_per_sequence)."""
    where: Literal["reward", "loss"] = "reward"
    """reward: -β·k1 is added to each token's detached reward (TRL, OpenRLHF, verl).
    loss: β·mean(k2) is added to the minibatch loss and differentiated."""

    def __post_init__(self) -> None:
        if (self.kind, self.where) not in UNBIASED_PENALTIES:
            raise ValueError(
                f"kl.kind={self.kind} with kl.where={self.where} does not pull the policy towards the reference "
                "(its gradient is not that of KL(policy || reference)); use kind=k1 where=reward (the default) "
                "or kind=k2 where=loss. The KL's value is logged with k3 either way.")


class KLController:
    """β with a state that goes into checkpoints. ``update`` is called once per PPO iteration."""

    def __init__(self, spec: KLSpec):
        self.spec = spec
        self.value = spec.coef

    def update(self, kl_per_sequence: float, n_samples: int) -> float:
        if self.spec.controller == "adaptive":
            error = min(max(kl_per_sequence / self.spec.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_samples / self.spec.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
