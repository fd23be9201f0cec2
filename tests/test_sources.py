import csv

from rdkit import Chem

from chemlit.data.records import read_table
from chemlit.data.sources import _cas_from_int, ensure_melting_points, keep_molecule


def test_builtin_table_is_built_once_from_open_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("CHEMLIT_CACHE", str(tmp_path))
    path = ensure_melting_points()
    assert path.parent == tmp_path and not list(tmp_path.glob("*.tmp*"))
    rows = list(csv.DictReader(open(path)))
    sources = {r["source"] for r in rows}
    assert sources == {"open_notebook", "wikidata"}  # CRC and other unclear-licence sources left out
    assert 12_000 < len(rows) < 14_000
    assert sum(r["source"] == "open_notebook" for r in rows) > 11_000
    assert len({r["smiles"] for r in rows}) == len(rows)
    mol = Chem.MolFromSmiles(rows[0]["smiles"])
    assert keep_molecule(mol)
    by_cas = {r["cas"]: r for r in rows}
    assert abs(float(by_cas["64-17-5"]["mp_c"]) - (-114.1)) < 1.0   # ethanol, in °C
    assert ensure_melting_points() == path                            # cached: not rebuilt
    records, skipped = read_table(path)
    assert len(records) == len(rows) and not skipped


def test_filters_and_cas_format():
    assert _cas_from_int("50000") == "50-00-0"
    assert keep_molecule(Chem.MolFromSmiles("CCO"))
    assert not keep_molecule(Chem.MolFromSmiles("[Na+].[Cl-]"))        # two components
    assert not keep_molecule(Chem.MolFromSmiles("C[N+](C)(C)C"))       # charged
    assert not keep_molecule(Chem.MolFromSmiles("Cl[Pb]Cl"))           # not organic
    assert not keep_molecule(Chem.MolFromSmiles("O"))                  # no carbon
