"""CSV files the engine writes for spreadsheets, safe to open in Excel and WPS.

A cell whose text starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return
is run as a formula by Excel and WPS (``=HYPERLINK(...)`` leaks data, ``+cmd|...``
starts programs). Claims files and campaign files are outside text, and the
reports copy them (a venue's claimed code, a venue's name), so every text cell of
every CSV the engine writes goes through ``neutralise``: OWASP's CSV-injection rule,
a leading single quote, which the spreadsheet shows as text and does not evaluate.
Numbers are written as they are, also a signed number formatted as text (``-12.34``),
which runs nothing. Quotes and separators inside a cell are the csv module's job.

Use ``open_report(path)`` and ``SafeWriter`` for any new report (a hot loop may call
``neutralise`` on exactly its outside-text cells instead, as reconciliation.csv does).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_FIRST = frozenset(FORMULA_START)
# A signed number written as text (a report's "-12.34" yuan) runs nothing: kept as is,
# so the spreadsheet still sees a number.
_NUMBER = re.compile(r"[+-]?[0-9]+(\.[0-9]+)?")


def neutralise(value: Any) -> Any:
    """The cell as it is safe to write: text that a spreadsheet would evaluate gets a
    leading single quote; everything else is unchanged."""
    if isinstance(value, str) and value[:1] in _FIRST and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


class SafeWriter:
    """``csv.writer`` with every cell neutralised."""

    def __init__(self, f: IO[str]) -> None:
        self._w = csv.writer(f)

    def writerow(self, row: Iterable[Any]) -> None:
        self._w.writerow([neutralise(v) for v in row])


def open_report(path: Path) -> IO[str]:
    """A CSV report for spreadsheets: UTF-8 with a byte-order mark, so that Excel and
    WPS show Chinese names (contract section 5), and csv's own line endings."""
    return open(path, "w", newline="", encoding="utf-8-sig")
