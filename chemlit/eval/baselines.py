"""What a chemist would compare a model to, on the same split: the training mean, and a random
forest on RDKit descriptors."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rdkit import Chem, RDLogger
from rdkit.Chem import Descriptors


def descriptor_matrix(smiles: Sequence[str]) -> np.ndarray:
    """(N, D) matrix of all RDKit 2D descriptors; non-finite values become 0."""
    RDLogger.DisableLog("rdApp.*")
    names = [name for name, _ in Descriptors.descList]
    rows = []
    for s in smiles:
        values = Descriptors.CalcMolDescriptors(Chem.MolFromSmiles(s))
        rows.append([values.get(n, 0.0) for n in names])
    RDLogger.EnableLog("rdApp.*")
    matrix = np.asarray(rows, dtype=np.float64)
    matrix[~np.isfinite(matrix)] = 0.0
    return np.clip(matrix, -1e6, 1e6).astype(np.float32)


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
