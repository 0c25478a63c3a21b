"""The samples sheet: one row per radiograph, validated against its JSON schema.

Validation goes through :func:`snakemake.utils.validate` (which also fills
schema defaults) and is then checked across rows. Every problem is reported
with the sheet's file name, the data row (1-based, header not counted), the
file line and the column, and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from bmdpipe.errors import ConfigError

SCHEMA = Path(__file__).resolve().parent.parent / "schemas" / "samples.schema.yaml"

#: Columns whose value belongs to the patient and must agree on every row of that patient.
PER_PATIENT_FIXED = ("ct", "ct_series_uid", "ct_labels", "label_table", "calibration", "age", "sex", "site", "scanner")
PATH_COLUMNS = ("xray", "ct", "ct_labels", "label_table")


def schema_path() -> Path:
    """The samples-sheet schema shipped with bmdpipe."""
    if not SCHEMA.exists():  # installed without the repository around it
        raise FileNotFoundError(f"samples schema not found at {SCHEMA}")
    return SCHEMA


def _load_schema() -> dict[str, Any]:
    with open(schema_path()) as fh:
        return yaml.safe_load(fh)


def _where(sheet: Path, i: int) -> str:
    return f"{sheet.name}: row {i + 1} (line {i + 2})"


def _numeric_columns(schema: dict[str, Any], columns: list[str]) -> list[str]:
    import re

    numeric = [c for c, s in schema.get("properties", {}).items() if s.get("type") == "number"]
    for pattern, sub in schema.get("patternProperties", {}).items():
        if sub.get("type") == "number":
            numeric += [c for c in columns if re.match(pattern, c)]
    return [c for c in columns if c in numeric]


def _read_delimited(p: Path, what: str, missing: str) -> pd.DataFrame:
    """A TSV (``.tsv``, ``.txt``) or CSV (``.csv``) table as stripped strings (blanks ""); ``what`` names it in
    errors, ``missing`` says what to do when the file does not exist."""
    if not p.exists():
        raise ConfigError(f"{p}: {what} not found; {missing}")
    sep = "," if p.suffix.lower() == ".csv" else "\t"
    try:
        df = pd.read_csv(p, sep=sep, dtype=str, keep_default_na=False, comment=None)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot parse the {what} as {'CSV' if sep == ',' else 'TSV'}: {exc}") from None
    df.columns = [c.strip() for c in df.columns]
    return df.apply(lambda col: col.str.strip())


def read_sheet(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a TSV (``.tsv``, ``.txt``) or CSV (``.csv``) sheet as strings, blanks as missing."""
    df = _read_delimited(Path(path), "samples sheet", "set cohort.samples in the config to an existing TSV or CSV file")
    return df.replace("", pd.NA)


def validate_samples(df: pd.DataFrame, sheet: str | os.PathLike[str], *, check_paths: bool = True,
                     relative_to: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """Validate a sheet read by :func:`read_sheet`; return it typed, defaults filled, paths absolute (or relative
    to ``relative_to``).

    Args:
        df: the sheet, all columns as strings.
        sheet: the sheet's path, for messages and to resolve relative paths.
        check_paths: require every referenced file or folder to exist.
        relative_to: paths inside this folder are returned relative to it instead (the workflow passes its
            working directory: Snakemake records input paths, and relative ones keep a copied or moved
            project up to date); paths outside it stay absolute.

    Raises:
        ConfigError: naming the row, line and column of the first problem.
    """
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    sheet = Path(sheet)
    schema = _load_schema()
    missing = [c for c in schema.get("required", []) if c not in df.columns]
    if missing:
        raise ConfigError(
            f"{sheet.name}: required column(s) {', '.join(repr(c) for c in missing)} missing; "
            f"the header has {', '.join(repr(c) for c in df.columns)}"
        )
    if df.empty:
        raise ConfigError(f"{sheet.name}: the samples sheet has a header but no rows")
    df = df.copy()
    for col in _numeric_columns(schema, list(df.columns)):
        values = pd.to_numeric(df[col], errors="coerce")
        bad = df[col].notna() & values.isna()
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise ConfigError(f"{_where(sheet, i)}, column '{col}': {df[col].iloc[i]!r} is not a number")
        df[col] = values.astype("float64")
    for i, record in enumerate(df.to_dict("records")):
        for col in schema.get("required", []):
            if pd.isna(record.get(col)):
                raise ConfigError(f"{_where(sheet, i)}, column '{col}': empty, a value is required")
    object_cols = [c for c in df.columns if df[c].dtype != "float64"]
    df[object_cols] = df[object_cols].astype(object)
    try:
        validate(df, str(schema_path()))
    except WorkflowError as exc:
        raise _row_error(exc, df, schema, sheet) from None

    _check_unique_views(df, sheet)
    _check_per_patient(df, sheet)
    base = Path(relative_to).resolve() if relative_to is not None else None
    for col in PATH_COLUMNS:
        if col not in df.columns:
            continue
        for i, value in enumerate(df[col]):
            if pd.isna(value):
                continue
            resolved = (sheet.parent / str(value)).resolve()
            if check_paths and not resolved.exists():
                raise ConfigError(
                    f"{_where(sheet, i)}, column '{col}': {value!r} does not exist (resolved to {resolved}); "
                    "paths are relative to the folder of the samples sheet"
                )
            if base is not None and resolved.is_relative_to(base):
                resolved = Path(os.path.relpath(resolved, base))
            df.loc[df.index[i], col] = str(resolved)
    return df.reset_index(drop=True)


def _row_error(exc: Exception, df: pd.DataFrame, schema: dict[str, Any], sheet: Path) -> ConfigError:
    """Turn snakemake's 'Error validating row i' into row, line and column."""
    import re

    import jsonschema

    match = re.search(r"row (\d+)", str(exc))
    if match is None:
        return ConfigError(f"{sheet.name}: {exc}")
    row = int(match.group(1))
    record = {k: v for k, v in df.iloc[row].to_dict().items() if not pd.isna(v)}
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(record), key=lambda e: list(e.absolute_path))
    if not errors:
        return ConfigError(f"{_where(sheet, row)}: {exc}")
    cause = errors[0]
    column = "/".join(str(p) for p in cause.absolute_path)
    col_text = f", column '{column}'" if column else ""
    return ConfigError(f"{_where(sheet, row)}{col_text}: {_show(cause.instance)} is invalid: {_expected(cause)}")


def _expected(err: Any) -> str:
    s = err.schema if isinstance(err.schema, dict) else {}
    desc = s.get("description")
    base = err.message
    if err.validator == "pattern":
        base = f"expected letters, digits, '_', '.' or '-' (pattern {err.validator_value})"
    elif err.validator == "enum":
        base = f"expected one of {err.validator_value}"
    elif err.validator in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        base = f"expected a value with {err.validator} {err.validator_value}"
    return f"{base}" + (f" ({desc.strip()})" if desc else "")


def _check_unique_views(df: pd.DataFrame, sheet: Path) -> None:
    dup = df.duplicated(["patient_id", "view"], keep=False)
    if dup.any():
        rows = [i for i in range(len(df)) if dup.iloc[i]]
        first = rows[0]
        same = [i for i in rows if (df.patient_id.iloc[i], df.view.iloc[i]) == (df.patient_id.iloc[first], df.view.iloc[first])]
        raise ConfigError(
            f"{sheet.name}: rows {', '.join(str(i + 1) for i in same)} (lines {', '.join(str(i + 2) for i in same)}) "
            f"all have patient_id {df.patient_id.iloc[first]!r} and view {df.view.iloc[first]!r}; "
            "give each radiograph of a patient its own view tag"
        )


def _check_per_patient(df: pd.DataFrame, sheet: Path) -> None:
    columns = [c for c in df.columns if c in PER_PATIENT_FIXED or c.startswith(("dxa_", "qct_"))]
    for pid, group in df.groupby("patient_id", sort=False):
        first = group.index[0]
        for col in columns:
            for other in group.index[1:]:
                a, b = group.at[first, col], group.at[other, col]
                if (pd.isna(a) and pd.isna(b)) or (not pd.isna(a) and not pd.isna(b) and a == b):
                    continue
                raise ConfigError(
                    f"{sheet.name}: patient {pid!r} has {col} = {_show(a)} in row {first + 1} "
                    f"but {_show(b)} in row {other + 1}; a patient's {col} must be the same on all of its rows"
                )


def _show(value: Any) -> str:
    if pd.isna(value):
        return "<empty>"
    return repr(value.item() if hasattr(value, "item") else value)


def load_samples(path: str | os.PathLike[str], *, check_paths: bool = True,
                 relative_to: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """Read and validate a samples sheet (:func:`read_sheet`, :func:`validate_samples`)."""
    return validate_samples(read_sheet(path), path, check_paths=check_paths, relative_to=relative_to)


def patients(df: pd.DataFrame) -> list[str]:
    """Patient ids in sheet order, each once."""
    return list(dict.fromkeys(df["patient_id"]))


def column_parts(column: str) -> tuple[str, str]:
    """``(prefix, site)`` of a per-site column ``{prefix}_{site}``: a sheet's BMD column (``"dxa_L1"`` →
    ``("dxa", "L1")``, ``"qct_L1"``) or a per-patient table's ``truth_L1`` / ``pred_L1``."""
    prefix, sep, site = column.partition("_")
    if not (prefix and sep and site):
        raise ValueError(f"column {column!r} is not named prefix_site (e.g. dxa_L1)")
    return prefix, site


#: Columns of a manual landmark table (:func:`read_landmark_table`).
LANDMARK_COLUMNS = ("patient_id", "view", "landmark", "row", "col")


def read_landmark_table(path: str | os.PathLike[str], samples: pd.DataFrame | None = None) -> dict[tuple[str, str], Any]:
    """Seed 000's chest landmarks placed by hand: a TSV (``.tsv``, ``.txt``) or CSV (``.csv``) with one row per
    point and the columns ``patient_id, view, landmark, row, col``.

    ``landmark`` is one of :data:`bmdpipe.chest_landmarks.LANDMARKS`; ``row`` and ``col`` are pixels of the
    radiograph file as stored (row 0 is the first row of its pixel data, pixel centres at integers,
    fractions allowed). A view may give any subset of the 16 points.

    Args:
        path: the table.
        samples: the validated samples sheet; when given, every (patient_id, view) must be one of its rows.

    Returns:
        ``(patient_id, view)`` → ``(16, 2)`` float64 ``(row, col)`` pixels, NaN where the table gives none.

    Raises:
        ConfigError: a missing file or column, an unknown landmark, a coordinate that is not a number of pixels
            ≥ 0, a point given twice, or a radiograph the samples sheet does not have (the row is named).
    """
    import numpy as np

    from bmdpipe.chest_landmarks import LANDMARKS

    p = Path(path)
    df = _read_delimited(p, "landmark table", "set cohort.landmarks to an existing TSV or CSV file (or to null when "
                         "no landmarks were placed by hand)")
    missing = [c for c in LANDMARK_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(f"{p}: column(s) {', '.join(missing)} missing; a landmark table has the columns "
                          f"{', '.join(LANDMARK_COLUMNS)} (one row per point, row/col in pixels of the radiograph)")
    index = {name: k for k, name in enumerate(LANDMARKS)}
    views = None if samples is None else set(zip(samples.patient_id.astype(str), samples.view.astype(str)))
    out: dict[tuple[str, str], Any] = {}
    seen: dict[tuple[str, str, str], int] = {}
    for i, row in enumerate(df[list(LANDMARK_COLUMNS)].itertuples(index=False)):
        where = _where(p, i)
        key = (row.patient_id, row.view)
        if row.landmark not in index:
            raise ConfigError(f"{where}: landmark {row.landmark!r} is not one of seed 000's 16: {', '.join(LANDMARKS)}")
        if views is not None and key not in views:
            raise ConfigError(f"{where}: patient_id {row.patient_id!r} with view {row.view!r} is not a row of the "
                              "samples sheet; fix the ids or remove the row")
        coords = []
        for name in ("row", "col"):
            value = getattr(row, name)
            try:
                v = float(value)
            except ValueError:
                v = float("nan")
            if not np.isfinite(v) or v < 0:
                raise ConfigError(f"{where}: {name} = {value!r} is not a pixel coordinate; give a number ≥ 0 "
                                  "(pixels of the radiograph file, row 0 = its first row)")
            coords.append(v)
        if (*key, row.landmark) in seen:
            raise ConfigError(f"{where}: {row.landmark} of patient {row.patient_id!r} view {row.view!r} is already "
                              f"given in row {seen[(*key, row.landmark)] + 1}; keep one of the two")
        seen[(*key, row.landmark)] = i
        out.setdefault(key, np.full((len(LANDMARKS), 2), np.nan))[index[row.landmark]] = coords
    return out
