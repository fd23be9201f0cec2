"""A run killed with SIGKILL right after a mid-epoch checkpoint, resumed from that checkpoint with the real CLI,
ends exactly where the uninterrupted run ends: weights, optimizer state, batches seen, and for PPO β and the
curriculum. PPO, SFT and CPT, tiny models, 6 optimizer steps, killed as the 4th starts."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # subprocess runs killed and resumed

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.init_args.model.tiny.hidden_size", "32", "--model.init_args.model.tiny.num_layers", "1",
        "--model.init_args.model.tiny.num_heads", "2", "--model.init_args.model.tiny.intermediate_size", "64",
        "--model.init_args.model.tiny.vocab_size", "400", "--trainer.logger", "false", "--trainer.max_epochs", "1",
        "--trainer.limit_val_batches", "0", "--trainer.precision", "32-true", "--trainer.callbacks=[]"]
STAGES = {
    "ppo": ["--config", str(ROOT / "configs" / "debug" / "ppo_one_iteration.yaml"),
            "--model.init_args.ppo.decoding", "fast", "--model.init_args.kl.controller", "adaptive",
            "--model.init_args.kl.target", "0.1", "--model.init_args.kl.horizon", "64",
            "--model.init_args.curriculum.window", "16",
            "--model.init_args.ppo.num_minibatches", "1"],  # one optimizer step per iteration
    "sft": ["--config", str(ROOT / "configs" / "quickstart" / "sft.yaml"), *TINY, "--data.batch_size", "8",
            "--model.init_args.max_new_tokens", "8"],
    "cpt": ["--config", str(ROOT / "configs" / "quickstart" / "cpt.yaml"), *TINY, "--data.batch_size", "4",
            "--data.max_length", "64"],
}


EVERY_STEP = ["--trainer.callbacks.every_n_train_steps=1", "--trainer.callbacks.save_top_k=-1",
              "--trainer.callbacks.filename={step}"]


def fit(stage: str, run: Path, log: Path, kill_at=None, ckpt_path=None, extra=(), checkpoints=EVERY_STEP,
        signal_at=None) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "chemlit", "fit", *STAGES[stage],
            "--data.table", str(ROOT / "tests" / "data" / "tiny_mp.csv"), "--data.run_dir", str(run / "data"),
            "--model.init_args.export_dir", str(run / "export"),
            "--trainer.limit_train_batches", "6", "--trainer.enable_checkpointing", "true",
            "--trainer.default_root_dir", str(run),
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={run / 'ckpt'}", "--trainer.callbacks.save_last=true", *checkpoints,
            "--trainer.callbacks+=crash_probe.Probe", *extra]
    if ckpt_path:
        args += ["--ckpt_path", str(ckpt_path)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
               CHEMLIT_PROBE_LOG=str(log))
    if kill_at is not None:
        env["CHEMLIT_PROBE_KILL_AT"] = str(kill_at)
    if signal_at is not None:
        env["CHEMLIT_PROBE_SIGNAL_AT"] = signal_at
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=str(run.parent))


def lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("stage", ["ppo", "sft", "cpt"])
def test_sigkill_after_a_mid_epoch_checkpoint_then_resume_is_bit_identical(tmp_path, stage):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    for run in (straight, crashed):
        run.mkdir()
    done = fit(stage, straight, straight / "seen.jsonl")
    assert done.returncode == 0, done.stderr[-3000:]
    killed = fit(stage, crashed, crashed / "seen.jsonl", kill_at=3)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (crashed / "export").exists()
    resumed = fit(stage, crashed, crashed / "seen-after.jsonl", ckpt_path=crashed / "ckpt" / "step=3.ckpt")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert_same_run(stage, straight, crashed, lines(crashed / "seen.jsonl")[:3] + lines(crashed / "seen-after.jsonl"))


def assert_same_run(stage: str, straight: Path, other: Path, other_seen: list, final_checkpoints: bool = True) -> None:
    """Same batches and exported weights as ``straight``, and (``final_checkpoints``) the same final
    last.ckpt: step, optimizer state, PPO's β and curriculum."""
    assert other_seen == lines(straight / "seen.jsonl")
    a, b = load_file(straight / "export" / "model.safetensors"), load_file(other / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    if not final_checkpoints:
        return
    last = [torch.load(run / "ckpt" / "last.ckpt", weights_only=True) for run in (straight, other)]
    assert last[0]["global_step"] == last[1]["global_step"] == 6
    if stage == "ppo":
        assert last[0]["chemlit_ppo"]["kl_controller"] == last[1]["chemlit_ppo"]["kl_controller"]
        assert last[0]["chemlit_ppo"]["curriculum"] == last[1]["chemlit_ppo"]["curriculum"]
    for name, value in last[0]["state_dict"].items():
        assert torch.equal(value, last[1]["state_dict"][name]), name
    for (_, x), (_, y) in zip(last[0]["optimizer_states"][0]["state"].items(), last[1]["optimizer_states"][0]["state"].items()):
        for key in x:
            assert torch.equal(torch.as_tensor(x[key]), torch.as_tensor(y[key])), key


@pytest.mark.parametrize("stage", ["ppo", "sft"])
def test_a_run_stopped_by_max_steps_goes_on_when_resumed_with_the_limit_raised(tmp_path, stage):
    """3 steps with --trainer.max_steps 3 and the default checkpointing (last.ckpt when the run ends),
    then the same command without the limit and --ckpt_path last.ckpt: 3 more steps on the next batches."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for run in (straight, stopped):
        run.mkdir()
    assert fit(stage, straight, straight / "seen.jsonl", checkpoints=()).returncode == 0
    first = fit(stage, stopped, stopped / "seen.jsonl", checkpoints=(), extra=("--trainer.max_steps", "3"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert torch.load(stopped / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 3
    again = fit(stage, stopped, stopped / "seen-after.jsonl", checkpoints=(), ckpt_path=stopped / "ckpt" / "last.ckpt")
    assert again.returncode == 0, again.stderr[-3000:]
    seen = lines(stopped / "seen.jsonl") + lines(stopped / "seen-after.jsonl")
    if stage == "ppo":   # a constant learning rate: the resumed run is the uninterrupted one
        assert_same_run(stage, straight, stopped, seen)
    else:                # SFT's cosine schedule is laid over max_steps, so its weights differ by design;
        assert seen == lines(straight / "seen.jsonl")  # the batches go on where they stopped
        assert torch.load(stopped / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 6


@pytest.mark.parametrize("stage, signum", [("ppo", signal.SIGINT), ("sft", signal.SIGTERM)])
def test_ctrl_c_or_sigterm_stops_after_the_step_with_a_checkpoint_and_no_export(tmp_path, stage, signum):
    """The signal arrives as step 4 starts: step 4 finishes, last.ckpt is written, nothing is exported, the
    exit code is 128 + the signal; resumed from last.ckpt the run ends like the uninterrupted one."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    for run in (straight, stopped):
        run.mkdir()
    assert fit(stage, straight, straight / "seen.jsonl", checkpoints=()).returncode == 0
    first = fit(stage, stopped, stopped / "seen.jsonl", checkpoints=(), signal_at=f"3:{signum.name}")
    assert first.returncode == 128 + signum, first.stderr[-3000:]
    assert not (stopped / "export").exists()
    assert torch.load(stopped / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 4
    again = fit(stage, stopped, stopped / "seen-after.jsonl", checkpoints=(), ckpt_path=stopped / "ckpt" / "last.ckpt")
    assert again.returncode == 0, again.stderr[-3000:]
    # The same batches and bit-identical exported weights (which two Adam steps after the resume would not
    # give without the exact optimizer state). The resumed run's own last.ckpt is not compared: Lightning's
    # ModelCheckpoint, restored from the stop's checkpoint, does not write last.ckpt again at the end.
    assert_same_run(stage, straight, stopped, lines(stopped / "seen.jsonl") + lines(stopped / "seen-after.jsonl"),
                    final_checkpoints=False)
