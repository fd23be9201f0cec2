"""The benchmark reports say what the measurements say: the throughput section, the SFT ablations, the one report."""

import json

import pytest

from chemlit.bench.report import throughput_markdown
from chemlit.bench.throughput import summarize


def test_throughput_section_reports_medians_lengths_and_both_ratios():
    ours = {"seconds_per_iteration": [9.0, 8.0, 30.0], "mean_response_length": [90.0, 80.0, 70.0],
            "rollout_tokens_per_second": 5000.0, "generate_tokens_per_second": 2500.0}
    theirs = {"trl_version": "0.11.4", "seconds_per_iteration": [12.0, 11.0, 13.0],
              "mean_response_length": [60.0, 60.0, 60.0]}
    setup = {"model": "tiny", "prompts": 16, "samples_per_prompt": 8, "samples_per_iteration": 128,
             "max_new_tokens": 96, "ppo_epochs": 2, "minibatches": 4, "timed_iterations": 3}
    summary = summarize(setup, ours, theirs)
    text = throughput_markdown(summary)
    # the median (9.0 s), not the mean (15.7 s) that one slow iteration would drag up
    assert "| chemlit PPOModule | 9.00 | 9.0, 8.0, 30.0 | 90, 80, 70 | 14.2 | 654 |" in text
    assert "| TRL 0.11.4 PPOTrainer.generate + step | 12.00 | 12.0, 11.0, 13.0 | 60, 60, 60 | 10.7 | 640 |" in text
    assert "**1.33x** in samples/s, the median over the iteration pairs (1.33, 1.38, 0.43); 1.33x from the median" in text
    assert "1.02x in response tokens/s" in text


def test_the_ratio_pairs_iterations_that_ran_back_to_back():
    # The machine turns 1.5x slower after chemlit's second iteration (ours: 8 s, then 12 s). TRL's iterations,
    # each run right after one of ours, are 15, 15, 15, 18, 18 s: pair by pair 1.25-1.88x, median 1.5x.
    # Each side's median alone (12 s against 15 s) says 1.25x.
    ours = {"seconds_per_iteration": [8.0, 8.0, 12.0, 12.0, 12.0], "mean_response_length": [90.0] * 5}
    theirs = {"seconds_per_iteration": [15.0, 15.0, 15.0, 18.0, 18.0], "mean_response_length": [90.0] * 5}
    summary = summarize({"samples_per_iteration": 128}, ours, theirs)
    assert summary["paired_ratios"] == [15 / 8, 15 / 8, 15 / 12, 18 / 12, 18 / 12]
    assert summary["ratio_chemlit_over_trl"] == 1.5
    assert summary["ratio_of_median_samples_per_second"] == 15 / 12


def test_a_new_throughput_run_replaces_only_the_reports_throughput_section(tmp_path):
    from chemlit.bench.report import THROUGHPUT_HEADING, replace_throughput_section

    report = tmp_path / "report.md"
    report.write_text("# Report\n\n| model | MAE |\n\n" + THROUGHPUT_HEADING + "0.11.4\n\nold numbers\n")
    replace_throughput_section(report, THROUGHPUT_HEADING + "0.11.4\n\nnew numbers\n")
    assert report.read_text() == "# Report\n\n| model | MAE |\n\n" + THROUGHPUT_HEADING + "0.11.4\n\nnew numbers\n"
    bare = tmp_path / "bare.md"
    bare.write_text("# Report\n")
    replace_throughput_section(bare, THROUGHPUT_HEADING + "x\n")
    assert bare.read_text() == "# Report\n\n" + THROUGHPUT_HEADING + "x\n"


def test_a_new_section_replaces_its_own_and_keeps_the_sections_after_it(tmp_path):
    from chemlit.bench.report import THROUGHPUT_HEADING, replace_section
    from chemlit.bench.stages import STAGES_HEADING

    report = tmp_path / "report.md"
    report.write_text("# Report\n\n" + THROUGHPUT_HEADING + "0.11.4\n\nold\n\n" + STAGES_HEADING + "\n\nstages\n")
    replace_section(report, THROUGHPUT_HEADING, THROUGHPUT_HEADING + "0.11.4\n\nnew\n")
    assert report.read_text() == ("# Report\n\n" + THROUGHPUT_HEADING + "0.11.4\n\nnew\n\n"
                                  + STAGES_HEADING + "\n\nstages\n")
    replace_section(report, STAGES_HEADING, STAGES_HEADING + "\n\nmeasured\n")
    assert report.read_text().endswith("new\n\n" + STAGES_HEADING + "\n\nmeasured\n")


@pytest.mark.slow
def test_sft_ablations_train_each_variant_from_the_same_cpt_export_and_compare_them(tmp_path, tiny_table):
    from chemlit.bench.__main__ import sft_ablations
    from chemlit.pipeline import run_pipeline
    from tests.test_pipeline import EXTRA, ROOT

    runs = tmp_path / "runs"
    run_pipeline(ROOT / "configs" / "quickstart", runs, table=str(tiny_table), stages=["cpt"], extra=EXTRA,
                 minutes=None)
    text = sft_ablations(runs, tmp_path / "out", ROOT / "configs" / "quickstart", str(tiny_table), 1,
                         ["sft-compact", "sft-compact-analogues"],
                         extra={"sft": EXTRA["sft"] + ["--trainer.log_every_n_steps", "1"], "test": EXTRA["test"]})
    assert (tmp_path / "out" / "results" / "ablations.md").read_text() == text
    for name in ("sft-compact", "sft-compact-analogues"):
        config = next((runs / name).glob("version_*/config.yaml")).read_text()
        assert f"path: {runs / 'cpt' / 'export'}" in config and "rationale_style: compact" in config
    assert (runs / "sft-compact-analogues" / "export" / "reference_set.json").is_file()
    assert "compact rationale + 3 analogues − compact rationale" in text  # paired against the first variant
    assert "## Learning per minute" in text and "| compact rationale | 3 |" in text


@pytest.mark.slow
def test_one_report_carries_every_test_set_its_baselines_the_ppo_story_and_the_ablations(tmp_path, tiny_table):
    from chemlit.bench.report import SUMMARY_HEADING, full_report, test_sets_from_args
    from chemlit.data.splits import read_split
    from chemlit.pipeline import RUN_RECORD, run_pipeline, write_run_record
    from tests.test_pipeline import EXTRA, ROOT

    runs, out, configs = tmp_path / "runs", tmp_path / "out", ROOT / "configs" / "quickstart"
    result = run_pipeline(configs, runs, table=str(tiny_table), extra=EXTRA, minutes=None)
    write_run_record(runs, ["--runs", str(runs), "--minutes", "1"], 90.0, result)
    record = json.loads((runs / RUN_RECORD).read_text())
    assert record["command"] == f"python -m chemlit pipeline --runs {runs} --minutes 1" and record["minutes"] == 1.5
    (out / "results").mkdir(parents=True)
    (out / "results" / "ablations.md").write_text("# Report: 9 test molecules\n\nrows\n\n## Learning per minute\n\nmore\n")
    # the same run stands in for the scaffold set too: its answers by the product's decoding are reused
    test_sets = test_sets_from_args(runs, None, runs, None)
    text = full_report(test_sets, out, configs, str(tiny_table), extra=tuple(EXTRA["test"]),
                       without_estimate_minutes=0.05, train_extra=tuple(EXTRA["sft"]))
    assert (out / "results.md").read_text() == text
    summary = text.split(SUMMARY_HEADING, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| test set")]
    assert [r.split(" | ")[0] for r in rows] == ["| Random split, the default pipeline (30-minute budget)",
                                                 "| Murcko-scaffold split"]
    sections = text.split("\n## ")
    random_split = next(s for s in sections if s.startswith("Random split"))
    scaffold = next(s for s in sections if s.startswith("Murcko-scaffold split"))
    assert f"Made by `python -m chemlit pipeline --runs {runs} --minutes 1` at commit" in random_split
    # the decoding ablation (greedy, median of 8 beside the product's median of 32) is the default run's only
    assert "| PPO, greedy − SFT, greedy |" in random_split and "| SFT, median of 32 − SFT, greedy |" in random_split
    assert "| PPO, median of 32 − SFT, median of 32 |" in scaffold and ", greedy" not in scaffold
    assert "What the language model adds to the estimate" in random_split and "Rationale fidelity: " in random_split
    assert all(len(r.split(" | ")) == 14 for r in rows)                 # ... | coverage SFT / PPO | facts right |
    # the summary's baseline cells are the section's own numbers (same split, same molecules)
    for baseline, column in (("random forest on RDKit descriptors", 8), ("mean of training targets", 11),
                             ("stacking: median regression on the estimate and PPO's answer, fitted on validation", 7),
                             ("SFT without the estimate in its prompt", 10)):
        cell = next(line for line in random_split.splitlines() if line.startswith(f"| {baseline} |")).split(" | ")[1]
        assert rows[0].split(" | ")[column] == cell
    # blend and stacking are fitted on PPO's answers to the validation molecules, never on the test ones
    split = read_split(runs / "cpt" / "splits.csv")
    fitted_on = {row.split(",")[0] for path in runs.glob("val-*/version_*/predictions.csv")
                 for row in path.read_text().splitlines()[1:]}
    assert fitted_on and {split[s] for s in fitted_on} == {"val"} and "validation molecules: the blend weight" in text
    config = next((runs / "sft-no-estimate").glob("version_*/config.yaml")).read_text()
    assert "descriptor_estimate: false" in config and f"path: {runs / 'cpt' / 'export'}" in config
    goals = text.split("## Goals", 1)[1].split("\n## ", 1)[0]
    assert "| PPO − SFT ≤ −1.5 °C, CI excluding 0 | Random split" in goals
    assert "| PPO − SFT: CI not above 0 | Murcko-scaffold split |" in goals
    assert "| PPO − estimate ≤ 0 (aim: CI below 0) | Random split" in goals
    assert goals.count("| PPO's interval coverage within 2 points of 80% |") == 2
    assert "## The PPO run, from its TensorBoard logs" in text and "| KL per answer to the reference (nats) |" in text
    assert "## SFT ablations (`ablations.md`, copied)" in text and "### Learning per minute" in text
    assert len((out / "results" / "report.csv").read_text().splitlines()) == 3
    assert (out / "results" / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_ppo_ablations_train_each_variant_from_one_sft_export_and_answer_validation_only(tmp_path, tiny_table):
    from chemlit.bench.ppo_ablations import ppo_ablations
    from chemlit.data.splits import read_split
    from tests.test_pipeline import EXTRA, ROOT

    runs, configs = tmp_path / "runs", ROOT / "configs" / "quickstart"
    extra = {**EXTRA, "ppo": EXTRA["ppo"] + ["--trainer.log_every_n_steps", "1"], "val": EXTRA["test"]}
    text = ppo_ablations(runs, tmp_path / "out", configs, str(tiny_table), 2, ["ppo-graded", "ppo-kernel-score"],
                         extra=extra)
    assert (tmp_path / "out" / "results" / "ppo_ablations.md").read_text() == text
    for name, objective in (("ppo-graded", "sample"), ("ppo-kernel-score", "kernel_score")):
        config = next((runs / name).glob("version_*/config.yaml")).read_text()
        assert f"path: {runs / 'sft' / 'export'}" in config and f"objective: {objective}" in config
    # every model answered the validation molecules, and nothing answered the test split
    answered = {row.split(",")[0] for path in runs.glob("val-*/version_*/predictions.csv")
                for row in path.read_text().splitlines()[1:]}
    split = read_split(runs / "cpt" / "splits.csv")
    assert answered and {split[s] for s in answered} == {"val"}
    assert not list(runs.glob("test-*"))
    assert "validation molecules" in text
    assert "kernel score of the K answers (leave-one-out credit), curriculum 100 → 50 → 25 °C − graded reward" in text
    assert "| graded reward tol/(tol + e), curriculum 100 → 50 → 25 °C | 2 |" in text  # its iterations


def test_what_twice_trl_needs_splits_chemlits_median_by_the_profiled_shares():
    from chemlit.bench.throughput import what_twice_trl_needs

    # The profiled iteration ran 12 s (the profiler's cost), the timed median is 6 s: the matmuls' and attention's
    # share (6 of 12 s) is taken of the median, 3 s; the rest, 3 s, must fit in 10 / 2 - 3 = 2 s.
    twice = what_twice_trl_needs(6.0, 10.0, {"matmul": 4.0, "attention": 2.0, "other ops": 4.0, "outside ops": 2.0})
    assert twice["target_seconds"] == 5.0
    assert twice["matmul_and_attention_seconds"] == pytest.approx(3.0)
    assert twice["rest_seconds"] == pytest.approx(3.0)
    assert twice["rest_cut"] == pytest.approx(1 / 3)
    assert twice["ratio_with_no_rest"] == pytest.approx(10 / 3)
    # kernels alone slower than half TRL's: more than all of the rest would have to go
    assert what_twice_trl_needs(6.0, 10.0, {"matmul": 5.5, "attention": 0.0, "other ops": 0.5,
                                            "outside ops": 0.0})["rest_cut"] > 1


def test_trl_timed_iterations_are_its_steps_after_the_warm_up_not_the_counted_or_profiled_ones():
    from chemlit.bench.throughput import TRLProcess

    trl = object.__new__(TRLProcess)
    trl.version, trl.samples = "0.11.4", 128
    trl.iterations = [{"what": "step", "seconds": 30.0, "rollout_seconds": 9.0, "mean_response_length": 90.0},
                      {"what": "count", "seconds": 50.0, "rollout_seconds": 9.0, "mean_response_length": 90.0,
                       "gflop": 1280.0},
                      {"what": "profile", "seconds": 16.0, "rollout_seconds": 9.0, "mean_response_length": 90.0,
                       "profiled": {"seconds": 16.0, "kinds": {"matmul": 4.0}}},
                      {"what": "step", "seconds": 9.0, "rollout_seconds": 3.0, "mean_response_length": 91.0},
                      {"what": "step", "seconds": 10.0, "rollout_seconds": 3.0, "mean_response_length": 92.0}]
    result = trl.result()
    assert result["seconds_per_iteration"] == [9.0, 10.0]
    assert result["mean_response_length"] == [91.0, 92.0]
    assert result["gflop"] == 1280.0 and result["profiled"]["seconds"] == 16.0


def test_throughput_section_has_one_block_per_cpu_kind_with_the_work_and_what_twice_trl_needs():
    ours = {"seconds_per_iteration": [6.0, 6.0], "mean_response_length": [90.0, 90.0],
            "rollout_tokens_per_second": 8000.0, "generate_tokens_per_second": 4000.0, "gflop": 950.0,
            "profiled": {"seconds": 6.5, "kinds": {"matmul": 3.0, "attention": 0.5, "other ops": 2.5,
                                                   "outside ops": 0.5}}}
    theirs = {"trl_version": "0.11.4", "seconds_per_iteration": [9.0, 9.0], "mean_response_length": [90.0, 90.0],
              "gflop": 1280.0, "profiled": {"seconds": 16.0, "kinds": {"matmul": 4.3, "attention": 1.1,
                                                                       "other ops": 9.6, "outside ops": 1.0}}}
    setup = {"model": "tiny", "prompts": 16, "samples_per_prompt": 8, "samples_per_iteration": 128,
             "max_new_tokens": 96, "ppo_epochs": 2, "minibatches": 4, "timed_iterations": 2, "machine": "m"}
    native = {"kind": "native", **summarize(setup, ours, theirs)}
    avx2 = {"kind": "AVX2", **summarize(dict(setup, env={"ATEN_CPU_CAPABILITY": "avx2"}), ours, theirs)}
    text = throughput_markdown({"command": "python -m chemlit.bench throughput --isa both", "date": "2026-12-05",
                                "runs": [native, avx2]})
    assert "Made by: `python -m chemlit.bench throughput --isa both` on 2026-12-05." in text
    assert "### native: m\n" in text and "### AVX2: m (ATEN_CPU_CAPABILITY=avx2)\n" in text
    assert text.count("chemlit 950 GFLOP, TRL 1280 GFLOP (1.35x") == 2
    assert "- TRL (profiled 16.00 s, timed median 9.00 s): matmul 4.30, attention 1.10, other ops 9.60" in text
    # 4.5 s allowed; matmuls and attention 6 x 3.5 / 6.5 = 3.23 s; the rest 2.77 s must lose 2.77 - 1.27 = 1.50 s
    assert ("needs chemlit's iteration in 4.50 s. At its median its matmuls and attention take 3.23 s and the rest "
            "2.77 s, which would have to shrink by 54 % (with no time outside the matmuls and attention: 2.79x TRL)"
            in text)
