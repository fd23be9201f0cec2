"""What a chemist would compare a model to, on the same split: the training mean, a random forest on
RDKit descriptors, and gradient boosting on the same descriptors (the model behind
``data.descriptor_estimate``: a model given that estimate is compared with the estimate itself)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from chemlit.data.descriptors import descriptor_matrix
from chemlit.data.estimates import gradient_boosting

MEAN = "mean of training targets"
RANDOM_FOREST = "random forest on RDKit descriptors"
GRADIENT_BOOSTING = "gradient boosting on RDKit descriptors (the descriptor estimate)"


def train_test_records(table: str, split_file: str, held_out: str = "test"):
    """(train, held_out) records of a table ("builtin" or a path) under a run's splits.csv: the test
    molecules, or with held_out="val" the validation molecules that choices are made on."""
    from chemlit.data.records import read_table
    from chemlit.data.sources import ensure_melting_points
    from chemlit.data.splits import read_split

    records, _ = read_table(ensure_melting_points() if table == "builtin" else table)
    split = read_split(split_file)
    return ([r for r in records if split.get(r.smiles) == "train"],
            [r for r in records if split.get(r.smiles) == held_out])


def mean_baseline(train_targets: Sequence[float], n: int) -> np.ndarray:
    """Predict the training mean for every molecule."""
    return np.full(n, float(np.mean(train_targets)))


def _forest(n_estimators: int, seed: int, n_jobs: int = -1):
    from sklearn.ensemble import RandomForestRegressor

    return RandomForestRegressor(n_estimators=n_estimators, random_state=seed, n_jobs=n_jobs,
                                 min_samples_leaf=1, max_features=0.3)


def random_forest_baseline(train_smiles: Sequence[str], train_targets: Sequence[float],
                           test_smiles: Sequence[str], n_estimators: int = 300, seed: int = 0,
                           n_jobs: int = -1) -> np.ndarray:
    """Random forest (scikit-learn) on RDKit descriptors, trained on the training split."""
    forest = _forest(n_estimators, seed, n_jobs)
    forest.fit(descriptor_matrix(train_smiles), np.asarray(train_targets, dtype=float))
    return forest.predict(descriptor_matrix(test_smiles))


def descriptor_baselines(train_smiles: Sequence[str], train_targets: Sequence[float], test_smiles: Sequence[str],
                         n_estimators: int = 300, seed: int = 0) -> dict[str, np.ndarray]:
    """The random forest and the gradient boosting on RDKit descriptors (computed once), trained on the
    training split: {name: (N,) predictions}."""
    train_x, test_x = descriptor_matrix(train_smiles), descriptor_matrix(test_smiles)
    y = np.asarray(train_targets, dtype=float)
    return {RANDOM_FOREST: _forest(n_estimators, seed).fit(train_x, y).predict(test_x),
            GRADIENT_BOOSTING: gradient_boosting(seed).fit(train_x, y).predict(test_x)}


def main(argv: list[str] | None = None) -> None:
    """``python -m chemlit.eval.baselines --split-file runs/.../splits.csv``: baselines on a run's test split."""
    import argparse

    from chemlit.eval.bootstrap import bootstrap_mae

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--table", default="builtin", help="builtin or a table path (as data.table)")
    parser.add_argument("--split-file", required=True, help="splits.csv written by a run")
    parser.add_argument("--trees", type=int, default=300)
    args = parser.parse_args(argv)
    train, test = train_test_records(args.table, args.split_file)
    truth = np.array([r.target for r in test])
    predictions = {MEAN: mean_baseline([r.target for r in train], len(test)),
                   **descriptor_baselines([r.smiles for r in train], [r.target for r in train],
                                          [r.smiles for r in test], args.trees)}
    print(f"| baseline ({len(train)} train, {len(test)} test molecules) | MAE °C [95% CI] | RMSE °C |")
    print("|---|---|---|")
    for name, pred in predictions.items():
        errors = np.abs(pred - truth)
        print(f"| {name} | {bootstrap_mae(errors)} | {np.sqrt(np.mean(errors ** 2)):.1f} |")


if __name__ == "__main__":
    main()
