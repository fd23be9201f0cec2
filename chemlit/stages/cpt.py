"""CPT: next-token loss on packed molecule text and rationales (no target values)."""

from __future__ import annotations

from typing import Optional

import torch
from torchmetrics import MeanMetric

from chemlit.models.factory import CPTLora, ModelSpec, SFTLora
from chemlit.stages.base import StageModule, next_token_loss


class CPTModule(StageModule):
    """Continued pre-training. Logs loss and perplexity; exports like every stage."""

    stage_name = "cpt"

    def __init__(self, model: ModelSpec = ModelSpec(), learning_rate: float = 1e-3, weight_decay: float = 0.1,
                 warmup_steps: int = 100, export_dir: Optional[str] = None,
                 lora: CPTLora = CPTLora()):
        """
        Args:
            model: which model to train and how to load it (see ModelSpec).
            learning_rate: peak AdamW learning rate (linear warm-up, cosine decay to 10%).
            weight_decay: AdamW weight decay on matrices.
            warmup_steps: optimizer steps of linear warm-up.
            export_dir: where the trained model goes; default <log_dir>/export.
            lora: adapter settings. The CPT default adapts embed_tokens and lm_head as well, with a
                high alpha (128): what the CPT->SFT forgetting study found to work best.
        """
        super().__init__(model, learning_rate, weight_decay, warmup_steps, export_dir)
        self.lora = lora
        self.save_hyperparameters()
        self.val_loss = MeanMetric()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = next_token_loss(logits, batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        n_tokens = (batch["labels"][:, 1:] != -100).sum()
        self.val_loss.update(next_token_loss(logits, batch["labels"]), weight=n_tokens)

    def on_validation_epoch_end(self) -> None:
        # Perplexity is exp of the token-weighted mean loss, not a mean of per-batch perplexities.
        loss = self.val_loss.compute()
        self.log("val/loss", loss, prog_bar=True)
        self.log("val/perplexity", torch.exp(loss.clamp(max=50.0)))
        self.val_loss.reset()
