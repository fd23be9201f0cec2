"""Parity plot: predicted against measured melting point, for TensorBoard and reports."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display: figures go to TensorBoard or files
import matplotlib.pyplot as plt  # noqa: E402


def parity_figure(predicted: Sequence[float], measured: Sequence[float], title: str = "", ax=None):
    """A square scatter of predicted vs measured (°C) with the y = x line and the MAE in the title.

    Draws into ``ax`` when given (several panels in one figure), else into a new figure.
    """
    pairs = [(p, m) for p, m in zip(predicted, measured) if p == p and m == m]  # drop NaN
    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100) if ax is None else (ax.figure, ax)
    if pairs:
        p, m = zip(*pairs)
        low, high = min(min(p), min(m)), max(max(p), max(m))
        ax.plot([low, high], [low, high], color="grey", linewidth=1)
        ax.scatter(m, p, s=6, alpha=0.5)
        mae = sum(abs(a - b) for a, b in pairs) / len(pairs)
        title = f"{title}  MAE {mae:.1f} °C, n={len(pairs)}".strip()
    ax.set_xlabel("measured melting point (°C)")
    ax.set_ylabel("predicted (°C)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig
