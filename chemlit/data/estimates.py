"""A descriptor model's estimate in the prompt: what the model is told before it reasons.

The random forest a chemist would pick instead of the language model reads 217 computed RDKit
descriptors; the language model has to learn them, and their effect, from ~10k molecules in minutes.
With ``data.descriptor_estimate`` the prompt carries the estimate of a gradient-boosting model on
those descriptors (scikit-learn's ``HistGradientBoostingRegressor``), and the model learns when to
follow it and when not to:

    Molecule: CC(=O)Oc1ccccc1C(=O)O
    Descriptor estimate: 126 °C
    Question: What is the melting point in °C?

No molecule is told an estimate made from its own value:

* a training molecule gets its **out-of-fold** estimate: the training split is cut into ``folds``
  parts (seeded, by SMILES, never by value) and each part is estimated by a model fitted on the
  others (cross-fitting, as in stacking);
* every other molecule (validation, test, ``predict``) gets the estimate of one model fitted on the
  whole training split.

The export carries the training molecules, their values, descriptors and out-of-fold estimates
(``descriptor_estimator.npz``, plain arrays, no pickle), so ``predict`` on new molecules refits the
same model (seeded: the same numbers) without the table or the split.

Fitting takes minutes on a few cores, so its results are cached (``chemlit.data.cache``): the
descriptors per SMILES, and per training set (its molecules, values and descriptors, ``folds``,
``seed``, the estimator's settings, the versions of scikit-learn, NumPy and RDKit, this code) the out-of-fold
estimates and the full model's estimates of every other molecule asked about so far. A second run on
the same split fits nothing; a new molecule fits the full model once and adds its estimate.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from chemlit.data.cache import cache_path, digest, read_entry, source_digest, text_array, text_list, write_entry
from chemlit.data.descriptors import cached_descriptor_matrix, descriptor_matrix, descriptor_names, descriptor_set
from chemlit.data.files import write_whole
from chemlit.data.records import canonical_smiles

log = logging.getLogger(__name__)

ESTIMATOR_FILE = "descriptor_estimator.npz"
GRADIENT_BOOSTING = {"max_iter": 300, "learning_rate": 0.1, "early_stopping": False}


def gradient_boosting(seed: int = 0):
    """The estimator: 300 boosting rounds, no early stopping (it would hold out a random part)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    return HistGradientBoostingRegressor(**GRADIENT_BOOSTING, random_state=seed)


def out_of_fold(descriptors: np.ndarray, values: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N,) each row estimated by a model fitted on the other folds only (rows in their given order)."""
    from sklearn.model_selection import KFold

    estimates = np.empty(len(values))
    for fitted_on, held_out in KFold(min(folds, len(values)), shuffle=True, random_state=seed).split(descriptors):
        model = gradient_boosting(seed).fit(descriptors[fitted_on], values[fitted_on])
        estimates[held_out] = model.predict(descriptors[held_out])
    return estimates


class DescriptorEstimator:
    """Training molecules with their values and descriptors; estimates for any molecule."""

    def __init__(self, smiles: Sequence[str], values: Sequence[float], descriptors: Optional[np.ndarray] = None,
                 fold_estimates: Optional[Sequence[float]] = None, folds: int = 5, seed: int = 0,
                 cache: bool = True):
        """``smiles`` canonical (as ``read_table`` gives them); kept sorted by SMILES, so the folds
        depend on the molecules only. ``cache``: read and store descriptors and estimates in the
        cache (``chemlit.data.cache``) instead of computing them every time."""
        if len(smiles) != len(values):
            raise ValueError(f"descriptor estimator: {len(smiles)} SMILES but {len(values)} values")
        if len(smiles) < 2:
            raise ValueError(f"descriptor estimator: needs at least 2 training molecules with a value, got {len(smiles)}")
        order = sorted(range(len(smiles)), key=lambda i: smiles[i])
        self.smiles = [smiles[i] for i in order]
        self.values = np.asarray([float(values[i]) for i in order])
        self.folds, self.seed = folds, seed
        self._cache = cache
        self.descriptors = (np.asarray(descriptors, dtype=np.float32)[order] if descriptors is not None
                            else self._descriptor_matrix(self.smiles))
        self._predicted: dict[str, float] = {}  # the full model's estimates of other molecules (cached)
        self._cache_key = self.cache_key() if cache else None
        entry = self._read_cache() if cache else None
        if fold_estimates is not None:
            self.fold_estimates = np.asarray(fold_estimates, dtype=float)[order]
            if entry is not None:
                log.info("descriptor estimate: the full model's estimates of %d molecules from cache %s",
                         len(self._predicted), self.cache_file())
        elif entry is not None:
            self.fold_estimates = entry["fold_estimates"]
            log.info("descriptor estimate: out-of-fold estimates of %d training molecules and the full model's "
                     "of %d others from cache %s", len(self.smiles), len(self._predicted), self.cache_file())
        else:
            if cache:
                log.info("descriptor estimate: fitting on %d training molecules (%d out-of-fold fits; stored in "
                         "cache %s)", len(self.smiles), min(folds, len(self.smiles)), self.cache_file())
            self.fold_estimates = out_of_fold(self.descriptors, self.values, folds, seed)
            if cache:
                self._store()
        self._index = {s: i for i, s in enumerate(self.smiles)}
        self._model = None

    @classmethod
    def from_records(cls, records, folds: int = 5, seed: int = 0) -> DescriptorEstimator:
        rows = [(r.smiles, r.target) for r in records if r.target is not None]
        return cls([s for s, _ in rows], [v for _, v in rows], folds=folds, seed=seed)

    def __len__(self) -> int:
        return len(self.smiles)

    def model(self):
        """The model fitted on every training molecule (fitted on first use)."""
        if self._model is None:
            self._model = gradient_boosting(self.seed).fit(self.descriptors, self.values)
        return self._model

    def estimate(self, smiles: Sequence[str]) -> list[float]:
        """°C for each molecule: a training molecule's out-of-fold estimate (never from its own value),
        any other's from the model fitted on all of them."""
        # a string that is a known molecule's canonical SMILES is that molecule: no need to parse it again
        canonical = [s if s in self._index or s in self._predicted else canonical_smiles(s) for s in smiles]
        out = [float(self.fold_estimates[self._index[s]]) if s in self._index else None for s in canonical]
        new = sorted({s for s, e in zip(canonical, out) if e is None} - self._predicted.keys())
        if new:
            if self._cache:
                log.info("descriptor estimate: fitting the model on all %d training molecules for %d other molecules "
                         "(stored in cache %s)", len(self.smiles), len(new), self.cache_file())
            self._predicted.update(zip(new, self.model().predict(self._descriptor_matrix(new)).tolist()))
            if self._cache:
                self._store()
        return [self._predicted[s] if e is None else e for s, e in zip(canonical, out)]

    # ------------------------------------------------------------------ cached between runs
    def _descriptor_matrix(self, smiles: Sequence[str]) -> np.ndarray:
        return cached_descriptor_matrix(smiles) if self._cache else descriptor_matrix(smiles)

    def cache_key(self) -> str:
        """Everything the estimates depend on: the training set, the folds and the model."""
        import sys

        import sklearn

        settings = {"code": source_digest(sys.modules[__name__]), "folds": self.folds, "seed": self.seed,
                    "model": GRADIENT_BOOSTING, "scikit-learn": sklearn.__version__, "numpy": np.__version__,
                    "descriptors": descriptor_set()}
        return digest(settings, text_array(self.smiles), self.values, self.descriptors)

    def cache_file(self) -> Path:
        return cache_path("estimates", f"{self._cache_key[:32]}.npz")

    def _read_cache(self) -> Optional[dict]:
        """The cached estimates for this training set (and ``_predicted`` filled), or None."""
        entry = read_entry(self.cache_file(), self._cache_key, "descriptor estimate")
        if entry is None:
            return None
        try:
            predicted = text_list(entry["predicted_smiles"])
            fold, values = entry["fold_estimates"].astype(float), entry["predicted"].astype(float)
            if fold.shape != (len(self.smiles),) or values.shape != (len(predicted),):
                raise ValueError("its estimates do not fit its training set")
            if not (np.isfinite(fold).all() and np.isfinite(values).all()):
                raise ValueError("it holds non-finite estimates")
        except (KeyError, ValueError, UnicodeDecodeError) as error:
            log.warning("descriptor estimate: ignoring cache entry %s (%s); recomputing", self.cache_file(), error)
            return None
        self._predicted = dict(zip(predicted, values.tolist()))
        return {"fold_estimates": fold}

    def _store(self) -> None:
        smiles = sorted(self._predicted)
        write_entry(self.cache_file(), self._cache_key,
                    {"fold_estimates": np.asarray(self.fold_estimates, dtype=float),
                     "predicted_smiles": text_array(smiles),
                     "predicted": np.asarray([self._predicted[s] for s in smiles], dtype=float)},
                    "descriptor estimate")

    # ------------------------------------------------------------------ saved with the export
    def to_bytes(self) -> bytes:
        about = {"about": "chemlit descriptor estimator: HistGradientBoostingRegressor(max_iter=300, "
                          "learning_rate=0.1, early_stopping=False) on RDKit 2D descriptors",
                 "folds": self.folds, "seed": self.seed, "descriptors": descriptor_names(), "versions": _versions()}
        buffer = io.BytesIO()
        np.savez_compressed(buffer, smiles=np.asarray(self.smiles, dtype=str), values=self.values,
                            descriptors=self.descriptors, fold_estimates=self.fold_estimates,
                            about=np.asarray(json.dumps(about)))
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "descriptor estimator") -> DescriptorEstimator:
        with np.load(io.BytesIO(data), allow_pickle=False) as saved:
            about = json.loads(str(saved["about"]))
            if about["descriptors"] != descriptor_names():
                raise ValueError(f"{where}: made with RDKit {about['versions'].get('rdkit')}, whose descriptor list "
                                 f"differs from this RDKit's: retrain, or install that RDKit version")
            return cls(saved["smiles"].tolist(), saved["values"], saved["descriptors"], saved["fold_estimates"],
                       about["folds"], about["seed"])

    def save(self, path: str | Path) -> Path:
        """Write whole or not at all."""
        return write_whole(path, self.to_bytes())

    @classmethod
    def load(cls, path: str | Path) -> DescriptorEstimator:
        return cls.from_bytes(Path(path).read_bytes(), str(path))


def _versions() -> dict:
    import sklearn
    from rdkit import rdBase

    return {"rdkit": rdBase.rdkitVersion, "scikit-learn": sklearn.__version__}
