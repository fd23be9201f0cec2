"""Real runs through the CLI: a few steps of `fit`, then validate / test / predict on the result."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chemlit.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart" / "sft.yaml"


def read_scalars(run_dir: Path) -> dict[str, list[float]]:
    """Every scalar TensorBoard holds for a run: {tag: [values in step order]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for path in sorted(run_dir.glob("events.out.tfevents*")):
        events = EventAccumulator(str(path))
        events.Reload()
        for tag in events.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in events.Scalars(tag))
    return out


def read_tags(run_dir: Path, kind: str) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for path in run_dir.glob("events.out.tfevents*"):
        events = EventAccumulator(str(path))
        events.Reload()
        tags |= set(events.Tags()[kind])
    return tags


def tiny_args(tmp_path, table):
    """The quickstart config shrunk to seconds: a tiny table, a tiny model, a few steps."""
    return [
        "--config", str(CONFIG),
        "--data.table", str(table),
        "--data.batch_size", "8", "--data.eval_batch_size", "16",
        "--model.init_args.model.tiny.hidden_size", "32", "--model.init_args.model.tiny.num_layers", "1",
        "--model.init_args.model.tiny.num_heads", "2", "--model.init_args.model.tiny.intermediate_size", "64",
        "--model.init_args.model.tiny.vocab_size", "400",
        "--model.init_args.max_new_tokens", "24", "--model.init_args.val_generate_limit", "16",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false",
    ]


def test_fit_then_validate_test_predict(tmp_path, tiny_table, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["chemlit"])
    main(["fit", *tiny_args(tmp_path, tiny_table), "--trainer.limit_train_batches", "6",
          "--trainer.max_epochs", "1", "--trainer.val_check_interval", "1.0", "--trainer.log_every_n_steps", "2",
          "--model.init_args.track_forgetting", "true", "--data.cpt_replay_ratio", "0.5"])
    run = tmp_path / "runs" / "quickstart-sft" / "version_0"
    assert (run / "config.yaml").exists() and (run / "splits.csv").exists()
    scalars = read_scalars(run)
    assert len(scalars["train/loss"]) == 3                       # steps 2, 4, 6
    assert 0.0 <= scalars["val/parse_rate"][-1] <= 1.0           # generated, parsed, logged
    assert "val/mae" in scalars and "val/loss" in scalars
    assert scalars["val/forgetting"][-1] > 0 and scalars["val/cpt_perplexity"][-1] > 1
    assert "val/parity" in read_tags(run, "images")
    export = run / "export"
    assert (export / "model.safetensors").exists() and (export / "chemlit_export.json").exists()
    # The export reloads with plain transformers and generates.
    model = AutoModelForCausalLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    ids = torch.tensor([[tok.bos_token_id] + tok("Molecule: CCO\nRationale:")["input_ids"]])
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, ids.size(1) + 3)

    ckpt = str(run / "checkpoints" / "last.ckpt")
    split = str(run / "splits.csv")
    for command in ("validate", "test"):
        main([command, *tiny_args(tmp_path, tiny_table), "--ckpt_path", ckpt, "--data.split_file", split])
    test_run = tmp_path / "runs" / "quickstart-sft" / "version_2"
    test_scalars = read_scalars(test_run)
    if test_scalars["test/parse_rate"][-1] > 0:  # a 6-step model may not write a number at all
        assert test_scalars["test/mae_ci_low"][-1] <= test_scalars["test/mae"][-1] <= test_scalars["test/mae_ci_high"][-1]
    else:
        assert "test/mae_ci_low" not in test_scalars
    main(["predict", *tiny_args(tmp_path, tiny_table), "--ckpt_path", ckpt, "--data.split_file", split])
    predictions = list((tmp_path / "runs" / "quickstart-sft").glob("version_*/predictions.csv"))
    assert len(predictions) == 1
    with open(predictions[0], newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["smiles", "prediction", "low", "high", "rationale", "measured"]
        assert len(list(reader)) == 16  # the 16 test molecules of the tiny table
    # A table of new molecules, without any measured value: predict answers for all of its rows.
    new = tmp_path / "new.csv"
    new.write_text("smiles\nCCO\nc1ccccc1O\nCC(=O)Nc1ccc(O)cc1\n")
    main(["predict", *tiny_args(tmp_path, new), "--ckpt_path", ckpt, "--data.predict_split", "all"])
    newest = max((tmp_path / "runs" / "quickstart-sft").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    with open(newest / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["smiles"] for r in rows) == sorted(["CCO", "Oc1ccccc1", "CC(=O)Nc1ccc(O)cc1"])
    assert all(r["measured"] == "" for r in rows)
    # Checkpoints hold only tensors and plain data: they load without unpickling arbitrary objects.
    assert "state_dict" in torch.load(ckpt, weights_only=True)


@pytest.mark.slow
def test_print_config_is_a_full_runnable_config():
    out = subprocess.run([sys.executable, "-m", "chemlit", "fit", "--config", str(CONFIG), "--print_config"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    for key in ("class_path: chemlit.SFTModule", "vocab_size: 1024", "on_invalid: error", "max_epochs: 2"):
        assert key in out


@pytest.mark.parametrize("table_text, message", [
    ("smiles,mpC\nCCO,-114\nnot_a_smiles,5\n", "row 3: invalid SMILES 'not_a_smiles'"),
    ("smiles,mpC\nCCO,warm\n", "row 2: value 'warm' in column 'mpC' is not a number"),
])
@pytest.mark.slow
def test_bad_table_exits_nonzero_with_one_line_and_no_traceback(tmp_path, table_text, message):
    table = tmp_path / "bad.csv"
    table.write_text(table_text)
    result = subprocess.run(
        [sys.executable, "-m", "chemlit", "fit", *tiny_args(tmp_path, table), "--trainer.max_steps", "1"],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert f"chemlit: error: {table}: {message}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("config", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")))
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(ROOT / config), "--print_config"])
    assert info.value.code in (0, None)
    assert "class_path: chemlit." in capsys.readouterr().out


@pytest.mark.slow
def test_missing_checkpoint_is_one_line_too(tmp_path, tiny_table):
    result = subprocess.run(
        [sys.executable, "-m", "chemlit", "validate", *tiny_args(tmp_path, tiny_table),
         "--ckpt_path", str(tmp_path / "nope.ckpt")], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "chemlit: error: Checkpoint file not found" in result.stderr and "Traceback" not in result.stderr


def test_command_line_arguments_win_over_the_checkpoints_hyperparameters(tmp_path, tiny_table, monkeypatch):
    """With --ckpt_path, the model's arguments come from the checkpoint unless typed on the command line:
    what the user typed wins (test, predict, and a resumed fit's export_dir)."""
    import yaml

    monkeypatch.setattr(sys, "argv", ["chemlit"])
    main(["fit", *tiny_args(tmp_path, tiny_table), "--trainer.limit_train_batches", "2", "--trainer.max_epochs", "1",
          "--trainer.limit_val_batches", "0", "--model.init_args.temperature", "0.7"])
    runs = tmp_path / "runs" / "quickstart-sft"
    ckpt, split = runs / "version_0" / "checkpoints" / "last.ckpt", runs / "version_0" / "splits.csv"
    for command in ("test", "predict"):
        main([command, *tiny_args(tmp_path, tiny_table), "--ckpt_path", str(ckpt), "--data.split_file", str(split),
              "--model.init_args.decoding", "median", "--model.init_args.answer_samples=4"])
    for version in ("version_1", "version_2"):
        model = yaml.safe_load((runs / version / "config.yaml").read_text())["model"]["init_args"]
        assert (model["decoding"], model["answer_samples"]) == ("median", 4)   # typed: the command line's
        assert model["temperature"] == 0.7                                     # not typed: the checkpoint's
    main(["fit", *tiny_args(tmp_path, tiny_table), "--trainer.limit_train_batches", "2", "--trainer.max_epochs", "2",
          "--trainer.limit_val_batches", "0", "--ckpt_path", str(ckpt),
          "--model.init_args.export_dir", str(tmp_path / "new-export")])
    assert (tmp_path / "new-export" / "model.safetensors").exists()


def test_sft_skips_and_counts_a_step_whose_loss_or_gradient_is_not_finite(tmp_path, tiny_table):
    """SFT (automatic optimisation): the 2nd of 3 steps gets a NaN loss; its step is skipped and counted,
    the weights and the optimizer's moments after it are those of step 1, and step 3 trains again."""
    import lightning as L

    from chemlit.data.datamodule import RationaleDataModule
    from chemlit.models.factory import ModelSpec, TinyConfig
    from chemlit.stages.sft import SFTModule

    class PoisonedSFT(SFTModule):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx == 1 else loss

    snapshots = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            state = trainer.optimizers[0].state
            moments = [s["exp_avg"].clone() for s in state.values()] if state else []
            snapshots.append(({k: v.clone() for k, v in pl_module.model.state_dict().items()}, moments))

    L.seed_everything(0)
    module = PoisonedSFT(model=ModelSpec(source="tiny", tiny=TinyConfig(hidden_size=32, num_layers=1, num_heads=2,
                                                                       intermediate_size=64, vocab_size=400)),
                         warmup_steps=1, val_generate_limit=0)
    data = RationaleDataModule(table=str(tiny_table), stage="sft", batch_size=8, run_dir=str(tmp_path / "data"))
    L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=3, limit_val_batches=0, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              callbacks=[Snapshot()], default_root_dir=str(tmp_path)).fit(module, data)
    assert module.skipped_steps == 1
    (weights1, moments1), (weights2, moments2), (weights3, _) = snapshots
    assert all(torch.equal(weights1[k], weights2[k]) for k in weights1)          # the NaN step changed nothing
    assert all(torch.equal(a, b) for a, b in zip(moments1, moments2)) and moments1
    assert any(not torch.equal(weights2[k], weights3[k]) for k in weights2)      # and training went on
    assert all(torch.isfinite(v).all() for v in weights3.values())
