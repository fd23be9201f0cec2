"""RDKit 2D descriptors of molecules: what the random-forest baseline and the descriptor estimate
(``chemlit.data.estimates``) read."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from rdkit import Chem, RDLogger
from rdkit.Chem import Descriptors

from chemlit.data.cache import cache_path, digest, read_entry, text_array, text_list, write_entry

log = logging.getLogger(__name__)

# Bump when descriptor_matrix computes other numbers for the same RDKit: cached rows are keyed by it.
DESCRIPTORS_VERSION = 1


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
    """What a molecule's descriptor row depends on besides its SMILES."""
    from rdkit import rdBase

    return {"version": DESCRIPTORS_VERSION, "rdkit": rdBase.rdkitVersion, "names": descriptor_names()}


def cached_descriptor_matrix(smiles: Sequence[str], n_jobs: int | None = None) -> np.ndarray:
    """``descriptor_matrix(smiles)``, its rows kept per SMILES in the cache (one file per descriptor
    set: RDKit version and descriptor list): only molecules not seen before are computed."""
    smiles = list(smiles)
    about = descriptor_set()
    key = digest(about)
    path = cache_path("descriptors", f"rdkit-{about['rdkit']}-{key[:16]}.npz")
    entry = read_entry(path, key, "descriptors")
    known, rows = [], np.zeros((0, len(about["names"])), dtype=np.float32)
    if entry is not None:
        known = text_list(entry["smiles"])
        if entry["descriptors"].shape == (len(known), len(about["names"])) and len(set(known)) == len(known):
            rows = entry["descriptors"].astype(np.float32, copy=False)
        else:
            log.warning("descriptors: ignoring cache entry %s (its rows do not match its SMILES); recomputing", path)
            known = []
    index = {s: i for i, s in enumerate(known)}
    missing = sorted(set(smiles) - index.keys())
    if missing:
        log.info("descriptors: computing RDKit descriptors of %d molecules (%d more from cache %s)",
                 len(missing), len(set(smiles)) - len(missing), path)
        rows = np.concatenate([rows, descriptor_matrix(missing, n_jobs)])
        index.update((s, len(known) + i) for i, s in enumerate(missing))
        known = known + missing
        if write_entry(path, key, {"smiles": text_array(known), "descriptors": rows}, "descriptors"):
            log.info("descriptors: stored %d molecules' descriptors in %s", len(known), path)
    elif smiles:
        log.info("descriptors: %d molecules from cache %s", len(set(smiles)), path)
    return rows[[index[s] for s in smiles]]
