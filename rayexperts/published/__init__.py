"""The catalogue of published numbers: every result table of the four seed papers (MLLT, NCL, ECL, CBD),
plus the SADE README and RIDE MODEL_ZOO numbers that docs/methods.md quotes, one number a row.

    >>> from rayexperts import published
    >>> published.load(paper="NCL", dataset="cifar100-lt", imbalance_factor=100, metric="top1_all")

Columns (:data:`COLUMNS`): ``paper`` (where the number is printed), ``table``, ``dataset``,
``imbalance_factor`` (CIFAR only), ``backbone``, ``method``, ``variant`` (empty for a main result; the
ablation switches, ``single expert`` / ``ensemble``, the test distribution, ...), ``metric``
(:data:`METRICS`), ``value`` (percent, as printed), ``selection`` (the reported checkpoint where the paper
or its code says: ``best_test``, ``last``), ``epochs``, ``seeds`` (runs averaged), ``source`` (where to
find the number: table and line of the seed text), ``preset`` and ``overrides`` (the preset and dotted
``key=value`` overrides that train the row's setting, where one exists; views such as a single expert or
PC softmax are chosen when reading results, not here).

Optional columns (:data:`OPTIONAL_COLUMNS`): ``view`` (which view of the preset's run gives the number),
``augment`` (the augmentation family the source states for the row: :data:`AUGMENT_FAMILIES`),
``protocol_note`` (one line: what the preset runs differently from the row's source, e.g. the released
code's 200 epochs where the text says 400; empty where the preset runs what the row states) and
``inferred`` (``true`` where a cell was reconstructed from text the seed extraction garbled, e.g. a teacher
mix read from illegible check marks; :func:`load` returns it as a bool). A row that names a preset states
the protocol that preset runs: its ``epochs``, ``selection``, ``view``, ``seeds`` and ``augment`` equal the
resolved config's (:func:`disagreements`), or its ``protocol_note`` says why not (docs/results.md).

The CSV keeps the printed decimals (``50.60``); :func:`load` returns ``value`` as a float. Pandas only:
importing this module does not import torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = ["AUGMENT_FAMILIES", "CATALOG", "COLUMNS", "INTEGER_COLUMNS", "METRICS", "OPTIONAL_COLUMNS", "SELECTIONS",
           "augment_family", "check", "disagreements", "load", "read", "stated_protocol"]

CATALOG: Path = Path(__file__).with_name("results.csv")

COLUMNS: tuple[str, ...] = (
    "paper", "table", "dataset", "imbalance_factor", "backbone", "method", "variant", "metric", "value",
    "selection", "epochs", "seeds", "source", "preset", "overrides",
)
METRICS: tuple[str, ...] = ("top1_all", "top1_many", "top1_medium", "top1_few", "ece", "error")
SELECTIONS: tuple[str, ...] = ("", "last", "best_test", "best_val")
INTEGER_COLUMNS: tuple[str, ...] = ("imbalance_factor", "epochs", "seeds")
# Optional: which view of the preset's run gives the row's number (empty: the method's primary view), the
# augmentation family the source states, what the preset runs differently (one line), reconstructed cells.
OPTIONAL_COLUMNS: tuple[str, ...] = ("view", "augment", "protocol_note", "inferred")
# data.augment values by the family a paper names (RandAugment, AutoAugment, ...): a row's ``augment`` is a family.
AUGMENT_FAMILIES: dict[str, tuple[str, ...]] = {
    "standard": ("standard", "standard_rotation", "standard_jitter"),
    "randaugment": ("randaugment", "randaugment_timm"),
    "autoaugment": ("autoaugment", "autoaugment_cutout"),
    "data_aug": ("data_aug", "data_aug_simclr"),
    "none": ("none",),
}
BOOLEANS: tuple[str, ...] = ("", "true", "false")
# Every row names these; the others may be empty.
REQUIRED_VALUES: tuple[str, ...] = ("paper", "table", "dataset", "backbone", "method", "metric", "value", "source")


def _blank(v: Any) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) or (isinstance(v, str) and not v.strip())


def _text(v: Any) -> str:
    return "" if _blank(v) else str(v).strip()


def check(df: pd.DataFrame) -> None:
    """Validate a catalogue in this format (the shipped CSV, or a user's, read with or without dtypes).

    Raises ``ValueError`` with a one-line message naming the CSV line (1-based; line 1 is the header, so the
    DataFrame's i-th row is line i + 2) and the column: a missing column, an empty required value, an unknown
    metric or selection, a value that is not a number in [0, 100], a non-integer imbalance factor, epochs or
    seeds, ``overrides`` without a ``preset``, an ``augment`` that is no family, an ``inferred`` that is not
    true/false/empty, or a ``protocol_note`` of several lines.
    """
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"catalogue lacks column(s) {', '.join(missing)}; the columns are {', '.join(COLUMNS)}")
    optional = {c: list(df[c]) if c in df.columns else [""] * len(df) for c in ("augment", "protocol_note", "inferred")}
    for i, row in enumerate(df[list(COLUMNS)].itertuples(index=False, name=None)):
        cells = dict(zip(COLUMNS, row))
        where = f"catalogue line {i + 2}"
        for col in REQUIRED_VALUES:
            if _blank(cells[col]):
                raise ValueError(f"{where}: column '{col}' is empty")
        metric = _text(cells["metric"])
        if metric not in METRICS:
            raise ValueError(f"{where}: column 'metric' is {metric!r}, not one of {', '.join(METRICS)}")
        raw = _text(cells["value"])
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{where}: column 'value' is {raw!r}, not a number") from None
        if not 0.0 <= value <= 100.0:
            raise ValueError(f"{where}: column 'value' is {raw}, outside 0-100 (values are percentages)")
        for col in INTEGER_COLUMNS:
            if _blank(cells[col]):
                continue
            raw = _text(cells[col])
            try:
                number = float(raw)
            except ValueError:
                raise ValueError(f"{where}: column '{col}' is {raw!r}, not a number") from None
            if number != int(number) or number <= 0:
                raise ValueError(f"{where}: column '{col}' is {raw!r}, not a positive whole number")
        selection = _text(cells["selection"])
        if selection not in SELECTIONS:
            choices = ", ".join(s or repr(s) for s in SELECTIONS)
            raise ValueError(f"{where}: column 'selection' is {selection!r}, not one of {choices}")
        if _text(cells["overrides"]) and not _text(cells["preset"]):
            raise ValueError(f"{where}: column 'overrides' is set but column 'preset' is empty")
        augment = _text(optional["augment"][i])
        if augment and augment not in AUGMENT_FAMILIES:
            raise ValueError(f"{where}: column 'augment' is {augment!r}, not one of {', '.join(AUGMENT_FAMILIES)}")
        inferred = _text(optional["inferred"][i]).lower()
        if inferred not in BOOLEANS:
            raise ValueError(f"{where}: column 'inferred' is {inferred!r}, not true, false or empty")
        if "\n" in _text(optional["protocol_note"][i]):
            raise ValueError(f"{where}: column 'protocol_note' spans several lines; it is one line")


def read(path: str | Path = CATALOG) -> pd.DataFrame:
    """A catalogue CSV in this format (the shipped one, or a user's: ``jobs/reproduce.py --catalog``), checked."""
    return _read(Path(path))


def _read(path: Path = CATALOG) -> pd.DataFrame:
    raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[])
    check(raw)
    df = raw[list(COLUMNS)].copy()
    for col in OPTIONAL_COLUMNS:
        df[col] = raw[col] if col in raw else ""
    df["inferred"] = df["inferred"].str.strip().str.lower() == "true"
    for col in INTEGER_COLUMNS:
        df[col] = pd.array([int(float(v)) if v.strip() else pd.NA for v in df[col]], dtype="Int64")
    df["value"] = df["value"].astype(float)
    return df


def _matches(series: pd.Series, wanted: Any) -> pd.Series:
    if isinstance(wanted, (list, tuple, set, frozenset)) or (
        isinstance(wanted, Iterable) and not isinstance(wanted, (str, bytes, Mapping))
    ):
        values = list(wanted)
        mask = series.isin([v for v in values if v is not None])
        if any(v is None for v in values):
            mask = mask | series.isna()
        return mask.fillna(False).astype(bool)
    if wanted is None:
        return series.isna()
    return (series == wanted).fillna(False).astype(bool)


def load(**filters: Any) -> pd.DataFrame:
    """The catalogue as a DataFrame, rows kept where ``column == value`` for every filter (a list, tuple or set
    keeps rows whose value is in it; ``None`` matches an empty numeric cell, ``""`` an empty text cell).

    Text columns are ``str`` (empty cells are ``""``); ``imbalance_factor``, ``epochs`` and ``seeds`` are
    nullable ``Int64``; ``value`` is ``float``. An unknown column is a ``ValueError`` naming it and the columns.
    """
    unknown = [k for k in filters if k not in (*COLUMNS, *OPTIONAL_COLUMNS)]
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise ValueError(f"unknown column(s) {names} to filter on; the columns are {', '.join(COLUMNS)}")
    df = _read()
    for col, wanted in filters.items():
        df = df[_matches(df[col], wanted)]
    return df.reset_index(drop=True)


def augment_family(augment: str) -> str:
    """The family (:data:`AUGMENT_FAMILIES`) of a ``data.augment`` value; the value itself when none holds it."""
    return next((family for family, members in AUGMENT_FAMILIES.items() if augment in members), augment)


def stated_protocol(row: Mapping[str, Any]) -> dict[str, Any]:
    """What a catalogue row states about the protocol behind its number, the cells it leaves empty left out:
    ``epochs``, ``selection``, ``seeds`` (ints and text as :func:`load` returns them), ``view``, ``augment``."""
    out: dict[str, Any] = {}
    for key in ("epochs", "seeds"):
        if not _blank(row.get(key)):
            out[key] = int(row[key])
    for key in ("selection", "view", "augment"):
        if _text(row.get(key)):
            out[key] = _text(row[key])
    return out


def disagreements(row: Mapping[str, Any], runs: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (the row's value, what runs)}`` where a row states a protocol item (:func:`stated_protocol`) that
    differs from ``runs``, the resolved protocol of its preset: ``epochs``, ``selection``, ``seeds`` (the runs
    averaged), ``view`` (the view read) and ``augment`` (a ``data.augment`` value, compared by family)."""
    out = {}
    for key, stated in stated_protocol(row).items():
        if key not in runs:
            continue
        running = augment_family(str(runs[key])) if key == "augment" else runs[key]
        if stated != running:
            out[key] = (stated, running)
    return out
