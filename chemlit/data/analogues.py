"""Retrieved analogues: the training molecules most like a given one, with their measured values.

A ``ReferenceSet`` holds the training split's molecules as Morgan fingerprints (RDKit, radius 2,
2048 bits by default) with their melting points. ``neighbours(smiles, k)`` returns the k most
Tanimoto-similar of them, never the molecule itself: an entry with the same canonical SMILES (the
molecule, or a duplicate row of it) is skipped, so a training row cannot read its own value.

The set is built from the training split only and saved in every export (``reference_set.json``:
SMILES, values, fingerprints and how they were made), so ``predict`` on new molecules retrieves
from exactly the molecules the model was trained with, without the table or the split.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rdkit import Chem, DataStructs, rdBase
from rdkit.Chem import rdFingerprintGenerator

from chemlit.data.files import write_whole
from chemlit.data.records import canonical_smiles

REFERENCE_FILE = "reference_set.json"


@dataclass(frozen=True)
class Analogue:
    smiles: str
    similarity: float  # Tanimoto, 0..1
    value: float       # measured melting point, °C


class ReferenceSet:
    """Training molecules, their fingerprints and values; nearest neighbours by Tanimoto similarity."""

    def __init__(self, smiles: Sequence[str], values: Sequence[float], radius: int = 2, n_bits: int = 2048,
                 fingerprints: Sequence | None = None):
        """``smiles`` must be canonical (as ``read_table`` gives them); kept sorted by SMILES, so that
        ties in similarity always resolve the same way."""
        if len(smiles) != len(values):
            raise ValueError(f"reference set: {len(smiles)} SMILES but {len(values)} values")
        order = sorted(range(len(smiles)), key=lambda i: smiles[i])
        self.smiles = [smiles[i] for i in order]
        self.values = [float(values[i]) for i in order]
        self.radius, self.n_bits = radius, n_bits
        self._generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
        self.fingerprints = ([fingerprints[i] for i in order] if fingerprints is not None else
                             [self.fingerprint(s) for s in self.smiles])
        self._index = {s: i for i, s in enumerate(self.smiles)}

    def fingerprint(self, smiles: str):
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            raise ValueError(f"invalid SMILES {smiles!r}")
        return self._generator.GetFingerprint(mol)

    @classmethod
    def from_records(cls, records, radius: int = 2, n_bits: int = 2048) -> ReferenceSet:
        """From a split's records (those with a measured value)."""
        rows = [(r.smiles, r.target) for r in records if r.target is not None]
        return cls([s for s, _ in rows], [v for _, v in rows], radius, n_bits)

    def __len__(self) -> int:
        return len(self.smiles)

    def neighbours(self, smiles: str, k: int) -> list[Analogue]:
        """The k most similar reference molecules, most similar first (ties: by SMILES).

        Never ``smiles`` itself: the entry with the same canonical SMILES (the molecule, or a
        duplicate row of it merged into one record) is skipped.
        """
        query = canonical_smiles(smiles)
        similarity = np.asarray(DataStructs.BulkTanimotoSimilarity(self.fingerprint(query), self.fingerprints))
        own = self._index.get(query)
        if own is not None:
            similarity[own] = -1.0
        order = np.argsort(-similarity, kind="stable")[:k]   # stable: equal similarities keep SMILES order
        return [Analogue(self.smiles[i], float(similarity[i]), self.values[i]) for i in order if i != own]

    # ------------------------------------------------------------------ saved with the export
    def to_json(self) -> str:
        return json.dumps({
            "about": "chemlit reference set: the training molecules retrieved as analogues",
            "fingerprint": {"kind": "morgan", "radius": self.radius, "n_bits": self.n_bits,
                            "similarity": "tanimoto", "rdkit": rdBase.rdkitVersion},
            "smiles": self.smiles, "values": self.values,
            "fingerprints": [fp.ToBase64() for fp in self.fingerprints],
        }) + "\n"

    def save(self, path: str | Path) -> Path:
        """Write whole or not at all."""
        return write_whole(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> ReferenceSet:
        return cls.from_json(Path(path).read_text(), str(path))

    @classmethod
    def from_json(cls, text: str, where: str = "reference set") -> ReferenceSet:
        data = json.loads(text)
        spec = data["fingerprint"]
        if spec.get("kind") != "morgan":
            raise ValueError(f"{where}: unknown fingerprint kind {spec.get('kind')!r}")
        fingerprints = []
        for encoded in data["fingerprints"]:
            fp = DataStructs.ExplicitBitVect(spec["n_bits"])
            fp.FromBase64(encoded)
            fingerprints.append(fp)
        return cls(data["smiles"], data["values"], spec["radius"], spec["n_bits"], fingerprints)
