"""``python -m chemlit fit|validate|test|predict --config configs/...yaml``

A LightningCLI: each stage module's typed ``__init__`` arguments become the ``model:`` block of
the config, RationaleDataModule's become ``data:``, and their docstrings become ``--help``.
``--print_config`` prints a full, runnable config; the config used is saved beside the logs.

Problems with the user's data end the program with one line on stderr and exit code 2, no
traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Literal, Optional, Union

import lightning as L
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from chemlit.data.datamodule import RationaleDataModule
from chemlit.data.records import DataError
from chemlit.hardware import resolve_accelerator, resolve_precision
from chemlit.stages.base import StageModule
from chemlit.stages.signals import StopRequested


def quiet_known_noise() -> None:
    """Warnings that say nothing actionable to a chemlit user (each checked on this stack)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*`isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    # validate/test/predict log into a new version directory; the checkpoint's old dirpath is moot.
    warnings.filterwarnings("ignore", message=".*The dirpath has changed from.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage())  # an advertisement, not information
    # `python -m chemlit pipeline` runs each stage's CLI in-process, with its own argument list.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
    # PPO checkpoints are taken after a whole iteration (update + β + curriculum), never mid-update;
    # tests/test_ppo_stage.py checks that a resumed run matches an uninterrupted one.
    warnings.filterwarnings("ignore", message=".*Using ModelCheckpoint with manual optimization and every_n_train_steps.*")
    # PPO's frozen reference is in eval mode on purpose (and the policy too: dropout off).
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode at the start of training.*")
    # torchdata's StatefulDataLoader calls a torch API that torch 2.13 deprecates; nothing for a user to do.
    warnings.filterwarnings("ignore", message=".*'set_vital' is deprecated.*")
    # Lightning's model summary cannot size bf16 weights; it says so and counts them as fp32, which they are.
    warnings.filterwarnings("ignore", message=".*is not supported by the model summary.*")
    # bitsandbytes' CPU backend announces an optional kernels package on import; nothing to act on.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    logging.getLogger("chemlit").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)


def model_arguments(argv: list[str]) -> list[str]:
    """The ``--model...`` arguments (with their values) typed after the subcommand."""
    picked, i = [], 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--model"):
            takes_value = "=" not in token and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            picked += argv[i:i + 2] if takes_value else [token]
            i += 2 if takes_value else 1
        else:
            i += 1
    return picked


UNLOGGED_RUNS = Path("runs") / "unlogged"


def next_version(parent: Path) -> Path:
    """``parent``/version_N with N one past the highest there (TensorBoardLogger's numbering)."""
    versions = [int(p.name.split("_")[1]) for p in parent.glob("version_*") if p.name.split("_")[1].isdigit()]
    return parent / f"version_{max(versions, default=-1) + 1}"


class ChemlitTrainer(L.Trainer):
    """Lightning's Trainer with one more precision, ``auto`` (the default): bf16-mixed where this machine runs
    bf16 fast, 16-mixed on a GPU without bf16, 32-true otherwise (chemlit.hardware says how it decides).
    Any explicit precision is passed through unchanged. ``accelerator: auto`` (the default) is a CUDA GPU where
    torch sees one, else the CPU (``chemlit.hardware.resolve_accelerator``; Apple's MPS only when named).

    A run's files never land in the current directory: without a logger and without ``default_root_dir``,
    the run's directory is runs/unlogged/version_N (Lightning's default is the current directory). And
    ``fast_dev_run`` writes nothing: no checkpoint (Lightning 2.6's ModelCheckpoint still writes last.ckpt
    at the end of such a run when ``save_last`` is set, so its checkpoint callbacks are dropped), no export,
    no run files."""

    def __init__(self, *args, accelerator: Union[str, Accelerator] = "auto",
                 precision: Optional[Union[Literal["auto"], _PRECISION_INPUT]] = "auto", **kwargs):
        if kwargs.get("fast_dev_run"):
            callbacks = kwargs.get("callbacks") or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            kwargs["callbacks"] = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
            kwargs["enable_checkpointing"] = False
        elif not kwargs.get("logger") and kwargs.get("default_root_dir") is None:
            kwargs["default_root_dir"] = str(next_version(UNLOGGED_RUNS))
        accelerator = resolve_accelerator(accelerator)
        super().__init__(*args, accelerator=accelerator, precision=resolve_precision(precision, accelerator), **kwargs)


class ChemlitCLI(LightningCLI):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("trainer_class", ChemlitTrainer)
        self._argv = list(kwargs.get("args") or (args[0] if args else None) or sys.argv[1:])
        super().__init__(StageModule, RationaleDataModule, *args, subclass_mode_model=True, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """--ckpt_path fills the model's arguments from the checkpoint's hyperparameters (so the network is
        built as it was trained); then the ``--model...`` arguments typed on the command line are applied
        again on top, so what the user typed wins (LightningCLI alone applies the checkpoint's last)."""
        super()._parse_ckpt_path()
        typed = model_arguments(self._argv)
        if typed and self.config.get("subcommand") and self.config[self.config.subcommand].get("ckpt_path"):
            self.config = self.parser.parse_args([self.config.subcommand, *typed], namespace=self.config)


def main(args: list[str] | None = None) -> None:
    """fit / validate / test / predict (``python -m chemlit pipeline`` is chemlit.__main__'s)."""
    quiet_known_noise()
    try:
        cli = ChemlitCLI(args=args)
    except (DataError, FileNotFoundError) as err:  # bad input or a wrong path: the user's to fix
        print(f"chemlit: error: {err}", file=sys.stderr)
        sys.exit(2)
    except StopRequested as stop:  # validate / test / predict stopped by Ctrl-C / SIGTERM: nothing written
        print(f"chemlit: {stop}: nothing written", file=sys.stderr)
        sys.exit(128 + stop.signum)
    stop_signal = getattr(cli.model, "stop_signal", None)
    if stop_signal is not None:  # stopped by Ctrl-C / SIGTERM: a checkpoint, no export, the shell's exit code
        sys.exit(128 + int(stop_signal))


if __name__ == "__main__":
    main()
