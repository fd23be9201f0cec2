"""What every stage shares: building the model, handing the tokenizer to the data, the optimizer,
saving the tokenizer in checkpoints, and exporting a Hugging Face directory when training ends."""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
from pathlib import Path
from typing import Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_only
from tokenizers import Tokenizer

from chemlit.data.analogues import REFERENCE_FILE, ReferenceSet
from chemlit.data.estimates import ESTIMATOR_FILE, DescriptorEstimator
from chemlit.data.datamodule import IGNORE_INDEX, pad_left
from chemlit.data.prompts import ANSWER_MARKER, answer_line_prefix
from chemlit.data.records import ColumnMap
from chemlit.data.tokenizer import wrap_tokenizer
from chemlit.eval.bootstrap import bootstrap_mae
from chemlit.eval.metrics import PredictionMetrics
from chemlit.eval.plots import parity_figure
from chemlit.models.factory import (
    EXPORT_INFO,
    CPTLora,
    LoraSpec,
    ModelSpec,
    SFTLora,
    TinyConfig,
    export_model,
    load_model_and_tokenizer,
)
from chemlit.models.shared_prefix import decode_after_prefix, generate_plain

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


def load_pending_loader_state(trainer: L.Trainer) -> None:
    """Give a resumed run's training loader the position its checkpoint saved, if Lightning has not.

    Lightning 2.6 builds the training loader before it reads the checkpoint when configure_optimizers
    asks for ``trainer.estimated_stepping_batches`` (the SFT and CPT schedules do), and then never hands
    the loader its saved state (Lightning issue #20550): such a run restarted its epoch from the first
    batch (tests/test_crash_resume.py). This loads the pending state and restarts the loader's iterator,
    as Lightning's own resume path would have; without a pending state it does nothing.
    """
    loop = trainer.fit_loop
    pending = getattr(loop, "_combined_loader_states_to_load", None)
    if pending and loop._combined_loader is not None:
        loop._combined_loader._load_state_dicts(pending)
        loop._combined_loader_states_to_load = []
        iter(loop._data_fetcher)


def reopen_cut_epoch(checkpoint: dict) -> None:
    """Let a run that stopped at ``max_steps`` or ``max_time`` go on when resumed with the limit raised.

    Stopping early ends Lightning's epoch loop, so the checkpoint written then counts the epoch as
    processed although batches of it remain (its last batch never came); resumed, such a run found
    ``max_epochs`` reached and trained nothing. This marks that epoch as still open, so the resumed run
    continues it from the loader's saved position. An epoch that really ended is left alone.
    """
    fit = checkpoint.get("loops", {}).get("fit_loop")
    if not fit or fit["epoch_loop.batch_progress"]["is_last_batch"]:
        return
    for progress in (fit["epoch_progress"]["current"], fit["epoch_progress"]["total"]):
        if progress["processed"] > progress["completed"]:
            progress["processed"] = progress["completed"]


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


class StageModule(L.LightningModule):
    """Base of the CPT, SFT and PPO stages. Subclasses add their steps."""

    stage_name = "base"
    plain_decoding = False  # True: model.generate, none of chemlit's decoding machinery (PPO's ppo.decoding: plain)

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
        self.stop_signal: Optional[int] = None  # SIGINT / SIGTERM received during fit
        self._previous_handlers: dict = {}

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
        """A model trained with analogues retrieves them from the reference set in its export (the
        molecules it was trained with), in every later stage and in ``predict``; its prompts carry
        as many analogues as it was trained with, whatever ``data.analogues`` says."""
        if not hasattr(datamodule, "analogues") or self.model_spec.source == "tiny" or not self.model_spec.path:
            return
        info_file = Path(self.model_spec.path) / EXPORT_INFO
        info = json.loads(info_file.read_text()) if info_file.is_file() else {}
        estimator = Path(self.model_spec.path) / ESTIMATOR_FILE
        if estimator.is_file() and hasattr(datamodule, "descriptor_estimate"):  # its prompts carried an estimate
            datamodule.use_estimator(DescriptorEstimator.load(estimator), str(estimator))
        elif info.get("stage") in ("sft", "ppo") and getattr(datamodule, "descriptor_estimate", False):
            # A model that learned to answer without the estimate is not shown one it never saw.
            log.warning("%s was trained without a descriptor estimate in its prompts: data.descriptor_estimate is "
                        "turned off", self.model_spec.path)
            datamodule.descriptor_estimate = False
        style = info.get("rationale_style") if info.get("stage") in ("sft", "ppo") else None
        if style and hasattr(datamodule, "use_rationale_style") and datamodule.rationale_style != style:
            # rationales written for this model (PPO's rationale_anchor) in the style it learned to write
            log.info("%s learned %s rationales: data.rationale_style %s -> %s", self.model_spec.path, style,
                     datamodule.rationale_style, style)
            datamodule.use_rationale_style(style)
        saved = Path(self.model_spec.path) / REFERENCE_FILE
        if not saved.is_file():
            return
        trained_with = info.get("analogues", 0)
        if trained_with and datamodule.analogues != trained_with:
            log.warning("%s was trained with %d analogues per prompt: using %d, not data.analogues=%d",
                        self.model_spec.path, trained_with, trained_with, datamodule.analogues)
        datamodule.use_reference(ReferenceSet.load(saved), trained_with or datamodule.analogues, str(saved))

    def on_train_start(self) -> None:
        load_pending_loader_state(self.trainer)
        self.catch_stop_signals()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A from-scratch tokenizer is trained on the split; keep it with the weights it belongs to.
        checkpoint["chemlit_tokenizer"] = self.tokenizer.backend_tokenizer.to_str()
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        if getattr(datamodule, "analogues", 0):  # predict from a checkpoint retrieves from the same molecules
            checkpoint["chemlit_reference_set"] = datamodule.reference_set().to_json()
            checkpoint["chemlit_analogues"] = datamodule.analogues
        if getattr(datamodule, "descriptor_estimate", False):
            checkpoint["chemlit_descriptor_estimator"] = datamodule.descriptor_estimator().to_bytes()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        reopen_cut_epoch(checkpoint)
        if "chemlit_tokenizer" in checkpoint and self.model_spec.source == "tiny":
            self.tokenizer = wrap_tokenizer(Tokenizer.from_str(checkpoint["chemlit_tokenizer"]))
            if self.model is not None and self.model.get_input_embeddings().num_embeddings != len(self.tokenizer):
                # setup() built the network for a tokenizer trained on this run's table (predict on a table of
                # new molecules gets a smaller vocabulary): give it the checkpoint's size before its weights load.
                self.model.resize_token_embeddings(len(self.tokenizer))
            if self.trainer is not None and self.trainer.datamodule is not None:
                self.trainer.datamodule.tokenizer = self.tokenizer
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        if "chemlit_reference_set" in checkpoint and hasattr(datamodule, "analogues"):  # prompts as it was trained
            datamodule.use_reference(ReferenceSet.from_json(checkpoint["chemlit_reference_set"]),
                                     checkpoint["chemlit_analogues"], "the checkpoint's reference set")
        if "chemlit_descriptor_estimator" in checkpoint and hasattr(datamodule, "descriptor_estimate"):
            datamodule.use_estimator(DescriptorEstimator.from_bytes(checkpoint["chemlit_descriptor_estimator"]),
                                     "the checkpoint's descriptor estimator")

    # ------------------------------------------------------------------ answering
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
                "analogues": getattr(datamodule, "analogues", 0),
                "descriptor_estimate": getattr(datamodule, "descriptor_estimate", False),
                "rationale_style": getattr(datamodule, "rationale_style", None), "global_step": self.global_step}

    # ------------------------------------------------------------------ Ctrl-C and SIGTERM: stop cleanly, resumable
    def catch_stop_signals(self) -> None:
        """Ctrl-C or SIGTERM during training stops after the step in progress with a checkpoint and no export
        (a second Ctrl-C stops at once, as usual). Installed when training starts, after Lightning's own."""
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[signum] = signal.signal(signum, self._request_stop)

    def _request_stop(self, signum, frame) -> None:
        if self.stop_signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.stop_signal = signum
        print(f"\nchemlit: {signal.Signals(signum).name} received: stopping after this step with a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        stop = self.trainer.strategy.reduce_boolean_decision(self.stop_signal is not None, all=False)
        if stop and not self.trainer.should_stop:
            path = self.interrupted_checkpoint_path()
            self.trainer.save_checkpoint(path)
            self.trainer.should_stop = True
            if self.trainer.is_global_zero:
                print(f"chemlit: saved {path}; resume with: fit ... --ckpt_path {path}", file=sys.stderr, flush=True)

    def interrupted_checkpoint_path(self) -> Path:
        """Where a stop by signal saves: the checkpoint callback's last.ckpt, else <run>/checkpoints/last.ckpt."""
        callback = self.trainer.checkpoint_callback
        directory = getattr(callback, "dirpath", None) or Path(self.trainer.log_dir or self.trainer.default_root_dir) / "checkpoints"
        return Path(directory) / "last.ckpt"

    def teardown(self, stage: str) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    @rank_zero_only
    def on_fit_end(self) -> None:
        if self.stop_signal is not None:  # an export means "stage done" to the pipeline: not after a stop
            print("chemlit: stopped by a signal: no export", file=sys.stderr)
            return
        datamodule = self.trainer.datamodule
        extra = {}
        if getattr(datamodule, "analogues", 0):
            extra[REFERENCE_FILE] = datamodule.reference_set().to_json()
        if getattr(datamodule, "descriptor_estimate", False):
            extra[ESTIMATOR_FILE] = datamodule.descriptor_estimator().to_bytes()
        path = export_model(self.model, self.tokenizer, self.export_path(), self.export_info(), self.model_spec,
                            extra_files=extra)
        log.info("Exported the %s model to %s", self.stage_name, path)
        print(f"chemlit: exported the {self.stage_name} model to {path}")


class AnsweringStage(StageModule):
    """A stage that answers with a number (SFT, PPO): validation and test write answers, parse them and
    log MAE, RMSE, R², parse rate (test: with a bootstrap interval), a parity plot and a few answers.

    Subclasses set ``val_generate_limit`` and ``log_examples`` and say how they answer in ``answer_batch``.
    """

    val_generate_limit: Optional[int] = None
    log_examples: int = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.val_metrics = PredictionMetrics()
        self.test_metrics = PredictionMetrics()
        self._val_generated = 0
        self._examples: list[str] = []
        self._pairs: list[tuple[float, float]] = []   # (predicted, measured) of this validation/test

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
