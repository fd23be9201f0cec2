"""A callback for tests/test_stop_signals.py, given to the real CLI with --trainer.callbacks+=stop_probe.Probe.

It wraps the stage's ``answer_with_interval`` (what validation, test, predict and predict's interval
calibration all answer with): each call prints "chemlit-probe: answering", and the first one then waits
(up to 10 s) until the module has received the signal the test sends on seeing that line, before it
answers. So the signal always arrives in the middle of the first batch, however slow the machine; the
number of lines printed says how many batches were answered in all."""

import time

import lightning as L

MARKER = "chemlit-probe: answering"


class Probe(L.Callback):
    def setup(self, trainer, pl_module, stage):
        answer, calls = pl_module.answer_with_interval, []

        def answer_with_interval(batch):
            calls.append(1)
            print(MARKER, flush=True)
            deadline = time.monotonic() + 10
            while len(calls) == 1 and getattr(pl_module, "stop_signal", None) is None and time.monotonic() < deadline:
                time.sleep(0.02)
            return answer(batch)

        pl_module.answer_with_interval = answer_with_interval
