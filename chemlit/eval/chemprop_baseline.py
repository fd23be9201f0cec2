"""chemprop's D-MPNN (chemprop 2.3) as the report's strongest alternative: the model a chemist would pick.

Optional: ``pip install 'chemlit[chemprop]'`` (chemprop pins its own rdkit through ``cuik_molmaker_pin``, so a
separate environment keeps chemlit's rdkit as it is). It trains on a pipeline run's training molecules,
keeps the epoch with the lowest validation loss (the run's validation molecules) and answers the run's
validation and test molecules:

    python -m chemlit.bench chemprop --runs runs/pipeline runs/scaffold runs/source [--epochs 30]

writes ``<run>/chemprop/predictions.csv`` (smiles, split, prediction) whole, beside ``chemprop.json`` (the
splits file's SHA-256, epochs, seed, chemprop's version, minutes). ``python -m chemlit.bench report`` reads
them where they exist and were made from the run's own split; it does not need chemprop installed.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from chemlit.data.files import write_whole

CHEMPROP = "chemprop D-MPNN (2.3)"
FOLDER = "chemprop"          # under a pipeline run
PREDICTIONS = "predictions.csv"
RECORD = "chemprop.json"
INSTALL = "pip install 'chemlit[chemprop]'"


def available() -> bool:
    """Whether chemprop is importable here."""
    return importlib.util.find_spec("chemprop") is not None


def _require():
    if not available():
        raise SystemExit(f"chemlit: the chemprop baseline needs chemprop 2.3: {INSTALL} (it pins rdkit through "
                         "cuik_molmaker_pin; a separate virtual environment keeps chemlit's own)")
    import chemprop
    return chemprop


def chemprop_baseline(train_smiles: Sequence[str], train_targets: Sequence[float], val_smiles: Sequence[str],
                      val_targets: Sequence[float], predict_smiles: Sequence[str], epochs: int = 30, seed: int = 0,
                      batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """chemprop 2.3's default D-MPNN regressor (bond message passing, mean aggregation, batch norm, targets
    standardised on the training molecules), trained for ``epochs`` on the training molecules; the epoch
    with the lowest validation loss answers ``predict_smiles`` (°C, same order)."""
    _require()
    import copy

    import lightning.pytorch as pl
    from chemprop import data, featurizers, models, nn

    class KeepBest(pl.Callback):   # the best epoch's weights in memory (chemprop's checkpoints need pickle to load)
        def __init__(self):
            self.loss, self.state = float("inf"), None

        def on_validation_end(self, trainer, module):
            loss = float(trainer.callback_metrics.get("val_loss", float("inf")))
            if not trainer.sanity_checking and loss < self.loss:
                self.loss, self.state = loss, copy.deepcopy(module.state_dict())

    pl.seed_everything(seed, verbose=False)
    featurizer = featurizers.SimpleMoleculeMolGraphFeaturizer()

    def dataset(smiles, targets=None):
        points = [data.MoleculeDatapoint.from_smi(s, None if targets is None else np.array([float(t)]))
                  for s, t in zip(smiles, targets if targets is not None else [None] * len(smiles))]
        return data.MoleculeDataset(points, featurizer)

    train, val, answer = dataset(train_smiles, train_targets), dataset(val_smiles, val_targets), dataset(predict_smiles)
    scaler = train.normalize_targets()
    val.normalize_targets(scaler)    # val_loss: the training loss on the validation molecules, same scale
    ffn = nn.RegressionFFN(output_transform=nn.UnscaleTransform.from_standard_scaler(scaler))
    model = models.MPNN(nn.BondMessagePassing(), nn.MeanAggregation(), ffn, batch_norm=True)
    best = KeepBest()
    trainer = pl.Trainer(logger=False, accelerator="auto", devices=1, max_epochs=epochs, callbacks=[best],
                         enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False)
    trainer.fit(model, data.build_dataloader(train, batch_size=batch_size, seed=seed),
                data.build_dataloader(val, batch_size=batch_size, shuffle=False))
    model.load_state_dict(best.state)
    out = trainer.predict(model, data.build_dataloader(answer, batch_size=batch_size, shuffle=False))
    return np.concatenate([np.asarray(o).reshape(len(o), -1)[:, 0] for o in out]).astype(float)


def split_digest(split_file: Path) -> str:
    return hashlib.sha256(Path(split_file).read_bytes()).hexdigest()


def write_run_predictions(run_dir: Path, table: str = "builtin", epochs: int = 30, seed: int = 0) -> Path:
    """Train on ``run_dir``'s split (its cpt/splits.csv) and write its validation and test answers whole."""
    chemprop = _require()
    from chemlit.eval.baselines import train_test_records

    split_file = Path(run_dir) / "cpt" / "splits.csv"
    if not split_file.is_file():
        raise SystemExit(f"chemlit bench chemprop: {split_file} does not exist (not a finished pipeline run)")
    train, test = train_test_records(table, str(split_file))
    _, val = train_test_records(table, str(split_file), "val")
    started = time.monotonic()
    values = chemprop_baseline([r.smiles for r in train], [r.target for r in train], [r.smiles for r in val],
                               [r.target for r in val], [r.smiles for r in val + test], epochs=epochs, seed=seed)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["smiles", "split", "prediction"])
    for record, split, value in zip(val + test, ["val"] * len(val) + ["test"] * len(test), values):
        writer.writerow([record.smiles, split, f"{value:.3f}"])
    folder = Path(run_dir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    write_whole(folder / PREDICTIONS, buffer.getvalue())
    write_whole(folder / RECORD, json.dumps({
        "model": CHEMPROP, "chemprop": chemprop.__version__, "epochs": epochs, "seed": seed, "table": table,
        "train": len(train), "val": len(val), "test": len(test), "splits_sha256": split_digest(split_file),
        "minutes": round((time.monotonic() - started) / 60, 2)}, indent=2) + "\n")
    return folder / PREDICTIONS


def read_run_predictions(run_dir: Path, split: str = "test") -> Optional[dict[str, float]]:
    """{smiles: °C} of ``split`` from ``run_dir``'s chemprop answers; None where there are none. A file made
    from another split than the run's own is refused: it would score chemprop on its training molecules."""
    folder = Path(run_dir) / FOLDER
    if not (folder / PREDICTIONS).is_file():
        return None
    record = json.loads((folder / RECORD).read_text())
    if record.get("splits_sha256") != split_digest(Path(run_dir) / "cpt" / "splits.csv"):
        raise SystemExit(f"chemlit: {folder / PREDICTIONS} was made from another split than "
                         f"{Path(run_dir) / 'cpt' / 'splits.csv'}; rerun python -m chemlit.bench chemprop --runs {run_dir}")
    with open(folder / PREDICTIONS, newline="") as handle:
        return {row["smiles"]: float(row["prediction"]) for row in csv.DictReader(handle) if row["split"] == split}
