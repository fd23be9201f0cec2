"""A callback for tests/test_crash_resume.py, given to the real CLI with --trainer.callbacks+=crash_probe.Probe:
it appends each training batch's molecules to $CHEMLIT_PROBE_LOG and, when $CHEMLIT_PROBE_KILL_AT is set,
kills its own process with SIGKILL as batch N starts (after the checkpoint of batch N-1 was written); with
$CHEMLIT_PROBE_SIGNAL_AT=N:SIGINT (or SIGTERM) it sends itself that signal once as batch N+1 starts."""

import json
import os
import signal

import lightning as L


class Probe(L.Callback):
    signalled = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        signal_at = os.environ.get("CHEMLIT_PROBE_SIGNAL_AT")   # e.g. "3:SIGINT": Ctrl-C as batch 4 starts
        if signal_at is not None and not self.signalled and trainer.global_step >= int(signal_at.split(":")[0]):
            self.signalled = True
            os.kill(os.getpid(), getattr(signal, signal_at.split(":")[1]))
        kill_at = os.environ.get("CHEMLIT_PROBE_KILL_AT")
        if kill_at is not None and trainer.global_step >= int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)   # no cleanup, no final checkpoint: what a crash looks like
        with open(os.environ["CHEMLIT_PROBE_LOG"], "a") as handle:
            # SFT and PPO batches name their molecules; CPT's packed blocks are told apart by their token sums
            seen = list(batch["smiles"]) if "smiles" in batch else batch["input_ids"].sum(1).tolist()
            handle.write(json.dumps(seen) + "\n")
