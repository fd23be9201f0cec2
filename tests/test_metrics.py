import math

import pytest
import torch

from chemlit.eval.metrics import PredictionMetrics


def test_metrics_match_hand_values():
    metrics = PredictionMetrics()
    # Second answer had no number (NaN); fourth molecule has no measured value and is ignored.
    metrics.update(torch.tensor([10.0, math.nan, 30.0]), torch.tensor([12.0, 5.0, 20.0]))
    metrics.update(torch.tensor([50.0, 7.0]), torch.tensor([40.0, math.nan]))
    out = {k: v.item() for k, v in metrics.compute().items()}
    errors = [-2.0, 10.0, 10.0]                      # pred - target over parsed answers
    assert out["parse_rate"] == pytest.approx(3 / 4)
    assert out["mae"] == pytest.approx(22 / 3)
    assert out["rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errors) / 3))
    targets = [12.0, 20.0, 40.0]
    mean = sum(targets) / 3
    ss_tot = sum((t - mean) ** 2 for t in targets)
    assert out["r2"] == pytest.approx(1 - sum(e * e for e in errors) / ss_tot)


def test_no_parsed_answer_gives_nan_not_an_error():
    metrics = PredictionMetrics()
    metrics.update(torch.tensor([math.nan]), torch.tensor([1.0]))
    out = metrics.compute()
    assert out["parse_rate"].item() == 0.0 and math.isnan(out["mae"].item())
