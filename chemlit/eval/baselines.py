"""What a chemist would compare a model to, on the same split: the training mean, and a random
forest on RDKit descriptors."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from rdkit import Chem, RDLogger
from rdkit.Chem import Descriptors


def _descriptor_rows(smiles: Sequence[str]) -> list[list[float]]:
    RDLogger.DisableLog("rdApp.*")
    names = [name for name, _ in Descriptors.descList]
    rows = []
    for s in smiles:
        values = Descriptors.CalcMolDescriptors(Chem.MolFromSmiles(s))
        rows.append([values.get(n, 0.0) for n in names])
    RDLogger.EnableLog("rdApp.*")
    return rows


def descriptor_matrix(smiles: Sequence[str], n_jobs: int | None = None) -> np.ndarray:
    """(N, D) matrix of all RDKit 2D descriptors; non-finite values become 0.

    About 7 ms per molecule on one core (the built-in table's 11.5k molecules: 80 s), so the rows
    are split over ``n_jobs`` processes (default: every core); the result does not depend on it.
    """
    smiles = list(smiles)
    n_jobs = max(1, min(n_jobs or os.cpu_count() or 1, len(smiles) // 100))
    if n_jobs == 1:
        rows = _descriptor_rows(smiles)
    else:  # spawn, not fork: the caller may hold torch's thread pools
        size = -(-len(smiles) // n_jobs)
        chunks = [smiles[i:i + size] for i in range(0, len(smiles), size)]
        with ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = [row for part in pool.map(_descriptor_rows, chunks) for row in part]
    matrix = np.asarray(rows, dtype=np.float64)
    matrix[~np.isfinite(matrix)] = 0.0
    return np.clip(matrix, -1e6, 1e6).astype(np.float32)


def train_test_records(table: str, split_file: str):
    """(train, test) records of a table ("builtin" or a path) under a run's splits.csv."""
    from chemlit.data.records import read_table
    from chemlit.data.sources import ensure_melting_points
    from chemlit.data.splits import read_split

    records, _ = read_table(ensure_melting_points() if table == "builtin" else table)
    split = read_split(split_file)
    return ([r for r in records if split.get(r.smiles) == "train"],
            [r for r in records if split.get(r.smiles) == "test"])


def mean_baseline(train_targets: Sequence[float], n: int) -> np.ndarray:
    """Predict the training mean for every molecule."""
    return np.full(n, float(np.mean(train_targets)))


def random_forest_baseline(train_smiles: Sequence[str], train_targets: Sequence[float],
                           test_smiles: Sequence[str], n_estimators: int = 300, seed: int = 0,
                           n_jobs: int = -1) -> np.ndarray:
    """Random forest (scikit-learn) on RDKit descriptors, trained on the training split."""
    from sklearn.ensemble import RandomForestRegressor

    forest = RandomForestRegressor(n_estimators=n_estimators, random_state=seed, n_jobs=n_jobs,
                                   min_samples_leaf=1, max_features=0.3)
    forest.fit(descriptor_matrix(train_smiles), np.asarray(train_targets, dtype=float))
    return forest.predict(descriptor_matrix(test_smiles))


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
    predictions = {
        "mean of training targets": mean_baseline([r.target for r in train], len(test)),
        "random forest on RDKit descriptors": random_forest_baseline(
            [r.smiles for r in train], [r.target for r in train], [r.smiles for r in test], args.trees),
    }
    print(f"| baseline ({len(train)} train, {len(test)} test molecules) | MAE °C [95% CI] | RMSE °C |")
    print("|---|---|---|")
    for name, pred in predictions.items():
        errors = np.abs(pred - truth)
        print(f"| {name} | {bootstrap_mae(errors)} | {np.sqrt(np.mean(errors ** 2)):.1f} |")


if __name__ == "__main__":
    main()
