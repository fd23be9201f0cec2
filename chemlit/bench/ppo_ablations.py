"""``python -m chemlit.bench ppo-ablations``: PPO's reward, objective and curriculum, decided on validation.

Every variant is the pipeline's PPO stage (``configs/quickstart/ppo.yaml``) from the same SFT export,
on the same split, for the same number of iterations (not minutes: variants run one after another, and
a busy machine must not give one fewer updates); then the *validation* molecules are answered with the
product's decoding (the median of the sampled numbers after the greedy rationale). The test split is
not read: defaults are chosen here, and the test set is answered once, by the report.

    python -m chemlit.bench ppo-ablations --runs runs/ppo-ablations [--iterations 100] [--variants ...]

trains the CPT and SFT stages first where ``--runs`` has no SFT export yet (each for its config's epochs,
no time limit, no test answers), or uses those of a finished pipeline run (``--runs runs/pipeline``).

writes ``docs/results/ppo_ablations.md``: validation MAE with 95 % bootstrap intervals, paired
differences (each variant against the SFT start, against the descriptor estimate alone, and the
curriculum and objective comparisons), and per run the iterations, molecules rolled out, the
curriculum's moves, the KL and the success rate per level.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from chemlit.bench.machine import machine
from chemlit.cli import main as cli_main
from chemlit.eval.baselines import GRADIENT_BOOSTING
from chemlit.pipeline import STAGES, stage_args, test_predictions

REWARD = "--model.init_args.reward."
LEVELS = "--model.init_args.curriculum.tolerances_c"

# name: (label, fit arguments). Each states its grade and objective, whatever ppo.yaml's defaults are.
PPO_VARIANTS = {
    "ppo-seed": ("the seed's reward max(1 − e/tol, −1), curriculum 100 → 50 → 25 °C",
                 [REWARD + "kernel", "linear_floor", REWARD + "objective", "sample"]),
    "ppo-graded": ("graded reward tol/(tol + e), curriculum 100 → 50 → 25 °C",
                   [REWARD + "kernel", "hyperbolic", REWARD + "objective", "sample"]),
    "ppo-kernel-score": ("kernel score of the K answers (leave-one-out credit), curriculum 100 → 50 → 25 °C",
                         [REWARD + "kernel", "hyperbolic", REWARD + "objective", "kernel_score"]),
    "ppo-lenient": ("graded reward, fixed lenient 100 °C",
                    [REWARD + "kernel", "hyperbolic", REWARD + "objective", "sample", LEVELS, "[100.0]"]),
    "ppo-strict": ("graded reward, fixed strict 25 °C",
                   [REWARD + "kernel", "hyperbolic", REWARD + "objective", "sample", LEVELS, "[25.0]"]),
}
# (a, b): paired ΔMAE = MAE(a) − MAE(b) on the same validation molecules, beside each against SFT
COMPARISONS = [("ppo-graded", "ppo-seed"), ("ppo-kernel-score", "ppo-graded"),
               ("ppo-graded", "ppo-lenient"), ("ppo-graded", "ppo-strict")]


def val_predictions(name: str, export: Path, configs: Path, runs: Path, split_file: Path, table: str,
                    extra: list[str]) -> Path:
    """runs/val-<name>/version_N/predictions.csv: the validation molecules answered by ``export`` with the
    product's decoding. No interval calibration: only the numbers are compared here."""
    return test_predictions(name, export, configs, runs, split_file, table,
                            ["--model.init_args.calibration_molecules", "0", *extra], split="val")[0]


def run_story(run_dir: Path) -> dict:
    """What one PPO run did, from its TensorBoard logs and export: iterations, molecules rolled out, the
    curriculum's moves, the KL per answer and the success rate at each level (first and last quarter)."""
    from chemlit.bench.report import tensorboard_scalars

    scalars = {tag: [e.value for e in events] for tag, events in tensorboard_scalars(run_dir).items()}
    info = json.loads((run_dir / "export" / "chemlit_export.json").read_text())

    def quarters(tag: str) -> str:
        values = scalars.get(tag, [])
        if not values:
            return "–"
        q = max(len(values) // 4, 1)
        return f"{sum(values[:q]) / q:.2f} → {sum(values[-q:]) / q:.2f}"

    levels = {tag.rsplit("_", 1)[1]: quarters(tag) for tag in scalars if tag.startswith("curriculum/success_rate_")}
    seen = scalars.get("ppo/molecules_seen", [])
    return {"iterations": len(scalars.get("ppo/kl_per_sequence", [])), "molecules": int(seen[-1]) if seen else 0,
            "curriculum": info.get("curriculum_history", []), "kl": quarters("ppo/kl_per_sequence"),
            "success": levels, "sample_mae": quarters("ppo/sample_mae")}


NO_TIME_LIMIT = ["--trainer.max_time", "00:12:00:00"]  # the configs' epochs or iterations decide


def ensure_sft(runs: Path, configs: Path, table: str, extra: dict[str, list[str]]) -> Path:
    """The CPT and SFT stages as the pipeline runs them, each for its config's epochs (no time budget, no
    test answers), unless ``runs`` already has them. Returns the SFT export."""
    previous = None
    for stage in (s for s in STAGES if s.name in ("cpt", "sft")):
        export = runs / stage.experiment / "export"
        if not export.is_dir():
            cli_main(stage_args(stage, configs, runs, runs / "cpt" / "splits.csv", previous, table,
                                NO_TIME_LIMIT + extra.get(stage.name, [])))
        previous = export
    return previous


def ppo_ablations(runs: Path, out: Path, configs: Path, table: str, iterations: int, variants: list[str],
                  extra: dict[str, list[str]] | None = None) -> str:
    """Each PPO variant for ``iterations`` from the run's SFT export, its validation answers, one report.
    ``extra``: more arguments for the "cpt", "sft", "ppo" fits and the "val" answers (tests shrink them)."""
    from chemlit.bench.report import RESULTS, append_and_write
    from chemlit.data.splits import read_split
    from chemlit.eval.report import build_report, evaluation_columns, read_predictions

    extra = extra or {}
    sft, split_file = ensure_sft(runs, configs, table, extra), runs / "cpt" / "splits.csv"
    stage = next(s for s in STAGES if s.name == "ppo")
    budget = ["--trainer.limit_train_batches", str(iterations), *NO_TIME_LIMIT]
    predictions = {"SFT start": read_predictions(val_predictions("sft", sft, configs, runs, split_file, table,
                                                                 extra.get("val", [])))}
    stories, seconds = {}, {}
    for name in variants:
        label, overrides = PPO_VARIANTS[name]
        export = runs / name / "export"
        if not export.is_dir():
            started = time.perf_counter()
            cli_main(stage_args(stage, configs, runs, split_file, sft, table,
                                overrides + budget + extra.get("ppo", []), name))
            seconds[name] = time.perf_counter() - started
        predictions[label] = read_predictions(val_predictions(name, export, configs, runs, split_file, table,
                                                              extra.get("val", [])))
        stories[label] = run_story(runs / name)
        if name in seconds:
            stories[label]["minutes"] = seconds[name] / 60
    labels = {name: PPO_VARIANTS[name][0] for name in variants}
    pairs = [(label, "SFT start") for label in labels.values()]
    pairs += [(labels[a], labels[b]) for a, b in COMPARISONS if a in labels and b in labels]
    pairs += [(label, GRADIENT_BOOSTING) for label in ["SFT start", *labels.values()]]
    evaluated = evaluation_columns(predictions, str(split_file), table, held_out="val")
    train_molecules = sum(1 for v in read_split(split_file).values() if v == "train")
    notes = [f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d %H:%M')}.",
             f"Made by: `python -m chemlit.bench ppo-ablations --runs {runs} --iterations {iterations} --variants "
             f"{' '.join(variants)}`.",
             f"Every variant: `{configs / 'ppo.yaml'}` from `{sft}` for {iterations} iterations, then the validation "
             "molecules answered by `predict` (median of the sampled numbers after the greedy rationale). The "
             "test split is not read."]
    text = build_report(predictions, str(split_file), table, pairs=pairs, evaluated=evaluated, notes=notes,
                        heading="# PPO ablations on validation molecules", held_out="val")
    rows = ["", "## What each run did", "",
            f"Molecules rolled out (of {train_molecules} training molecules); KL per answer (k3, nats), sampled "
            "answers' MAE and success rate per level: mean of the first → last quarter of the iterations at it.",
            "", "| variant | iterations | minutes | molecules | curriculum (iteration, level) | KL per answer "
            "| sample MAE °C | success rate per level |", "|---|---|---|---|---|---|---|---|"]
    for label, story in stories.items():
        success = "; ".join(f"{level}: {v}" for level, v in story["success"].items()) or "–"
        minutes = f"{story['minutes']:.1f}" if "minutes" in story else "–"
        rows.append(f"| {label} | {story['iterations']} | {minutes} | {story['molecules']} | {story['curriculum']} | "
                    f"{story['kl']} | {story['sample_mae']} | {success} |")
    return append_and_write(text, rows, out / RESULTS / "ppo_ablations.md")
