"""One report a chemist can trust: the model against the baselines, on the same molecules.

    python -m chemlit.eval.report --predictions runs/.../predictions.csv \
        --split-file runs/.../splits.csv [--compare other/predictions.csv] [--out report.md]

Reads a ``predictions.csv`` written by ``python -m chemlit predict`` on a run's test split, and
reports on exactly those molecules: MAE with a 95% bootstrap interval, RMSE, R² and parse rate for
the model; the same for the training-mean predictor, a random forest and gradient boosting (the
model of ``data.descriptor_estimate``) on RDKit descriptors trained on the run's training split; and paired-bootstrap differences of MAE (model minus
baseline; an interval that excludes zero is a real difference). For paired comparisons an answer
without a number is scored as if the model had predicted the training mean, and the report says
how many there were.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
from pathlib import Path

import numpy as np

from chemlit.data.files import write_whole
from chemlit.eval.baselines import MEAN, descriptor_baselines, mean_baseline, train_test_records
from chemlit.eval.bootstrap import bootstrap_mae, paired_bootstrap_delta


def read_predictions(path: str | Path) -> dict[str, float]:
    """{smiles: predicted °C or NaN} from a predictions.csv."""
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["smiles"]: float(row["prediction"]) if row["prediction"] else math.nan
                for row in csv.DictReader(handle)}


def read_intervals(path: str | Path) -> dict[str, tuple[float, float]]:
    """{smiles: (low, high)} from a predictions.csv with ``low``/``high`` columns (decoding=median); {} without."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "low" not in rows[0] or "high" not in rows[0]:
        return {}
    return {row["smiles"]: (float(row["low"]), float(row["high"])) for row in rows if row["low"] and row["high"]}


def interval_coverage(intervals: dict[str, tuple[float, float]], smiles: list[str], truth: np.ndarray) -> dict:
    """How often the measured value lies in [low, high] over the molecules that have an interval, and the
    intervals' median width."""
    have = [i for i, s in enumerate(smiles) if s in intervals]
    if not have:
        return {"n": 0, "coverage": math.nan, "median_width": math.nan}
    bounds = np.array([intervals[smiles[i]] for i in have])
    measured = truth[have]
    inside = (bounds[:, 0] <= measured) & (measured <= bounds[:, 1])
    return {"n": len(have), "coverage": float(inside.mean()), "median_width": float(np.median(bounds[:, 1] - bounds[:, 0]))}


def model_metrics(predicted: np.ndarray, truth: np.ndarray) -> dict:
    """MAE [95% CI], RMSE, R² over the answers with a number, and the parse rate."""
    parsed = ~np.isnan(predicted)
    if not parsed.any():
        return {"mae": math.nan, "mae_low": math.nan, "mae_high": math.nan, "rmse": math.nan, "r2": math.nan,
                "parse_rate": 0.0, "n": int(predicted.size)}
    errors = np.abs(predicted[parsed] - truth[parsed])
    interval = bootstrap_mae(errors)
    r2 = 1.0 - float(np.sum((predicted[parsed] - truth[parsed]) ** 2) / np.sum((truth[parsed] - truth[parsed].mean()) ** 2))
    return {"mae": interval.estimate, "mae_low": interval.low, "mae_high": interval.high,
            "rmse": float(np.sqrt(np.mean(errors ** 2))), "r2": r2, "parse_rate": float(parsed.mean()),
            "n": int(predicted.size)}


def blend_mae(predicted: np.ndarray, estimate: np.ndarray, truth: np.ndarray, weight: float) -> float:
    """MAE of w·model + (1 − w)·estimate over the answers with a number."""
    parsed = ~np.isnan(predicted)
    return float(np.mean(np.abs(weight * predicted[parsed] + (1.0 - weight) * estimate[parsed] - truth[parsed])))


def fit_blend_weight(predicted: np.ndarray, estimate: np.ndarray, truth: np.ndarray, steps: int = 10) -> float:
    """The w in 0, 1/steps, ..., 1 whose blend w·model + (1 − w)·estimate has the lowest MAE on these molecules
    (fit it on validation molecules, report it on test ones); the smaller w on a tie."""
    blends = {float(w): blend_mae(predicted, estimate, truth, w) for w in np.linspace(0.0, 1.0, steps + 1)}
    return min(blends, key=lambda w: (round(blends[w], 9), w))


def fit_stacking(predicted: np.ndarray, estimate: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Stacking by median regression: (c, a, b) minimising mean |c + a·estimate + b·model − truth| (the MAE the
    report scores), fitted on these molecules -- validation ones. A missing answer counts as the estimate."""
    from sklearn.linear_model import QuantileRegressor

    model = np.where(np.isnan(predicted), estimate, predicted)
    fit = QuantileRegressor(quantile=0.5, alpha=0.0, solver="highs").fit(np.column_stack([estimate, model]), truth)
    return np.array([fit.intercept_, *fit.coef_])


def apply_stacking(coefficients: np.ndarray, predicted: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """c + a·estimate + b·model for fit_stacking's (c, a, b); a missing answer counts as the estimate."""
    model = np.where(np.isnan(predicted), estimate, predicted)
    return coefficients[0] + coefficients[1] * estimate + coefficients[2] * model


def against_estimate(predicted: np.ndarray, estimate: np.ndarray, truth: np.ndarray, weight: float | None = None,
                     steps: int = 10) -> dict:
    """What a model adds to an estimate it was given (``data.descriptor_estimate``), on the answers with a number.

    mean_abs_deviation: how far its answers stray from the estimate. error_correlation: of the two error
    vectors (near 1: the model knows what the estimate knows and little else). ``weight``: the blend
    w·model + (1 − w)·estimate chosen elsewhere (on validation molecules): blend_mae is its MAE here.
    best_weight / best_blend_mae: the w of the lowest MAE on *these* molecules (0, 1/steps, ..., 1) -- an
    oracle, for diagnosis only. best_weight 0 means every step away from the estimate cost accuracy: the
    model's own corrections were noise.
    """
    parsed = ~np.isnan(predicted)
    p, e, y = predicted[parsed], estimate[parsed], truth[parsed]
    best = fit_blend_weight(p, e, y, steps)
    result = {"n": int(parsed.sum()), "mean_abs_deviation": float(np.mean(np.abs(p - e))),
              "error_correlation": float(np.corrcoef(p - y, e - y)[0, 1]), "best_weight": best,
              "best_blend_mae": blend_mae(p, e, y, best), "model_mae": blend_mae(p, e, y, 1.0),
              "estimate_mae": blend_mae(p, e, y, 0.0)}
    if weight is not None:
        result.update(weight=float(weight), blend_mae=blend_mae(p, e, y, weight))
    return result


def read_rationales(path: str | Path) -> dict[str, str]:
    """{smiles: the rationale the model wrote, without its answer line} from a predictions.csv."""
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["smiles"]: row.get("rationale", "").split("##Prediction")[0].strip()
                for row in csv.DictReader(handle)}


def rationale_facts(text: str) -> list[str]:
    """A rationale's facts: its parts between commas, semicolons and full stops ("donors 1", "mass 180")."""
    return [part.strip() for part in re.split(r"[,;.]\s+|[,;.]$", text.strip()) if part.strip()]


def rationale_fidelity(written: dict[str, str], reference: dict[str, str]) -> float:
    """The share of the reference rationales' facts that the written rationales state word for word,
    over the molecules both have (each molecule weighs the same). The reference is what the structure-only
    writer says of the molecule: a model that writes its own counts wrong, or drifts, scores lower."""
    shares = []
    for smiles, text in written.items():
        facts = rationale_facts(reference.get(smiles, ""))
        if facts:
            stated = set(rationale_facts(text))
            shares.append(sum(fact in stated for fact in facts) / len(facts))
    return float(np.mean(shares)) if shares else math.nan


def mae_cell(metrics: dict) -> str:
    """A model_metrics result's MAE as the report writes it: "29.0 [27.5, 30.5]"."""
    if metrics["parse_rate"] == 0:
        return "no answer with a number"
    return f"{metrics['mae']:.1f} [{metrics['mae_low']:.1f}, {metrics['mae_high']:.1f}]"


def _row(name: str, predicted: np.ndarray, truth: np.ndarray) -> str:
    m = model_metrics(predicted, truth)
    if m["parse_rate"] == 0:
        return f"| {name} | {mae_cell(m)} | – | – | 0.0% |"
    return f"| {name} | {mae_cell(m)} | {m['rmse']:.1f} | {m['r2']:.2f} | {m['parse_rate']:.1%} |"


def evaluation_columns(predictions: dict[str, dict[str, float]], split_file: str, table: str = "builtin",
                       trees: int = 300, held_out: str = "test"):
    """The test molecules (or with held_out="val" the validation molecules) the predictions cover, their
    truth, and every model's and baseline's answers."""
    train, test = train_test_records(table, split_file, held_out)
    first = next(iter(predictions.values()))
    test = [r for r in test if r.smiles in first]
    if not test:
        raise SystemExit("report: no test molecule of the split file is in the predictions")
    truth = np.array([r.target for r in test])
    mean = mean_baseline([r.target for r in train], len(test))
    columns = {name: np.array([p.get(r.smiles, math.nan) for r in test]) for name, p in predictions.items()}
    columns[MEAN] = mean
    columns.update(descriptor_baselines([r.smiles for r in train], [r.target for r in train],
                                        [r.smiles for r in test], trees))
    return train, test, truth, mean, columns


def build_report(predictions: dict[str, dict[str, float]], split_file: str, table: str = "builtin",
                 trees: int = 300, pairs: list[tuple[str, str]] | None = None, evaluated=None,
                 intervals: dict[str, dict[str, tuple[float, float]]] | None = None,
                 notes: list[str] | None = None, heading: str = "# Report", held_out: str = "test") -> str:
    """Markdown report. ``pairs`` lists (a, b) for paired ΔMAE = MAE(a) − MAE(b); by default the first
    model against every other model and baseline. ``evaluated``: a result of evaluation_columns
    (the forest is trained once when a caller needs the numbers twice). ``intervals``: per model, the
    (low, high) of each molecule, reported as coverage of the measured values. ``notes``: lines after the
    header (how the models answered). ``heading``: the Markdown heading it starts with. ``held_out``: the
    split the predictions answer (test, or val where a choice is being made)."""
    train, test, truth, mean, columns = evaluated or evaluation_columns(predictions, split_file, table, trees,
                                                                        held_out)
    which = "validation" if held_out == "val" else held_out
    lines = [f"{heading}: {len(test)} {which} molecules, {len(train)} training molecules", "",
             f"Split file: `{split_file}`. Intervals: 95% bootstrap over molecules (2,000 resamples).", ""]
    lines += [*notes, ""] if notes else []
    lines += ["| model | MAE °C [95% CI] | RMSE °C | R² | parse rate |", "|---|---|---|---|---|"]
    lines += [_row(name, values, truth) for name, values in columns.items()]
    lines += ["", "Paired differences of MAE on the same molecules (negative: the model is better):", "",
              "| comparison | ΔMAE °C [95% CI] | significant |", "|---|---|---|"]
    names = list(predictions)
    if pairs is None:
        pairs = [(names[0], other) for other in columns if other != names[0]]
    filled = {n: np.where(np.isnan(v), mean, v) for n, v in columns.items()}
    for first, other in pairs:
        delta = paired_bootstrap_delta(np.abs(filled[first] - truth), np.abs(filled[other] - truth))
        lines.append(f"| {first} − {other} | {delta} | {'yes' if delta.excludes_zero() else 'no'} |")
    smiles = [r.smiles for r in test]
    covered = {name: interval_coverage(bounds, smiles, truth) for name, bounds in (intervals or {}).items() if bounds}
    if covered:
        lines += ["", "Prediction intervals (`low`–`high` in predictions.csv) against the measured values:", "",
                  "| model | molecules with an interval | measured value inside | median width °C |", "|---|---|---|---|"]
        lines += [f"| {name} | {c['n']} | {c['coverage']:.1%} | {c['median_width']:.0f} |" for name, c in covered.items()]
    unparsed = {n: int(np.isnan(v).sum()) for n, v in columns.items() if np.isnan(v).any()}
    if unparsed:
        lines += ["", "Answers without a number, scored as the training mean in paired comparisons: "
                  + ", ".join(f"{n}: {k}" for n, k in unparsed.items()) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", required=True, help="predictions.csv of the model to report")
    parser.add_argument("--name", default="model", help="name of that model in the report")
    parser.add_argument("--compare", action="append", default=[], metavar="NAME=CSV",
                        help="another model's predictions.csv on the same molecules (repeatable)")
    parser.add_argument("--split-file", required=True)
    parser.add_argument("--table", default="builtin")
    parser.add_argument("--trees", type=int, default=300, help="trees of the random forest")
    parser.add_argument("--out", help="write the Markdown report here too (whole or not at all)")
    args = parser.parse_args(argv)
    files = {args.name: args.predictions}
    for item in args.compare:
        name, _, path = item.partition("=")
        files[name] = path
    predictions = {name: read_predictions(path) for name, path in files.items()}
    intervals = {name: read_intervals(path) for name, path in files.items()}
    report = build_report(predictions, args.split_file, args.table, args.trees, intervals=intervals)
    print(report)
    if args.out:
        write_whole(args.out, report)


if __name__ == "__main__":
    main()
