"""The end of a stage: a Hugging Face model directory (+ tokenizer, + LoRA adapter where used, + what its
prompts need: ``chemlit.stages.handover``) that the next stage's config and ``predict`` name."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

from chemlit.data.files import run_directory
from chemlit.models.factory import export_model
from chemlit.stages.handover import export_files, export_record

log = logging.getLogger(__name__)


class ExportOnFitEnd:
    """StageModule's export: ``export_dir``, else <run directory>/export, when fit ends -- not after a stop
    by signal (an export means "stage done" to the pipeline) and not in a ``fast_dev_run`` (which writes
    nothing)."""

    def export_path(self) -> Path:
        return Path(self.export_dir) if self.export_dir else run_directory(self.trainer) / "export"

    def export_info(self) -> dict:
        datamodule = self.trainer.datamodule
        return {"stage": self.stage_name, "model_source": self.model_spec.source,
                "base_path": self.model_spec.path, "table": str(datamodule.table),
                "split_file": str(datamodule.split_file or datamodule.output_dir() / "splits.csv"),
                "lora": None if self.lora is None or not self.lora.enabled else vars(self.lora),
                **export_record(datamodule), "global_step": self.global_step}

    @rank_zero_only
    def on_fit_end(self) -> None:
        if self.stop_signal is not None:
            print("chemlit: stopped by a signal: no export", file=sys.stderr)
            return
        if self.trainer.fast_dev_run:
            print("chemlit: fast_dev_run: no export", file=sys.stderr)
            return
        path = export_model(self.model, self.tokenizer, self.export_path(), self.export_info(), self.model_spec,
                            extra_files=export_files(self.trainer.datamodule))
        log.info("Exported the %s model to %s", self.stage_name, path)
        print(f"chemlit: exported the {self.stage_name} model to {path}")
