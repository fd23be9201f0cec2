"""Arrays chemlit can recompute but would rather not (descriptors, the descriptor estimate), cached
under ``cache_dir()`` next to the built-in table.

An entry is one ``.npz`` of plain arrays (no pickle) written whole or not at all, holding the key it
was made for and a checksum of each array. Reading checks both: an entry that is unreadable, made for
another key, or whose arrays do not match their checksums is ignored with a warning (the caller
recomputes and overwrites it), never trusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from chemlit.data.files import write_whole
from chemlit.data.sources import cache_dir

log = logging.getLogger(__name__)


def digest(*parts) -> str:
    """sha256 of ``parts``: arrays by dtype, shape and bytes; anything else as its sorted JSON."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(f"{part.dtype.str}{part.shape}".encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def text_array(strings: Sequence[str]) -> np.ndarray:
    """Strings (no newlines, e.g. SMILES) as one uint8 array: compact, unlike fixed-width unicode."""
    return np.frombuffer("\n".join(strings).encode("utf-8"), dtype=np.uint8)


def text_list(array: np.ndarray) -> list[str]:
    text = array.tobytes().decode("utf-8")
    return text.split("\n") if text else []


def cache_path(*parts: str) -> Path:
    return cache_dir().joinpath(*parts)


def read_entry(path: Path, key: str, what: str) -> Optional[dict[str, np.ndarray]]:
    """The arrays of the entry at ``path`` if it was made for ``key`` and is intact; None if there is
    none (silently) or it cannot be trusted (with a warning)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            about = json.loads(saved["about"].tobytes().decode("utf-8"))
            arrays = {name: saved[name] for name in saved.files if name != "about"}
        if about.get("key") != key:
            raise ValueError("made for other inputs")
        if sorted(about.get("checksums", {})) != sorted(arrays):
            raise ValueError("its arrays are not the ones it lists")
        for name, array in arrays.items():
            if digest(array) != about["checksums"][name]:
                raise ValueError(f"array {name!r} does not match its checksum")
    except Exception as error:  # noqa: BLE001 -- any unreadable entry is recomputed, not trusted
        log.warning("%s: ignoring cache entry %s (%s: %s); recomputing", what, path, type(error).__name__, error)
        return None
    return arrays


def write_entry(path: Path, key: str, arrays: dict[str, np.ndarray], what: str) -> Optional[Path]:
    """Store ``arrays`` for ``key`` at ``path``, whole or not at all; a cache that cannot be written
    (read-only, disk full) is a warning, not a failure: None."""
    about = {"key": key, "checksums": {name: digest(array) for name, array in arrays.items()}}
    buffer = io.BytesIO()
    np.savez(buffer, about=np.frombuffer(json.dumps(about).encode("utf-8"), dtype=np.uint8), **arrays)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_whole(path, buffer.getvalue())
    except OSError as error:
        log.warning("%s: could not write cache entry %s (%s); it is recomputed next time", what, path, error)
        return None
