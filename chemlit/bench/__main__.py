"""``python -m chemlit.bench``: the benchmark report (not a test; it takes a while).

    python -m chemlit.bench report     --runs runs/pipeline [--out chemlit/bench/results]
    python -m chemlit.bench ablations  --runs runs/pipeline [--minutes 8] [--variants ...]
    python -m chemlit.bench throughput [--out chemlit/bench/results] [--trl-dir .bench-trl]

``report`` starts from a finished ``python -m chemlit pipeline`` run directory and adds, on the
same split and the same test molecules:
  * the rationale ablation: the SFT stage again from the same CPT export with
    ``data.use_rationale=false`` (the number straight after the prompt), same epochs;
  * the curriculum ablation: the PPO stage again from the same SFT export, strict from step one
    (only the strictest tolerance of the curriculum, so it can neither ease nor fall back), same budget;
then answers the test molecules with every model (greedy) and writes ``report.md`` and
``report.csv``: mean predictor, random forest, SFT, PPO and the ablations, MAE with 95% bootstrap
intervals, RMSE, R², parse rate, and paired-bootstrap differences. ``ablations`` trains SFT variants
(rationale style, none, analogues, CPT replay) for the same minutes each from the pipeline's CPT
export and writes ``ablations.md``: test MAE under median decoding with intervals and paired
differences, molecules per second and validation MAE by minute. ``throughput`` times one PPO
iteration of chemlit against TRL 0.11.4 (see chemlit/bench/throughput.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

from chemlit.cli import main as cli_main
from chemlit.data.files import write_csv
from chemlit.eval.baselines import GRADIENT_BOOSTING, RANDOM_FOREST
from chemlit.pipeline import STAGES, stage_args, test_predictions

SFT, PPO = "SFT (rationale, greedy)", "PPO (curriculum, greedy)"
SFT_NO_RATIONALE, PPO_STRICT = "SFT without rationale (greedy)", "PPO strict from step one (greedy)"
MEDIAN_SAMPLES = 32
SFT_MEDIAN, PPO_MEDIAN = f"SFT (rationale, median of {MEDIAN_SAMPLES})", f"PPO (curriculum, median of {MEDIAN_SAMPLES})"
MEDIAN_ARGS = ["--model.init_args.decoding", "median", "--model.init_args.answer_samples", str(MEDIAN_SAMPLES)]
GREEDY_ARGS = ["--model.init_args.decoding", "greedy"]  # the product's default is median; these rows say greedy
PPO_LONG = "PPO, {minutes} min (curriculum, greedy)"
THROUGHPUT_HEADING = "## PPO iteration throughput: chemlit vs TRL "


def machine() -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {platform.system()}")


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


def report(runs: Path, out: Path, configs: Path, table: str, long_ppo_minutes: int = 0) -> str:
    from chemlit.eval.report import (
        build_report,
        evaluation_columns,
        model_metrics,
        read_predictions,
    )

    for stage in ("cpt", "sft", "ppo"):
        if not (runs / stage / "export").is_dir():
            raise SystemExit(f"chemlit bench: {runs / stage / 'export'} is missing: run `python -m chemlit "
                             f"pipeline --runs {runs}` first")
    timings = {}
    no_rationale, timings["sft-no-rationale"] = run_ablation(
        "sft-no-rationale", "sft", configs, runs, table, runs / "cpt" / "export", ["--data.use_rationale", "false"])
    strict, timings["ppo-strict"] = run_ablation("ppo-strict", "ppo", configs, runs, table, runs / "sft" / "export",
                                                 strict_level_args(configs))
    long_label = PPO_LONG.format(minutes=long_ppo_minutes)
    if long_ppo_minutes:  # the same PPO config, given more wall time than the pipeline's budget
        long_ppo, timings["ppo-long"] = run_ablation(
            "ppo-long", "ppo", configs, runs, table, runs / "sft" / "export",
            ["--trainer.limit_train_batches", "2000", "--trainer.max_time", f"00:00:{long_ppo_minutes:02d}:00"])
    models = {PPO: ("ppo-greedy", runs / "ppo" / "export", GREEDY_ARGS),
              SFT: ("sft-greedy", runs / "sft" / "export", GREEDY_ARGS),
              PPO_MEDIAN: ("ppo-median", runs / "ppo" / "export", MEDIAN_ARGS),
              SFT_MEDIAN: ("sft-median", runs / "sft" / "export", MEDIAN_ARGS),
              PPO_STRICT: ("ppo-strict", strict, GREEDY_ARGS),
              SFT_NO_RATIONALE: ("sft-no-rationale", no_rationale, ["--data.use_rationale", "false", *GREEDY_ARGS])}
    if long_ppo_minutes:
        models[long_label] = ("ppo-long", long_ppo, GREEDY_ARGS)
    split_file = runs / "cpt" / "splits.csv"
    predictions = {label: read_predictions(test_predictions(name, export, configs, runs, split_file, table, extra)[0])
                   for label, (name, export, extra) in models.items()}
    split = str(runs / "cpt" / "splits.csv")
    evaluated = evaluation_columns(predictions, split, table)
    pairs = [(PPO, SFT), (PPO_MEDIAN, SFT_MEDIAN), (PPO_STRICT, SFT), (PPO, PPO_STRICT), (SFT_MEDIAN, SFT),
             (SFT, SFT_NO_RATIONALE), (PPO, RANDOM_FOREST), (PPO_MEDIAN, RANDOM_FOREST),
             (PPO_MEDIAN, GRADIENT_BOOSTING), (SFT, "mean of training targets"),
             (SFT_MEDIAN, "mean of training targets")]
    if long_ppo_minutes:
        pairs.insert(1, (long_label, SFT))
    text = build_report(predictions, split, table, pairs=pairs, evaluated=evaluated)
    _, _, truth, _, columns = evaluated
    rows = [{"model": name, **model_metrics(values, truth)} for name, values in columns.items()]
    out.mkdir(parents=True, exist_ok=True)
    header = [f"Machine: {machine()}. Date: {time.strftime('%Y-%m-%d')}.",
              f"Made by: `python -m chemlit.bench report --runs {runs}"
              + (f" --long-ppo-minutes {long_ppo_minutes}" if long_ppo_minutes else "")
              + f"` after `python -m chemlit pipeline --runs {runs}`.",
              ""]
    ran = [f"{name} {seconds / 60:.1f} min" for name, seconds in timings.items() if seconds]
    if ran:
        header += [f"Ablation runs (wall time): {', '.join(ran)}.", ""]
    for name in ("ppo", "ppo-long"):
        curriculum = _curriculum_path(runs / name / "export")
        if curriculum:
            header += [f"{name} curriculum path (iteration, level): {curriculum}", ""]
    throughput = out / "throughput.json"
    tail = ["", throughput_markdown(json.loads(throughput.read_text()))] if throughput.exists() else []
    text = text.replace("\n", "\n" + "\n".join(header) + "\n", 1) + "\n".join(tail)
    _write(out / "report.md", text)
    write_csv(rows, out / "report.csv")
    _parity_png(out / "parity.png", {name: columns[name] for name in (SFT, SFT_MEDIAN, PPO)}, truth)
    return text


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
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list] = {}
    for path in sorted(run_dir.glob("version_*/events.out.tfevents*")):
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(events.Scalars(tag))
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
    """Each SFT variant for ``minutes`` from the pipeline's CPT export, its test answers, one report.
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
    how = (f"Every variant: the SFT stage (`sft.yaml` + `after_cpt.yaml`) from the same CPT export for {minutes} min "
           "of training, then the test molecules answered with the default decoding (median of 8 after the greedy "
           "rationale).")
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
    text = text.rstrip("\n") + "\n" + "\n".join(rows) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "ablations.md", text)
    return text


def _parity_png(path: Path, models: dict, truth) -> None:
    """Predicted vs measured for the test molecules, one panel per model (for the README)."""
    import matplotlib.pyplot as plt

    from chemlit.eval.plots import parity_figure

    fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 4.5), dpi=100)
    for ax, (name, values) in zip(axes, models.items()):
        parity_figure(values.tolist(), truth.tolist(), name, ax=ax)
    fig.tight_layout()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def strict_level_args(configs: Path) -> list[str]:
    """One level only, the strictest of the PPO config's curriculum: no leniency and no falling back."""
    import yaml

    config = yaml.safe_load((configs / "ppo.yaml").read_text())
    strictest = min(config["model"]["init_args"]["curriculum"]["tolerances_c"])
    return ["--model.init_args.curriculum.tolerances_c", f"[{strictest}]",
            "--model.init_args.curriculum.start_level", "0"]


def _curriculum_path(export: Path):
    info = export / "chemlit_export.json"
    return json.loads(info.read_text()).get("curriculum_history") if info.exists() else None


def throughput_markdown(summary: dict) -> str:
    setup, ours, theirs = summary["setup"], summary["chemlit"], summary["trl"]
    return "\n".join([
        THROUGHPUT_HEADING + theirs.get("trl_version", "0.11.4"), "",
        f"Same model ({setup['model']}), {setup['samples_per_iteration']} samples per iteration "
        f"({setup['prompts']} prompts x {setup['samples_per_prompt']}), up to {setup['max_new_tokens']} new tokens, "
        f"{setup['ppo_epochs']} PPO epochs x {setup['minibatches']} minibatches; "
        f"{setup['timed_iterations']} timed iterations after one warm-up, samples/s from the median. "
        f"Made by: `python -m chemlit.bench throughput --iterations {setup['timed_iterations']}`.", "",
        "| implementation | median s / iteration | timed iterations (s) | mean response length (tokens) "
        "| samples / s | response tokens / s |", "|---|---|---|---|---|---|",
        _throughput_row("chemlit PPOModule", ours),
        _throughput_row(f"TRL {theirs.get('trl_version', '')} PPOTrainer.generate + step", theirs), "",
        f"Ratio chemlit / TRL: **{summary['ratio_chemlit_over_trl']:.2f}x** in samples/s"
        + (f", {ours['response_tokens_per_second'] / theirs['response_tokens_per_second']:.2f}x in response tokens/s"
           if "response_tokens_per_second" in ours else "")
        + ". Rollout: chemlit "
        f"{ours['rollout_tokens_per_second']:.0f} tokens/s vs the model's own cached `generate` loop "
        f"{ours['generate_tokens_per_second']:.0f} tokens/s on the same prompts.", ""])


def replace_throughput_section(path: Path, section: str) -> None:
    """A report made earlier gets the new throughput section (the rest of it is left as it was)."""
    if path.exists():
        text = path.read_text(encoding="utf-8")
        start = text.find(THROUGHPUT_HEADING)
        _write(path, (text[:start] if start >= 0 else text.rstrip("\n") + "\n\n") + section)


def _throughput_row(name: str, result: dict) -> str:
    seconds, lengths = result["seconds_per_iteration"], result.get("mean_response_length", [])
    tokens_per_second = result.get("response_tokens_per_second")
    return (f"| {name} | {statistics.median(seconds):.2f} | {', '.join(f'{x:.1f}' for x in seconds)} | "
            f"{', '.join(f'{x:.0f}' for x in lengths)} | {result['samples_per_second']:.1f} | "
            + (f"{tokens_per_second:.0f} |" if tokens_per_second else "– |"))


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m chemlit.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="ablations + one report on the pipeline's test molecules")
    rep.add_argument("--runs", default="runs/pipeline")
    rep.add_argument("--configs", default="configs/quickstart")
    rep.add_argument("--table", default="builtin")
    rep.add_argument("--out", default="chemlit/bench/results")
    rep.add_argument("--long-ppo-minutes", type=int, default=0,
                     help="also run the PPO config for this many minutes (beyond the pipeline's budget)")
    abl = sub.add_parser("ablations", help="SFT variants for the same minutes from the pipeline's CPT export")
    abl.add_argument("--runs", default="runs/pipeline")
    abl.add_argument("--configs", default="configs/quickstart")
    abl.add_argument("--table", default="builtin")
    abl.add_argument("--out", default="chemlit/bench/results")
    abl.add_argument("--minutes", type=int, default=8, help="training minutes of each variant")
    abl.add_argument("--variants", nargs="+", choices=list(SFT_VARIANTS), default=list(SFT_VARIANTS),
                     help="the first is the one the others are compared with")
    thr = sub.add_parser("throughput", help="one PPO iteration: chemlit vs TRL 0.11.4")
    thr.add_argument("--out", default="chemlit/bench/results")
    thr.add_argument("--trl-dir", default=".bench-trl", help="where TRL 0.11.4 is installed (--no-deps)")
    thr.add_argument("--iterations", type=int, default=5, help="timed iterations of each, after one warm-up")
    args = parser.parse_args(argv)
    from chemlit.cli import quiet_known_noise

    quiet_known_noise()
    if args.command == "ablations":
        print(sft_ablations(Path(args.runs), Path(args.out), Path(args.configs), args.table, args.minutes,
                            args.variants))
    elif args.command == "throughput":
        from chemlit.bench.throughput import run

        summary = run(Path(args.out), Path(args.trl_dir), iterations=args.iterations)
        section = throughput_markdown(summary)
        print(section)
        replace_throughput_section(Path(args.out) / "report.md", section)
    else:
        print(report(Path(args.runs), Path(args.out), Path(args.configs), args.table, args.long_ppo_minutes))


if __name__ == "__main__":
    main()
