import csv

import numpy as np

from chemlit.data.records import read_table
from chemlit.data.splits import make_split, write_split
from chemlit.eval.report import main


def _predictions(path, pairs, intervals=None):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["smiles", "prediction", *(["low", "high"] if intervals else []), "rationale", "measured"])
        for i, (smiles, value) in enumerate(pairs):
            bounds = list(intervals[i]) if intervals else []
            writer.writerow([smiles, "" if value is None else value, *bounds, "r", ""])
    return str(path)


def test_report_compares_model_with_baselines_on_the_same_molecules(tiny_table, tmp_path, capsys):
    records, _ = read_table(tiny_table)
    split = make_split([r.smiles for r in records], "random", (0.6, 0.0, 0.4), seed=0)
    split_file = write_split(split, tmp_path / "splits.csv")
    test = [r for r in records if split[r.smiles] == "test"]
    rng = np.random.default_rng(0)
    good = [(r.smiles, r.target + rng.normal(0, 3)) for r in test]
    good[0] = (good[0][0], None)                                    # one answer without a number
    noisy = [(r.smiles, r.target + rng.normal(0, 80)) for r in test]
    # intervals: the first half of the molecules contain their measured value, the rest lie above it
    bounds = [(r.target - 5, r.target + 5) if i < len(test) // 2 else (r.target + 1, r.target + 11)
              for i, r in enumerate(test)]
    out = tmp_path / "report.md"
    main(["--predictions", _predictions(tmp_path / "good.csv", good, bounds), "--name", "good",
          "--compare", f"noisy={_predictions(tmp_path / 'noisy.csv', noisy)}",
          "--split-file", str(split_file), "--table", str(tiny_table), "--trees", "30", "--out", str(out)])
    report = out.read_text()
    assert report in capsys.readouterr().out                         # printed and written alike
    assert f"# Report: {len(test)} test molecules" in report
    for name in ("good", "noisy", "mean of training targets", "random forest on RDKit descriptors"):
        assert f"| {name} |" in report
    assert f"| good | " in report and f"{(len(test) - 1) / len(test):.1%} |" in report   # parse rate
    line = next(l for l in report.splitlines() if l.startswith("| good − mean of training targets"))
    assert line.endswith("| yes |")                                  # 3 °C noise beats the mean, clearly
    assert "good: 1" in report
    coverage = next(l for l in report.splitlines() if l.startswith("| good | ") and "| 10 |" in l)
    assert coverage == f"| good | {len(test)} | {(len(test) // 2) / len(test):.1%} | 10 |"
    assert not any(l.startswith("| noisy | ") and l.endswith("| 10 |") for l in report.splitlines())
