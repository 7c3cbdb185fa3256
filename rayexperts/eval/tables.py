"""The papers' result tables from metrics rows: no torch, so that drivers can print them cheaply."""

from __future__ import annotations

GROUPS = ("many", "medium", "few")
# The papers' table columns: test top-1 by shot group, then overall.
SHOT_COLUMNS = {"top1_many": "Many", "top1_medium": "Medium", "top1_few": "Few", "top1": "All"}


def shot_table(rows, index: str | list[str], decimals: int = 2):
    """Many / Medium / Few / All top-1 in % of ``rows`` (a DataFrame of metrics rows), indexed by ``index``."""
    return (rows.set_index(index)[list(SHOT_COLUMNS)].rename(columns=SHOT_COLUMNS) * 100).round(decimals)
