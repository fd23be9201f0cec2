"""Read a table of molecules into validated records, or say exactly what is wrong with it.

Formats: CSV / TSV, JSONL, Parquet, or a Hugging Face ``datasets`` directory (``save_to_disk``).
Columns are found by name (see ``ColumnMap``); the format of the work we continue -- ``name,
smiles, mpC`` and, for rationale sets, ``Reason`` and ``Prediction(integer)`` -- is read as it is.

Every problem is a ``DataError`` whose message is one line naming the file, the row and the problem.
Row numbers are the ones a person sees: the line number for CSV and JSONL (the CSV header is line
1), the 1-based record number for Parquet and datasets directories. With ``on_invalid="skip"`` bad
rows are dropped instead and returned as ``Skipped`` entries so the caller can log and write them.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from rdkit import Chem, RDLogger

from chemlit.data.prompts import ANSWER_MARKER, to_celsius

OnInvalid = Literal["error", "skip"]
Unit = Literal["C", "K", "F"]

CANDIDATES = {
    "smiles": ("smiles", "canonical_smiles", "smi"),
    "target": ("mp_c", "mpc", "mp", "melting_point", "melting point", "tm", "target", "y", "value"),
    "rationale": ("rationale", "reason", "reasoning"),
    "name": ("name", "compound", "molecule"),
    "source": ("source",),
}
TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t", ".jsonl": None, ".parquet": None}


class DataError(ValueError):
    """A problem with the user's data, said in one line; the CLI prints it without a traceback."""


@dataclass(frozen=True)
class Record:
    smiles: str                  # RDKit canonical SMILES
    target: Optional[float]      # melting point in °C; None when the table has no target
    rationale: Optional[str]     # the table's own rationale; None means "write one from structure"
    name: str = ""
    source: str = ""             # where the row came from (a file name or a built-in source)
    row: int = 0                 # row number in that file, as described in the module docstring


@dataclass(frozen=True)
class Skipped:
    file: str
    row: int
    problem: str


@dataclass
class ColumnMap:
    """Which column holds what. ``None`` means: find it by its usual names (case-insensitive)."""

    smiles: Optional[str] = None
    """SMILES column (found as smiles / canonical_smiles / smi)."""
    target: Optional[str] = None
    """Measured value (found as mp_c / mpC / mp / melting_point / tm / target / y / value)."""
    rationale: Optional[str] = None
    """Optional rationale text (found as rationale / Reason / reasoning); empty cells get a written one."""
    name: Optional[str] = None
    """Optional compound name (found as name / compound / molecule)."""
    unit: Unit = "C"
    """Unit of the target column: C, K or F. Everything inside chemlit is °C."""


def _raw_rows(path: Path) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    """Column names and (row number, {column: value}) of any supported table."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        return _dataset_rows(path)
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{suffix or path.name}' "
                        "(use .csv, .tsv, .jsonl, .parquet or a Hugging Face datasets directory)")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    if suffix == ".jsonl":
        return _jsonl_rows(path)
    import pandas as pd

    try:
        if suffix == ".parquet":
            frame = pd.read_parquet(path)
            first_row = 1
        else:
            frame = pd.read_csv(path, sep=TABLE_SUFFIXES[suffix], dtype=str, keep_default_na=False)
            first_row = 2
    except Exception as err:  # pandas/pyarrow raise many types; the user needs the message only
        raise DataError(f"{path}: cannot be read as {suffix[1:]}: {str(err).splitlines()[0]}") from None
    records = frame.to_dict("records")
    return [str(c) for c in frame.columns], ((i + first_row, r) for i, r in enumerate(records))


def _jsonl_rows(path: Path) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    rows, columns = [], {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: row {line_number}: not valid JSON ({err.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: row {line_number}: expected a JSON object, got {type(obj).__name__}")
            columns.update(dict.fromkeys(obj))
            rows.append((line_number, obj))
    return list(columns), iter(rows)


def _dataset_rows(path: Path) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    import datasets

    try:
        data = datasets.load_from_disk(str(path))
    except Exception as err:
        raise DataError(f"{path}: not a Hugging Face datasets directory ({str(err).splitlines()[0]})") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data:
            raise DataError(f"{path}: dataset has splits {sorted(data)}; expected one named 'train'")
        data = data["train"]
    return list(data.column_names), ((i + 1, r) for i, r in enumerate(data))


def _resolve(columns: list[str], wanted: Optional[str], role: str, path: Path, required: bool) -> Optional[str]:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{path}: missing column '{wanted}' for the {role} (columns: {', '.join(columns)})")
        return wanted
    lowered = {c.lower().strip(): c for c in columns}
    for candidate in CANDIDATES[role]:
        if candidate in lowered:
            return lowered[candidate]
    if required:
        raise DataError(f"{path}: missing column for the {role}: none of {', '.join(CANDIDATES[role])} "
                        f"(columns: {', '.join(columns)}); set data.columns.{role}")
    return None


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def parse_target(raw, column: str, unit: Unit) -> float:
    """A finite number in °C, or ValueError with the problem in words."""
    text = _text(raw)
    if not text:
        raise ValueError(f"empty value in column '{column}'")
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"value {text!r} in column '{column}' is not a number") from None
    if math.isnan(value):
        raise ValueError(f"value in column '{column}' is NaN")
    if math.isinf(value):
        raise ValueError(f"value in column '{column}' is infinite")
    return to_celsius(value, unit)


def canonical_smiles(text: str) -> str:
    """RDKit canonical SMILES, or ValueError naming the problem."""
    if not text:
        raise ValueError("empty SMILES")
    RDLogger.DisableLog("rdApp.*")
    try:
        mol = Chem.MolFromSmiles(text)
    finally:
        RDLogger.EnableLog("rdApp.*")
    if mol is None or mol.GetNumAtoms() == 0:
        raise ValueError(f"invalid SMILES {text!r} (RDKit cannot parse it)")
    return Chem.MolToSmiles(mol)


def _clean_rationale(text: str) -> Optional[str]:
    # Rationale sets sometimes end in the answer line already; the template adds its own.
    text = text.split(ANSWER_MARKER, 1)[0].strip()
    return text or None


def read_table(path: str | Path, columns: Optional[ColumnMap] = None, on_invalid: OnInvalid = "error",
               require_target: bool = True, duplicate_tolerance_c: float = 5.0,
               ) -> tuple[list[Record], list[Skipped]]:
    """Read and validate a table: (records, skipped rows).

    Duplicated molecules (same canonical SMILES) whose values agree within
    ``duplicate_tolerance_c`` are merged into one record with the mean value; values further apart
    are a conflict (an error, or with ``skip`` every row of that molecule is skipped).
    """
    path = Path(path)
    columns = columns or ColumnMap()
    names, rows = _raw_rows(path)
    if not names:
        raise DataError(f"{path}: file has no columns")
    smiles_col = _resolve(names, columns.smiles, "smiles", path, required=True)
    target_col = _resolve(names, columns.target, "target", path, required=require_target)
    rationale_col = _resolve(names, columns.rationale, "rationale", path, required=False)
    name_col = _resolve(names, columns.name, "name", path, required=False)
    source_col = _resolve(names, None, "source", path, required=False)

    skipped: list[Skipped] = []
    groups: dict[str, list[Record]] = {}
    n_rows = 0

    def reject(row: int, problem: str) -> None:
        if on_invalid == "error":
            raise DataError(f"{path}: row {row}: {problem}")
        skipped.append(Skipped(str(path), row, problem))

    for row_number, raw in rows:
        n_rows += 1
        try:
            smiles = canonical_smiles(_text(raw.get(smiles_col)))
            target = parse_target(raw.get(target_col), target_col, columns.unit) if target_col else None
        except ValueError as err:
            reject(row_number, str(err))
            continue
        record = Record(
            smiles=smiles, target=target,
            rationale=_clean_rationale(_text(raw.get(rationale_col))) if rationale_col else None,
            name=_text(raw.get(name_col)) if name_col else "",
            source=_text(raw.get(source_col)) if source_col else path.name,
            row=row_number,
        )
        groups.setdefault(smiles, []).append(record)
    if n_rows == 0:
        raise DataError(f"{path}: file has a header but no data rows")

    records = []
    for smiles, group in groups.items():
        values = [r.target for r in group if r.target is not None]
        if values and max(values) - min(values) > duplicate_tolerance_c:
            first = group[0]
            for other in group[1:]:
                reject(other.row, f"duplicate of row {first.row} ({smiles}) with a conflicting value: "
                                  f"{other.target:g} vs {first.target:g} °C")
            if on_invalid == "skip":
                skipped.append(Skipped(str(path), first.row, f"conflicting duplicates of {smiles}"))
            continue
        merged = group[0]
        if len(group) > 1 and values:
            merged = Record(merged.smiles, sum(values) / len(values), merged.rationale, merged.name,
                            merged.source, merged.row)
        records.append(merged)
    if not records:
        raise DataError(f"{path}: no valid rows left ({len(skipped)} skipped)")
    return records, skipped


def randomized_smiles(smiles: str, seed: int) -> str:
    """Another valid SMILES of the same molecule: its atoms renumbered by a permutation drawn from
    ``seed``, written without canonical ordering. The same (smiles, seed) always gives the same text;
    seed 0 gives the canonical SMILES."""
    canonical = canonical_smiles(smiles)
    if seed == 0:
        return canonical
    mol = Chem.MolFromSmiles(canonical)  # atoms in canonical order: the input's spelling does not matter
    order = list(range(mol.GetNumAtoms()))
    random.Random(f"{canonical}|{seed}").shuffle(order)
    return Chem.MolToSmiles(Chem.RenumberAtoms(mol, order), canonical=False)
