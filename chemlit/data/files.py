"""Files chemlit writes for a person to read (predictions, skipped rows, reports): whole or not at all."""

from __future__ import annotations

import csv
import os
from pathlib import Path


def write_whole(path: str | Path, content: str | bytes) -> Path:
    """Write text (UTF-8) or bytes whole or not at all (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    if isinstance(content, bytes):
        tmp.write_bytes(content)
    else:
        tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """Write dict rows as CSV, whole or not at all (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["smiles"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path
