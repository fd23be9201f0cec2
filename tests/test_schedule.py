"""The learning-rate schedule ends at whichever comes first: the last step or trainer.max_time."""

import math
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Timer

import chemlit.stages.base as base
from chemlit.models.factory import ModelSpec, TinyConfig
from chemlit.stages.cpt import CPTModule


def rate_after(module, steps: int) -> float:
    scheduler = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
    return scheduler.get_last_lr()[0] / module.learning_rate


def module_with(timer) -> CPTModule:
    module = CPTModule(model=ModelSpec(source="tiny", tiny=TinyConfig(hidden_size=16, num_layers=1, num_heads=2,
                                                                       intermediate_size=32, vocab_size=300)),
                       learning_rate=1e-3, warmup_steps=1)
    module.model = torch.nn.Linear(4, 4)
    module._trainer = SimpleNamespace(estimated_stepping_batches=1000, callbacks=[timer] if timer else [])
    return module


def test_the_cosine_follows_the_clock_when_the_time_limit_comes_first(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("lightning.pytorch.callbacks.timer.time.monotonic", lambda: clock[0])
    timer = Timer(duration=timedelta(seconds=100))
    timer.on_train_start(None, None)
    # no time spent: 20 of 1000 steps is barely into the cosine, as without a limit
    assert rate_after(module_with(timer), 20) == pytest.approx(rate_after(module_with(None), 20))
    assert rate_after(module_with(None), 20) > 0.99
    clock[0] += 50.0  # half of max_time gone after 21 steps: 42 fit, so after warm-up (1 step) the cosine is at
    assert base.steps_in_time(timer, 21) == pytest.approx(42)  # 20 of 41 steps instead of 20 of 999
    assert rate_after(module_with(timer), 21) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 20 / 41)))
    clock[0] += 60.0  # past max_time: the floor, 10 % of the peak
    assert rate_after(module_with(timer), 21) == pytest.approx(0.1, abs=1e-6)
    assert base.steps_in_time(None, 21) == float("inf")
