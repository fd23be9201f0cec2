"""Arrays chemlit can recompute but would rather not (descriptors, the descriptor estimate, written
rationales), cached under ``cache_dir()`` next to the built-in table.

An entry is one ``.npz`` of plain arrays (no pickle) written whole or not at all, holding the key it
was made for and a checksum of each array. Reading checks both: an entry that is unreadable, made for
another key, or whose arrays do not match their checksums is ignored with a warning (the caller
recomputes and overwrites it), never trusted. Keys hold everything the numbers depend on, including
the source of the module that computes them (``source_digest``): changed code misses the cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Optional, Union

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


def source_digest(*modules: ModuleType) -> str:
    """sha256 of the source files of ``modules``: a cached result is keyed by the code that made it."""
    h = hashlib.sha256()
    for module in modules:
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


def text_array(strings: Sequence[str]) -> np.ndarray:
    """Strings as one uint8 array (their JSON): compact, unlike numpy's fixed-width unicode."""
    return np.frombuffer(json.dumps(list(strings), ensure_ascii=False).encode("utf-8"), dtype=np.uint8)


def text_list(array: np.ndarray) -> list[str]:
    strings = json.loads(array.tobytes().decode("utf-8"))
    if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
        raise ValueError("not a list of strings")
    return strings


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


PerMolecule = Union[np.ndarray, list[str]]
# entries of cached_per_smiles already read by this process: path -> (key, file stamp, SMILES, values, index)
_read: dict[Path, tuple] = {}


def _stamp(path: Path) -> Optional[tuple[int, int, int]]:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _read_per_smiles(path: Path, key: str, what: str) -> tuple[list[str], Optional[PerMolecule], dict[str, int], bool]:
    """(SMILES, values, index, whether the file was read now) of the entry at ``path``."""
    stamp = _stamp(path)
    if stamp is None:
        return [], None, {}, False
    memo = _read.get(path)
    if memo is not None and memo[:2] == (key, stamp):
        return (*memo[2:], False)
    known: list[str] = []
    values: Optional[PerMolecule] = None
    entry = read_entry(path, key, what)
    if entry is not None:
        try:
            known = text_list(entry["smiles"])
            values = text_list(entry["texts"]) if "texts" in entry else entry["rows"]
            if len(values) != len(known) or len(set(known)) != len(known):
                raise ValueError("its values do not match its SMILES")
        except (KeyError, ValueError, UnicodeDecodeError) as error:
            log.warning("%s: ignoring cache entry %s (%s); recomputing", what, path, error)
            known, values = [], None
    index = {s: i for i, s in enumerate(known)}
    _read[path] = (key, stamp, known, values, index)
    return known, values, index, True


def cached_per_smiles(smiles: Sequence[str], compute: Callable[[list[str]], PerMolecule], path: Path, key: str,
                      what: str) -> PerMolecule:
    """``compute(smiles)`` -- array rows or strings, one per molecule, each depending on its molecule
    alone -- kept per SMILES in the entry at ``path``: only molecules not seen before are computed and
    added to the entry. A few new molecules next to many known ones (a molecule from outside the table)
    are computed and not stored: rewriting the whole entry would cost more than computing them again."""
    smiles = list(smiles)
    known, values, index, read_now = _read_per_smiles(path, key, what)
    missing = sorted(set(smiles) - index.keys())
    if missing:
        store = 20 * len(missing) >= len(known)
        if store:
            log.info("%s: computing %d molecules (%d more from cache %s)", what, len(missing),
                     len(set(smiles)) - len(missing), path)
        new = compute(missing)
        if values is None:
            values = new
        elif isinstance(values, list):
            values = values + list(new)
        else:
            values = np.concatenate([values, new])
        index = {**index, **{s: len(known) + i for i, s in enumerate(missing)}}
        known = known + missing
        texts = isinstance(values, list)
        if store and write_entry(path, key, {"smiles": text_array(known),
                                             ("texts" if texts else "rows"): text_array(values) if texts else values},
                                 what):
            _read[path] = (key, _stamp(path), known, values, index)
            log.info("%s: stored %d molecules in %s", what, len(known), path)
    elif read_now:
        log.info("%s: %d molecules from cache %s", what, len(set(smiles)), path)
    order = [index[s] for s in smiles]
    return [values[i] for i in order] if isinstance(values, list) else values[order]
