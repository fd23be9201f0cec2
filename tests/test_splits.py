import pytest

from chemlit.data.datamodule import RationaleDataModule
from chemlit.data.records import DataError
from chemlit.data.splits import make_split, murcko_scaffold, read_split, write_split

SMILES = [
    "c1ccccc1", "Cc1ccccc1", "Oc1ccccc1", "Nc1ccccc1", "Clc1ccccc1", "CCc1ccccc1",
    "C1CCCCC1", "CC1CCCCC1", "OC1CCCCC1", "c1ccc2ccccc2c1", "Cc1ccc2ccccc2c1", "c1ccncc1",
    "Cc1ccncc1", "CCO", "CCCO", "CCCCO", "CC(=O)O", "CCC(=O)O", "c1ccoc1", "Cc1ccoc1",
] * 1
SMILES = SMILES + [f"C{'C' * i}N" for i in range(20)]


@pytest.mark.parametrize("kind", ["random", "scaffold"])
def test_split_is_seeded_complete_and_sized(kind):
    a = make_split(SMILES, kind, (0.6, 0.2, 0.2), seed=3)
    assert a == make_split(list(reversed(SMILES)), kind, (0.6, 0.2, 0.2), seed=3)  # order-independent
    assert set(a) == set(SMILES)
    counts = {name: sum(v == name for v in a.values()) for name in ("train", "val", "test")}
    assert counts["test"] <= 8 and counts["val"] <= 8 and counts["train"] >= 24
    if kind == "random":
        assert counts == {"train": 24, "val": 8, "test": 8}
        assert make_split(SMILES, kind, (0.6, 0.2, 0.2), seed=4) != a


def test_scaffold_split_never_shares_a_scaffold_across_splits():
    a = make_split(SMILES, "scaffold", (0.6, 0.2, 0.2), seed=0)
    where: dict[str, set] = {}
    for smiles, split in a.items():
        where.setdefault(murcko_scaffold(smiles), set()).add(split)
    assert all(len(splits) == 1 for splits in where.values())
    assert murcko_scaffold("CCO") == "" and murcko_scaffold("Cc1ccccc1") == "c1ccccc1"


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="summing to 1"):
        make_split(SMILES, "random", (0.5, 0.1, 0.1), seed=0)


def test_split_file_round_trip_and_errors(tmp_path):
    a = make_split(SMILES, "random", (0.8, 0.1, 0.1), seed=0)
    path = write_split(a, tmp_path / "run" / "splits.csv")
    assert read_split(path) == a
    bad = tmp_path / "bad.csv"
    bad.write_text("smiles,split\nCCO,holdout\n")
    with pytest.raises(DataError, match="row 2: split 'holdout'"):
        read_split(bad)


def test_source_split_tests_on_the_held_out_source_only(tmp_path):
    path = tmp_path / "t.csv"
    rows = [("CCO", -114, "a"), ("CCCO", -126, "a"), ("CCCCO", -89, "a"), ("CCCCCO", -78, "a"),
            ("c1ccccc1", 5.5, "b"), ("Cc1ccccc1", -95, "b"), ("CC(=O)O", 16.6, "a"), ("OCCO", -12.9, "a"),
            ("NC(=O)N", 133, "a"), ("CCN", -81, "a"), ("CCCN", -83, "a"), ("CCCCN", -49, "a")]
    path.write_text("smiles,mpC,source\n" + "".join(f"{s},{v},{src}\n" for s, v, src in rows))
    dm = RationaleDataModule(table=str(path), run_dir=str(tmp_path / "run"), split="source", holdout_source="b",
                             split_fractions=(0.8, 0.2, 0.0))
    dm.setup()
    assert sorted(r.smiles for r in dm.records["test"]) == ["Cc1ccccc1", "c1ccccc1"]
    assert all(r.source == "a" for split in ("train", "val") for r in dm.records[split])
    assert len(dm.records["val"]) == 2 and len(dm.records["train"]) == 8  # 10 molecules of a, 4:1
    with pytest.raises(ValueError, match="no molecule comes from 'c'.*'a', 'b'"):
        RationaleDataModule(table=str(path), run_dir=str(tmp_path / "r2"), split="source", holdout_source="c").setup()
    with pytest.raises(ValueError, match="holdout_source"):
        RationaleDataModule(table=str(path), run_dir=str(tmp_path / "r3"), split="source").setup()
