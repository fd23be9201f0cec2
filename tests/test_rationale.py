import csv

import pytest

from chemlit.data.datamodule import RationaleDataModule
from chemlit.data.rationale import write_rationale


def test_same_structure_same_text_whatever_the_spelling():
    assert write_rationale("OCC") == write_rationale("CCO") == write_rationale("C(O)C")


def test_rationale_names_the_facts_that_drive_melting_points():
    aspirin = write_rationale("CC(=O)Oc1ccccc1C(=O)O")
    assert "1 donor" in aspirin and "3 acceptors" in aspirin
    assert "1 aromatic" in aspirin and "carboxylic acid" in aspirin and "ester" in aspirin
    assert "ether" not in aspirin  # the ester oxygen is not an ether
    assert "Symmetry: high" in write_rationale("c1ccc2ccccc2c1")
    assert "4 Cl" in write_rationale("ClC(Cl)(Cl)Cl")
    assert "floppy" in write_rationale("CCCCCCCCCCCCCCCC(=O)O")
    assert "urea" in write_rationale("NC(=O)N")
    assert "(raises)" in aspirin and "(lowers)" in write_rationale("CCCCCC")
    with pytest.raises(ValueError):
        write_rationale("C1CC")


def _table(path, values):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["smiles", "mpC"])
        for smiles, value in values.items():
            writer.writerow([smiles, value])
    return str(path)


def test_no_target_leakage_through_the_datamodule(tmp_path):
    """Two tables with the same molecules and different values give the same rationales."""
    molecules = ["CCO", "c1ccccc1", "CC(=O)O", "Oc1ccccc1", "CCCCCCCC", "NC(=O)N", "ClCCl", "c1ccncc1",
                 "CC(C)O", "OCCO"]
    texts = []
    for k, offset in enumerate((0.0, 250.0)):
        table = _table(tmp_path / f"t{k}.csv", {s: i * 10 + offset for i, s in enumerate(molecules)})
        dm = RationaleDataModule(table=table, run_dir=str(tmp_path / f"run{k}"), split_fractions=(0.8, 0.1, 0.1))
        dm.setup()
        texts.append({r.smiles: dm.rationale(r) for split in dm.records.values() for r in split})
    assert texts[0] == texts[1]
    assert all(str(int(v)) not in t for v in (250, 260, 330) for t in texts[1].values())


def test_users_own_rationale_takes_precedence(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("smiles,mpC,Reason\nCCO,-114,My own reason.\nc1ccccc1,5.5,\n")
    dm = RationaleDataModule(table=str(path), run_dir=str(tmp_path / "run"), split_fractions=(1.0, 0.0, 0.0))
    dm.setup()
    by_smiles = {r.smiles: dm.rationale(r) for r in dm.records["train"]}
    assert by_smiles["CCO"] == "My own reason."
    assert by_smiles["c1ccccc1"] == write_rationale("c1ccccc1")


def test_compact_style_states_the_same_facts_in_fewer_words(tmp_path):
    aspirin = "CC(=O)Oc1ccccc1C(=O)O"
    compact = write_rationale(aspirin, "compact")
    assert compact == write_rationale("OC(=O)c1ccccc1OC(C)=O", "compact")  # structure, not spelling
    assert "donors 1, acceptors 3" in compact and "aromatic rings 1" in compact
    assert "carboxylic acid" in compact and "ester" in compact and "ether" not in compact
    assert "raises" not in compact and len(compact) < len(write_rationale(aspirin)) / 2
    assert "symmetry high" in write_rationale("c1ccc2ccccc2c1", "compact")
    assert "Cl 4" in write_rationale("ClC(Cl)(Cl)Cl", "compact")
    with pytest.raises(ValueError, match="style"):
        write_rationale(aspirin, "short")
    path = tmp_path / "r.csv"
    path.write_text(f"smiles,mpC,Reason\nCCO,-114,My own reason.\n{aspirin},135,\n")
    dm = RationaleDataModule(table=str(path), run_dir=str(tmp_path / "run"), split_fractions=(1.0, 0.0, 0.0),
                             rationale_style="compact")
    dm.setup()
    by_smiles = {r.smiles: dm.rationale(r) for r in dm.records["train"]}
    assert by_smiles["CCO"] == "My own reason."  # a table's own rationale is never rewritten
    assert by_smiles[aspirin] == compact
