"""``python -m chemlit pipeline``: CPT -> SFT -> PPO -> test, in one command, resumable.

Each stage is an ordinary ``python -m chemlit fit --config ...`` run (the same LightningCLI, the
same YAML files you can run by hand); the pipeline only puts them in order, points each stage at
the previous stage's export and at one shared split file, and at the end answers the test
molecules with the SFT and the PPO model and writes one report (MAE with bootstrap intervals,
baselines, paired differences).

Time: ``--minutes`` (default 30) is the whole run's budget. Before each stage the time still left is
divided among the stages still to run and the test, in the proportions of ``BUDGET_SHARES``, and the
stage gets its part as ``trainer.max_time`` (its learning-rate schedule ends with it). A stage that
ends early leaves its time to the next ones; on a slower machine every stage trains less instead of
the run taking longer.

Resuming: a stage whose export directory exists is done (exports are written whole or not at
all) and is skipped; a stage that was interrupted restarts from its newest ``last.ckpt``. Run the
same command again after an interruption. ``--fresh`` deletes the pipeline's runs first.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from chemlit.cli import main as cli_main
from chemlit.data.files import write_whole
from chemlit.hardware import AUTO_ENV


@dataclass
class Stage:
    name: str
    configs: list[str]   # YAML files, relative to --configs
    experiment: str      # TensorBoard run name (runs/<experiment>/version_N)


STAGES = [
    Stage("cpt", ["cpt.yaml"], "cpt"),
    Stage("sft", ["sft.yaml", "after_cpt.yaml"], "sft"),
    Stage("ppo", ["ppo.yaml"], "ppo"),
]


# Parts of the budget: CPT, SFT, PPO train; "test" answers the test molecules with both models and writes the
# report (measured on 2 cores: 1.9 min per model for 1,285 molecules, 1.4 min for the report's random forest).
BUDGET_SHARES = {"cpt": 0.13, "sft": 0.49, "ppo": 0.20, "test": 0.18}
STAGE_OVERHEAD_S = 25.0  # per stage: start-up, data and tokenizer, export; not counted by max_time
MIN_STAGE_S = 60.0       # no stage gets less, however little is left


def stage_seconds(stage: str, seconds_left: float, stages_left: list[str]) -> float:
    """The wall time ``stage`` may train: its share of what is left among the stages still to run and the
    test, less its start-up and export time; at least one minute."""
    weight = sum(BUDGET_SHARES[name] for name in stages_left) + BUDGET_SHARES["test"]
    return max(seconds_left * BUDGET_SHARES[stage] / weight - STAGE_OVERHEAD_S, MIN_STAGE_S)


def as_max_time(seconds: float) -> str:
    """Lightning's ``DD:HH:MM:SS``."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"00:{hours:02d}:{minutes:02d}:{secs:02d}"


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def decoding_label(config_file: Path) -> str:
    """How a predict run answered, from the config it saved: "median of 32" or "greedy"."""
    import yaml

    try:  # the CLI saves the full config, defaults included
        init = yaml.safe_load(config_file.read_text())["model"]["init_args"]
        decoding, samples = init["decoding"], init["answer_samples"]
    except (OSError, KeyError, TypeError):
        return "answers"
    return f"median of {samples}" if decoding == "median" else decoding


def newest(root: Path, pattern: str) -> Path | None:
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def newest_last_checkpoint(log_root: Path) -> Path | None:
    return newest(log_root, "version_*/checkpoints/last*.ckpt")


def stage_args(stage: Stage, configs: Path, runs: Path, split_file: Path, previous_export: Path | None,
               table: str, extra: list[str], experiment: str | None = None) -> list[str]:
    """The ``fit`` arguments of one stage; ``experiment`` renames its run (ablations of a stage)."""
    experiment = experiment or stage.experiment
    args = ["fit"]
    for name in stage.configs:
        args += ["--config", str(configs / name)]
    args += ["--data.table", table, "--trainer.logger.init_args.save_dir", str(runs),
             "--trainer.logger.init_args.name", experiment,
             "--model.init_args.export_dir", str(runs / experiment / "export"),
             "--data.run_dir", str(runs / experiment)]
    if stage.name == "cpt":
        args += ["--data.split_file", "null"]  # the first stage makes the split...
    else:
        args += ["--data.split_file", str(split_file)]  # ...every later stage reuses it
    if previous_export is not None:
        args += ["--model.init_args.model.source", "pretrained", "--model.init_args.model.path", str(previous_export)]
    return args + extra


def predict_args(configs: Path, runs: Path, split_file: Path, export: Path, name: str, table: str,
                 split: str = "test") -> list[str]:
    """Answers for the ``split`` molecules (the test set; val where a choice is made), through the SFT stage's
    predict (same decoding for all), into runs/<split>-<name>."""
    return ["predict", "--config", str(configs / "sft.yaml"), "--data.table", table,
            "--model.init_args.model.source", "pretrained", "--model.init_args.model.path", str(export),
            "--data.split_file", str(split_file), "--data.predict_split", split,
            "--trainer.logger.init_args.save_dir", str(runs), "--trainer.logger.init_args.name", f"{split}-{name}"]


def test_predictions(name: str, export: Path, configs: Path, runs: Path, split_file: Path, table: str,
                     extra: list[str], split: str = "test") -> tuple[Path, bool]:
    """runs/<split>-<name>/version_N/predictions.csv for ``export``, made unless one newer than the export
    exists. Returns the file and whether it was made now."""
    out = newest(runs / f"{split}-{name}", "version_*/predictions.csv")
    if out is not None and out.stat().st_mtime >= export.stat().st_mtime:
        return out, False
    cli_main(predict_args(configs, runs, split_file, export, name, table, split) + extra)
    return newest(runs / f"{split}-{name}", "version_*/predictions.csv"), True


def run_pipeline(configs: Path, runs: Path, table: str = "builtin", fresh: bool = False,
                 stages: list[str] | None = None, extra: dict[str, list[str]] | None = None,
                 minutes: float | None = 30.0, base_model: str | None = None, split: str | None = None,
                 holdout_source: str = "wikidata", seed: int | None = None) -> dict:
    """Run the stages in order within ``minutes`` (None: each config's own limits); ``base_model`` replaces the
    first stage's pretrained model; ``split`` (random / scaffold / source, None: the configs') is how the first
    stage splits the table, ``holdout_source`` the test source of split=source; ``seed`` (None: the configs')
    seeds every stage's training (initialisation, order, sampling), not the split. Returns where everything is,
    each part's wall time and CPU use, and the report's text."""
    from chemlit.eval.report import build_report, read_intervals, read_predictions
    from chemlit.hardware import cpu_cores

    deadline = time.perf_counter() + minutes * 60 if minutes else None
    cores = cpu_cores()

    extra = extra or {}
    if not configs.is_dir():
        raise SystemExit(f"chemlit pipeline: error: no config directory {configs} (run from the repository root "
                         "or pass --configs)")
    if fresh and runs.exists():
        shutil.rmtree(runs)
    runs.mkdir(parents=True, exist_ok=True)
    split_file = runs / "cpt" / "splits.csv"
    previous_export: Path | None = None
    timings: dict[str, float] = {}
    cpu_use: dict[str, float] = {}   # cores busy on average during each part
    selected = [s for s in STAGES if stages is None or s.name in stages]
    to_run = [s.name for s in selected if not (runs / s.experiment / "export").is_dir()]
    for number, stage in enumerate(selected, 1):
        export = runs / stage.experiment / "export"
        header = f"[{number}/{len(selected)} {stage.name}]"
        if export.is_dir():
            print(f"chemlit pipeline {header} done earlier: {export}", flush=True)
        else:
            limit = []
            if deadline is not None:
                seconds = stage_seconds(stage.name, deadline - time.perf_counter(), to_run)
                limit = ["--trainer.max_time", as_max_time(seconds)]
                print(f"chemlit pipeline {header} may train {seconds / 60:.1f} min of the "
                      f"{(deadline - time.perf_counter()) / 60:.1f} left", flush=True)
            first = ["--model.init_args.model.path", base_model] if base_model and previous_export is None else []
            if seed is not None:
                first += ["--seed_everything", str(seed)]
            if split and stage.name == "cpt":  # the stage that makes the split
                first += ["--data.split", split] + (["--data.holdout_source", holdout_source] if split == "source"
                                                    else [])
            args = stage_args(stage, configs, runs, split_file, previous_export, table,
                              first + limit + extra.get(stage.name, []))
            checkpoint = newest_last_checkpoint(runs / stage.experiment)
            if checkpoint is not None:
                print(f"chemlit pipeline {header} resuming from {checkpoint}", flush=True)
                args += ["--ckpt_path", str(checkpoint)]
            print(f"chemlit pipeline {header} python -m chemlit {' '.join(args)}", flush=True)
            started, cpu_started = time.perf_counter(), cpu_seconds()
            cli_main(args)
            timings[stage.name] = time.perf_counter() - started
            cpu_use[stage.name] = (cpu_seconds() - cpu_started) / timings[stage.name]
            to_run.remove(stage.name)
        previous_export = export
    # ------------------------------------------------------------------ test: SFT and PPO on the same molecules
    predictions, intervals = {}, {}
    for name in ("ppo", "sft"):
        export = runs / name / "export"
        if not export.is_dir():
            continue
        started, cpu_started = time.perf_counter(), cpu_seconds()
        out, made = test_predictions(name, export, configs, runs, split_file, table, extra.get("test", []))
        if made:
            timings[f"test-{name}"] = time.perf_counter() - started
            cpu_use[f"test-{name}"] = (cpu_seconds() - cpu_started) / timings[f"test-{name}"]
        label = f"{name.upper()} model ({decoding_label(out.parent / 'config.yaml')})"
        predictions[label], intervals[label] = read_predictions(out), read_intervals(out)
    notes = ["Both models answer the same way (`python -m chemlit predict` with configs' `sft.yaml`): median = "
             "the median of the sampled numbers after the greedy rationale, its interval their 10th–90th "
             "percentile; greedy = the most likely tokens."]
    report = build_report(predictions, str(split_file), table, intervals=intervals, notes=notes) if predictions else ""
    if report:
        write_whole(runs / "report.md", report)
    return {"runs": runs, "timings": timings, "cpu_use": cpu_use, "cores": cores, "report": report}


RUN_RECORD = "pipeline_run.json"


def code_commit() -> str:
    """The short commit of the chemlit code that is running ("unknown" outside a git checkout)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_run_record(runs: Path, argv: list[str], seconds: float, result: dict) -> Path:
    """runs/pipeline_run.json: the command, the code's commit, the date, and each part's minutes -- what
    ``python -m chemlit.bench report`` says of the run (a resumed run records its last invocation)."""
    import json

    commit = code_commit()
    chosen = os.environ.get(AUTO_ENV, "")  # "<key>|<precision>|<reason>"
    record = {"command": ("python -m chemlit pipeline " + shlex.join(argv)).strip(), "commit": commit,
              "finished": time.strftime("%Y-%m-%d %H:%M"), "minutes": round(seconds / 60, 1),
              "parts_minutes": {part: round(s / 60, 1) for part, s in result["timings"].items()},
              "precision_auto": chosen.split("|", 2)[1] if chosen.count("|") >= 2 else None}
    return write_whole(runs / RUN_RECORD, json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m chemlit pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="configs/quickstart",
                        help="directory with cpt/sft/after_cpt/ppo.yaml: configs/quickstart (CPU, tiny model from "
                             "scratch) or configs/gpu (a pretrained model, 4-bit + LoRA)")
    parser.add_argument("--runs", default="runs/pipeline", help="where runs, TensorBoard logs and exports go")
    parser.add_argument("--table", default="builtin", help="builtin, or your own table (CSV/JSONL/Parquet/...)")
    parser.add_argument("--fresh", action="store_true", help="delete --runs first instead of resuming")
    parser.add_argument("--stages", nargs="+", choices=[s.name for s in STAGES], help="only these stages")
    parser.add_argument("--minutes", type=float, default=30.0,
                        help="wall-time budget of the whole run, divided among the stages (default 30); "
                             "0 = each config's own max_time")
    parser.add_argument("--base-model", help="the first stage's pretrained model (hub name or directory), for "
                                              "configs that start from one (configs/gpu)")
    parser.add_argument("--split", choices=["random", "scaffold", "source"],
                        help="how the table is split (default: the configs', random): scaffold = Murcko scaffolds "
                             "never cross splits; source = test on the molecules of --holdout-source only")
    parser.add_argument("--holdout-source", default="wikidata",
                        help="--split source: the source whose molecules are the test set (default wikidata: "
                             "the built-in table's molecules that Open Notebook lacks)")
    parser.add_argument("--seed", type=int,
                        help="seed of every stage's training (default: the configs', 0); the split stays the same, "
                             "so two seeds answer the same test molecules")
    parser.add_argument("--stage-args", nargs=2, action="append", default=[], metavar=("STAGE", "ARGS"),
                        help="more command-line arguments for one stage's run (cpt, sft, ppo, or test for the "
                             "answering), e.g. --stage-args sft '--trainer.max_epochs 6'; repeatable")
    args = parser.parse_args(argv)
    extra: dict[str, list[str]] = {}
    for stage, more in args.stage_args:
        if stage not in {s.name for s in STAGES} | {"test"}:
            parser.error(f"--stage-args: unknown stage {stage!r} (cpt, sft, ppo or test)")
        extra.setdefault(stage, []).extend(shlex.split(more))
    started = time.perf_counter()
    result = run_pipeline(Path(args.configs), Path(args.runs), args.table, args.fresh, args.stages, extra=extra,
                          minutes=args.minutes or None, base_model=args.base_model, split=args.split,
                          holdout_source=args.holdout_source, seed=args.seed)
    runs = result["runs"]
    write_run_record(runs, argv if argv is not None else sys.argv[1:], time.perf_counter() - started, result)
    print("\n" + "=" * 78)
    print(f"chemlit pipeline finished in {(time.perf_counter() - started) / 60:.1f} min"
          + (f" (budget {args.minutes:.0f} min)" if args.minutes else ""))
    chosen = os.environ.get(AUTO_ENV, "")
    if chosen:
        print("  precision auto: {1} ({2})".format(*chosen.split("|", 2)))
    for part, seconds in result["timings"].items():
        print(f"  {part:>8}: {seconds / 60:5.1f} min, {result['cpu_use'][part]:.1f} of {result['cores']} cores busy")
    for stage in STAGES:
        print(f"  {stage.name:>4} export: {runs / stage.experiment / 'export'}")
    print(f"  TensorBoard: tensorboard --logdir {runs}")
    if result["report"]:
        print(f"  report:      {runs / 'report.md'}\n")
        print(result["report"])


if __name__ == "__main__":
    main(sys.argv[1:])
