"""The built-in melting-point table, built offline from data shipped in the `chemicals` package.

Sources (both openly licensed; CRC and others with unclear terms are left out on purpose):

* ``open_notebook`` -- Bradley et al., Open Notebook Science melting points (CC0), Kelvin by CAS.
* ``wikidata``      -- Wikidata melting points (CC0), Kelvin by CAS, used for molecules the Open
  Notebook set lacks.

Structures come from the PubChem-derived CAS -> SMILES identifier files in the same package. Every
row keeps its source and CAS number. The table is built once (about a minute) and cached as CSV.
"""

from __future__ import annotations

import csv
import logging
import os
import statistics
from pathlib import Path

from rdkit import Chem, RDLogger

log = logging.getLogger(__name__)

BUILTIN_VERSION = 1
BUILTIN_COLUMNS = ("smiles", "mp_c", "name", "cas", "source")
# Elements a melting-point chemist would call "organic" here; metal complexes and salts are left out.
ORGANIC_ELEMENTS = frozenset({"H", "B", "C", "N", "O", "F", "Si", "P", "S", "Cl", "Se", "Br", "I"})


def cache_dir() -> Path:
    """Where built tables live: ``$CHEMLIT_CACHE`` or ``~/.cache/chemlit``."""
    root = os.environ.get("CHEMLIT_CACHE") or Path.home() / ".cache" / "chemlit"
    return Path(root)


def _chemicals_folder() -> Path:
    import chemicals

    return Path(chemicals.__file__).parent


def _cas_from_int(value: str) -> str:
    """Wikidata's file stores CAS numbers as integers: 50000 -> '50-00-0'."""
    digits = str(int(float(value)))
    return f"{digits[:-3]}-{digits[-3:-1]}-{digits[-1]}"


def _read_cas_smiles_names(folder: Path) -> dict[str, tuple[str, str]]:
    """CAS -> (SMILES, common name) from the package's identifier files; later files win."""
    table: dict[str, tuple[str, str]] = {}
    for fname in ("chemical identifiers example user db.tsv", "chemical identifiers pubchem large.tsv",
                  "chemical identifiers pubchem small.tsv"):
        with open(folder / "Identifiers" / fname, encoding="utf-8") as handle:
            for line in handle:
                fields = line.rstrip("\n").split("\t")
                if len(fields) < 5 or not fields[4]:
                    continue
                name = fields[8] if len(fields) > 8 and fields[8] else (fields[7] if len(fields) > 7 else "")
                table[fields[1]] = (fields[4], name)
    return table


def _read_melting_points(folder: Path) -> list[tuple[str, float, str]]:
    """(CAS, melting point in K, source) from Open Notebook first, then Wikidata."""
    rows: list[tuple[str, float, str]] = []
    with open(folder / "Phase Change" / "OpenNotebook Melting Points.tsv", encoding="utf-8") as handle:
        for rec in csv.DictReader(handle, delimiter="\t"):
            if rec["Tm"]:
                rows.append((rec["CAS"], float(rec["Tm"]), "open_notebook"))
    with open(folder / "Misc" / "wikidata_properties.tsv", encoding="utf-8") as handle:
        for rec in csv.DictReader(handle, delimiter="\t"):
            if rec["Tm"]:
                rows.append((_cas_from_int(rec["CAS"]), float(rec["Tm"]), "wikidata"))
    return rows


def keep_molecule(mol: Chem.Mol) -> bool:
    """Single component, net neutral, made of organic elements, with at least one carbon."""
    if mol is None or len(Chem.GetMolFrags(mol)) != 1:
        return False
    if Chem.GetFormalCharge(mol) != 0:
        return False
    symbols = {atom.GetSymbol() for atom in mol.GetAtoms()}
    return "C" in symbols and symbols <= ORGANIC_ELEMENTS


def build_melting_points() -> list[dict]:
    """Build the built-in table in memory; see the module docstring for what goes in."""
    RDLogger.DisableLog("rdApp.*")
    folder = _chemicals_folder()
    structures = _read_cas_smiles_names(folder)
    by_smiles: dict[str, dict] = {}
    for cas, tm_kelvin, source in _read_melting_points(folder):
        if cas not in structures:
            continue
        smiles, name = structures[cas]
        mol = Chem.MolFromSmiles(smiles)
        if not keep_molecule(mol):
            continue
        canonical = Chem.MolToSmiles(mol)
        entry = by_smiles.get(canonical)
        if entry is not None and entry["source"] != source:
            continue  # Open Notebook already has this molecule; Wikidata only fills gaps
        if entry is None:
            entry = by_smiles[canonical] = {"smiles": canonical, "values": [], "name": name,
                                            "cas": cas, "source": source}
        entry["values"].append(tm_kelvin - 273.15)
    table = []
    for entry in by_smiles.values():
        # Several CAS numbers can map to one structure (salts stripped, stereo lost in the source):
        # keep the median so one odd record cannot drag the value.
        table.append({"smiles": entry["smiles"], "mp_c": round(statistics.median(entry["values"]), 2),
                      "name": entry["name"], "cas": entry["cas"], "source": entry["source"]})
    RDLogger.EnableLog("rdApp.*")
    return table


def builtin_path() -> Path:
    return cache_dir() / f"melting_points_v{BUILTIN_VERSION}.csv"


def ensure_melting_points() -> Path:
    """Path of the cached built-in table, building it on first use (written whole or not at all)."""
    path = builtin_path()
    if path.exists():
        return path
    log.info("Building the built-in melting-point table from the `chemicals` package (once)...")
    table = build_melting_points()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=BUILTIN_COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    os.replace(tmp, path)
    log.info("Built %d molecules into %s", len(table), path)
    return path
