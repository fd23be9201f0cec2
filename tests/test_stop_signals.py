"""Every command stops when asked, and a run writes its files in its run directory, never in the current one.

validate, test and predict, sent SIGTERM or Ctrl-C (SIGINT) in the middle of a batch (predict: of its
interval calibration), stop at the end of that batch, write nothing and exit with 128 + the signal's
number (fit's own stop, with a checkpoint, is tests/test_crash_resume.py's). A fast_dev_run fit leaves the
current directory as it was; a fit without a logger writes under runs/unlogged/version_N."""

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from chemlit.cli import main
from stop_probe import MARKER

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "quickstart" / "sft.yaml"
TABLE = ROOT / "tests" / "data" / "tiny_mp.csv"


def tiny() -> list[str]:
    """The quickstart SFT config shrunk to seconds (a tiny model on the tiny table, no descriptor estimate)."""
    return ["--config", str(CONFIG), "--data.table", str(TABLE), "--data.descriptor_estimate", "false",
            "--data.batch_size", "8", "--data.eval_batch_size", "4",
            "--model.init_args.model.tiny.hidden_size", "32", "--model.init_args.model.tiny.num_layers", "1",
            "--model.init_args.model.tiny.num_heads", "2", "--model.init_args.model.tiny.intermediate_size", "64",
            "--model.init_args.model.tiny.vocab_size", "400", "--model.init_args.max_new_tokens", "16",
            "--model.init_args.answer_samples", "4", "--model.init_args.calibration_molecules", "16",
            "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A checkpoint of two SFT steps and its run's splits.csv."""
    runs = tmp_path_factory.mktemp("trained") / "runs"
    main(["fit", *tiny(), "--trainer.logger.init_args.save_dir", str(runs), "--trainer.limit_train_batches", "2",
          "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0"])
    run = runs / "quickstart-sft" / "version_0"
    return run / "checkpoints" / "last.ckpt", run / "splits.csv"


@pytest.mark.parametrize("command, signum", [("predict", signal.SIGTERM), ("test", signal.SIGINT),
                                             ("validate", signal.SIGTERM)])
@pytest.mark.slow
def test_a_signal_stops_validate_test_and_predict_after_the_batch_writing_nothing(tmp_path, trained, command,
                                                                                   signum):
    ckpt, split = trained
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen(
        [sys.executable, "-m", "chemlit", command, *tiny(), "--ckpt_path", str(ckpt),
         "--data.split_file", str(split), "--trainer.callbacks+=stop_probe.Probe"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    watchdog = threading.Timer(300, child.kill)
    watchdog.start()
    try:
        lines = []
        for line in child.stdout:  # until the first batch is being answered (predict: its calibration's)
            lines.append(line)
            if line.strip() == MARKER:
                child.send_signal(signum)
                break
        output = "".join(lines) + child.stdout.read()
        child.wait()
    finally:
        watchdog.cancel()
    assert child.returncode == 128 + signum, output[-3000:]
    assert output.count(MARKER) == 1, output[-3000:]  # no batch after the one the signal came in
    assert f"stopped by {signum.name}: nothing written" in output and "Traceback" not in output, output[-3000:]
    assert not list(tmp_path.rglob("predictions.csv*"))  # not even a temporary file
    assert "test/mae" not in output  # no metrics table either


def tree(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def test_a_fast_dev_run_leaves_the_current_directory_as_it_was(tmp_path, monkeypatch):
    """No checkpoint (the config's ModelCheckpoint has save_last), no export, no splits.csv, no data_summary.json."""
    (tmp_path / "notes.txt").write_text("mine\n")
    before = tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    main(["fit", *tiny(), "--trainer.fast_dev_run", "true"])  # the config's logger: save_dir runs
    assert tree(tmp_path) == before


def test_a_run_without_a_logger_writes_under_runs_not_in_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", *tiny(), "--trainer.logger", "false", "--trainer.callbacks=[]",
          "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.save_last=true",
          "--trainer.limit_train_batches", "2", "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "0"])
    assert os.listdir(tmp_path) == ["runs"]
    run = tmp_path / "runs" / "unlogged" / "version_0"
    for name in ("splits.csv", "data_summary.json", "checkpoints/last.ckpt", "export/model.safetensors"):
        assert (run / name).is_file(), name
