import csv

import numpy as np
import pytest

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


def test_against_estimate_finds_whether_the_model_adds_to_the_estimate_it_reads():
    from chemlit.eval.report import against_estimate

    rng = np.random.default_rng(0)
    truth = rng.normal(100, 50, 4000)
    estimate = truth + rng.normal(0, 20, truth.size)
    # a model that only copies the estimate and adds noise of its own: every step away from the estimate costs
    copier = estimate + rng.normal(0, 10, truth.size)
    a = against_estimate(copier, estimate, truth)
    assert a["best_weight"] == 0.0 and a["best_blend_mae"] == a["estimate_mae"] < a["model_mae"]
    assert a["error_correlation"] > 0.85 and 7 < a["mean_abs_deviation"] < 9   # E|N(0, 10)| = 8
    # a model with its own, independent information: the best blend weighs it, and beats both
    informed = truth + rng.normal(0, 20, truth.size)
    informed[:10] = np.nan                                                  # answers without a number are left out
    b = against_estimate(informed, estimate, truth)
    assert b["n"] == truth.size - 10 and 0.4 <= b["best_weight"] <= 0.6   # equal noise: equal weights
    assert b["best_blend_mae"] < 0.8 * min(b["model_mae"], b["estimate_mae"]) and abs(b["error_correlation"]) < 0.1


def test_rationale_fidelity_counts_the_structural_facts_stated_word_for_word():
    from chemlit.data.rationale import write_rationale
    from chemlit.eval.report import rationale_facts, rationale_fidelity

    aspirin, ethanol = "CC(=O)Oc1ccccc1C(=O)O", "CCO"
    reference = {s: write_rationale(s, "compact") for s in (aspirin, ethanol)}
    facts = rationale_facts(reference[aspirin])
    assert "donors 1" in facts and "acceptors 3" in facts and not any(f.endswith((",", ";", ".")) for f in facts)
    assert rationale_fidelity(reference, reference) == 1.0
    wrong = reference[aspirin].replace("donors 1", "donors 2")            # one count wrong out of len(facts)
    assert rationale_fidelity({aspirin: wrong}, reference) == pytest.approx(1 - 1 / len(facts))
    # word for word: "donors 12" does not state "donors 1"; facts the model adds cost nothing, facts it omits do
    assert rationale_fidelity({aspirin: reference[aspirin].replace("donors 1", "donors 12")}, reference) \
        == pytest.approx(1 - 1 / len(facts))
    assert rationale_fidelity({aspirin: reference[aspirin] + " nitro, urea."}, reference) == 1.0
    assert rationale_fidelity({aspirin: "donors 1, acceptors 3"}, reference) == pytest.approx(2 / len(facts))
    # each molecule weighs the same; a molecule without a reference is left out
    both = rationale_fidelity({aspirin: wrong, ethanol: "", "C": "x"}, reference)
    assert both == pytest.approx((1 - 1 / len(facts) + 0.0) / 2)


def test_stacking_and_the_blend_weight_are_fitted_on_one_set_and_scored_on_another():
    """Median regression on (estimate, model): fitted on validation-like molecules, it removes the model's bias
    and weighs two independent errors equally on new molecules; a few wild values do not move it."""
    from chemlit.eval.report import apply_stacking, blend_mae, fit_blend_weight, fit_stacking

    rng = np.random.default_rng(1)

    def molecules(n):
        truth = rng.normal(100, 60, n)
        return truth, truth + rng.normal(0, 20, n), truth + 10 + rng.normal(0, 20, n)   # estimate, biased model

    truth, estimate, model = molecules(3000)
    clean = fit_stacking(model, estimate, truth)
    assert abs(clean[1] - clean[2]) < 0.08 and 0.85 < clean[1] + clean[2] < 1.02   # equal noise: equal weights
    truth[:60] += 1000                                  # 2 % wild values: least squares would move by ~20 °C
    c = fit_stacking(model, estimate, truth)
    assert abs(c[0] - clean[0]) < 2 and np.abs(c[1:] - clean[1:]).max() < 0.03
    new_truth, new_estimate, new_model = molecules(3000)
    new_model[:5] = np.nan                              # no number: the estimate stands in
    stacked = apply_stacking(c, new_model, new_estimate)
    assert not np.isnan(stacked).any()
    assert np.mean(np.abs(stacked - new_truth)) < 0.8 * np.mean(np.abs(new_estimate - new_truth))
    w = fit_blend_weight(model[60:], estimate[60:], truth[60:])
    assert 0.3 <= w <= 0.6 and blend_mae(new_model, new_estimate, new_truth, w) < blend_mae(
        new_model, new_estimate, new_truth, 0.0)
    assert fit_blend_weight(estimate, estimate, truth) == 0.0    # a tie goes to the estimate alone


def _stage_dir(root, stage, steps, config, train=1000):
    import json

    import yaml

    (root / stage / "export").mkdir(parents=True)
    (root / stage / "export" / "chemlit_export.json").write_text(json.dumps({"stage": stage, "global_step": steps}))
    (root / stage / "version_0").mkdir()
    (root / stage / "version_0" / "config.yaml").write_text(yaml.safe_dump(config))
    (root / stage / "data_summary.json").write_text(json.dumps({"splits": {"train": {"molecules": train}}}))
    return root / stage


def test_the_report_says_how_much_each_stage_trained_on(tmp_path):
    # SFT: steps x batch x accumulation x devices (a run cut short by its time budget shows fewer passes);
    # PPO: the molecules it logged as rolled out, not its optimizer steps (8 per iteration).
    from torch.utils.tensorboard import SummaryWriter

    from chemlit.bench.report import seen_sentence, stage_examples

    _stage_dir(tmp_path, "cpt", 10, {"trainer": {"devices": 1}, "data": {"batch_size": 4}})
    _stage_dir(tmp_path, "sft", 125, {"trainer": {"devices": 2, "accumulate_grad_batches": 2},
                                      "data": {"batch_size": 8}})
    ppo = _stage_dir(tmp_path, "ppo", 24, {"trainer": {"devices": 1}, "data": {"batch_size": 16}})
    writer = SummaryWriter(str(ppo / "version_0"))
    for i in range(3):
        writer.add_scalar("ppo/score_mean", 0.5, i)
        writer.add_scalar("ppo/molecules_seen", 16.0 * (i + 1), i)
    writer.close()
    assert stage_examples(tmp_path / "sft")["rows"] == 125 * 8 * 2 * 2
    assert stage_examples(ppo)["rows"] == 48 and stage_examples(ppo)["iterations"] == 3
    text = seen_sentence(tmp_path)
    assert "SFT 125 steps, 4,000 molecules (4.0 passes over the 1,000 training molecules)" in text
    assert "PPO 3 iterations, 48 molecules rolled out (5% of the training molecules)" in text
    assert "CPT 10 steps of 4 sequences (40)" in text
    assert seen_sentence(tmp_path / "nothing") == ""
