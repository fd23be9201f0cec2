"""SFT: teach the format prompt -> rationale -> ``##Prediction: <number>``, loss on the answer only.

Validation and test generate an answer for each molecule, parse the number and log MAE, RMSE, R²
and the parse rate (torchmetrics), plus a few full generations as TensorBoard text.
"""

from __future__ import annotations

import logging
import math
from typing import Literal, Optional

import numpy as np
import torch

from chemlit.data.datamodule import IGNORE_INDEX
from chemlit.data.files import run_directory, write_csv
from chemlit.data.prompts import ANSWER_MARKER, parse_prediction
from chemlit.models.factory import CPTLora, ModelSpec, SFTLora
from chemlit.stages.answering import AnsweringStage
from chemlit.stages.base import next_token_loss

log = logging.getLogger(__name__)


def conformal_scale(medians, lows, highs, targets, coverage: float, min_half_width: float = 1.0) -> float:
    """The factor s such that [m - s(m - low), m + s(high - m)] holds ``targets`` for at least ``coverage``
    of the calibration molecules, with the finite-sample correction of split conformal prediction
    (the ceil((n + 1) coverage)-th smallest score), so a new molecule from the same distribution is
    covered with probability >= coverage. A molecule's score is how far outside (> 1) or inside
    (< 1) its interval its measured value lies, in units of the interval's half on that side (at
    least ``min_half_width`` °C, so that an interval of width 0 can still be stretched)."""
    m, lo, hi, y = (np.asarray(x, dtype=float) for x in (medians, lows, highs, targets))
    below = (m - y) / np.maximum(m - lo, min_half_width)
    above = (y - m) / np.maximum(hi - m, min_half_width)
    scores = np.sort(np.maximum(below, above))
    rank = min(math.ceil((len(scores) + 1) * coverage), len(scores))
    return float(max(scores[rank - 1], 0.0))

Decoding = Literal["greedy", "sample", "median"]


class SFTModule(AnsweringStage):
    stage_name = "sft"

    def __init__(
        self,
        model: ModelSpec = ModelSpec(),
        learning_rate: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 100,
        decoding: Decoding = "median",
        temperature: float = 1.0,
        max_new_tokens: int = 192,
        val_generate_limit: Optional[int] = 256,
        log_examples: int = 4,
        export_dir: Optional[str] = None,
        lora: SFTLora = SFTLora(),
        track_forgetting: bool = False,
        answer_loss_weight: float = 1.0,
        answer_samples: int = 32,
        val_decoding: Decoding = "greedy",
        interval: tuple[float, float] = (0.1, 0.9),
        calibration_molecules: int = 256,
        smiles_variants: int = 1,
    ):
        """
        Args:
            model: which model to train and how to load it (see ModelSpec).
            learning_rate: peak AdamW learning rate (linear warm-up, cosine decay to 10%).
            weight_decay: AdamW weight decay on matrices (not on norms and biases).
            warmup_steps: optimizer steps of linear warm-up.
            decoding: how test and predict answer (the pipeline's report too). median (default):
                greedy rationale, then `answer_samples` numbers sampled after its "##Prediction:",
                answered by their median, with `interval` quantiles of the same samples (greedy
                digits pick each digit's mode and collapse onto a few round values; the median of
                samples is the answer that minimises the expected absolute error). greedy: most
                likely token at each step, no interval; sample: one sample at `temperature`.
            val_decoding: how validation answers during fit (greedy: the cheapest; model selection
                uses val/loss).
            interval: lower and upper quantile of the sampled numbers written as `low` and `high`
                to predictions.csv (decoding=median); (0.1, 0.9) = the 10th-90th percentile, and so
                an 80 % interval once calibrated.
            calibration_molecules: before `predict` writes intervals, answer this many validation
                molecules and stretch (or shrink) every interval around its median by the one factor
                that makes them contain their measured values as often as the interval's nominal
                coverage says (split-conformal calibration). The sampled numbers of a fine-tuned
                model are too narrow: raw 10th-90th percentiles held 30-65 % of the measured values.
                0, or no measured validation molecules: the raw quantiles.
            temperature: sampling temperature when decoding=sample or median.
            answer_samples: numbers sampled per molecule when decoding=median (also for the interval).
                The median of a few samples is itself noisy: on the pipeline's SFT model (1,285 test
                molecules) 8 gave 30.6 °C, 32 gave 29.0, 128 gave 28.7, at 60, 72 and 111 s.
            smiles_variants: decoding=median: answer for this many SMILES of each molecule (the
                canonical one and randomised ones: renumbered atoms), each with its own greedy
                rationale and answer_samples numbers, and take the median of all of them. 1 = the
                canonical SMILES only; n costs n times the answering time.
            max_new_tokens: longest generated rationale + answer.
            val_generate_limit: generate for only the first N validation molecules each epoch
                (generation is the slow part); None = all. Test always uses all.
            log_examples: full generations written to TensorBoard as text per validation.
            export_dir: where the trained model goes; default <log_dir>/export.
            lora: adapter settings. The SFT default (attention + MLP, low alpha 8) is what the
                CPT->SFT forgetting study found to keep the most CPT knowledge.
            track_forgetting: log the validation molecules' CPT-text perplexity at each validation
                and its ratio to the value before SFT (val/forgetting; > 1 means forgetting).
            answer_loss_weight: weight of the answer line's tokens ("##Prediction: N" and the end
                token) against 1 for rationale tokens. The number is 3-4 of about 90 completion
                tokens; a weight above 1 keeps its gradient from drowning in the rationale's.
        """
        super().__init__(model, learning_rate, weight_decay, warmup_steps, export_dir)
        self.lora = lora
        self.save_hyperparameters()
        self.decoding = decoding
        self.val_decoding = val_decoding
        if not 0.0 <= interval[0] < interval[1] <= 1.0:
            raise ValueError(f"interval must be two quantiles 0 <= low < high <= 1, got {interval}")
        self.interval = (float(interval[0]), float(interval[1]))
        if calibration_molecules < 0:
            raise ValueError(f"calibration_molecules must be >= 0, got {calibration_molecules}")
        self.calibration_molecules = calibration_molecules
        self.interval_scale = 1.0  # set by calibrate_interval() before predict
        self.answer_samples = answer_samples
        if smiles_variants < 1:
            raise ValueError(f"smiles_variants must be >= 1, got {smiles_variants}")
        self.smiles_variants = smiles_variants
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.val_generate_limit = val_generate_limit
        self.log_examples = log_examples
        self.track_forgetting = track_forgetting
        if answer_loss_weight <= 0:
            raise ValueError(f"answer_loss_weight must be > 0, got {answer_loss_weight}")
        self.answer_loss_weight = answer_loss_weight
        self.cpt_perplexity_before: Optional[float] = None

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        weights = 1.0 + (self.answer_loss_weight - 1.0) * batch["answer_mask"]  # (B, T)
        loss = next_token_loss(logits, batch["labels"], weights)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].size(0))
        return loss

    # ------------------------------------------------------------------ generation
    def current_decoding(self) -> str:
        """``val_decoding`` while validating inside fit, ``decoding`` for test and predict."""
        trainer = self._trainer
        if trainer is not None and (trainer.sanity_checking or (trainer.validating and trainer.state.fn == "fit")):
            return self.val_decoding
        return self.decoding

    @torch.no_grad()
    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        """Answer ids (B, T) and texts for left-padded prompts (greedy for decoding=greedy|median)."""
        sample = self.current_decoding() == "sample"
        return self.write_answers(prompt_ids, prompt_mask, self.max_new_tokens, self.temperature if sample else None)

    @torch.no_grad()
    def sampled_numbers(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, answers: torch.Tensor
                        ) -> list[list[float]]:
        """For each molecule, the numbers parsed from ``answer_samples`` answer lines sampled after its
        greedy answer's own "##Prediction:" -- or, where the greedy answer has none (malformed, or cut
        by max_new_tokens), after its whole text with "\n##Prediction:" appended, as PPO's rollout does.

        answers: (B, T) the greedy answers' ids."""
        K = self.answer_samples
        ids, mask, _ = self.answer_line_prompts(prompt_ids, prompt_mask, answers)
        # The K samples of a molecule share its rationale: computed once, its keys and values read once.
        sampled = self.decode(ids, mask, K, 8, self.temperature)  # (B * K, <= 8)
        texts = self.tokenizer.batch_decode(sampled, skip_special_tokens=True)
        numbers = []
        for b in range(answers.size(0)):
            parsed = [parse_prediction(ANSWER_MARKER + t) for t in texts[b * K:(b + 1) * K]]
            numbers.append([n for n in parsed if n is not None])
        return numbers

    def median_and_interval(self, numbers: list[list[float]], fallback: list[Optional[float]]
                            ) -> tuple[list[Optional[float]], list[tuple[float, float]]]:
        """Each molecule's median number and ``interval`` quantiles, stretched around the median by
        ``interval_scale``; ``fallback`` and (nan, nan) where none."""
        values, intervals = list(fallback), [(math.nan, math.nan)] * len(fallback)
        for b, found in enumerate(numbers):
            if found:
                median, low, high = np.quantile(np.array(found, dtype=float), [0.5, *self.interval])
                s = self.interval_scale
                values[b], intervals[b] = float(median), (float(median - s * (median - low)),
                                                          float(median + s * (high - median)))
        return values, intervals

    @torch.no_grad()
    def calibrate_interval(self) -> None:
        """``interval_scale`` from the first ``calibration_molecules`` measured validation molecules of the
        training run (``RationaleDataModule.calibration_molecules``: never molecules predict answers)."""
        self.interval_scale = 1.0
        datamodule = self.trainer.datamodule
        examples = datamodule.calibration_examples(self.calibration_molecules)  # the training run's validation molecules
        if self.decoding != "median" or not examples:
            return
        medians, lows, highs, targets = [], [], [], []
        for start in range(0, len(examples), datamodule.eval_batch_size):
            self.stop_if_requested()  # Ctrl-C / SIGTERM: stop between batches here too
            part = examples[start:start + datamodule.eval_batch_size]
            batch = datamodule.collate_rl(part)
            _, values, intervals = self.answer_with_interval(
                {**batch, "prompt_ids": batch["prompt_ids"].to(self.device),
                 "prompt_mask": batch["prompt_mask"].to(self.device)})
            for value, (low, high), ex in zip(values.tolist(), intervals, part):
                if not math.isnan(low):
                    medians.append(value), lows.append(low), highs.append(high), targets.append(ex.target)
        if medians:
            self.interval_scale = conformal_scale(medians, lows, highs, targets, self.interval[1] - self.interval[0])
            log.info("interval: the %.0f%% interval stretched by %.2f around the median, calibrated on %d "
                     "validation molecules", 100 * (self.interval[1] - self.interval[0]), self.interval_scale,
                     len(medians))

    def answer_with_interval(self, batch: dict) -> tuple[list[str], torch.Tensor, list[tuple[float, float]]]:
        """Texts, numbers (NaN where none parsed) and intervals ((nan, nan) unless decoding=median)."""
        answers, texts = self.generate(batch["prompt_ids"], batch["prompt_mask"])
        values = [parse_prediction(t) for t in texts]
        intervals = [(math.nan, math.nan)] * len(values)
        if self.current_decoding() == "median":
            numbers = self.sampled_numbers(batch["prompt_ids"], batch["prompt_mask"], answers)
            for variant in range(1, self.smiles_variants):  # the same molecules, other SMILES: pool the numbers
                prompts = self.trainer.datamodule.variant_prompts(batch["smiles"], variant)
                ids, mask = prompts["prompt_ids"].to(self.device), prompts["prompt_mask"].to(self.device)
                variant_answers, _ = self.generate(ids, mask)
                for pooled, more in zip(numbers, self.sampled_numbers(ids, mask, variant_answers)):
                    pooled.extend(more)
            values, intervals = self.median_and_interval(numbers, values)
        return texts, self.as_tensor(values), intervals

    def answer_batch(self, batch: dict) -> tuple[list[str], torch.Tensor]:
        texts, values, _ = self.answer_with_interval(batch)
        return texts, values

    # ------------------------------------------------------------------ forgetting
    @torch.no_grad()
    def cpt_perplexity(self) -> float:
        """Perplexity of the validation molecules' CPT text: what SFT may make the model forget."""
        blocks = self.trainer.datamodule.packed_blocks("val").to(self.device)
        total, count = 0.0, 0
        for chunk in blocks.split(self.trainer.datamodule.eval_batch_size):
            labels = chunk.masked_fill(chunk == self.tokenizer.pad_token_id, IGNORE_INDEX)
            n = int((labels[:, 1:] != IGNORE_INDEX).sum())
            total += next_token_loss(self.model(input_ids=chunk).logits, labels).item() * n
            count += n
        return math.exp(min(total / max(count, 1), 50.0))

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.track_forgetting and self.cpt_perplexity_before is None:
            self.cpt_perplexity_before = self.cpt_perplexity()

    # ------------------------------------------------------------------ validation (test: AnsweringStage's)
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        self.log("val/loss", next_token_loss(logits, batch["labels"]), prog_bar=True, batch_size=batch["input_ids"].size(0))
        super().validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.track_forgetting and self.cpt_perplexity_before is not None and not self.trainer.sanity_checking:
            now = self.cpt_perplexity()
            self.log("val/cpt_perplexity", now)
            self.log("val/forgetting", now / self.cpt_perplexity_before)  # > 1: CPT text got less likely

    def on_predict_epoch_start(self) -> None:
        self._predictions: list[dict] = []
        if self.calibration_molecules:
            self.calibrate_interval()

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict]:
        texts, values, intervals = self.answer_with_interval(batch)
        blank = lambda x: "" if math.isnan(x) else round(x, 1)  # noqa: E731
        rows = [{"smiles": s, "prediction": blank(v), "low": blank(lo), "high": blank(hi), "rationale": t.strip(),
                 "measured": "" if math.isnan(m) else m}
                for s, v, (lo, hi), t, m in zip(batch["smiles"], values.tolist(), intervals, texts,
                                                batch["targets"].tolist())]
        self._predictions.extend(rows)
        return rows

    def on_predict_epoch_end(self) -> None:
        self.stop_if_requested()  # a signal after the last batch: still nothing written
        if not self.trainer.is_global_zero:
            return
        if self.trainer.fast_dev_run:
            print(f"chemlit: fast_dev_run: {len(self._predictions)} predictions, none written")
            return
        path = write_csv(self._predictions, run_directory(self.trainer) / "predictions.csv")
        print(f"chemlit: wrote {len(self._predictions)} predictions to {path}")
