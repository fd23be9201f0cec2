"""Files chemlit writes for a person to read (predictions, skipped rows, reports): whole or not at all."""

from __future__ import annotations

import csv
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def run_directory(trainer) -> Path:
    """Where a run's own files go (splits.csv, data_summary.json, skipped_rows.csv, predictions.csv,
    checkpoints, export): its logger's directory (TensorBoard's <save_dir>/<name>/version_N), or without
    a logger the trainer's ``default_root_dir`` (chemlit's CLI makes that a runs/unlogged/version_N
    directory, never the current one). Unlike ``trainer.log_dir`` no collective call: rank 0 may ask alone."""
    logger = trainer.logger
    for name in ("log_dir", "save_dir"):  # TensorBoard / CSV loggers have a log_dir, others a save_dir
        where = getattr(logger, name, None) if logger is not None else None
        if isinstance(where, (str, os.PathLike)):
            return Path(where)
    return Path(trainer.default_root_dir)


@contextmanager
def _temporary_beside(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` that replaces it when the block ends, and is removed if it fails."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_whole(path: str | Path, content: str | bytes) -> Path:
    """Write text (UTF-8) or bytes whole or not at all (temporary file, then rename)."""
    path = Path(path)
    with _temporary_beside(path) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content, encoding="utf-8")
    return path


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """Write dict rows as CSV, whole or not at all (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _temporary_beside(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["smiles"])
        writer.writeheader()
        writer.writerows(rows)
    return path
