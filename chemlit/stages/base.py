"""What every stage shares: building the model, handing the tokenizer to the data, the optimizer,
saving the tokenizer in checkpoints, and exporting a Hugging Face directory when training ends."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from tokenizers import Tokenizer

from chemlit.data.datamodule import IGNORE_INDEX
from chemlit.data.records import ColumnMap
from chemlit.data.tokenizer import wrap_tokenizer
from chemlit.models.factory import CPTLora, LoraSpec, ModelSpec, SFTLora, TinyConfig, export_model, load_model_and_tokenizer
from chemlit.models.shared_prefix import decode_after_prefix

log = logging.getLogger(__name__)


def allow_in_checkpoints(*classes: type) -> None:
    """Let ``torch.load(weights_only=True)`` rebuild these plain config dataclasses.

    A module built in Python (not from YAML) stores its hyperparameters as these objects; the
    weights-only unpickler refuses unknown classes, and allowing a dataclass of numbers and strings
    runs no code of the checkpoint's choosing.
    """
    torch.serialization.add_safe_globals(list(classes))


allow_in_checkpoints(ModelSpec, TinyConfig, LoraSpec, SFTLora, CPTLora, ColumnMap)


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


class StageModule(L.LightningModule):
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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A from-scratch tokenizer is trained on the split; keep it with the weights it belongs to.
        checkpoint["chemlit_tokenizer"] = self.tokenizer.backend_tokenizer.to_str()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "chemlit_tokenizer" in checkpoint and self.model_spec.source == "tiny":
            self.tokenizer = wrap_tokenizer(Tokenizer.from_str(checkpoint["chemlit_tokenizer"]))
            if self.trainer is not None and self.trainer.datamodule is not None:
                self.trainer.datamodule.tokenizer = self.tokenizer

    # ------------------------------------------------------------------ answering
    @torch.no_grad()
    def write_answers(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
                      temperature: Optional[float] = None) -> tuple[torch.Tensor, list[str]]:
        """What the model writes after left-padded prompts: answer ids (B, T) and their text.

        Greedy when ``temperature`` is None, else plain sampling from softmax(logits / T). The
        cached decoding loop of chemlit.models.shared_prefix (same tokens as ``generate``; its cache
        has room for the whole answer and finished rows leave the batch), so validation, test,
        predict and PPO's greedy rationales all decode the same way.
        """
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        ids = decode_after_prefix(self.model, prompt_ids, prompt_mask, 1, max_new_tokens, eos, pad,
                                  temperature=temperature)
        return ids, self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def as_tensor(self, numbers: list[Optional[float]]) -> torch.Tensor:
        """Parsed numbers (None where an answer had none) as a tensor with NaN in their place."""
        return torch.tensor([math.nan if v is None else v for v in numbers], device=self.device)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.requires_grad and p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=self.learning_rate, betas=(0.9, 0.95))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.warmup_steps, total // 10 + 1)

        def schedule(step: int) -> float:
            # Linear warm-up, then cosine decay to 10% of the peak rate.
            if step < warmup:
                return (step + 1) / warmup
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.1 + 0.9 * 0.5 * (1.0 + torch.cos(torch.tensor(progress * torch.pi)).item())

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ export
    def export_path(self) -> Path:
        if self.export_dir:
            return Path(self.export_dir)
        # Not trainer.log_dir: it broadcasts across ranks, and the export runs on rank 0 only.
        base = getattr(self.trainer.logger, "log_dir", None) or self.trainer.default_root_dir
        return Path(base) / "export"

    def export_info(self) -> dict:
        datamodule = self.trainer.datamodule
        return {"stage": self.stage_name, "model_source": self.model_spec.source,
                "base_path": self.model_spec.path, "table": str(datamodule.table),
                "split_file": str(datamodule.split_file or datamodule.output_dir() / "splits.csv"),
                "lora": None if self.lora is None or not self.lora.enabled else vars(self.lora),
                "global_step": self.global_step}

    @rank_zero_only
    def on_fit_end(self) -> None:
        path = export_model(self.model, self.tokenizer, self.export_path(), self.export_info(), self.model_spec)
        log.info("Exported the %s model to %s", self.stage_name, path)
        print(f"chemlit: exported the {self.stage_name} model to {path}")
