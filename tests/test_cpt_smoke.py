"""The datamodule's cpt stage feeds a real CPT fit (the full stage is deepened in its own issue)."""

import math
import sys

from chemlit.cli import main
from tests.test_cli import read_scalars, tiny_args


def test_cpt_fit_logs_perplexity_and_exports(tmp_path, tiny_table, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["chemlit"])
    main(["fit", *tiny_args(tmp_path, tiny_table), "--model", "chemlit.CPTModule", "--data.stage", "cpt",
          "--data.max_length", "64", "--trainer.limit_train_batches", "4", "--trainer.max_epochs", "1",
          "--trainer.val_check_interval", "1.0", "--trainer.log_every_n_steps", "1",
          "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"])
    run = tmp_path / "runs" / "quickstart-sft" / "version_0"
    scalars = read_scalars(run)
    loss, ppl = scalars["val/loss"][-1], scalars["val/perplexity"][-1]
    assert math.isclose(ppl, math.exp(loss), rel_tol=1e-4)
    assert (run / "export" / "model.safetensors").exists()
