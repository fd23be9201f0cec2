"""The critic: a scalar value head on the language model's last hidden state.

V(s_t) estimates the return (final score minus KL penalties) from the state "prompt plus the
first t response tokens". It starts at exactly zero (weights and bias), so the first advantages are
the rewards themselves and the head cannot disturb the policy before it has learned anything.
"""

from __future__ import annotations

import torch
from torch import nn


class ValueHead(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, H) -> values (B, T), computed in fp32 whatever the model's dtype (autocast off here)."""
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self.summary(hidden.float()).squeeze(-1)


def disable_dropout(module: nn.Module) -> int:
    """Set every dropout probability to 0 (PPO's ratios assume the same network each pass)."""
    count = 0
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0
            count += 1
    config = getattr(module, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    return count
