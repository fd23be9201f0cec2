import json

import pytest

from chemlit.data.records import ColumnMap, DataError, read_table


def test_reads_the_format_of_the_work_we_continue(write_csv):
    path = write_csv(
        "name,smiles,mpC,Reason,Prediction(integer)\n"
        "ethanol,OCC,-114.1,\"Small alcohol with one donor.\n##Prediction: -110\",-110\n"
        "benzoic acid,OC(=O)c1ccccc1,122.4,,120\n"
    )
    records, skipped = read_table(path)
    assert skipped == []
    assert [r.smiles for r in records] == ["CCO", "O=C(O)c1ccccc1"]  # RDKit canonical
    assert [r.target for r in records] == [-114.1, 122.4]
    assert records[0].rationale == "Small alcohol with one donor."  # trailing answer line removed
    assert records[1].rationale is None                            # empty cell: writer fills it later
    assert records[0].name == "ethanol" and records[0].row == 2


def test_explicit_column_mapping_and_units(write_csv):
    path = write_csv("id,structure,tm_kelvin\na,CCO,159.05\n")
    records, _ = read_table(path, ColumnMap(smiles="structure", target="tm_kelvin", unit="K"))
    assert records[0].target == pytest.approx(-114.1)


def test_jsonl_parquet_and_datasets_directory(tmp_path):
    rows = [{"smiles": "CCO", "mp": -114.1}, {"smiles": "c1ccccc1", "mp": 5.5}]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import datasets
    import pandas as pd

    parquet = tmp_path / "t.parquet"
    pd.DataFrame(rows).to_parquet(parquet)
    hf_dir = tmp_path / "hf"
    datasets.Dataset.from_list(rows).save_to_disk(str(hf_dir))
    for path in (jsonl, parquet, hf_dir):
        records, _ = read_table(path)
        assert sorted(r.target for r in records) == [-114.1, 5.5], path


@pytest.mark.parametrize("text, message", [
    ("smiles,mpC\nCCO,-114\nC1CC,50\n", "row 3: invalid SMILES 'C1CC'"),
    ("smiles,mpC\nCCO,-114\n,50\n", "row 3: empty SMILES"),
    ("smiles,mpC\nCCO,abc\n", "row 2: value 'abc' in column 'mpC' is not a number"),
    ("smiles,mpC\nCCO,nan\n", "row 2: value in column 'mpC' is NaN"),
    ("smiles,mpC\nCCO,inf\n", "row 2: value in column 'mpC' is infinite"),
    ("smiles,mpC\nCCO,\n", "row 2: empty value in column 'mpC'"),
    ("smiles,mpC\nCCO,-114\nOCC,80\n", "row 3: duplicate of row 2 (CCO) with a conflicting value: 80 vs -114 °C"),
    ("name,mpC\nethanol,-114\n", "missing column for the smiles"),
    ("smiles,name\nCCO,ethanol\n", "missing column for the target"),
    ("smiles,mpC\n", "file has a header but no data rows"),
    ("", "file is empty"),
])
def test_bad_input_is_one_line_naming_file_row_and_problem(write_csv, text, message):
    path = write_csv(text)
    with pytest.raises(DataError) as info:
        read_table(path)
    text = str(info.value)
    assert message in text
    assert text.startswith(str(path))
    assert "\n" not in text


def test_wrong_file_type_missing_file_and_named_column(tmp_path, write_csv):
    xlsx = tmp_path / "table.xlsx"
    xlsx.write_bytes(b"PK\x03\x04")
    with pytest.raises(DataError, match="unsupported file type '.xlsx'"):
        read_table(xlsx)
    with pytest.raises(DataError, match="file not found"):
        read_table(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="missing column 'MP' for the target"):
        read_table(write_csv("smiles,mpC\nCCO,1\n"), ColumnMap(target="MP"))
    bad_json = tmp_path / "t.jsonl"
    bad_json.write_text('{"smiles": "CCO", "mp": 1}\n{oops\n')
    with pytest.raises(DataError, match="row 2: not valid JSON"):
        read_table(bad_json)


def test_skip_mode_counts_and_returns_every_bad_row(write_csv):
    path = write_csv("smiles,mpC\nCCO,-114\nC1CC,50\nCCN,abc\nc1ccccc1,5.5\nOCC,-116\nCl,1\nCl,90\n")
    records, skipped = read_table(path, on_invalid="skip")
    # CCO twice within 5 °C: merged into their mean; Cl twice 89 °C apart: both dropped.
    assert {r.smiles: r.target for r in records} == {"CCO": -115.0, "c1ccccc1": 5.5}
    assert sorted(s.row for s in skipped) == [3, 4, 7, 8]
    assert all(s.file == str(path) for s in skipped)


def test_duplicates_that_agree_are_merged(write_csv):
    records, skipped = read_table(write_csv("smiles,mpC\nCCO,-114\nOCC,-112\n"))
    assert len(records) == 1 and records[0].target == -113.0 and skipped == []
