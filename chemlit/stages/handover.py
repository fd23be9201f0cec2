"""What travels with a model besides its weights and tokenizer, and what the datamodule adopts from it.

A model trained with analogues, a descriptor estimate or a rationale style must be shown prompts made
the same way in every later stage and in ``predict``: its export and its checkpoints carry the
reference set and the estimator, and its export says which style and how many analogues it learned.
This module is the one place that reads them back into a :class:`RationaleDataModule` (through its
``use_reference`` / ``use_estimator`` / ``use_rationale_style``) and takes them out of it. Any other
datamodule (a test's own, or none) carries nothing and adopts nothing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from chemlit.data.analogues import REFERENCE_FILE, ReferenceSet
from chemlit.data.datamodule import RationaleDataModule
from chemlit.data.estimates import ESTIMATOR_FILE, DescriptorEstimator
from chemlit.models.factory import EXPORT_INFO

CALIBRATION_FILE = "calibration_molecules.json"  # the training run's validation molecules: predict's intervals

log = logging.getLogger(__name__)


def adopt_export(datamodule, model_dir: str) -> None:
    """Prompts as the model in ``model_dir`` (an export) learned them: its descriptor estimator (or none, for
    an answering model trained without one), its rationale style, and its reference set with as many
    analogues per prompt as it was trained with, whatever ``data.analogues`` says."""
    if not isinstance(datamodule, RationaleDataModule):
        return
    info_file = Path(model_dir) / EXPORT_INFO
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    estimator = Path(model_dir) / ESTIMATOR_FILE
    if estimator.is_file():  # its prompts carried an estimate
        datamodule.use_estimator(DescriptorEstimator.load(estimator), str(estimator))
    elif info.get("stage") in ("sft", "ppo") and datamodule.descriptor_estimate:
        # A model that learned to answer without the estimate is not shown one it never saw.
        log.warning("%s was trained without a descriptor estimate in its prompts: data.descriptor_estimate is "
                    "turned off", model_dir)
        datamodule.descriptor_estimate = False
    style = info.get("rationale_style") if info.get("stage") in ("sft", "ppo") else None
    if style and datamodule.rationale_style != style:
        # rationales written for this model (PPO's rationale_anchor) in the style it learned to write
        log.info("%s learned %s rationales: data.rationale_style %s -> %s", model_dir, style,
                 datamodule.rationale_style, style)
        datamodule.use_rationale_style(style)
    calibration = Path(model_dir) / CALIBRATION_FILE
    if calibration.is_file():
        datamodule.use_calibration_set(json.loads(calibration.read_text()), str(calibration))
    saved = Path(model_dir) / REFERENCE_FILE
    if not saved.is_file():
        return
    trained_with = info.get("analogues", 0)
    if trained_with and datamodule.analogues != trained_with:
        log.warning("%s was trained with %d analogues per prompt: using %d, not data.analogues=%d",
                    model_dir, trained_with, trained_with, datamodule.analogues)
    datamodule.use_reference(ReferenceSet.load(saved), trained_with or datamodule.analogues, str(saved))


def checkpoint_entries(datamodule) -> dict:
    """What a checkpoint keeps so that ``predict`` from it retrieves from the same molecules and estimates
    with the same estimator."""
    if not isinstance(datamodule, RationaleDataModule):
        return {}
    entries = {}
    if datamodule.analogues:
        entries["chemlit_reference_set"] = datamodule.reference_set().to_json()
        entries["chemlit_analogues"] = datamodule.analogues
    if datamodule.descriptor_estimate:
        entries["chemlit_descriptor_estimator"] = datamodule.descriptor_estimator().to_bytes()
    entries["chemlit_calibration_set"] = [list(m) for m in datamodule.calibration_molecules()]
    return entries


def adopt_checkpoint(datamodule, checkpoint: dict) -> None:
    """Prompts as the checkpoint's model was trained with (``checkpoint_entries``)."""
    if not isinstance(datamodule, RationaleDataModule):
        return
    if "chemlit_reference_set" in checkpoint:
        datamodule.use_reference(ReferenceSet.from_json(checkpoint["chemlit_reference_set"]),
                                 checkpoint["chemlit_analogues"], "the checkpoint's reference set")
    if "chemlit_descriptor_estimator" in checkpoint:
        datamodule.use_estimator(DescriptorEstimator.from_bytes(checkpoint["chemlit_descriptor_estimator"]),
                                 "the checkpoint's descriptor estimator")
    if checkpoint.get("chemlit_calibration_set"):
        datamodule.use_calibration_set(checkpoint["chemlit_calibration_set"], "the checkpoint")


def export_files(datamodule) -> dict[str, str | bytes]:
    """Files an export carries beside the model (its reference set, its estimator): ``adopt_export`` reads them."""
    if not isinstance(datamodule, RationaleDataModule):
        return {}
    files: dict[str, str | bytes] = {}
    if datamodule.analogues:
        files[REFERENCE_FILE] = datamodule.reference_set().to_json()
    if datamodule.descriptor_estimate:
        files[ESTIMATOR_FILE] = datamodule.descriptor_estimator().to_bytes()
    calibration = datamodule.calibration_molecules()
    if calibration:
        files[CALIBRATION_FILE] = json.dumps(calibration)
    return files


def export_record(datamodule) -> dict:
    """What the export's record (``chemlit_export.json``) says about the prompts: ``adopt_export`` reads it."""
    if not isinstance(datamodule, RationaleDataModule):
        return {"analogues": 0, "descriptor_estimate": False, "rationale_style": None}
    return {"analogues": datamodule.analogues, "descriptor_estimate": datamodule.descriptor_estimate,
            "rationale_style": datamodule.rationale_style}
