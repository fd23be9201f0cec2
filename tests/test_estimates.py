"""The descriptor estimate in the prompt: no molecule is told an estimate made from its own value,
held-out molecules get the model fitted on the training split only, and the export carries it."""

import csv
import logging
import sys

import numpy as np
import pytest

from chemlit.cli import main
from chemlit.data import estimates
from chemlit.data.datamodule import RationaleDataModule
from chemlit.data.descriptors import descriptor_matrix
from chemlit.data.records import canonical_smiles, randomized_smiles
from chemlit.data.estimates import ESTIMATOR_FILE, DescriptorEstimator, gradient_boosting
from chemlit.data.splits import read_split
from chemlit.models.factory import ModelSpec
from chemlit.stages.sft import SFTModule
from tests.test_cli import tiny_args


def _training_set(tiny_table, tmp_path):
    dm = RationaleDataModule(table=str(tiny_table), run_dir=str(tmp_path))
    dm.setup()
    return dm, [r.smiles for r in dm.records["train"]], [r.target for r in dm.records["train"]]


def test_a_training_molecules_estimate_does_not_depend_on_its_own_value(tmp_path, tiny_table, monkeypatch):
    # 20 fits: 30 boosting rounds each instead of 300 (what is checked does not depend on the rounds)
    monkeypatch.setitem(estimates.GRADIENT_BOOSTING, "max_iter", 30)
    _, smiles, values = _training_set(tiny_table, tmp_path)
    descriptors = descriptor_matrix(smiles, n_jobs=1)
    base = DescriptorEstimator(smiles, values, descriptors)
    changed = list(values)
    for i in (0, 7):
        changed[i] = values[i] + 500.0  # a wildly different measured value for two molecules
        after = DescriptorEstimator(smiles, changed, descriptors)
        assert after.estimate([smiles[i]]) == base.estimate([smiles[i]]), "its estimate saw its own value"
        changed[i] = values[i]
    # ... while a model fitted on it (in-sample) would have moved: the check can fail.
    fitted = gradient_boosting().fit(descriptors, np.asarray(values))
    moved = list(values)
    moved[0] += 500.0
    refitted = gradient_boosting().fit(descriptors, np.asarray(moved))
    assert refitted.predict(descriptors[:1])[0] != pytest.approx(fitted.predict(descriptors[:1])[0])
    # A training molecule spelled another way is still that molecule: its out-of-fold estimate, not the
    # estimate of the model fitted on it.
    spelled = next(randomized_smiles(smiles[i], 1) for i in range(3, len(smiles))
                   if randomized_smiles(smiles[i], 1) != smiles[i])
    assert base.estimate([spelled]) == base.estimate([canonical_smiles(spelled)])
    assert canonical_smiles(spelled) in set(smiles)


def test_held_out_molecules_get_the_model_fitted_on_the_training_split_only(tmp_path, tiny_table):
    dm = RationaleDataModule(table=str(tiny_table), run_dir=str(tmp_path), descriptor_estimate=True)
    dm.setup()
    train = {r.smiles for r in dm.records["train"]}
    held_out = [r for split in ("val", "test") for r in dm.records[split]]
    assert held_out and set(dm.descriptor_estimator().smiles) == train
    fitted = gradient_boosting().fit(descriptor_matrix(sorted(train), n_jobs=1),
                                     np.asarray([dm.descriptor_estimator().values]).ravel())
    expected = fitted.predict(descriptor_matrix([r.smiles for r in held_out], n_jobs=1))
    for record, value in zip(held_out, expected):
        assert dm.estimate_of(record.smiles) == pytest.approx(value)
        assert f"Descriptor estimate: {round(value)} °C" in dm.example(record).prompt
    off = RationaleDataModule(table=str(tiny_table), run_dir=str(tmp_path / "off"))
    off.setup()
    assert "Descriptor estimate" not in off.example(off.records["test"][0]).prompt


def test_estimator_round_trips_through_its_file(tmp_path, tiny_table):
    _, smiles, values = _training_set(tiny_table, tmp_path)
    estimator = DescriptorEstimator(smiles, values)
    loaded = DescriptorEstimator.load(estimator.save(tmp_path / ESTIMATOR_FILE))
    queries = smiles[:3] + ["CCCCCCCCCCCCCCCCCC(=O)O", "Clc1ccc(Cl)c(Cl)c1"]
    assert loaded.estimate(queries) == estimator.estimate(queries)


def test_predict_on_new_molecules_estimates_from_the_export_alone(tmp_path, tiny_table, monkeypatch, caplog):
    monkeypatch.setattr(sys, "argv", ["chemlit"])
    main(["fit", *tiny_args(tmp_path, tiny_table), "--data.descriptor_estimate", "true",
          "--trainer.limit_train_batches", "2", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0"])
    run = tmp_path / "runs" / "quickstart-sft" / "version_0"
    export = run / "export"
    saved = DescriptorEstimator.load(export / ESTIMATOR_FILE)
    train = sorted(s for s, split in read_split(run / "splits.csv").items() if split == "train")
    assert saved.smiles == train  # the training split, nothing else

    new = tmp_path / "new.csv"
    new.write_text("smiles\nCCCCCCCCCCCCCCCCCC(=O)O\nClc1ccc(Cl)c(Cl)c1\n")
    pretrained = ["--model.init_args.model.source", "pretrained", "--model.init_args.model.path", str(export)]
    with caplog.at_level(logging.INFO, logger="chemlit"):  # data.descriptor_estimate left off: the export says on
        main(["predict", *tiny_args(tmp_path, new), *pretrained, "--data.predict_split", "all"])
    assert f"descriptor estimate: from {export / ESTIMATOR_FILE}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="chemlit"):  # the checkpoint carries it too
        main(["predict", *tiny_args(tmp_path, new), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
              "--data.predict_split", "all"])
    assert f"descriptor estimate: from the checkpoint's descriptor estimator ({len(train)} training molecules)" \
        in caplog.text
    newest = max((tmp_path / "runs" / "quickstart-sft").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(newest / "predictions.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 2

    dm = RationaleDataModule(table=str(new), run_dir=str(tmp_path / "p"), predict_split="all",
                             descriptor_estimate=True)
    dm.setup("predict")
    with pytest.raises(ValueError, match="too few to fit the estimator"):
        dm.estimate_of("CCO")  # without the export there is nothing to fit on
    SFTModule(model=ModelSpec(source="pretrained", path=str(export))).hand_over_reference_set(dm)
    for record in dm.records["test"] + dm.records["train"] + dm.records["val"]:
        assert dm.estimate_of(record.smiles) == saved.estimate([record.smiles])[0]
        assert "Descriptor estimate: " in dm.example(record).prompt


def test_a_model_trained_without_the_estimate_is_not_shown_one(tmp_path, tiny_table):
    """sft.yaml turns the estimate on; answering with a model that never saw it turns it off, while a CPT
    export (which answers nothing yet) lets the SFT stage turn it on."""
    for stage, expected in (("sft", False), ("ppo", False), ("cpt", True)):
        export = tmp_path / stage
        export.mkdir()
        (export / "chemlit_export.json").write_text(f'{{"stage": "{stage}", "analogues": 0}}')
        dm = RationaleDataModule(table=str(tiny_table), run_dir=str(tmp_path / f"run-{stage}"),
                                 descriptor_estimate=True)
        dm.setup()
        SFTModule(model=ModelSpec(source="pretrained", path=str(export))).hand_over_reference_set(dm)
        assert dm.descriptor_estimate is expected, stage
        assert ("Descriptor estimate" in dm.example(dm.records["test"][0]).prompt) is expected
