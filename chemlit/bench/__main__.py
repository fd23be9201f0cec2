"""``python -m chemlit.bench``: the benchmark report (not a test; it takes a while).

    python -m chemlit.bench report     --runs runs/pipeline [--out chemlit/bench/results]
    python -m chemlit.bench throughput [--out chemlit/bench/results] [--trl-dir .bench-trl]

``report`` starts from a finished ``python -m chemlit pipeline`` run directory and adds, on the
same split and the same test molecules:
  * the rationale ablation: the SFT stage again from the same CPT export with
    ``data.use_rationale=false`` (the number straight after the prompt), same epochs;
  * the curriculum ablation: the PPO stage again from the same SFT export, strict from step one
    (only the strictest tolerance of the curriculum, so it can neither ease nor fall back), same budget;
then answers the test molecules with every model (greedy) and writes ``report.md`` and
``report.csv``: mean predictor, random forest, SFT, PPO and the ablations, MAE with 95% bootstrap
intervals, RMSE, R², parse rate, and paired-bootstrap differences. ``throughput`` times one PPO
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
    from chemlit.eval.report import build_report, evaluation_columns, model_metrics, read_predictions

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
             (SFT, SFT_NO_RATIONALE), (PPO, "random forest on RDKit descriptors"), (SFT, "mean of training targets"),
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
    thr = sub.add_parser("throughput", help="one PPO iteration: chemlit vs TRL 0.11.4")
    thr.add_argument("--out", default="chemlit/bench/results")
    thr.add_argument("--trl-dir", default=".bench-trl", help="where TRL 0.11.4 is installed (--no-deps)")
    thr.add_argument("--iterations", type=int, default=5, help="timed iterations of each, after one warm-up")
    args = parser.parse_args(argv)
    from chemlit.cli import quiet_known_noise

    quiet_known_noise()
    if args.command == "throughput":
        from chemlit.bench.throughput import run

        summary = run(Path(args.out), Path(args.trl_dir), iterations=args.iterations)
        section = throughput_markdown(summary)
        print(section)
        replace_throughput_section(Path(args.out) / "report.md", section)
    else:
        print(report(Path(args.runs), Path(args.out), Path(args.configs), args.table, args.long_ppo_minutes))


if __name__ == "__main__":
    main()
