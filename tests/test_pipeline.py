"""The one-command pipeline on a tiny table with tiny models: every stage, the report, and resume."""

from pathlib import Path

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


def test_pipeline_runs_every_stage_then_resumes_without_redoing_them(tmp_path, tiny_table, capsys):
    runs = tmp_path / "runs"
    result = run_pipeline(ROOT / "configs" / "quickstart", runs, table=str(tiny_table), extra=EXTRA)
    for stage in ("cpt", "sft", "ppo"):
        assert (runs / stage / "export" / "model.safetensors").exists(), stage
    assert set(result["timings"]) == {"cpt", "sft", "ppo", "test-ppo", "test-sft"}
    report = (runs / "report.md").read_text()
    assert "PPO model (greedy)" in report and "SFT model (greedy)" in report and "random forest" in report
    assert "PPO model (greedy) − SFT model (greedy)" in report  # the paired comparison
    # every stage used the CPT run's split
    assert (runs / "cpt" / "splits.csv").read_text() == (runs / "sft" / "splits.csv").read_text()

    again = run_pipeline(ROOT / "configs" / "quickstart", runs, table=str(tiny_table), extra=EXTRA)
    assert again["timings"] == {}  # nothing redone
    assert "done earlier" in capsys.readouterr().out
