"""RDKit 2D descriptors of molecules: what the random-forest baseline and the descriptor estimate
(``chemlit.data.estimates``) read."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from rdkit import Chem, RDLogger
from rdkit.Chem import Descriptors

from chemlit.data.cache import cache_path, cached_per_smiles, digest, source_digest


def descriptor_names() -> list[str]:
    return [name for name, _ in Descriptors.descList]


def _descriptor_rows(smiles: Sequence[str]) -> list[list[float]]:
    RDLogger.DisableLog("rdApp.*")
    names = descriptor_names()
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


def descriptor_set() -> dict:
    """What a molecule's descriptor row depends on besides its SMILES: RDKit, its descriptor list, this code."""
    import sys

    from rdkit import rdBase

    return {"rdkit": rdBase.rdkitVersion, "names": descriptor_names(), "code": source_digest(sys.modules[__name__])}


def cached_descriptor_matrix(smiles: Sequence[str], n_jobs: int | None = None) -> np.ndarray:
    """``descriptor_matrix(smiles)``, its rows kept per SMILES in the cache (one file per descriptor
    set): only molecules not seen before are computed."""
    about = descriptor_set()
    key = digest(about)
    if not smiles:
        return np.zeros((0, len(about["names"])), dtype=np.float32)
    return cached_per_smiles(smiles, lambda missing: descriptor_matrix(missing, n_jobs),
                             cache_path("descriptors", f"rdkit-{about['rdkit']}-{key[:16]}.npz"), key, "descriptors")
