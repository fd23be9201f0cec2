"""Ctrl-C and SIGTERM: every command stops when asked, and ``python -m chemlit`` exits with 128 + the
signal's number, as a shell reports a process ended by that signal.

- ``fit`` stops after the optimizer step in progress with a checkpoint (resume with ``--ckpt_path``) and
  no export: an export means "stage done" to the pipeline.
- ``validate``, ``test`` and ``predict`` stop after the batch in progress (``predict`` also between the
  batches of its interval calibration) and write nothing: no predictions.csv, no metrics.

A second Ctrl-C stops at once, as usual. The handlers are installed when the loop starts, after
Lightning's own (which would only log a SIGTERM outside fit, and end fit without a checkpoint), and
removed when the stage ends.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Optional

from lightning.pytorch.trainer.states import TrainerFn

from chemlit.data.files import run_directory


class StopRequested(Exception):
    """Raised at a batch boundary of validate / test / predict once Ctrl-C or SIGTERM came."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = int(signum)


class StopOnSignal:
    """StageModule's signal handling: ``stop_signal`` is the signal received (None while none came)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stop_signal: Optional[int] = None
        self._previous_handlers: dict = {}

    # ------------------------------------------------------------------ handlers
    def catch_stop_signals(self) -> None:
        """Ctrl-C and SIGTERM set ``stop_signal`` from now on (main thread only: Python's rule for handlers)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) != self._request_stop:
                self._previous_handlers[signum] = signal.signal(signum, self._request_stop)

    def _request_stop(self, signum, frame) -> None:
        if self.stop_signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop_signal = signum
        after = "this step with a checkpoint" if self._fitting() else "this batch, writing nothing"
        print(f"\nchemlit: {signal.Signals(signum).name} received: stopping after {after} "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def teardown(self, stage: str) -> None:
        for signum, handler in self._previous_handlers.items():
            if signal.getsignal(signum) == self._request_stop:  # (Lightning may have restored its originals)
                signal.signal(signum, handler)
        self._previous_handlers = {}

    def _fitting(self) -> bool:
        return self._trainer is not None and self._trainer.state.fn == TrainerFn.FITTING

    def stop_requested(self) -> bool:
        """Whether any rank received a signal: a collective, which every rank reaches at the same point."""
        return self.trainer.strategy.reduce_boolean_decision(self.stop_signal is not None, all=False)

    def stop_if_requested(self) -> None:
        """Outside fit: raise StopRequested once a signal came (the CLI exits with 128 + its number)."""
        if not self._fitting() and self.stop_requested():
            self.stop_signal = self.stop_signal or signal.SIGTERM  # another rank's signal
            raise StopRequested(self.stop_signal)

    # ------------------------------------------------------------------ fit: a checkpoint, then stop
    # (the handlers are installed by StageModule.on_train_start, after the loader's resume fix)
    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.stop_requested() and not self.trainer.should_stop:
            if not self.trainer.fast_dev_run:  # a smoke run writes no checkpoint
                path = self.interrupted_checkpoint_path()
                self.trainer.save_checkpoint(path)
                if self.trainer.is_global_zero:
                    print(f"chemlit: saved {path}; resume with: fit ... --ckpt_path {path}", file=sys.stderr,
                          flush=True)
            self.trainer.should_stop = True

    def interrupted_checkpoint_path(self) -> Path:
        """Where a stop by signal saves: the checkpoint callback's last.ckpt, else <run>/checkpoints/last.ckpt."""
        directory = getattr(self.trainer.checkpoint_callback, "dirpath", None)
        return Path(directory or run_directory(self.trainer) / "checkpoints") / "last.ckpt"

    # ------------------------------------------------------------------ validate / test / predict: stop, write nothing
    def on_validation_start(self) -> None:
        if not self._fitting():  # validation inside fit stops with fit, after the next training step
            self.catch_stop_signals()

    def on_test_start(self) -> None:
        self.catch_stop_signals()

    def on_predict_start(self) -> None:
        self.catch_stop_signals()

    def on_validation_batch_end(self, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.stop_if_requested()

    def on_test_batch_end(self, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.stop_if_requested()

    def on_predict_batch_end(self, outputs, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.stop_if_requested()
