"""The one-command pipeline on a tiny table with tiny models: every stage, the report, and resume."""

import csv
import json
import time
from pathlib import Path

import pytest

from chemlit import pipeline
from chemlit.data.records import canonical_smiles
from chemlit.data.splits import read_split
from chemlit.pipeline import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["--model.init_args.model.tiny.hidden_size", "32", "--model.init_args.model.tiny.num_layers", "1",
              "--model.init_args.model.tiny.num_heads", "2", "--model.init_args.model.tiny.intermediate_size", "64",
              "--model.init_args.model.tiny.vocab_size", "400"]
QUIET = ["--trainer.enable_progress_bar", "false"]
EXTRA = {
    "cpt": TINY_MODEL + QUIET + ["--trainer.max_steps", "2", "--data.batch_size", "4"],
    "sft": QUIET + ["--trainer.max_steps", "3", "--data.batch_size", "8", "--trainer.val_check_interval", "3",
                    "--trainer.limit_val_batches", "1", "--model.init_args.max_new_tokens", "16",
                    "--model.init_args.val_generate_limit", "8"],
    "ppo": QUIET + ["--trainer.limit_train_batches", "2", "--trainer.val_check_interval", "2",
                    "--trainer.limit_val_batches", "1", "--data.batch_size", "2",
                    "--model.init_args.ppo.samples_per_prompt", "2", "--model.init_args.ppo.max_new_tokens", "8",
                    "--model.init_args.val_generate_limit", "4", "--model.init_args.val_max_new_tokens", "8"],
    "test": QUIET + ["--model.init_args.max_new_tokens", "16"],
}


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_resumes_without_redoing_them(tmp_path, tiny_table, capsys):
    runs = tmp_path / "runs"
    result = run_pipeline(ROOT / "configs" / "quickstart", runs, table=str(tiny_table), extra=EXTRA)
    for stage in ("cpt", "sft", "ppo"):
        assert (runs / stage / "export" / "model.safetensors").exists(), stage
    assert set(result["timings"]) == {"cpt", "sft", "ppo", "test-ppo", "test-sft"}
    report = (runs / "report.md").read_text()
    assert "PPO model (median of 32)" in report and "SFT model (median of 32)" in report and "random forest" in report
    assert "PPO model (median of 32) − SFT model (median of 32)" in report  # the paired comparison
    # median decoding writes an interval per answer (the tiny model's answers rarely parse: the report's
    # coverage of them is tested in tests/test_report.py)
    header = next((runs / "test-sft").glob("version_*/predictions.csv")).read_text().splitlines()[0]
    assert header.split(",")[:4] == ["smiles", "prediction", "low", "high"]
    # every stage used the CPT run's split
    assert (runs / "cpt" / "splits.csv").read_text() == (runs / "sft" / "splits.csv").read_text()

    again = run_pipeline(ROOT / "configs" / "quickstart", runs, table=str(tiny_table), extra=EXTRA)
    assert again["timings"] == {}  # nothing redone
    assert "done earlier" in capsys.readouterr().out


def test_every_stage_gets_its_share_of_what_is_left_and_the_test_keeps_its_own():
    left, spent = 1800.0, {}
    for stage in ("cpt", "sft", "ppo"):  # each stage uses its whole limit plus its start-up allowance
        spent[stage] = pipeline.stage_seconds(stage, left, [s for s in ("cpt", "sft", "ppo") if s not in spent])
        left -= spent[stage] + pipeline.STAGE_OVERHEAD_S
    assert left == pytest.approx(1800 * pipeline.BUDGET_SHARES["test"])
    assert spent["sft"] > spent["ppo"] > spent["cpt"]
    # a stage that ended early leaves its time to the next ones
    assert pipeline.stage_seconds("ppo", 1000.0, ["ppo"]) > pipeline.stage_seconds("ppo", 1000.0, ["sft", "ppo"])
    assert pipeline.as_max_time(3725.9) == "00:01:02:05"


@pytest.mark.slow
def test_a_stage_stops_at_its_share_of_the_budget_and_exports(tmp_path, tiny_table, monkeypatch):
    """CPT has no step limit here (100,000 epochs): only the pipeline's budget stops it, and it still exports."""
    monkeypatch.setattr(pipeline, "STAGE_OVERHEAD_S", 0.0)
    monkeypatch.setattr(pipeline, "MIN_STAGE_S", 0.0)
    runs = tmp_path / "runs"
    extra = {"cpt": TINY_MODEL + QUIET + ["--trainer.max_epochs", "100000", "--data.batch_size", "4"]}
    started = time.perf_counter()
    result = run_pipeline(ROOT / "configs" / "quickstart", runs, table=str(tiny_table), stages=["cpt"], extra=extra,
                          minutes=0.1)  # 6 s: CPT may train 6 * 0.13 / (0.13 + 0.18) = 2.5 s
    assert time.perf_counter() - started < 60
    info = json.loads((runs / "cpt" / "export" / "chemlit_export.json").read_text())
    assert info["global_step"] > 0  # it trained, and stopped on time
    assert result["timings"]["cpt"] < 40
    config = next((runs / "cpt").glob("version_*/config.yaml")).read_text()
    assert "max_time: 00:00:00:02" in config


@pytest.mark.slow
def test_an_out_of_source_pipeline_tests_on_the_held_out_source_only(tmp_path, tiny_table, capsys):
    """--split source: the first stage makes the split, and its test set is the held-out source's molecules."""
    runs = tmp_path / "runs"
    run_pipeline(ROOT / "configs" / "quickstart", runs, table=str(tiny_table), stages=["cpt"], extra=EXTRA,
                 minutes=None, split="source", holdout_source="wikidata")
    with open(tiny_table, newline="") as handle:
        sources = {canonical_smiles(row["smiles"]): row["source"] for row in csv.DictReader(handle)}
    split = read_split(runs / "cpt" / "splits.csv")
    test = {s for s, name in split.items() if name == "test"}
    assert test == {s for s, source in sources.items() if source == "wikidata"}
    assert all(sources[s] == "open_notebook" for s, name in split.items() if name != "test")
    assert "--data.split source --data.holdout_source wikidata" in capsys.readouterr().out


@pytest.mark.slow
def test_the_gpu_configs_run_through_the_pipeline_on_a_cpu(tmp_path, tiny_table):
    """configs/gpu as the pipeline runs them -- a pretrained model loaded in 4-bit (bitsandbytes' CPU
    backend), LoRA in every stage, the PPO reference as the adapter-disabled network -- with only the
    device, the sizes and the step counts changed, and a tiny local model as --base-model."""
    from chemlit.models.factory import ModelSpec, TinyConfig, export_model, load_model_and_tokenizer

    corpus = lambda: [line.split(",")[0] for line in tiny_table.read_text().splitlines()[1:]]  # noqa: E731
    model, tokenizer = load_model_and_tokenizer(ModelSpec(source="tiny", tiny=TinyConfig(
        hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128, vocab_size=400)), corpus)
    base = export_model(model, tokenizer, tmp_path / "base", {"stage": "test"})
    on_cpu = QUIET + ["--trainer.accelerator", "cpu", "--data.num_workers", "0"]
    extra = {
        "cpt": on_cpu + ["--trainer.max_steps", "2", "--data.batch_size", "4", "--data.max_length", "96"],
        "sft": on_cpu + ["--trainer.max_steps", "2", "--data.batch_size", "4", "--trainer.val_check_interval", "2",
                         "--trainer.limit_val_batches", "1", "--model.init_args.max_new_tokens", "8",
                         "--model.init_args.val_generate_limit", "4", "--data.max_length", "160"],
        "ppo": on_cpu + ["--trainer.limit_train_batches", "2", "--trainer.val_check_interval", "2",
                         "--trainer.limit_val_batches", "1", "--data.batch_size", "2",
                         "--model.init_args.ppo.samples_per_prompt", "2", "--model.init_args.ppo.max_new_tokens", "8",
                         "--model.init_args.val_generate_limit", "2", "--model.init_args.val_max_new_tokens", "8"],
        "test": on_cpu + ["--model.init_args.max_new_tokens", "8"],
    }
    runs = tmp_path / "runs"
    result = run_pipeline(ROOT / "configs" / "gpu", runs, table=str(tiny_table), extra=extra, base_model=str(base))
    for stage in ("cpt", "sft", "ppo"):
        info = json.loads((runs / stage / "export" / "chemlit_export.json").read_text())
        assert info["lora"]["enabled"] and info["model_source"] == "pretrained", stage
    assert json.loads((runs / "cpt" / "export" / "chemlit_export.json").read_text())["base_path"] == str(base)
    assert "PPO model (median of 32)" in result["report"]


def test_stage_args_reach_their_stage_and_unknown_stages_are_refused(monkeypatch, capsys):
    import chemlit.pipeline as pipeline

    seen = {}

    class Ran(Exception):
        pass

    def fake_run(*args, **kwargs):
        seen.update(kwargs)
        raise Ran

    monkeypatch.setattr(pipeline, "run_pipeline", fake_run)
    with pytest.raises(Ran):
        pipeline.main(["--minutes", "60", "--stage-args", "sft", "--trainer.max_epochs 6 --data.seed 1",
                       "--stage-args", "ppo", "--trainer.limit_train_batches 600",
                       "--stage-args", "sft", "--model.init_args.learning_rate 0.001"])
    assert seen["extra"] == {"sft": ["--trainer.max_epochs", "6", "--data.seed", "1",
                                     "--model.init_args.learning_rate", "0.001"],
                             "ppo": ["--trainer.limit_train_batches", "600"]}
    with pytest.raises(SystemExit) as stopped:
        pipeline.main(["--stage-args", "rl", "--trainer.max_epochs 6"])
    assert stopped.value.code == 2 and "unknown stage 'rl'" in capsys.readouterr().err


def test_seed_reaches_every_stage_but_not_the_split(tmp_path, monkeypatch):
    """--seed N seeds each stage's training (seed_everything) and leaves the split (data.seed) alone, so runs
    with two seeds answer the same test molecules."""
    fits = []

    class Answering(Exception):
        pass

    def fake_cli(args):
        if args[0] != "fit":
            raise Answering
        fits.append(args)
        Path(args[args.index("--model.init_args.export_dir") + 1]).mkdir(parents=True)

    monkeypatch.setattr(pipeline, "cli_main", fake_cli)
    with pytest.raises(Answering):
        run_pipeline(ROOT / "configs" / "quickstart", tmp_path / "runs", minutes=None, seed=7)
    assert [a[a.index("--model.init_args.export_dir") + 1].split("/")[-2] for a in fits] == ["cpt", "sft", "ppo"]
    for args in fits:
        assert args[args.index("--seed_everything") + 1] == "7"
        assert "--data.seed" not in args
    fits.clear()
    with pytest.raises(Answering):
        run_pipeline(ROOT / "configs" / "quickstart", tmp_path / "other", minutes=None)
    assert all("--seed_everything" not in args for args in fits)
