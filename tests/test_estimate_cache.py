"""The descriptor estimate and the written rationales are cached between runs (``$CHEMLIT_CACHE``): a
second setup on the same split fits and writes nothing and gives the same numbers and texts; anything
that changes them misses the cache; an entry that cannot be trusted is recomputed with a warning."""

import csv
import logging

import numpy as np
import pytest

from chemlit.data import datamodule, descriptors, estimates, rationale
from chemlit.data.datamodule import RationaleDataModule
from chemlit.data.estimates import DescriptorEstimator
from chemlit.data.records import Record, canonical_smiles


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A scratch cache, and a short-boosting estimator on one thread so that each fit takes a moment
    (OpenMP's threads on a busy 2-core machine made these tests 7x slower)."""
    from threadpoolctl import threadpool_limits

    monkeypatch.setenv("CHEMLIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(estimates, "GRADIENT_BOOSTING", {"max_iter": 20, "learning_rate": 0.1,
                                                         "early_stopping": False}, raising=False)
    with threadpool_limits(1):
        yield tmp_path / "cache"


@pytest.fixture
def fits(monkeypatch):
    """Counts of what was computed: out-of-fold fits, full-model fits, descriptor rows."""
    counts = {"out_of_fold": 0, "model": 0, "descriptor_rows": 0}
    out_of_fold, gradient_boosting, descriptor_matrix = (estimates.out_of_fold, estimates.gradient_boosting,
                                                         descriptors.descriptor_matrix)

    def counted_out_of_fold(*args, **kwargs):
        counts["out_of_fold"] += 1
        return out_of_fold(*args, **kwargs)

    def counted_model(*args, **kwargs):
        counts["model"] += 1
        return gradient_boosting(*args, **kwargs)

    def counted_descriptors(smiles, *args, **kwargs):
        counts["descriptor_rows"] += len(smiles)
        return descriptor_matrix(smiles, *args, **kwargs)

    monkeypatch.setattr(estimates, "out_of_fold", counted_out_of_fold)
    monkeypatch.setattr(estimates, "gradient_boosting", counted_model)
    monkeypatch.setattr(descriptors, "descriptor_matrix", counted_descriptors)
    if hasattr(estimates, "descriptor_matrix"):
        monkeypatch.setattr(estimates, "descriptor_matrix", counted_descriptors)
    return counts


def _no_fitting(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("computed again instead of read from the cache")

    for module, name in ((estimates, "out_of_fold"), (estimates, "gradient_boosting"),
                         (estimates, "descriptor_matrix"), (descriptors, "descriptor_matrix")):
        monkeypatch.setattr(module, name, refuse)


def _as_a_new_command():
    """What a second command starts with: no cache entry read yet in this process."""
    try:
        from chemlit.data.cache import _read
    except ImportError:  # the code before the cache
        return
    _read.clear()


def _setup(table, run_dir, **kwargs) -> RationaleDataModule:
    dm = RationaleDataModule(table=str(table), run_dir=str(run_dir), descriptor_estimate=True, **kwargs)
    dm.setup()
    return dm


def _all_estimates(dm: RationaleDataModule) -> dict[str, float]:
    return {r.smiles: dm.estimate_of(r.smiles) for records in dm.records.values() for r in records}


def _estimates_file(cache_dir):
    (path,) = (cache_dir / "estimates").glob("*.npz")
    return path


def test_the_second_setup_on_the_same_split_fits_nothing_and_gives_the_same_estimates(
        tmp_path, tiny_table, cache, monkeypatch, caplog):
    with caplog.at_level(logging.INFO, logger="chemlit"):
        first = _all_estimates(_setup(tiny_table, tmp_path / "run1"))
    cold = caplog.text
    caplog.clear()

    _no_fitting(monkeypatch)
    _as_a_new_command()
    with caplog.at_level(logging.INFO, logger="chemlit"):
        dm = _setup(tiny_table, tmp_path / "run2")
        second = _all_estimates(dm)
    assert second == first  # the very same numbers, not close ones
    assert "descriptor estimate: fitting on 128 training molecules" in cold
    assert f"stored in cache {_estimates_file(cache)}" in cold
    assert f"from cache {_estimates_file(cache)}" in caplog.text
    assert "fitting" not in caplog.text
    # the export of a model trained on it carries the same estimator; predict on the test split with it
    # (the full model's estimates) reads them from the cache too
    loaded = DescriptorEstimator.from_bytes(dm.descriptor_estimator().to_bytes())
    test = [r.smiles for r in dm.records["test"]]
    assert loaded.estimate(test) == [first[s] for s in test]


def _table_with(tiny_table, path, change):
    with open(tiny_table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        if change(canonical_smiles(row["smiles"])):
            row["mpC"] = str(float(row["mpC"]) + 40.0)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_a_change_in_values_split_or_settings_misses_the_cache(tmp_path, tiny_table, cache, fits, monkeypatch):
    base = _setup(tiny_table, tmp_path / "base")
    before = _all_estimates(base)
    assert fits["out_of_fold"] == 1
    train = [r.smiles for r in base.records["train"]]
    test = {r.smiles for r in base.records["test"]}

    def misses(**kwargs) -> bool:
        runs = fits["out_of_fold"]
        _all_estimates(_setup(kwargs.pop("table", tiny_table), tmp_path / f"run{runs}", **kwargs))
        return fits["out_of_fold"] > runs

    assert not misses()
    # one training molecule's value: its neighbours' out-of-fold estimates and the full model change
    assert misses(table=_table_with(tiny_table, tmp_path / "one.csv", lambda s: s == train[5]))
    # a test molecule's value: nothing fitted on the training split changes, so the cache holds
    assert not misses(table=_table_with(tiny_table, tmp_path / "test.csv", lambda s: s in test))
    assert misses(seed=1)                              # another split
    assert misses(split_fractions=(0.7, 0.15, 0.15))
    assert misses(split="scaffold")
    assert misses(max_molecules=150)

    values = [r.target for r in base.records["train"]]
    runs = fits["out_of_fold"]
    DescriptorEstimator(train, values, folds=3)        # other folds
    DescriptorEstimator(train, values, seed=3)         # another seed of the folds and the model
    assert fits["out_of_fold"] == runs + 2
    monkeypatch.setattr(estimates, "GRADIENT_BOOSTING", {"max_iter": 21, "learning_rate": 0.1,
                                                         "early_stopping": False}, raising=False)
    assert misses()                                    # other estimator settings
    monkeypatch.setattr(estimates, "GRADIENT_BOOSTING", {"max_iter": 20, "learning_rate": 0.1,
                                                         "early_stopping": False}, raising=False)
    import sklearn

    installed = sklearn.__version__
    monkeypatch.setattr(sklearn, "__version__", "0.0.1")
    assert misses()                                    # another scikit-learn
    monkeypatch.setattr(sklearn, "__version__", installed)
    from rdkit import rdBase

    rows, installed = fits["descriptor_rows"], rdBase.rdkitVersion
    monkeypatch.setattr(rdBase, "rdkitVersion", "1999.01.1")
    assert misses()                                    # another RDKit: descriptors computed again too
    assert fits["descriptor_rows"] > rows
    monkeypatch.setattr(rdBase, "rdkitVersion", installed)
    assert _all_estimates(_setup(tiny_table, tmp_path / "again")) == before
    monkeypatch.setattr(estimates, "source_digest", lambda *modules: "edited", raising=False)
    assert misses()                                    # other code computing them


def test_an_entry_that_cannot_be_trusted_is_recomputed_with_a_warning(tmp_path, tiny_table, cache, fits, caplog):
    first = _all_estimates(_setup(tiny_table, tmp_path / "run"))
    path = _estimates_file(cache)
    descriptors_file, = (cache / "descriptors").glob("*.npz")
    good = path.read_bytes()
    with np.load(path) as saved:
        arrays = {name: saved[name] for name in saved.files}

    def tampered(**changes):
        np.savez(path, **{**arrays, **changes})

    wrongs = {
        "truncated": lambda: path.write_bytes(good[: len(good) // 2]),
        "not an npz": lambda: path.write_bytes(b"hello"),
        "other numbers, same checksums": lambda: tampered(fold_estimates=arrays["fold_estimates"] + 1.0),
        "no about": lambda: np.savez(path, **{k: v for k, v in arrays.items() if k != "about"}),
        "made for another key": lambda: tampered(about=np.frombuffer(
            arrays["about"].tobytes().replace(b'"key": "', b'"key": "0'), dtype=np.uint8)),
    }
    for what, corrupt in wrongs.items():
        corrupt()
        runs = fits["out_of_fold"]
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="chemlit"):
            again = _all_estimates(_setup(tiny_table, tmp_path / what))
        assert again == first, what
        assert fits["out_of_fold"] == runs + 1, what
        assert f"ignoring cache entry {path}" in caplog.text, what
        assert any(r.levelno == logging.WARNING for r in caplog.records), what

    rows = fits["descriptor_rows"]
    descriptors_file.write_bytes(descriptors_file.read_bytes()[:1000])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="chemlit"):
        dm = _setup(tiny_table, tmp_path / "descriptors")
        assert _all_estimates(dm) == first
    assert f"ignoring cache entry {descriptors_file}" in caplog.text
    # every training molecule's descriptors computed again (none trusted); they key the estimates, which
    # are then read from their (intact) entry
    assert fits["descriptor_rows"] == rows + len(dm.records["train"])
    assert fits["out_of_fold"] == runs + 1


def test_a_cache_that_cannot_be_written_is_a_warning(tmp_path, tiny_table, cache, monkeypatch, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("CHEMLIT_CACHE", str(blocked))
    with caplog.at_level(logging.WARNING, logger="chemlit"):
        dm = _setup(tiny_table, tmp_path / "run")
        assert len(_all_estimates(dm)) == 160
    assert "could not write cache entry" in caplog.text


def test_the_second_setup_writes_no_rationale_and_gives_the_same_texts(tmp_path, tiny_table, cache, monkeypatch,
                                                                       caplog):
    def texts(run, style="compact") -> dict[str, str]:
        dm = RationaleDataModule(table=str(tiny_table), run_dir=str(tmp_path / run), rationale_style=style)
        dm.setup()
        return {r.smiles: dm.rationale(r) for records in dm.records.values() for r in records}

    first = texts("run1")
    write_rationale = rationale.write_rationale

    def refuse(*args, **kwargs):
        raise AssertionError("written again instead of read from the cache")

    monkeypatch.setattr(rationale, "write_rationale", refuse)
    monkeypatch.setattr(datamodule, "write_rationale", refuse, raising=False)
    _as_a_new_command()
    with caplog.at_level(logging.INFO, logger="chemlit"):
        assert texts("run2") == first
    (entry,) = (cache / "rationales").glob("compact-*.npz")
    assert f"compact rationales: 160 molecules from cache {entry}" in caplog.text
    assert first == {s: write_rationale(s, "compact") for s in first}
    with pytest.raises(AssertionError, match="written again"):
        texts("full", style="full")                    # another style misses
    from rdkit import rdBase

    installed = rdBase.rdkitVersion
    monkeypatch.setattr(rdBase, "rdkitVersion", "1999.01.1")
    with pytest.raises(AssertionError, match="written again"):
        texts("rdkit")                                 # another RDKit misses
    monkeypatch.setattr(rdBase, "rdkitVersion", installed)

    monkeypatch.setattr(rationale, "write_rationale", write_rationale)
    # a molecule from outside the table (a calibration molecule an export carries) is written, and the
    # table's whole entry is not rewritten for it
    dm = RationaleDataModule(table=str(tiny_table), run_dir=str(tmp_path / "outside"), rationale_style="compact")
    dm.setup()
    stamp = entry.stat().st_mtime_ns
    outside = Record(canonical_smiles("CCCCCCCCO"), None, None)
    assert outside.smiles not in first and dm.rationale(outside) == write_rationale(outside.smiles, "compact")
    assert entry.stat().st_mtime_ns == stamp

    entry.write_bytes(entry.read_bytes()[:-10])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="chemlit"):
        assert texts("corrupt") == first
    assert f"ignoring cache entry {entry}" in caplog.text
