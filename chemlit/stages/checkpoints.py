"""What a stage's checkpoint carries beyond Lightning's own (the tokenizer, the prompts' reference set and
estimator), what may be unpickled from it, and two fixes that let a resumed run go on exactly where it
stopped."""

from __future__ import annotations

import lightning as L
import torch
from tokenizers import Tokenizer

from chemlit.data.records import ColumnMap
from chemlit.data.tokenizer import wrap_tokenizer
from chemlit.models.factory import CPTLora, LoraSpec, ModelSpec, SFTLora, TinyConfig
from chemlit.stages.handover import adopt_checkpoint, checkpoint_entries


def allow_in_checkpoints(*classes: type) -> None:
    """Let ``torch.load(weights_only=True)`` rebuild these plain config dataclasses.

    A module built in Python (not from YAML) stores its hyperparameters as these objects; the
    weights-only unpickler refuses unknown classes, and allowing a dataclass of numbers and strings
    runs no code of the checkpoint's choosing.
    """
    torch.serialization.add_safe_globals(list(classes))


allow_in_checkpoints(ModelSpec, TinyConfig, LoraSpec, SFTLora, CPTLora, ColumnMap)


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


class CheckpointExtras:
    """StageModule's ``on_save_checkpoint`` / ``on_load_checkpoint`` (PPO adds its own state on top)."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A from-scratch tokenizer is trained on the split; keep it with the weights it belongs to.
        checkpoint["chemlit_tokenizer"] = self.tokenizer.backend_tokenizer.to_str()
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        checkpoint.update(checkpoint_entries(datamodule))  # predict from a checkpoint: prompts as trained

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        reopen_cut_epoch(checkpoint)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if "chemlit_tokenizer" in checkpoint and self.model_spec.source == "tiny":
            self.tokenizer = wrap_tokenizer(Tokenizer.from_str(checkpoint["chemlit_tokenizer"]))
            if self.model is not None and self.model.get_input_embeddings().num_embeddings != len(self.tokenizer):
                # setup() built the network for a tokenizer trained on this run's table (predict on a table of
                # new molecules gets a smaller vocabulary): give it the checkpoint's size before its weights load.
                self.model.resize_token_embeddings(len(self.tokenizer))
            if datamodule is not None:
                datamodule.tokenizer = self.tokenizer
        adopt_checkpoint(datamodule, checkpoint)
