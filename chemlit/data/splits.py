"""Seeded random, Murcko-scaffold and out-of-source splits, written to and read from the run directory.

A split file is a CSV with columns ``smiles,split`` (``train`` / ``val`` / ``test``). Later stages
and evaluation read it back (``data.split_file``) so that every stage sees exactly the same
molecules, whatever happens to the table or the seed in between.
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from rdkit import Chem
from rdkit.Chem.Scaffolds import MurckoScaffold

SplitKind = Literal["random", "scaffold", "source"]
SPLIT_NAMES = ("train", "val", "test")


def _counts(n: int, fractions: Sequence[float]) -> tuple[int, int]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    n_val, n_test = int(round(n * fractions[1])), int(round(n * fractions[2]))
    return n_val, n_test


def random_split(smiles: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> dict[str, str]:
    """Shuffle with ``seed`` and cut: {smiles: split}."""
    n_val, n_test = _counts(len(smiles), fractions)
    order = sorted(smiles)  # independent of table order
    random.Random(seed).shuffle(order)
    assignment = {s: "test" for s in order[:n_test]}
    assignment.update({s: "val" for s in order[n_test:n_test + n_val]})
    assignment.update({s: "train" for s in order[n_test + n_val:]})
    return assignment


def murcko_scaffold(smiles: str) -> str:
    """Bemis-Murcko scaffold SMILES; '' for acyclic molecules."""
    mol = Chem.MolFromSmiles(smiles)
    return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False) if mol is not None else ""


def scaffold_split(smiles: Sequence[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> dict[str, str]:
    """Whole scaffold groups go to one split, so test scaffolds are never seen in training.

    Groups bigger than half the test share (the acyclic group, benzene...) always go to train --
    otherwise a single group could fill the test set; the rest are shuffled with ``seed`` and
    dealt to test and val until each is full.
    """
    n_val, n_test = _counts(len(smiles), fractions)
    groups: dict[str, list[str]] = {}
    for s in sorted(smiles):
        groups.setdefault(murcko_scaffold(s), []).append(s)
    big = [g for g in groups.values() if len(g) > n_test / 2]
    small = sorted((g for g in groups.values() if len(g) <= n_test / 2), key=lambda g: g[0])
    random.Random(seed).shuffle(small)
    assignment = {s: "train" for g in big for s in g}
    filled = {"test": 0, "val": 0}
    wanted = {"test": n_test, "val": n_val}
    for group in small:
        target = next((k for k in ("test", "val") if filled[k] + len(group) <= wanted[k]), "train")
        if target != "train":
            filled[target] += len(group)
        assignment.update({s: target for s in group})
    return assignment


def source_split(sources: dict[str, str], holdout: str, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                 seed: int = 0) -> dict[str, str]:
    """Out-of-source: every molecule whose source is ``holdout`` is test; the others are dealt to
    train and val in the ratio of ``fractions``' first two shares (its test share is not used).

    ``sources``: {smiles: source}. In the built-in table a molecule has one source (Wikidata rows
    are the molecules the Open Notebook set lacks), so holdout="wikidata" trains on Open Notebook
    and tests on the molecules only Wikidata has.
    """
    test = sorted(s for s, source in sources.items() if source == holdout)
    if not test:
        found = sorted(set(sources.values()))
        raise ValueError(f"split=source: no molecule comes from {holdout!r}; sources in the table: {found}")
    rest = sorted(s for s, source in sources.items() if source != holdout)
    if not rest:
        raise ValueError(f"split=source: every molecule comes from {holdout!r}; nothing is left to train on")
    train_share, val_share = fractions[0], fractions[1]
    n_val = int(round(len(rest) * val_share / max(train_share + val_share, 1e-12)))
    random.Random(seed).shuffle(rest)
    assignment = {s: "test" for s in test}
    assignment.update({s: "val" for s in rest[:n_val]})
    assignment.update({s: "train" for s in rest[n_val:]})
    return assignment


def make_split(smiles: Sequence[str], kind: SplitKind, fractions: Sequence[float], seed: int,
               sources: dict[str, str] | None = None, holdout_source: str | None = None) -> dict[str, str]:
    if kind == "random":
        return random_split(smiles, fractions, seed)
    if kind == "scaffold":
        return scaffold_split(smiles, fractions, seed)
    if kind == "source":
        if not holdout_source:
            raise ValueError("split=source needs data.holdout_source: the source whose molecules are the test set")
        return source_split({s: (sources or {}).get(s, "") for s in smiles}, holdout_source, fractions, seed)
    raise ValueError(f"unknown split kind {kind!r} (use 'random', 'scaffold' or 'source')")


def write_split(assignment: dict[str, str], path: str | Path) -> Path:
    """Write ``smiles,split`` whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["smiles", "split"])
        for smiles in sorted(assignment):
            writer.writerow([smiles, assignment[smiles]])
    os.replace(tmp, path)
    return path


def read_split(path: str | Path) -> dict[str, str]:
    from chemlit.data.records import DataError

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: split file not found")
    assignment = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"smiles", "split"} <= set(reader.fieldnames):
            raise DataError(f"{path}: a split file needs the columns smiles,split")
        for row_number, row in enumerate(reader, start=2):
            if row["split"] not in SPLIT_NAMES:
                raise DataError(f"{path}: row {row_number}: split {row['split']!r} is not one of {', '.join(SPLIT_NAMES)}")
            assignment[row["smiles"]] = row["split"]
    return assignment
