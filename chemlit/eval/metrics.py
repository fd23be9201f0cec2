"""How good the predicted numbers are: torchmetrics for MAE, RMSE and R², plus the parse rate.

A generation without a number still counts: it lowers the parse rate, and MAE/RMSE/R² are over the
answers that have one. Report both -- a model that answers only the easy molecules looks good on
MAE alone.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredError, Metric, MetricCollection, R2Score


class PredictionMetrics(Metric):
    """Accumulates (prediction, target) pairs where a prediction may be NaN (= no number)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.regression = MetricCollection({
            "mae": MeanAbsoluteError(),
            "rmse": MeanSquaredError(squared=False),
            "r2": R2Score(),
        })
        self.parse_rate = MeanMetric()

    def update(self, predictions: torch.Tensor, targets: torch.Tensor) -> None:  # (B,), (B,)
        predictions, targets = predictions.float().flatten(), targets.float().flatten()
        known = ~torch.isnan(targets)
        predictions, targets = predictions[known], targets[known]
        parsed = ~torch.isnan(predictions)
        self.parse_rate.update(parsed.float())
        if parsed.any():
            self.regression.update(predictions[parsed], targets[parsed])

    def compute(self) -> dict[str, torch.Tensor]:
        out = {"parse_rate": self.parse_rate.compute()}
        counted = self.regression["mae"].total
        for name, metric in self.regression.items():
            needs = 2 if name == "r2" else 1
            out[name] = metric.compute() if counted >= needs else torch.tensor(math.nan)
        return out

    def reset(self) -> None:
        super().reset()
        self.regression.reset()
        self.parse_rate.reset()
