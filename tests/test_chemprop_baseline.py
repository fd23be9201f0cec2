"""The chemprop baseline: the report reads its answers only where they were made from the run's own split, and
(where chemprop is installed) it trains on the training molecules and answers the ones asked, in order."""

import csv
import json

import numpy as np
import pytest

from chemlit.eval.chemprop_baseline import FOLDER, PREDICTIONS, RECORD, read_run_predictions, split_digest


def a_run(tmp_path, split_text):
    (tmp_path / "cpt").mkdir()
    (tmp_path / "cpt" / "splits.csv").write_text(split_text)
    return tmp_path


def answers(run, digest):
    folder = run / FOLDER
    folder.mkdir()
    with open(folder / PREDICTIONS, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows([["smiles", "split", "prediction"], ["CCO", "val", "-100.5"], ["c1ccccc1", "test", "4.250"],
                          ["CC(=O)O", "test", "16.0"]])
    (folder / RECORD).write_text(json.dumps({"splits_sha256": digest}))


def test_the_report_reads_the_answers_of_one_split_made_from_the_runs_own_splits(tmp_path):
    run = a_run(tmp_path, "smiles,split\nCCO,val\nc1ccccc1,test\nCC(=O)O,test\n")
    assert read_run_predictions(run) is None                 # no chemprop answers: the column stays empty
    answers(run, split_digest(run / "cpt" / "splits.csv"))
    assert read_run_predictions(run) == {"c1ccccc1": 4.25, "CC(=O)O": 16.0}
    assert read_run_predictions(run, "val") == {"CCO": -100.5}


def test_answers_made_from_another_split_are_refused(tmp_path):
    # e.g. a scaffold run's chemprop folder copied into a random-split run: chemprop would be scored on
    # molecules it trained on
    run = a_run(tmp_path, "smiles,split\nCCO,train\nc1ccccc1,test\n")
    answers(run, split_digest(run / "cpt" / "splits.csv"))
    (run / "cpt" / "splits.csv").write_text("smiles,split\nCCO,test\nc1ccccc1,train\n")
    with pytest.raises(SystemExit, match="another split"):
        read_run_predictions(run)


def test_chemprop_trains_and_answers_in_the_order_asked(tmp_path):
    pytest.importorskip("chemprop")
    from chemlit.eval.chemprop_baseline import chemprop_baseline

    rng = np.random.default_rng(0)
    smiles = ["C" * n for n in range(1, 13)] + ["C" * n + "O" for n in range(1, 13)]
    targets = [10.0 * len(s) + (50.0 if s.endswith("O") else 0.0) + rng.normal() for s in smiles]
    train = list(range(0, 24, 2)) + [1, 3]
    values = chemprop_baseline([smiles[i] for i in train], [targets[i] for i in train], smiles[5:9], targets[5:9],
                               ["CCCCCCCCCCC", "CCCCCCCCCCCO", "C"], epochs=40, batch_size=8)
    assert values.shape == (3,) and np.isfinite(values).all()
    assert values[1] > values[0] > values[2]   # the alcohol above its alkane, the long chain above methane
