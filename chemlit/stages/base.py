"""What every stage shares: building the model and handing the tokenizer (and what the model's export
carries) to the data, the loss, and the optimizer with its schedule.

The rest of a stage's life is in its own module, mixed into StageModule: ``checkpoints`` (what a
checkpoint carries, resuming exactly), ``signals`` (Ctrl-C and SIGTERM), ``export`` (the model directory
written when fit ends). Answering stages (SFT, PPO) build on ``answering.AnsweringStage``.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Timer

from chemlit.data.datamodule import IGNORE_INDEX
from chemlit.models.factory import LoraSpec, ModelSpec, load_model_and_tokenizer
from chemlit.stages.checkpoints import CheckpointExtras, load_pending_loader_state
from chemlit.stages.export import ExportOnFitEnd
from chemlit.stages.handover import adopt_export
from chemlit.stages.signals import StopOnSignal

log = logging.getLogger(__name__)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Weighted mean cross-entropy of predicting labels[t+1] from position t, over labels != -100.

    loss = sum_t w_t * CE_t / sum_t w_t with w_t = weights[t+1] (1 when ``weights`` is None).
    A batch with no labelled token (every prompt truncated away) gives 0, not NaN.
    """
    shift_logits = logits[:, :-1].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:]            # (B, T-1)
    token_loss = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=IGNORE_INDEX,
                                 reduction="none")  # (B, T-1), 0 where ignored
    w = (shift_labels != IGNORE_INDEX).float()  # (B, T-1)
    if weights is not None:
        w = w * weights[:, 1:].float()
    return (token_loss * w).sum() / w.sum().clamp(min=1e-8)


def steps_in_time(timer: Optional[Timer], step: int) -> float:
    """How many optimizer steps fit in ``trainer.max_time`` at the pace so far (``step`` steps in the time
    Lightning's Timer has counted, validation included; its clock is saved in checkpoints); inf without a
    time limit or before any time has passed. Where the time limit is far off this is far above the step
    count, so such runs stay exactly reproducible."""
    if timer is None or step <= 0:
        return math.inf
    remaining = timer.time_remaining("train")
    elapsed = timer.time_elapsed("train")
    if remaining is None or elapsed <= 0:
        return math.inf
    return step * (elapsed + remaining) / elapsed


def gradients_are_finite(module: torch.nn.Module) -> bool:
    """No NaN or inf in any gradient of ``module`` (under DDP the gradients are already averaged, so every
    rank gives the same answer)."""
    return all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


class StageModule(CheckpointExtras, StopOnSignal, ExportOnFitEnd, L.LightningModule):
    """Base of the CPT, SFT and PPO stages. Subclasses add their steps."""

    stage_name = "base"

    def __init__(self, model: ModelSpec = ModelSpec(), learning_rate: float = 1e-3, weight_decay: float = 0.1,
                 warmup_steps: int = 100, export_dir: Optional[str] = None):
        super().__init__()
        self.model_spec = model or ModelSpec()
        self.lora: Optional[LoraSpec] = None  # each stage sets its own, with its own defaults
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.export_dir = export_dir
        self.model = None
        self.tokenizer = None
        self.skipped_steps = 0  # optimizer steps not taken because a loss or gradient was not finite

    # ------------------------------------------------------------------ model and tokenizer
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if self.model is None:
            self.model, self.tokenizer = load_model_and_tokenizer(self.model_spec, datamodule.tokenizer_corpus,
                                                                  self.lora)
            self.model.train()  # from_pretrained returns eval mode; Lightning switches modes from here on
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            log.info("%s model: %.2fM parameters, %.2fM trainable", self.stage_name,
                     sum(p.numel() for p in self.model.parameters()) / 1e6, trainable / 1e6)
        datamodule.tokenizer = self.tokenizer
        self.hand_over_reference_set(datamodule)

    def hand_over_reference_set(self, datamodule) -> None:
        """A model loaded from an export is shown prompts as it learned them, in every later stage and in
        ``predict``: its reference set and analogue count, its descriptor estimator, its rationale style
        (``chemlit.stages.handover.adopt_export``). A from-scratch model has no export to read."""
        if self.model_spec.source != "tiny" and self.model_spec.path:
            adopt_export(datamodule, self.model_spec.path)

    def on_train_start(self) -> None:
        load_pending_loader_state(self.trainer)
        self.catch_stop_signals()  # after Lightning's own handlers (chemlit.stages.signals)

    # ------------------------------------------------------------------ optimisation
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Forward and backward (Lightning's closure), then the step only if every gradient is finite: a
        NaN or inf in a loss or a gradient never reaches the weights or the optimizer's moments. A skipped
        step is counted (``train/skipped_steps``). (PPO steps by hand and checks the same in ``update``.)"""
        loss = optimizer_closure()
        if not gradients_are_finite(self):
            self.skipped_steps += 1
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.step(closure=lambda: loss)  # the precision plugin still clips and calls its hooks
        self.log("train/skipped_steps", float(self.skipped_steps))

    def configure_optimizers(self):
        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=self.learning_rate, betas=(0.9, 0.95))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.warmup_steps, total // 10 + 1)

        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)

        def schedule(step: int) -> float:
            # Linear warm-up, then cosine decay to 10% of the peak rate, over the steps or over max_time,
            # whichever ends first (at the pace so far): a run cut by its time limit ends at a low rate too.
            if step < warmup:
                return (step + 1) / warmup
            end = min(total, steps_in_time(timer, step))
            progress = min((step - warmup) / max(end - warmup, 1), 1.0)
            return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(progress * math.pi))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
