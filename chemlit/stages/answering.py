"""Stages that answer with a number (SFT, PPO): how they decode, and what validation and test measure."""

from __future__ import annotations

import math
from typing import Optional

import torch

from chemlit.data.datamodule import pad_left
from chemlit.data.prompts import ANSWER_MARKER, answer_line_prefix
from chemlit.eval.bootstrap import bootstrap_mae
from chemlit.eval.metrics import PredictionMetrics
from chemlit.eval.plots import parity_figure
from chemlit.models.shared_prefix import decode_after_prefix, generate_plain
from chemlit.stages.base import StageModule


class AnsweringStage(StageModule):
    """A stage that answers with a number (SFT, PPO): it writes answers (``write_answers``; ``decode``
    samples several after shared prefixes, ``answer_line_prompts`` builds the answer lines' prefixes);
    validation and test write answers, parse them and log MAE, RMSE, R², parse rate (test: with a
    bootstrap interval), a parity plot and a few answers.

    Subclasses set ``val_generate_limit`` and ``log_examples`` and say how they answer in ``answer_batch``.
    """

    plain_decoding = False  # True: model.generate, none of chemlit's decoding machinery (PPO's ppo.decoding: plain)
    val_generate_limit: Optional[int] = None
    log_examples: int = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.val_metrics = PredictionMetrics()
        self.test_metrics = PredictionMetrics()
        self._val_generated = 0
        self._examples: list[str] = []
        self._pairs: list[tuple[float, float]] = []   # (predicted, measured) of this validation/test

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def decode(self, prefix_ids: torch.Tensor, prefix_mask: torch.Tensor, repeats: int, max_new_tokens: int,
               temperature: Optional[float]) -> torch.Tensor:
        """``repeats`` continuations of each left-padded prefix: (G*K, T) token ids.

        Greedy when ``temperature`` is None, else plain sampling from softmax(logits / T). By
        default chemlit's cached decoding loop (``decode_after_prefix``: the cache has room for the
        whole answer, finished rows leave the batch, a shared prefix is read once per group); with
        ``plain_decoding``, ``model.generate`` writes the same tokens (``generate_plain``).
        """
        decode = generate_plain if self.plain_decoding else decode_after_prefix
        return decode(self.model, prefix_ids, prefix_mask, repeats, max_new_tokens, self.tokenizer.eos_token_id,
                      self.tokenizer.pad_token_id, temperature=temperature)

    @torch.no_grad()
    def write_answers(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
                      temperature: Optional[float] = None) -> tuple[torch.Tensor, list[str]]:
        """What the model writes after left-padded prompts: answer ids (B, T) and their text. Validation,
        test, predict and PPO's greedy rationales all decode this way."""
        ids = self.decode(prompt_ids, prompt_mask, 1, max_new_tokens, temperature)
        return ids, self.tokenizer.batch_decode(ids, skip_special_tokens=True)

    def answer_line_prompts(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, written: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        """Where each row's answer line is sampled: its prompt + what it wrote up to its answer marker (the
        marker appended where it is missing or malformed: ``answer_line_prefix``), left-padded; and each
        row's written part. ``written``: (B, T) ids that ``write_answers`` returned (padding and the end
        token are dropped). PPO's rollout and median decoding both sample after these prefixes."""
        pad, eos = self.tokenizer.pad_token_id, self.tokenizer.eos_token_id
        marker = self.tokenizer.encode(ANSWER_MARKER, add_special_tokens=False)
        newline_marker = self.tokenizer.encode("\n" + ANSWER_MARKER, add_special_tokens=False)
        parts = [answer_line_prefix([t for t in row.tolist() if t not in (pad, eos)], marker, newline_marker)
                 for row in written]
        prefixes = [ids[mask.bool()].tolist() + part for ids, mask, part in zip(prompt_ids, prompt_mask, parts)]
        ids = pad_left(prefixes, pad, None).to(written.device)
        mask = pad_left([[1] * len(p) for p in prefixes], 0, None).to(written.device)
        return ids, mask, parts

    def as_tensor(self, numbers: list[Optional[float]]) -> torch.Tensor:
        """Parsed numbers (None where an answer had none) as a tensor with NaN in their place."""
        return torch.tensor([math.nan if v is None else v for v in numbers], device=self.device)

    # ------------------------------------------------------------------ validation and test
    def answer_batch(self, batch: dict) -> tuple[list[str], torch.Tensor]:
        """The answers' texts and their parsed numbers (NaN where none parses)."""
        raise NotImplementedError

    def _answer_and_score(self, batch: dict, metrics: PredictionMetrics) -> tuple[list[str], torch.Tensor]:
        texts, values = self.answer_batch(batch)
        metrics.update(values, batch["targets"])
        self._pairs.extend(zip(values.tolist(), batch["targets"].tolist()))
        return texts, values

    def on_validation_epoch_start(self) -> None:
        self._val_generated, self._examples, self._pairs = 0, [], []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if self.val_generate_limit is not None and self._val_generated >= self.val_generate_limit:
            return
        texts, values = self._answer_and_score(batch, self.val_metrics)
        self._val_generated += values.numel()
        for smiles, text, target in zip(batch["smiles"], texts, batch["targets"].tolist()):
            if len(self._examples) < self.log_examples:
                self._examples.append(f"**{smiles}** (measured {target:g} °C)\n\n{text}")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_text") and not self.trainer.sanity_checking:
            if self._examples:
                experiment.add_text("val/generations", "\n\n---\n\n".join(self._examples), self.global_step)
            self._log_parity("val/parity", experiment)

    def on_test_epoch_start(self) -> None:
        self._pairs = []

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._answer_and_score(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)
        errors = [abs(p - m) for p, m in self._pairs if not math.isnan(p) and not math.isnan(m)]
        if errors:
            interval = bootstrap_mae(errors)
            self.log("test/mae_ci_low", interval.low)
            self.log("test/mae_ci_high", interval.high)
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_figure"):
            self._log_parity("test/parity", experiment)

    def _log_parity(self, tag: str, experiment) -> None:
        if self._pairs:
            predicted, measured = zip(*self._pairs)
            experiment.add_figure(tag, parity_figure(predicted, measured, tag), self.global_step, close=True)

    def _log_metrics(self, prefix: str, metrics: PredictionMetrics) -> None:
        for name, value in metrics.compute().items():
            self.log(f"{prefix}/{name}", value, prog_bar=name in ("mae", "parse_rate"))
        metrics.reset()
