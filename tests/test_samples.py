"""Samples-sheet validation: every bad row is reported by row, line and column."""

from __future__ import annotations

import pytest

from bmdpipe.errors import ConfigError
from bmdpipe.samples import column_parts, load_samples

HEADER = ["patient_id", "view", "xray", "ct", "dxa_L1", "dxa_L2", "qct_L1", "age", "sex"]
GOOD = [
    ["p01", "pa", "x/p01_pa.dcm", "ct/p01", "0.95", "1.01", "140", "63", "F"],
    ["p01", "rot", "x/p01_rot.dcm", "ct/p01", "0.95", "1.01", "140", "63", "F"],
    ["p02", "pa", "x/p02_pa.png", "ct/p02.nii.gz", "0.71", "", "", "77", "M"],
]


def write_sheet(folder, rows, header=HEADER, sep="\t", name="samples.tsv"):
    (folder / "x").mkdir(exist_ok=True)
    (folder / "ct" / "p01").mkdir(parents=True, exist_ok=True)
    for f in ("x/p01_pa.dcm", "x/p01_rot.dcm", "x/p02_pa.png", "ct/p02.nii.gz"):
        (folder / f).touch()
    path = folder / name
    path.write_text("\n".join(sep.join(r) for r in [header, *rows]) + "\n")
    return path


def test_valid_sheet_types_and_resolves_paths(tmp_path):
    df = load_samples(write_sheet(tmp_path, GOOD))
    assert list(df.patient_id) == ["p01", "p01", "p02"]
    assert df.dxa_L1.tolist() == [0.95, 0.95, 0.71]
    assert df.dxa_L2.isna().tolist() == [False, False, True]
    assert df.xray[0] == str((tmp_path / "x" / "p01_pa.dcm").resolve())


def test_paths_inside_relative_to_stay_relative(tmp_path):
    """The workflow passes its working directory: paths under it are recorded relative, others stay absolute."""
    (tmp_path / "work").mkdir()
    df = load_samples(write_sheet(tmp_path / "work", GOOD), relative_to=tmp_path / "work")
    assert df.xray[0] == "x/p01_pa.dcm" and df.ct[2] == "ct/p02.nii.gz"
    df = load_samples(write_sheet(tmp_path / "work", GOOD), relative_to=tmp_path / "elsewhere")
    assert df.xray[0] == str((tmp_path / "work" / "x" / "p01_pa.dcm").resolve())


def test_csv_is_read_by_extension(tmp_path):
    df = load_samples(write_sheet(tmp_path, GOOD, sep=",", name="samples.csv"))
    assert len(df) == 3


def _bad(tmp_path, row_index, column, value):
    rows = [list(r) for r in GOOD]
    rows[row_index][HEADER.index(column)] = value
    return write_sheet(tmp_path, rows)


@pytest.mark.parametrize(
    ("row", "column", "value", "message"),
    [
        (1, "dxa_L1", "-0.2", r"samples\.tsv: row 2 \(line 3\), column 'dxa_L1': -0\.2 is invalid: expected a value with exclusiveMinimum 0 \(DXA areal BMD"),
        (2, "dxa_L1", "abc", r"samples\.tsv: row 3 \(line 4\), column 'dxa_L1': 'abc' is not a number"),
        (2, "qct_L1", "-5", r"row 3 \(line 4\), column 'qct_L1': -5\.0 is invalid"),
        (2, "sex", "female", r"row 3 \(line 4\), column 'sex': 'female' is invalid: expected one of \['F', 'M'\]"),
        (2, "patient_id", "p 02", r"row 3 \(line 4\), column 'patient_id': 'p 02' is invalid: expected letters, digits"),
        (2, "ct", "", r"row 3 \(line 4\), column 'ct': empty, a value is required"),
        (2, "xray", "x/missing.dcm", r"row 3 \(line 4\), column 'xray': 'x/missing\.dcm' does not exist \(resolved to .*missing\.dcm\)"),
        (2, "age", "130", r"row 3 \(line 4\), column 'age': 130\.0 is invalid: expected a value with maximum 120"),
    ],
)
def test_bad_values_name_row_line_and_column(tmp_path, row, column, value, message):
    with pytest.raises(ConfigError, match=message):
        load_samples(_bad(tmp_path, row, column, value))


def test_duplicate_patient_and_view(tmp_path):
    rows = [list(r) for r in GOOD]
    rows[1][1] = "pa"
    with pytest.raises(ConfigError, match=r"rows 1, 2 \(lines 2, 3\) all have patient_id 'p01' and view 'pa'"):
        load_samples(write_sheet(tmp_path, rows))


def test_missing_required_column(tmp_path):
    header = [h for h in HEADER if h != "ct"]
    rows = [[v for h, v in zip(HEADER, r) if h != "ct"] for r in GOOD]
    with pytest.raises(ConfigError, match=r"samples\.tsv: required column\(s\) 'ct' missing; the header has 'patient_id'"):
        load_samples(write_sheet(tmp_path, rows, header=header))


def test_a_patient_must_agree_with_itself(tmp_path):
    rows = [list(r) for r in GOOD]
    rows[1][HEADER.index("dxa_L1")] = "0.90"
    with pytest.raises(ConfigError, match=r"patient 'p01' has dxa_L1 = 0\.95 in row 1 but 0\.9 in row 2"):
        load_samples(write_sheet(tmp_path, rows))


def test_missing_sheet_and_empty_sheet(tmp_path):
    with pytest.raises(ConfigError, match=r"nosuch\.tsv: samples sheet not found"):
        load_samples(tmp_path / "nosuch.tsv")
    with pytest.raises(ConfigError, match=r"has a header but no rows"):
        load_samples(write_sheet(tmp_path, []))


def test_column_parts_splits_at_the_first_underscore_only():
    assert column_parts("dxa_L1") == ("dxa", "L1")
    assert column_parts("truth_T12") == ("truth", "T12")
    assert column_parts("qct_L1_mean") == ("qct", "L1_mean")
    for bad in ("dxaL1", "dxa_", "_L1"):
        with pytest.raises(ValueError, match=f"{bad!r} is not named prefix_site"):
            column_parts(bad)
