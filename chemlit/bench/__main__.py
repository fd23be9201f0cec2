"""``python -m chemlit.bench``: the benchmark report (not a test; it takes a while).

    python -m chemlit.bench report     --runs runs/pipeline [--seed-run runs/seed1] [--long runs/long]
                                       [--scaffold runs/scaffold] [--source runs/source] [--out docs]
                                       [--without-estimate MINUTES]
    python -m chemlit.bench ablations  --runs runs/pipeline [--minutes 8] [--variants ...]
    python -m chemlit.bench throughput [--out docs] [--trl-dir .bench-trl] [--isa native|avx2|both]
    python -m chemlit.bench ppo-ablations --runs runs/ppo-ablations [--iterations 100] [--variants ...]
    python -m chemlit.bench stages     [--steps 3] [--isa native|avx2|both] [--out docs] [--small]
    python -m chemlit.bench chemprop   --runs runs/pipeline [runs/seed1 ...] [--epochs 30]   (the chemprop extra)

``report`` trains nothing (unless ``--without-estimate``): it reads finished pipeline runs (the default one, and optionally a longer
run, a scaffold split and an out-of-source split), answers their test molecules with their SFT and
PPO exports, and writes one ``results.md`` with every test set beside its baselines, the decoding
ablation, what the model adds to the descriptor estimate (blend and stacking fitted on validation), the PPO run's curves in numbers, and the
ablations and throughput results found in ``--out``/results/ (see chemlit/bench/report.py).
``ablations`` trains SFT variants (rationale style, none, analogues, CPT replay) for the same minutes
each from the pipeline's CPT export and writes ``results/ablations.md``: test MAE under median decoding
with intervals and paired differences, molecules per second and validation MAE by minute.
``throughput`` times one PPO iteration of chemlit against TRL 0.11.4 (see chemlit/bench/throughput.py),
writes ``results/throughput.json`` and renews the throughput section of ``results.md``. ``--out``
(default docs/) is the same folder for all three.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from chemlit.bench.machine import machine
from chemlit.bench.ppo_ablations import PPO_VARIANTS, ppo_ablations
from chemlit.cli import main as cli_main
from chemlit.eval.baselines import GRADIENT_BOOSTING, RANDOM_FOREST
from chemlit.pipeline import STAGES, stage_args, test_predictions

def run_ablation(name: str, stage_name: str, configs: Path, runs: Path, table: str, previous: Path,
                 overrides: list[str]) -> tuple[Path, float]:
    """Fit one ablation stage (skipped when its export exists); returns its export and wall time."""
    stage = next(s for s in STAGES if s.name == stage_name)
    export = runs / name / "export"
    if export.is_dir():
        return export, 0.0
    args = stage_args(stage, configs, runs, runs / "cpt" / "splits.csv", previous, table, overrides, name)
    started = time.perf_counter()
    cli_main(args)
    return export, time.perf_counter() - started


# The SFT ablations: the same CPT export, the same split, the same minutes each; test answers by the product's
# default decoding (median). Names are run directories under --runs.
SFT_VARIANTS = {  # each states the estimate either way (below), whatever sft.yaml's default is
    "sft-full": ("full rationale", ["--data.rationale_style", "full"]),
    "sft-compact": ("compact rationale", ["--data.rationale_style", "compact"]),
    "sft-none": ("no rationale", ["--data.use_rationale", "false"]),
    "sft-compact-analogues": ("compact rationale + 3 analogues", ["--data.rationale_style", "compact",
                                                                  "--data.analogues", "3"]),
    "sft-compact-replay": ("compact rationale + CPT replay 0.25", ["--data.rationale_style", "compact",
                                                                   "--data.cpt_replay_ratio", "0.25"]),
    "sft-compact-estimate": ("compact rationale + descriptor estimate", ["--data.rationale_style", "compact",
                                                                         "--data.descriptor_estimate", "true"]),
    "sft-none-estimate": ("no rationale + descriptor estimate", ["--data.use_rationale", "false",
                                                                 "--data.descriptor_estimate", "true"]),
}
SFT_VARIANTS = {name: (label, overrides if "--data.descriptor_estimate" in overrides
                       else [*overrides, "--data.descriptor_estimate", "false"])
                for name, (label, overrides) in SFT_VARIANTS.items()}


def learning_curve(run_dir: Path, examples_per_step: int, train_molecules: int) -> dict:
    """Steps, molecules per second, epochs, validation MAE by minute and forgetting of one SFT run's logs."""
    from chemlit.bench.report import tensorboard_scalars

    scalars = tensorboard_scalars(run_dir)
    loss = scalars.get("train/loss", [])
    if len(loss) < 2:
        return {}
    start = loss[0].wall_time
    steps = json.loads((run_dir / "export" / "chemlit_export.json").read_text())["global_step"]
    rate = (loss[-1].step - loss[0].step) * examples_per_step / max(loss[-1].wall_time - start, 1e-9)
    return {"steps": steps, "molecules_per_s": rate, "epochs": steps * examples_per_step / train_molecules,
            "val_mae": [((e.wall_time - start) / 60, e.value) for e in scalars.get("val/mae", [])],
            "forgetting": [e.value for e in scalars.get("val/forgetting", [])]}


def sft_ablations(runs: Path, out: Path, configs: Path, table: str, minutes: int, variants: list[str],
                  extra: dict[str, list[str]] | None = None) -> str:
    """Each SFT variant for ``minutes`` from the pipeline's CPT export, its test answers, one report
    (``out/results/ablations.md``).
    ``extra``: more arguments for the "sft" fits and the "test" answers (tests shrink the runs with them)."""
    extra = extra or {}
    from chemlit.data.splits import read_split
    from chemlit.eval.report import (
        build_report,
        evaluation_columns,
        read_intervals,
        read_predictions,
    )

    cpt = runs / "cpt" / "export"
    if not cpt.is_dir():
        raise SystemExit(f"chemlit bench: {cpt} is missing: run `python -m chemlit pipeline --runs {runs}` first")
    split_file = runs / "cpt" / "splits.csv"
    train_molecules = sum(1 for v in read_split(split_file).values() if v == "train")
    budget = ["--trainer.max_time", f"00:00:{minutes:02d}:00", "--trainer.max_epochs", "1000"]  # time decides
    predictions, intervals, curves, timings = {}, {}, {}, {}
    for name in variants:
        label, overrides = SFT_VARIANTS[name]
        export, timings[name] = run_ablation(name, "sft", configs, runs, table, cpt,
                                             overrides + budget + extra.get("sft", []))
        out_csv = test_predictions(name, export, configs, runs, split_file, table, extra.get("test", []))[0]
        predictions[label], intervals[label] = read_predictions(out_csv), read_intervals(out_csv)
        curves[label] = learning_curve(runs / name, 32, train_molecules)
    labels = list(predictions)
    pairs = [(label, labels[0]) for label in labels[1:]]
    for name in variants:  # a variant that adds one thing to another (compact + analogues) against it too
        base = max((b for b in variants if b != name and name.startswith(b + "-")), key=len, default=None)
        if base is not None and base != variants[0]:
            pairs.append((SFT_VARIANTS[name][0], SFT_VARIANTS[base][0]))
    rationale_pairs = (("sft-none", ("sft-full", "sft-compact")), ("sft-none-estimate", ("sft-compact-estimate",)))
    for without, written in rationale_pairs:
        if without in variants:  # does writing a rationale help the number?
            pairs += [(SFT_VARIANTS[name][0], SFT_VARIANTS[without][0]) for name in written
                      if name in variants and name != variants[0]]
    pairs += [(label, RANDOM_FOREST) for label in labels]
    # a model told the descriptor estimate, against the estimate alone: what the language model adds to it
    pairs += [(SFT_VARIANTS[name][0], GRADIENT_BOOSTING) for name in variants if name.endswith("-estimate")]
    evaluated = evaluation_columns(predictions, str(split_file), table)
    command = (f"`python -m chemlit.bench ablations --runs {runs} --minutes {minutes} --variants "
               f"{' '.join(variants)}` after `python -m chemlit pipeline --runs {runs}`")
    from chemlit.bench.report import RESULTS, append_and_write, product_decoding

    how = (f"Every variant: the SFT stage (`sft.yaml` + `after_cpt.yaml`) from the same CPT export for {minutes} min "
           f"of training, then the test molecules answered with the default decoding ({product_decoding(configs)[0]} "
           "after the greedy rationale).")
    notes = [f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}.", f"Made by: {command}.", how]
    text = build_report(predictions, str(split_file), table, pairs=pairs, evaluated=evaluated, intervals=intervals,
                        notes=notes)
    header = ("| variant | steps | molecules / s | epochs | val MAE °C by minute (greedy, 128 molecules) "
              "| val/forgetting |")
    rows = ["", "## Learning per minute", "", header, "|---|---|---|---|---|---|"]
    for label, c in curves.items():
        if not c:
            continue
        val = ", ".join(f"{m:.1f} min: {v:.1f}" for m, v in c["val_mae"])
        forgetting = ", ".join(f"{v:.1f}" for v in c["forgetting"]) or "–"
        rows.append(f"| {label} | {c['steps']} | {c['molecules_per_s']:.1f} | {c['epochs']:.1f} | {val} | "
                    f"{forgetting} |")
    return append_and_write(text, rows, out / RESULTS / "ablations.md")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m chemlit.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="one results.md from finished pipeline runs (trains nothing unless "
                                        "--without-estimate)")
    rep.add_argument("--runs", default="runs/pipeline", help="the default pipeline run (random split)")
    rep.add_argument("--seed-run", help="the default pipeline again with another seed (pipeline --seed 1)")
    rep.add_argument("--long", help="a longer pipeline run on the same split")
    rep.add_argument("--scaffold", help="a pipeline run with --split scaffold")
    rep.add_argument("--source", help="a pipeline run with --split source")
    rep.add_argument("--configs", default="configs/quickstart")
    rep.add_argument("--table", default="builtin")
    rep.add_argument("--out", default="docs")
    rep.add_argument("--without-estimate", type=float, metavar="MINUTES",
                     help="first train each run's SFT stage without the estimate in its prompts for MINUTES (from "
                          "its CPT export; skipped where runs/<run>/sft-no-estimate exists), and report it")
    abl = sub.add_parser("ablations", help="SFT variants for the same minutes from the pipeline's CPT export")
    abl.add_argument("--runs", default="runs/pipeline")
    abl.add_argument("--configs", default="configs/quickstart")
    abl.add_argument("--table", default="builtin")
    abl.add_argument("--out", default="docs")
    abl.add_argument("--minutes", type=int, default=8, help="training minutes of each variant")
    abl.add_argument("--variants", nargs="+", choices=list(SFT_VARIANTS), default=list(SFT_VARIANTS),
                     help="the first is the one the others are compared with")
    ppo = sub.add_parser("ppo-ablations", help="PPO's reward, objective and curriculum from one SFT export, "
                                               "on validation molecules (chemlit/bench/ppo_ablations.py)")
    ppo.add_argument("--runs", default="runs/ppo-ablations", help="trains CPT and SFT here first if needed")
    ppo.add_argument("--configs", default="configs/quickstart")
    ppo.add_argument("--table", default="builtin")
    ppo.add_argument("--out", default="docs")
    ppo.add_argument("--iterations", type=int, default=100, help="PPO iterations of each variant")
    ppo.add_argument("--variants", nargs="+", choices=list(PPO_VARIANTS), default=list(PPO_VARIANTS))
    thr = sub.add_parser("throughput", help="one PPO iteration: chemlit vs TRL 0.11.4")
    thr.add_argument("--out", default="docs")
    thr.add_argument("--trl-dir", default=".bench-trl", help="where TRL 0.11.4 is installed (--no-deps)")
    thr.add_argument("--iterations", type=int, default=5, help="timed iterations of each, after a warm-up, a counted "
                                                                 "and a profiled one")
    thr.add_argument("--isa", choices=["native", "avx2", "both"], default="native",
                     help="avx2, both: (also) in a child process limited to AVX2 (ONEDNN_MAX_CPU_ISA, "
                          "ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS)")
    thr.add_argument("--json-out", help="write the result here only (no results/throughput.json, no report section)")
    stg = sub.add_parser("stages", help="CPT tokens/s, SFT molecules/s, PPO samples/s beside the fp32 matmul peak on "
                                        "each stage's shapes (chemlit/bench/stages.py)")
    stg.add_argument("--out", default="docs")
    stg.add_argument("--configs", default="configs/quickstart")
    stg.add_argument("--steps", type=int, default=3, help="timed steps of each stage, after a warm-up and a counted one")
    stg.add_argument("--warmup", type=int, default=1, help="untimed steps before the counted one")
    stg.add_argument("--isa", choices=["native", "avx2", "both"], default="native",
                     help="avx2, both: (also) in a child process limited to AVX2 (ONEDNN_MAX_CPU_ISA, "
                          "ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS)")
    stg.add_argument("--small", action="store_true", help="tiny shapes: checks the benchmark runs, measures nothing")
    stg.add_argument("--json-out", help="write the result here only (no results/stages.json, no table)")
    cpr = sub.add_parser("chemprop", help="chemprop's D-MPNN trained on each run's split; its validation and test "
                                          "answers for the report (needs pip install 'chemlit[chemprop]')")
    cpr.add_argument("--runs", nargs="+", required=True, help="finished pipeline runs (their cpt/splits.csv)")
    cpr.add_argument("--table", default="builtin")
    cpr.add_argument("--epochs", type=int, default=30, help="training epochs; the best on validation answers")
    cpr.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    command = "python -m chemlit.bench " + " ".join(sys.argv[1:] if argv is None else argv)  # as the records give it
    from chemlit.cli import quiet_known_noise

    quiet_known_noise()
    if args.command == "ppo-ablations":
        print(ppo_ablations(Path(args.runs), Path(args.out), Path(args.configs), args.table, args.iterations,
                            args.variants))
    elif args.command == "ablations":
        print(sft_ablations(Path(args.runs), Path(args.out), Path(args.configs), args.table, args.minutes,
                            args.variants))
    elif args.command == "chemprop":
        import shutil

        from chemlit.eval.chemprop_baseline import FOLDER, split_digest, write_run_predictions

        made: dict[str, Path] = {}   # runs with the same split (--seed runs) share one training
        for run_dir in map(Path, args.runs):
            digest = split_digest(run_dir / "cpt" / "splits.csv")
            if digest in made:
                shutil.copytree(made[digest] / FOLDER, run_dir / FOLDER, dirs_exist_ok=True)
                print(f"chemlit bench chemprop: {run_dir} has {made[digest]}'s split: answers copied")
                continue
            print(f"chemlit bench chemprop: wrote {write_run_predictions(run_dir, args.table, args.epochs, args.seed)}")
            made[digest] = run_dir
    elif args.command == "stages":
        from chemlit.bench.report import RESULTS
        from chemlit.bench.stages import run as run_stages, stages_markdown

        summary = run_stages(Path(args.out) / RESULTS, args.isa, args.steps, args.warmup, args.small, Path(args.configs),
                             command, Path(args.json_out) if args.json_out else None)
        if not args.json_out:
            from chemlit.bench.report import REPORT, replace_section
            from chemlit.bench.stages import STAGES_HEADING

            section = stages_markdown(summary)
            print(section)
            if not args.small:  # the report made earlier gets the new table
                replace_section(Path(args.out) / REPORT, STAGES_HEADING, section)
    elif args.command == "throughput":
        from chemlit.bench.report import REPORT, RESULTS, replace_throughput_section, throughput_markdown
        from chemlit.bench.throughput import run

        summary = run(Path(args.out) / RESULTS, Path(args.trl_dir), args.isa, iterations=args.iterations,
                      command=command, json_out=Path(args.json_out) if args.json_out else None)
        if not args.json_out:
            section = throughput_markdown(summary)
            print(section)
            replace_throughput_section(Path(args.out) / REPORT, section)
    else:
        from chemlit.bench.report import full_report, test_sets_from_args

        test_sets = test_sets_from_args(Path(args.runs), *(Path(p) if p else None
                                                          for p in (args.long, args.scaffold, args.source,
                                                                    args.seed_run)))
        print(full_report(test_sets, Path(args.out), Path(args.configs), args.table,
                          without_estimate_minutes=args.without_estimate))


if __name__ == "__main__":
    main()
