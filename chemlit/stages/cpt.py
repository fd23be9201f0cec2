"""CPT: next-token loss on packed molecule text and rationales (no target values)."""

from __future__ import annotations

import math

import torch

from chemlit.stages.base import StageModule, next_token_loss


class CPTModule(StageModule):
    """Continued pre-training. Logs loss and perplexity; exports like every stage."""

    stage_name = "cpt"

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = next_token_loss(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = next_token_loss(logits, batch["labels"])
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        self.log("val/perplexity", math.exp(min(loss.item(), 50.0)), batch_size=batch["input_ids"].size(0))
