"""``python -m chemlit.bench report``: one ``results.md`` that carries every measurement of the product.

    python -m chemlit.bench report --runs runs/pipeline [--seed-run runs/seed1] [--long runs/long]
                                   [--scaffold runs/scaffold] [--source runs/source] [--out docs]
                                   [--without-estimate MINUTES]

It trains nothing (unless ``--without-estimate``). It reads finished ``python -m chemlit pipeline`` run
directories, answers their test molecules (and, for what is fitted, their validation molecules) with their SFT and PPO exports (answers already made are reused), and writes one report,
``--out``/results.md, with its summary table (``results/report.csv``) and parity plot (``results/parity.png``)
beside it:

1. a summary table, one row per test set (the README's table is copied from it);
2. each test set: the models by the product's decoding (``configs/quickstart/sft.yaml``) beside the
   mean predictor, a random forest and the gradient boosting the prompt's estimate comes from, all
   trained on that run's training split; paired bootstrap differences, PPO against SFT first; the
   intervals' coverage; a blend and a stacking of PPO's answer with the estimate, fitted on the run's
   validation molecules; chemprop's D-MPNN where ``python -m chemlit.bench chemprop`` has answered the run
   (``chemlit/eval/chemprop_baseline.py``); the SFT without the estimate where the run has one. The default run (``--runs``) also answers greedy and with a median of 8
   (the decoding ablation), and says what the model adds to the estimate it reads;
3. the PPO run's story from its TensorBoard logs: reward and success per curriculum level, KL, validation;
4. the goals of the RL stage, each met or not;
5. the SFT ablations (``ablations.md`` of ``python -m chemlit.bench ablations``) and the throughput
   benchmark (``throughput.json``) and the PPO ablations (``ppo_ablations.md``), when they are in
   ``--out``/results/.
"""

from __future__ import annotations

import io
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from chemlit.eval.baselines import GRADIENT_BOOSTING, MEAN, RANDOM_FOREST

SFT, PPO = "SFT", "PPO"
# Made from validation answers, scored on test: what a chemist could build from the model and the estimate it reads.
BLEND = "blend w·PPO + (1 − w)·estimate, w fitted on validation"
STACKING = "stacking: median regression on the estimate and PPO's answer, fitted on validation"
NO_ESTIMATE = "SFT without the estimate in its prompt"
NO_ESTIMATE_RUN = "sft-no-estimate"   # its run directory beside cpt/, sft/, ppo/ (``--without-estimate``)
NOMINAL_COVERAGE = 0.80               # the intervals' calibrated level: SFTModule interval (0.1, 0.9), the product's
SUMMARY_HEADING = "## Summary"
THROUGHPUT_HEADING = "## PPO iteration throughput: chemlit vs TRL "
# The layout under --out (docs/ by default): the report, and beside it a folder of what it is made from or makes.
REPORT = "results.md"
RESULTS = "results"   # report.csv, parity.png, ablations.md (bench ablations), throughput.json (bench throughput)


@dataclass
class TestSet:
    """A finished pipeline run and what it stands for in the report."""

    key: str        # random | long | scaffold | source
    title: str      # the report's name for it
    runs: Path      # its --runs directory
    command: str    # how it was made


def product_decoding(configs: Path) -> tuple[str, list[str]]:
    """The decoding ``python -m chemlit predict --config sft.yaml`` uses: its label and explicit arguments."""
    import yaml

    init = yaml.safe_load((configs / "sft.yaml").read_text())["model"]["init_args"]
    if init.get("decoding", "median") != "median":
        return init["decoding"], ["--model.init_args.decoding", init["decoding"]]
    samples = int(init.get("answer_samples", 32))
    return f"median of {samples}", ["--model.init_args.decoding", "median", "--model.init_args.answer_samples",
                                    str(samples)]


def decoding_ablation(configs: Path) -> dict[str, list[str]]:
    """The product's decoding first, then greedy and a median of 8 (the earlier default)."""
    label, args = product_decoding(configs)
    others = {"greedy": ["--model.init_args.decoding", "greedy"],
              "median of 8": ["--model.init_args.decoding", "median", "--model.init_args.answer_samples", "8"]}
    return {label: args, **{k: v for k, v in others.items() if k != label}}


def _slug(label: str) -> str:
    return label.replace("median of ", "median").replace(" ", "-")


def answer(test_set: TestSet, stage: str, label: str, args: list[str], configs: Path, table: str,
           extra: tuple[str, ...] = (), split: str = "test") -> Path:
    """predictions.csv of ``stage``'s export on the run's test molecules (or ``split``'s), made unless an answer
    newer than the export exists (runs/<split>-<stage>-<decoding>)."""
    from chemlit.pipeline import test_predictions

    export = test_set.runs / stage / "export"
    if not export.is_dir():
        raise SystemExit(f"chemlit bench report: {export} is missing: finish `{test_set.command}` first")
    return test_predictions(f"{stage}-{_slug(label)}", export, configs, test_set.runs,
                            test_set.runs / "cpt" / "splits.csv", table, [*args, *extra], split)[0]


def nominal_coverage(configs: Path) -> float:
    """The product's interval level: high − low of the ``interval`` quantiles in sft.yaml (0.8 by default)."""
    import yaml

    low, high = yaml.safe_load((configs / "sft.yaml").read_text())["model"]["init_args"].get("interval", (0.1, 0.9))
    return float(high) - float(low)


def fitted_on_validation(test_set: TestSet, label: str, args: list[str], configs: Path, table: str,
                         extra: tuple[str, ...], test_ppo: dict[str, float]) -> tuple[dict, dict, str]:
    """The blend weight and the stacking, fitted on PPO's answers to the run's *validation* molecules against
    the prompt's own estimate (the SFT export's estimator), and their answers for the test molecules of
    ``test_ppo``. Returns ({name: {smiles: °C}}, {"weight": w, "stacking": (c, a, b)}, a sentence)."""
    from chemlit.data.estimates import ESTIMATOR_FILE, DescriptorEstimator
    from chemlit.eval.baselines import train_test_records
    from chemlit.eval.report import apply_stacking, fit_blend_weight, fit_stacking, read_predictions

    val_answers = read_predictions(answer(test_set, "ppo", label, args, configs, table, extra, split="val"))
    _, val = train_test_records(table, str(test_set.runs / "cpt" / "splits.csv"), "val")
    val = [r for r in val if r.smiles in val_answers]
    estimator = DescriptorEstimator.load(test_set.runs / "sft" / "export" / ESTIMATOR_FILE)
    truth = np.array([r.target for r in val])
    model = np.array([val_answers[r.smiles] for r in val])
    estimate = np.array(estimator.estimate([r.smiles for r in val]))
    weight, stacking = fit_blend_weight(model, estimate, truth), fit_stacking(model, estimate, truth)
    smiles = list(test_ppo)
    test_model, test_estimate = np.array([test_ppo[s] for s in smiles]), np.array(estimator.estimate(smiles))
    blend = np.where(np.isnan(test_model), test_estimate, weight * test_model + (1 - weight) * test_estimate)
    answers = {BLEND: dict(zip(smiles, blend.tolist())),
               STACKING: dict(zip(smiles, apply_stacking(stacking, test_model, test_estimate).tolist()))}
    sentence = (f"Fitted on PPO's answers ({label}) to the run's {len(val):,} validation molecules: the blend weight "
                f"w = {weight:.1f}; the stacking {stacking[0]:+.1f} + {stacking[1]:.2f}·estimate + "
                f"{stacking[2]:.2f}·PPO (median regression, the MAE's own loss). Both are scored on the test "
                "molecules below; an answer without a number counts as the estimate.")
    return answers, {"weight": weight, "stacking": stacking.tolist()}, sentence


def test_set_section(test_set: TestSet, configs: Path, table: str, decodings: dict[str, list[str]],
                     extra: tuple[str, ...] = ()) -> tuple[str, dict]:
    """One test set's section and its summary numbers."""
    from chemlit.eval.bootstrap import paired_bootstrap_delta
    from chemlit.eval.chemprop_baseline import CHEMPROP, read_run_predictions
    from chemlit.eval.report import (
        against_estimate,
        build_report,
        evaluation_columns,
        interval_coverage,
        rationale_fidelity,
        read_intervals,
        read_predictions,
        read_rationales,
    )

    labels = list(decodings)
    predictions, intervals, rationales = {}, {}, {}
    for label, args in decodings.items():
        for stage, name in (("ppo", PPO), ("sft", SFT)):
            csv_path = answer(test_set, stage, label, args, configs, table, extra)
            predictions[f"{name}, {label}"] = read_predictions(csv_path)
            intervals[f"{name}, {label}"] = read_intervals(csv_path)
            if label == labels[0]:
                rationales[name] = read_rationales(csv_path)
    ppo, sft = f"{PPO}, {labels[0]}", f"{SFT}, {labels[0]}"
    fitted_answers, fitted, fitted_sentence = fitted_on_validation(test_set, labels[0], decodings[labels[0]],
                                                                   configs, table, extra, predictions[ppo])
    predictions.update(fitted_answers)
    if (test_set.runs / NO_ESTIMATE_RUN / "export").is_dir():
        predictions[NO_ESTIMATE] = read_predictions(answer(test_set, NO_ESTIMATE_RUN, labels[0], decodings[labels[0]],
                                                           configs, table, extra))
    split_file = str(test_set.runs / "cpt" / "splits.csv")
    chemprop = read_run_predictions(test_set.runs)   # python -m chemlit.bench chemprop, where it was run
    if chemprop is not None:
        predictions[CHEMPROP] = {smiles: chemprop[smiles] for smiles in predictions[ppo] if smiles in chemprop}
    evaluated = evaluation_columns(predictions, split_file, table)
    pairs = [(f"{PPO}, {d}", f"{SFT}, {d}") for d in labels]
    pairs += [(ppo, GRADIENT_BOOSTING), (sft, GRADIENT_BOOSTING), (STACKING, GRADIENT_BOOSTING),
              (BLEND, GRADIENT_BOOSTING), (ppo, RANDOM_FOREST), (sft, RANDOM_FOREST), (ppo, MEAN)]
    pairs += [(ppo, CHEMPROP)] if CHEMPROP in predictions else []
    pairs += [(sft, NO_ESTIMATE)] if NO_ESTIMATE in predictions else []
    pairs += [(f"{name}, {labels[0]}", f"{name}, {d}") for name in (SFT, PPO) for d in labels[1:]]
    text = build_report(predictions, split_file, table, pairs=pairs, evaluated=evaluated, intervals=intervals,
                        notes=[f"Made by `{test_set.command}`{_commit_note(test_set.runs)}; answers by "
                               f"`python -m chemlit predict --config configs/quickstart/sft.yaml` on its exports.",
                               "", seen_sentence(test_set.runs), "", fitted_sentence],
                        heading=f"## {test_set.title}")
    _, test_records, truth, mean, columns = evaluated
    filled = {n: np.where(np.isnan(v), mean, v) for n, v in columns.items()}
    errors = {n: np.abs(v - truth) for n, v in filled.items()}
    added = {name: against_estimate(columns[name], columns[GRADIENT_BOOSTING], truth, fitted["weight"])
             for name in (sft, ppo)}
    text = text.rstrip("\n") + "\n\n" + _estimate_table(added) + "\n"
    style = rationale_style(test_set.runs / "sft" / "export", configs)
    reference = reference_rationales(rationales[SFT], style)   # SFT and PPO answered the same molecules
    fidelity = {name: rationale_fidelity(written, reference) for name, written in rationales.items()}
    text += ("\nRationale fidelity: the share of each molecule's structural facts (the parts of the rationale "
             f"the structure-only writer gives it, {style} style) that the model's greedy rationale states word "
             "for word: " + ", ".join(f"{name} {value:.1%}" for name, value in fidelity.items()) + ".\n")
    smiles = [r.smiles for r in test_records]
    optional = {key: summary_cell(columns[name], truth) if name in columns else "–"
                for key, name in (("chemprop", CHEMPROP), ("no_estimate", NO_ESTIMATE))}
    summary = {"key": test_set.key, "title": test_set.title, "n": len(truth), "decoding": labels[0],
               **{key: summary_cell(columns[name], truth) for key, name in
                  (("sft", sft), ("ppo", ppo), ("forest", RANDOM_FOREST), ("boosting", GRADIENT_BOOSTING),
                   ("mean", MEAN), ("stacking", STACKING))}, **optional,
               "ppo_minus_sft": paired_bootstrap_delta(errors[ppo], errors[sft]),
               "ppo_minus_estimate": paired_bootstrap_delta(errors[ppo], errors[GRADIENT_BOOSTING]),
               "stacking_minus_estimate": paired_bootstrap_delta(errors[STACKING], errors[GRADIENT_BOOSTING]),
               "ppo_minus_forest": paired_bootstrap_delta(errors[ppo], errors[RANDOM_FOREST]),
               "coverage": {name: interval_coverage(intervals[column], smiles, truth)["coverage"]
                            for name, column in ((SFT, sft), (PPO, ppo))},
               "fidelity": fidelity, "fitted": fitted,
               "parity": {sft: columns[sft], ppo: columns[ppo], "the estimate alone (gradient boosting)":
                          columns[GRADIENT_BOOSTING]}, "truth": truth}
    return text, summary


def rationale_style(export: Path, configs: Path) -> str:
    """The rationale style a model learned: its export's record, else the SFT config's."""
    import yaml

    info = export / "chemlit_export.json"
    style = json.loads(info.read_text()).get("rationale_style") if info.exists() else None
    return style or yaml.safe_load((configs / "sft.yaml").read_text())["data"].get("rationale_style", "full")


def reference_rationales(written: dict[str, str], style: str) -> dict[str, str]:
    """What the structure-only writer says of each molecule the model wrote for."""
    from chemlit.data.rationale import write_rationale

    return {smiles: write_rationale(smiles, style) for smiles in written}


def summary_cell(predicted: np.ndarray, truth: np.ndarray) -> str:
    """The section table's MAE cell, with the parse rate when some answers had no number."""
    from chemlit.eval.report import mae_cell, model_metrics

    m = model_metrics(predicted, truth)
    return mae_cell(m) if m["parse_rate"] in (0, 1) else f"{mae_cell(m)} ({m['parse_rate']:.0%} parsed)"


def _estimate_table(added: dict[str, dict]) -> str:
    lines = ["What the language model adds to the estimate it reads (gradient boosting, the same model as "
             "the prompt's `Descriptor estimate`): blends w·model + (1 − w)·estimate on the same molecules, w "
             "fitted on PPO's validation answers. The test-optimal w is shown for diagnosis only (it reads the "
             "test values).", "",
             "| model | mean distance from the estimate °C | correlation of the two errors | w (validation) "
             "| MAE of that blend | model MAE | estimate MAE | test-optimal w (diagnosis) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {name} | {a['mean_abs_deviation']:.1f} | {a['error_correlation']:.2f} | {a['weight']:.1f} | "
              f"{a['blend_mae']:.1f} | {a['model_mae']:.1f} | {a['estimate_mae']:.1f} | {a['best_weight']:.1f} |"
              for name, a in added.items()]
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    """One row per test set: MAE °C [95 % CI] of SFT and PPO by the product's decoding, of what can be built from
    PPO and the estimate it reads (fitted on validation), and of the baselines."""
    lines = [SUMMARY_HEADING, "",
             "MAE °C [95 % bootstrap CI] on each test set's molecules; SFT and PPO answer by "
             f"{rows[0]['decoding']} (the product's decoding); the baselines are trained on the same training "
             "split (chemprop and the SFT without the estimate: – where the report was made without them). "
             "Paired differences: negative = PPO better. Coverage: how often the measured value lies in the "
             "answer's interval.", "",
             "| test set | molecules | SFT | PPO | PPO − SFT | estimate alone (gradient boosting) | PPO − estimate "
             "| stacking (fitted on validation) | random forest | chemprop D-MPNN | SFT without the estimate "
             "| mean predictor | interval coverage SFT / PPO | rationale facts right: SFT / PPO |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fidelity = " / ".join(f"{r['fidelity'][name]:.0%}" for name in (SFT, PPO))
        coverage = " / ".join(f"{r['coverage'][name]:.1%}" for name in (SFT, PPO))
        lines.append(f"| {r['title']} | {r['n']:,} | {r['sft']} | {r['ppo']} | {r['ppo_minus_sft']} | {r['boosting']} "
                     f"| {r['ppo_minus_estimate']} | {r['stacking']} | {r['forest']} | {r['chemprop']} "
                     f"| {r['no_estimate']} | {r['mean']} | {coverage} | {fidelity} |")
    return "\n".join(lines)


def goals_table(rows: list[dict], nominal: float) -> str:
    """Issue 25's goals, each against the measured rows: met or not, with the number that decides it."""
    lines = ["## Goals", "", "The RL stage's goals, on the product's own decoding, each checked against the rows "
             "above.", "", "| goal | test set | measured [95 % CI] | met |", "|---|---|---|---|"]

    def add(goal: str, row: dict, measured: str, met: bool) -> None:
        lines.append(f"| {goal} | {row['title']} | {measured} | {'yes' if met else 'no'} |")

    for row in rows:
        delta = row["ppo_minus_sft"]
        if row["key"] in ("random", "seed"):
            add("PPO − SFT ≤ −1.5 °C, CI excluding 0", row, str(delta), delta.estimate <= -1.5 and delta.high < 0)
        elif row["key"] in ("scaffold", "source"):
            add("PPO − SFT: CI not above 0", row, str(delta), delta.low <= 0)
    for row in rows:
        if row["key"] in ("random", "seed"):
            against = row["ppo_minus_estimate"]
            add("PPO − estimate ≤ 0 (aim: CI below 0)", row, str(against), against.estimate <= 0)
    for row in rows:
        coverage = row["coverage"][PPO]
        add(f"PPO's interval coverage within 2 points of {nominal:.0%}", row, f"{coverage:.1%}",
            abs(coverage - nominal) <= 0.02)
    return "\n".join(lines)


def tensorboard_scalars(run_dir: Path) -> dict[str, list]:
    """Every scalar event of a run's TensorBoard logs (all its version_* folders, in order), by tag; none
    sampled away."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list] = {}
    for path in sorted(run_dir.glob("version_*/events.out.tfevents*")):
        events = EventAccumulator(str(path), size_guidance={"scalars": 0})
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(events.Scalars(tag))
    return scalars


def append_and_write(text: str, rows: list[str], path: Path) -> str:
    """``text`` with ``rows`` appended as lines, written whole to ``path`` (its folder made); returns it."""
    from chemlit.data.files import write_whole

    text = text.rstrip("\n") + "\n" + "\n".join(rows) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, text)
    return text


def ppo_story(run_dir: Path) -> str:
    """The PPO run's TensorBoard scalars in numbers: per curriculum level, and the KL and validation."""
    scalars = tensorboard_scalars(run_dir)
    if "ppo/score_mean" not in scalars:
        return ""

    def ends(tag: str, n: int = 10) -> str:
        values = [e.value for e in scalars.get(tag, [])]
        if not values:
            return "–"
        return f"{np.mean(values[:n]):.2f} → {np.mean(values[-n:]):.2f}"

    levels = sorted({t.rsplit("_", 1)[1] for t in scalars if t.startswith("curriculum/score_mean_")},
                    key=lambda level: -float(level.rstrip("C")))
    lines = [f"## The PPO run, from its TensorBoard logs (`{run_dir}`)", "",
             f"{len(scalars['ppo/score_mean'])} iterations. Means of the first and the last 10 logged values:", "",
             "| curriculum level (tolerance) | iterations | from iteration | mean score | success rate |",
             "|---|---|---|---|---|"]
    for level in levels:
        score = scalars[f"curriculum/score_mean_{level}"]
        lines.append(f"| {level.replace('C', ' °C')} | {len(score)} | {score[0].step} | "
                     f"{ends(f'curriculum/score_mean_{level}')} | {ends(f'curriculum/success_rate_{level}')} |")
    lines += ["", "| quantity | first → last |", "|---|---|"]
    for tag, what in (("ppo/kl_per_sequence", "KL per answer to the reference (nats)"), ("ppo/kl_coef", "β"),
                      ("ppo/entropy", "entropy per token"), ("ppo/sample_mae", "MAE of the sampled answers °C"),
                      ("ppo/greedy_mae", "MAE of the greedy answers °C"),
                      ("ppo/explained_variance", "explained variance of the value head")):
        lines.append(f"| {what} | {ends(tag)} |")
    val = scalars.get("val/mae", [])
    if val:
        lines.append(f"| validation MAE °C (greedy, at iterations {', '.join(str(e.step) for e in val)}) | "
                     + " → ".join(f"{e.value:.1f}" for e in val) + " |")
    return "\n".join(lines)


def run_record(runs: Path) -> dict:
    """The run's ``pipeline_run.json`` (command, commit, date, minutes per part), {} when it has none."""
    from chemlit.pipeline import RUN_RECORD

    path = runs / RUN_RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def _stage_config(stage_dir: Path) -> dict:
    """The config LightningCLI saved for a stage (its newest version_*), {} where it has none."""
    import yaml

    from chemlit.pipeline import newest

    config = newest(stage_dir, "version_*/config.yaml")
    return yaml.safe_load(config.read_text()) if config else {}


def stage_examples(stage_dir: Path) -> Optional[dict]:
    """What a finished stage trained on: its optimizer steps (the export's ``global_step``) and the rows they
    took (steps x batch size x gradient accumulation x devices x nodes, from the stage's saved config), with
    the run's training molecules (``data_summary.json``). PPO: the molecules it rolled out
    (``ppo/molecules_seen``) and its iterations. None where the stage has no export."""
    info_path = stage_dir / "export" / "chemlit_export.json"
    if not info_path.exists():
        return None
    info = json.loads(info_path.read_text())
    config = _stage_config(stage_dir)
    trainer, data = config.get("trainer") or {}, config.get("data") or {}
    summary = stage_dir / "data_summary.json"
    train = json.loads(summary.read_text())["splits"]["train"]["molecules"] if summary.exists() else None
    devices = trainer.get("devices")
    ranks = (devices if isinstance(devices, int) and devices > 0 else 1) * int(trainer.get("num_nodes") or 1)
    seen = {"stage": info.get("stage", stage_dir.name), "steps": int(info.get("global_step", 0)), "train_molecules": train,
            "batch_size": data.get("batch_size")}
    if seen["stage"] == "ppo":
        scalars = tensorboard_scalars(stage_dir)
        rolled = scalars.get("ppo/molecules_seen", [])
        seen.update(rows=int(rolled[-1].value) if rolled else None, iterations=len(scalars.get("ppo/score_mean", [])))
    elif seen["batch_size"]:
        seen["rows"] = seen["steps"] * int(seen["batch_size"]) * int(trainer.get("accumulate_grad_batches") or 1) * ranks
    return seen


def seen_sentence(runs: Path) -> str:
    """One sentence: how much each stage of a run trained on (a time budget cuts a slow machine's stages short)."""
    parts = []
    for stage in ("cpt", "sft", "ppo"):
        seen = stage_examples(runs / stage)
        if not seen:
            continue
        train, rows = seen["train_molecules"], seen.get("rows")
        if stage == "cpt":
            parts.append(f"CPT {seen['steps']:,} steps" + (f" of {seen['batch_size']} sequences ({rows:,})" if rows else ""))
        elif stage == "sft":
            parts.append(f"SFT {seen['steps']:,} steps, {rows:,} molecules"
                         + (f" ({rows / train:.1f} passes over the {train:,} training molecules)" if rows and train else "")
                         if rows else f"SFT {seen['steps']:,} steps")
        elif rows is not None:
            parts.append(f"PPO {seen['iterations']:,} iterations, {rows:,} molecules rolled out"
                         + (f" ({rows / train:.0%} of the training molecules)" if train else ""))
    return ("What the stages trained on: " + "; ".join(parts) + ".") if parts else ""


def _commit_note(runs: Path) -> str:
    record = run_record(runs)
    if not record:
        return " (no pipeline_run.json: the command is the documented one, not a record)"
    parts = ", ".join(f"{part} {minutes}" for part, minutes in record.get("parts_minutes", {}).items())
    return (f" at commit {record.get('commit', '?')}, finished {record.get('finished', '?')}, "
            f"{record.get('minutes', '?')} min in all ({parts} min)"
            + (f", precision auto: {record['precision_auto']}" if record.get("precision_auto") else ""))



def train_without_estimate(test_set: TestSet, configs: Path, table: str, minutes: float,
                           extra: tuple[str, ...] = ()) -> Path:
    """runs/sft-no-estimate: the SFT stage from the run's CPT export with no estimate in its prompts, for
    ``minutes`` of training (skipped when its export exists): the language model on its own."""
    from chemlit.cli import main as cli_main
    from chemlit.pipeline import STAGES, as_max_time, stage_args

    export = test_set.runs / NO_ESTIMATE_RUN / "export"
    if not export.is_dir():
        stage = next(s for s in STAGES if s.name == "sft")
        cli_main(stage_args(stage, configs, test_set.runs, test_set.runs / "cpt" / "splits.csv",
                            test_set.runs / "cpt" / "export", table,
                            ["--data.descriptor_estimate", "false", "--trainer.max_time", as_max_time(minutes * 60),
                             *extra], NO_ESTIMATE_RUN))
    return export


def full_report(test_sets: list[TestSet], out: Path, configs: Path, table: str = "builtin",
                extra: tuple[str, ...] = (), without_estimate_minutes: float | None = None,
                train_extra: tuple[str, ...] = ()) -> str:
    """Every section in one ``out/results.md`` (and ``out/results/``: ``report.csv``, the summary numbers, and
    ``parity.png``); returns the text.
    ``extra``: more arguments for every answering run (tests shorten the answers with it).
    ``without_estimate_minutes``: first train each run's SFT without the estimate for that long (where it has
    none yet; ``train_extra``: more arguments for that fit)."""
    from chemlit.bench.machine import machine
    from chemlit.data.files import write_csv, write_whole
    from chemlit.pipeline import code_commit

    sections, rows = [], []
    if without_estimate_minutes:
        for test_set in test_sets:
            train_without_estimate(test_set, configs, table, without_estimate_minutes, tuple(train_extra))
    for i, test_set in enumerate(test_sets):
        decodings = decoding_ablation(configs) if i == 0 else dict([next(iter(decoding_ablation(configs).items()))])
        text, summary = test_set_section(test_set, configs, table, decodings, tuple(extra))
        sections.append(text)
        rows.append(summary)
    story = ppo_story(test_sets[0].runs / "ppo")
    commands = "\n".join([f"    {t.command}" for t in test_sets] + chemprop_commands(test_sets))
    args = _report_args(test_sets) + (f" --without-estimate {without_estimate_minutes:g}" if without_estimate_minutes else "")
    header = [f"# chemlit report: {len(test_sets)} test set{'s' if len(test_sets) > 1 else ''}", "",
              f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}. Report made at commit {code_commit()} by:",
              "", f"    python -m chemlit.bench report {args}", "", "after:", "", commands, ""]
    parts = ["\n".join(header), summary_table(rows), goals_table(rows, nominal_coverage(configs)), *sections]
    if story:
        parts.append(story)
    ablations = out / RESULTS / "ablations.md"
    if ablations.exists():
        text = ablations.read_text(encoding="utf-8")
        parts.append("## SFT ablations (`ablations.md`, copied)\n\n" + text.replace("\n## ", "\n### ")
                     .replace("# Report:", "Test molecules:", 1))
    ppo_ablations = out / RESULTS / "ppo_ablations.md"
    if ppo_ablations.exists():  # the curriculum and objective ablations, decided on validation molecules
        text = ppo_ablations.read_text(encoding="utf-8")
        parts.append("## PPO ablations on validation molecules (`ppo_ablations.md`, copied)\n\n"
                     + text.split("\n", 1)[1].replace("\n## ", "\n### "))
    throughput = out / RESULTS / "throughput.json"
    if throughput.exists():
        parts.append(throughput_markdown(json.loads(throughput.read_text())))
    stages = out / RESULTS / "stages.json"
    if stages.exists():  # python -m chemlit.bench stages
        from chemlit.bench.stages import stages_markdown

        parts.append(stages_markdown(json.loads(stages.read_text())))
    report = "\n\n".join(p.rstrip("\n") for p in parts) + "\n"
    (out / RESULTS).mkdir(parents=True, exist_ok=True)
    write_whole(out / REPORT, report)
    parity_png(out / RESULTS / "parity.png", rows[0]["parity"], rows[0]["truth"])
    write_csv([{"test set": r["title"], "molecules": r["n"], "decoding": r["decoding"],
                **{f"{k} MAE [95% CI]": r[k] for k in ("sft", "ppo", "forest", "boosting", "mean", "stacking",
                                                       "chemprop", "no_estimate")},
                "PPO - SFT": str(r["ppo_minus_sft"]), "PPO - estimate": str(r["ppo_minus_estimate"]),
                "stacking - estimate": str(r["stacking_minus_estimate"]), "PPO - forest": str(r["ppo_minus_forest"]),
                **{f"{name} interval coverage": round(v, 4) for name, v in r["coverage"].items()},
                **{f"{name} rationale fidelity": round(v, 4) for name, v in r["fidelity"].items()}} for r in rows],
              out / RESULTS / "report.csv")
    return report


def throughput_markdown(result: dict) -> str:
    """The report's throughput section: ``bench throughput``'s result (one run per CPU kind; an older file's single
    summary is one run)."""
    runs = result.get("runs", [result])
    setup, theirs = runs[0]["setup"], runs[0]["trl"]
    command = result.get("command") or f"python -m chemlit.bench throughput --iterations {setup['timed_iterations']}"
    lines = [THROUGHPUT_HEADING + theirs.get("trl_version", "0.11.4"), "",
             f"Same model ({setup['model']}), {setup['samples_per_iteration']} samples per iteration "
             f"({setup['prompts']} prompts x {setup['samples_per_prompt']}), up to {setup['max_new_tokens']} new tokens, "
             f"{setup['ppo_epochs']} PPO epochs x {setup['minibatches']} minibatches; "
             f"{setup['timed_iterations']} timed iterations after a warm-up"
             + (", chemlit's and TRL's in turn" if "paired_ratios" in runs[0] else "") + ", samples/s from the median. "
             f"Made by: `{command}`" + (f" on {result['date']}" if "date" in result else "")
             + (f" on {setup['machine']}" if len(runs) == 1 and "machine" in setup else "") + ".", ""]
    for run in runs:
        if len(runs) > 1:
            lines += [f"### {run.get('kind', 'native')}: {run['setup'].get('machine', '')}"
                      + (f" ({', '.join(f'{k}={v}' for k, v in run['setup']['env'].items())})"
                         if run["setup"].get("env") else ""), ""]
        lines += _throughput_run(run)
    return "\n".join(lines)


def _throughput_run(summary: dict) -> list[str]:
    ours, theirs = summary["chemlit"], summary["trl"]
    lines = [
        "| implementation | median s / iteration | timed iterations (s) | mean response length (tokens) "
        "| samples / s | response tokens / s |", "|---|---|---|---|---|---|",
        _throughput_row("chemlit PPOModule", ours),
        _throughput_row(f"TRL {theirs.get('trl_version', '')} PPOTrainer.generate + step", theirs), "",
        (f"Ratio chemlit / TRL: **{summary['ratio_chemlit_over_trl']:.2f}x** in samples/s, the median over the "
         f"iteration pairs ({', '.join(f'{r:.2f}' for r in summary['paired_ratios'])}); "
         f"{summary['ratio_of_median_samples_per_second']:.2f}x from the median iterations"
         if "paired_ratios" in summary else
         f"Ratio chemlit / TRL: **{summary['ratio_chemlit_over_trl']:.2f}x** in samples/s")
        + (f", {ours['response_tokens_per_second'] / theirs['response_tokens_per_second']:.2f}x in response tokens/s"
           if "response_tokens_per_second" in ours else "")
        + ". Rollout: chemlit "
        f"{ours['rollout_tokens_per_second']:.0f} tokens/s vs the model's own cached `generate` loop "
        f"{ours['generate_tokens_per_second']:.0f} tokens/s on the same prompts.", ""]
    if "gflop" in ours and "gflop" in theirs:
        lines += [f"Work per iteration (matmul and attention FLOPs, counted on one untimed iteration each): chemlit "
                  f"{ours['gflop']:.0f} GFLOP, TRL {theirs['gflop']:.0f} GFLOP ({theirs['gflop'] / ours['gflop']:.2f}x "
                  "chemlit's: TRL computes every sample's prompt again and cannot share it across a group).", ""]
    profiled = [(name, r) for name, r in (("chemlit", ours), ("TRL", theirs)) if r.get("profiled")]
    if profiled:
        lines += ["Where an iteration's time goes, in seconds (one profiled, untimed iteration each; matmuls = "
                  "mm/addmm/bmm/baddbmm, other ops = every other ATen op, outside ops = Python, autograd's engine, "
                  "Lightning). The profiler's cost per op inflates the small ops, the more so the more of them "
                  "an iteration runs; the matmuls' seconds are the ones to compare:", ""]
        for name, r in profiled:
            kinds = r["profiled"]["kinds"]
            lines.append(f"- {name} (profiled {r['profiled']['seconds']:.2f} s, timed median "
                         f"{statistics.median(r['seconds_per_iteration']):.2f} s): "
                         + ", ".join(f"{kind} {v:.2f}" for kind, v in kinds.items()))
        lines.append("")
    twice = summary.get("twice_trl")
    if twice:
        lines += [f"Twice TRL's samples/s needs chemlit's iteration in {twice['target_seconds']:.2f} s. At its median "
                  f"its matmuls and attention take {twice['matmul_and_attention_seconds']:.2f} s and the rest "
                  f"{twice['rest_seconds']:.2f} s, which would have to shrink by {100 * twice['rest_cut']:.0f} % "
                  f"(with no time outside the matmuls and attention: {twice['ratio_with_no_rest']:.2f}x TRL).", ""]
    return lines


def replace_section(path: Path, heading: str, section: str) -> None:
    """A report made earlier gets a new ``section`` in place of the one under ``heading`` (appended where it has
    none); the rest of it is left as it was."""
    from chemlit.data.files import write_whole

    if path.exists():
        text = path.read_text(encoding="utf-8")
        start = text.find(heading)
        if start < 0:
            write_whole(path, text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n")
            return
        end = text.find("\n## ", start + len(heading))
        rest = text[end + 1:] if end >= 0 else ""
        write_whole(path, text[:start] + section.rstrip("\n") + "\n" + ("\n" + rest if rest else ""))


def replace_throughput_section(path: Path, section: str) -> None:
    """A report made earlier gets the new throughput section (the rest of it is left as it was)."""
    replace_section(path, THROUGHPUT_HEADING, section)


def _throughput_row(name: str, result: dict) -> str:
    seconds, lengths = result["seconds_per_iteration"], result.get("mean_response_length", [])
    tokens_per_second = result.get("response_tokens_per_second")
    return (f"| {name} | {statistics.median(seconds):.2f} | {', '.join(f'{x:.1f}' for x in seconds)} | "
            f"{', '.join(f'{x:.0f}' for x in lengths)} | {result['samples_per_second']:.1f} | "
            + (f"{tokens_per_second:.0f} |" if tokens_per_second else "– |"))


def parity_png(path: Path, models: dict, truth: np.ndarray) -> None:
    """Predicted vs measured for the default run's test molecules, one panel per model (for the README)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from chemlit.data.files import write_whole
    from chemlit.eval.plots import parity_figure

    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4.5), dpi=100)
    for ax, (name, values) in zip(np.atleast_1d(axes), models.items()):
        parity_figure(values.tolist(), truth.tolist(), name, ax=ax)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    write_whole(path, buffer.getvalue())


def chemprop_commands(test_sets: list[TestSet]) -> list[str]:
    """The command that made the chemprop answers the report read (one line per setting), where there are any."""
    from chemlit.eval.chemprop_baseline import RECORD

    by_setting: dict[tuple, list[str]] = {}
    for t in test_sets:
        record = t.runs / "chemprop" / RECORD
        if record.exists():
            info = json.loads(record.read_text())
            by_setting.setdefault((info.get("epochs"), info.get("seed"), info.get("table")), []).append(str(t.runs))
    return [f"    python -m chemlit.bench chemprop --runs {' '.join(runs)} --epochs {epochs}"
            + (f" --seed {seed}" if seed else "") + (f" --table {table}" if table and table != "builtin" else "")
            + "   (in an environment with pip install -e '.[chemprop]')"
            for (epochs, seed, table), runs in by_setting.items()]


def _report_args(test_sets: list[TestSet]) -> str:
    flags = {"random": "--runs", "seed": "--seed-run", "long": "--long", "scaffold": "--scaffold", "source": "--source"}
    return " ".join(f"{flags[t.key]} {t.runs}" for t in test_sets)


TITLES = {"random": "Random split, the default pipeline (30-minute budget)",
          "seed": "Random split, the default pipeline again with another seed",
          "long": "Random split, a longer run",
          "scaffold": "Murcko-scaffold split",
          "source": "Out-of-source split: train on one source, test on the molecules only the other has"}
COMMANDS = {"random": "python -m chemlit pipeline --runs {runs}",
            "seed": "python -m chemlit pipeline --runs {runs} --seed 1",
            "long": "python -m chemlit pipeline --runs {runs} --minutes 50 --stage-args sft \"--trainer.max_epochs 8\" "
                    "--stage-args ppo \"--trainer.limit_train_batches 1000\"",
            "scaffold": "python -m chemlit pipeline --runs {runs} --split scaffold --minutes 12",
            "source": "python -m chemlit pipeline --runs {runs} --split source --minutes 12"}


def test_sets_from_args(runs: Path, long: Path | None, scaffold: Path | None, source: Path | None,
                        seed: Path | None = None) -> list[TestSet]:
    """The run directories given, each with the command its pipeline_run.json recorded (or the documented one)."""
    given = {"random": runs, "seed": seed, "long": long, "scaffold": scaffold, "source": source}
    return [TestSet(key, TITLES[key], path, run_record(path).get("command") or COMMANDS[key].format(runs=path))
            for key, path in given.items() if path]
