"""Retrieved analogues: training molecules only, never a molecule's own row, and carried by the export."""

import csv
import logging
import sys

import pytest

from chemlit.cli import main
from chemlit.data.analogues import REFERENCE_FILE, ReferenceSet
from chemlit.data.datamodule import RationaleDataModule
from chemlit.data.splits import read_split
from chemlit.models.factory import ModelSpec
from chemlit.stages.sft import SFTModule
from tests.test_cli import tiny_args


def test_neighbours_are_the_most_similar_and_never_the_molecule_itself():
    reference = ReferenceSet(["CCO", "CCCO", "CCCCO", "c1ccccc1", "Oc1ccccc1"], [-114, -126, -89, 5.5, 41])
    found = reference.neighbours("OCC", 2)  # ethanol spelled another way: its own entry is skipped
    assert [a.smiles for a in found] == ["CCCO", "CCCCO"]
    assert found[0].similarity >= found[1].similarity and found[0].value == -126
    assert "CCO" not in [a.smiles for a in reference.neighbours("CCO", 4)]
    assert [a.smiles for a in reference.neighbours("Cc1ccccc1", 1)] in (["c1ccccc1"], ["Oc1ccccc1"])
    assert reference.neighbours("c1ccccc1", 1)[0].smiles == "Oc1ccccc1"


def test_reference_set_round_trips_through_its_file(tmp_path):
    reference = ReferenceSet(["CCO", "CCCO", "c1ccccc1", "Oc1ccccc1", "CC(=O)O"], [-114, -126, 5.5, 41, 16.6])
    loaded = ReferenceSet.load(reference.save(tmp_path / REFERENCE_FILE))
    for query in ("CCCCO", "Cc1ccccc1", "CCO"):
        assert loaded.neighbours(query, 3) == reference.neighbours(query, 3)
    assert (loaded.radius, loaded.n_bits) == (2, 2048)


def test_no_val_or_test_molecule_is_anyones_neighbour_and_none_is_its_own(tmp_path, tiny_table):
    dm = RationaleDataModule(table=str(tiny_table), run_dir=str(tmp_path), analogues=3)
    dm.setup()
    train = {r.smiles for r in dm.records["train"]}
    held_out = {r.smiles for split in ("val", "test") for r in dm.records[split]}
    assert held_out and train
    for split in ("train", "val", "test"):
        for record in dm.records[split]:
            neighbours = dm.analogues_of(record.smiles)
            assert len(neighbours) == 3
            assert {a.smiles for a in neighbours} <= train, split
            assert record.smiles not in {a.smiles for a in neighbours}
            assert not held_out & {a.smiles for a in neighbours}
            example = dm.example(record)
            assert "Analogues (similarity, °C): " in example.prompt
            assert "Analogues: the closest" in example.completion  # the rationale reasons from them
    off = RationaleDataModule(table=str(tiny_table), run_dir=str(tmp_path / "off"))
    off.setup()
    assert "Analogues" not in off.example(off.records["test"][0]).prompt


@pytest.mark.slow
def test_predict_on_an_unseen_molecule_retrieves_from_the_export_alone(tmp_path, tiny_table, monkeypatch, caplog):
    monkeypatch.setattr(sys, "argv", ["chemlit"])
    main(["fit", *tiny_args(tmp_path, tiny_table), "--data.analogues", "2", "--trainer.limit_train_batches", "2",
          "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0"])
    run = tmp_path / "runs" / "quickstart-sft" / "version_0"
    export = run / "export"
    assert (export / REFERENCE_FILE).is_file()
    train = sorted(s for s, split in read_split(run / "splits.csv").items() if split == "train")
    saved = ReferenceSet.load(export / REFERENCE_FILE)
    assert saved.smiles == train  # the training split, nothing else

    # A table of molecules the model never saw, no measured values, no split: only the export knows
    # which molecules to retrieve from.
    new = tmp_path / "new.csv"
    new.write_text("smiles\nCCCCCCCCCCCCCCCCCC(=O)O\nClc1ccc(Cl)c(Cl)c1\n")
    pretrained = ["--model.init_args.model.source", "pretrained", "--model.init_args.model.path", str(export)]
    with caplog.at_level(logging.INFO, logger="chemlit"):  # data.analogues left at 0: the export says 2
        main(["predict", *tiny_args(tmp_path, new), *pretrained, "--data.predict_split", "all"])
    assert f"analogues: 2 per prompt, retrieved from {export / REFERENCE_FILE}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="chemlit"):  # the checkpoint carries the same set
        main(["predict", *tiny_args(tmp_path, new), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
              "--data.predict_split", "all"])
    assert f"analogues: 2 per prompt, retrieved from the checkpoint's reference set ({len(train)} molecules)" \
        in caplog.text
    newest = max((tmp_path / "runs" / "quickstart-sft").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(newest / "predictions.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 2

    dm = RationaleDataModule(table=str(new), run_dir=str(tmp_path / "p"), predict_split="all", analogues=2)
    dm.setup("predict")
    with pytest.raises(ValueError, match="no measured molecule in its training split"):
        dm.analogues_of("CCO")  # without the export, there is nothing to retrieve from
    SFTModule(model=ModelSpec(source="pretrained", path=str(export))).hand_over_reference_set(dm)
    for record in dm.records["test"] + dm.records["train"] + dm.records["val"]:
        assert dm.analogues_of(record.smiles) == saved.neighbours(record.smiles, 2)
        assert {a.smiles for a in dm.analogues_of(record.smiles)} <= set(train)
