"""The CSV formats of a manifest: one record per physical line (`csv_records`), AudioSet segment lists
(`read_segments_csv`) and the class list (`read_class_labels`, `class_list`).

CSV files (all three kinds) are UTF-8, with or without a byte order mark, with LF, CRLF or CR line ends.
Blank lines and lines starting with `#` are skipped; every other physical line is one data row (a header
row, where the format has one, excepted): a quoted field may hold commas and doubled quotes but not a line
break, so a quote left open is a bad row of its own line and the next line is read as the next row (a
quoted field spread over k lines counts as k data rows, each quarantined unless it is a valid row by
itself). Hence: written + quarantined rows = data lines of the CSVs. In `class_labels_indices.csv`,
which has no per-row quarantine, any bad line is a `ManifestError` naming the file and line.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from pipeline.clips import LEAK_EXAMPLES, ManifestError


# Lone surrogates are how undecodable bytes come out of errors="surrogateescape".
SURROGATES = re.compile("[\udc80-\udcff]")


class Segment(NamedTuple):
    """One data row of an AudioSet segments CSV."""

    ytid: str
    start_s: float
    end_s: float
    label_mids: tuple[str, ...]
    line: int


class BadRow(NamedTuple):
    """A CSV data row that could not be parsed; `key` is its first field when there is one."""

    line: int
    reason: str
    text: str
    key: str | None


class ClassLabel(NamedTuple):
    index: int
    mid: str
    display_name: str


class _Record(NamedTuple):
    """One physical data line of a CSV: its fields, or why it is not a well-formed CSV record."""

    line: int
    fields: list[str]  # stripped; a best-effort split when `error` is set
    error: str | None
    text: str  # the line as read (without its line end; bytes that are not UTF-8 as U+FFFD)


class _LineParser:
    """Parses one line at a time with a csv reader that is fed that line only, so a quote left open ends at
    the line's end instead of taking the following lines (one reader, reused: it resets after each row)."""

    def __init__(self) -> None:
        self._pending: str | None = None
        self._strict = csv.reader(self, skipinitialspace=True, strict=True)
        self._lenient = csv.reader(self, skipinitialspace=True)

    def __iter__(self) -> _LineParser:
        return self

    def __next__(self) -> str:
        line, self._pending = self._pending, None
        if line is None:
            raise StopIteration
        return line

    def _fields(self, reader: Iterator[list[str]], text: str) -> list[str]:
        self._pending = text
        return [value.strip() for value in next(reader)]

    def parse(self, text: str) -> tuple[list[str], str | None]:
        """The fields of `text`, strict about quotes (one must close on the line, then a comma follows), or a
        best-effort split and what is wrong."""
        try:
            return self._fields(self._strict, text), None
        except csv.Error as error:
            problem = "unterminated quote" if "unexpected end of data" in str(error) else f"malformed CSV: {error}"
        try:
            # Without the quotes the first field still names the row's key (so its clip can be withheld).
            return self._fields(self._lenient, text.replace('"', "")), problem
        except csv.Error:  # a field over csv.field_size_limit()
            return [text.strip()], problem


def csv_records(path: str | os.PathLike) -> Iterator[_Record]:
    """Every non-blank line that is not a `#` comment, one record per physical line.

    A UTF-8 byte order mark is skipped and CRLF / CR line ends are accepted. A quoted field cannot span
    lines: a line whose quote does not close is a record with an error, and the next line is a new record,
    so a typo never swallows the rest of the file. A line that is not valid UTF-8 is a record with an error.
    """
    parser = _LineParser()
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline=None) as handle:
        for line, text in enumerate(handle, start=1):
            text = text.rstrip()  # the line end and trailing blanks; fields are stripped anyway
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            error = None
            if SURROGATES.search(text):
                text = SURROGATES.sub("\ufffd", text)
                error = "not valid UTF-8"
            fields, parse_error = parser.parse(text)
            error = error or parse_error
            if error is None and not any(fields):
                error = "every field is empty"
            yield _Record(line, fields, error, text)


def row_text(fields: list[str]) -> str:
    return ", ".join(fields)


def split_labels(text: str) -> tuple[str, ...]:
    """Labels of one field, separated by ',' or ';', de-duplicated in order."""
    labels = (label.strip() for label in re.split(r"[;,]", text))
    return tuple(dict.fromkeys(label for label in labels if label))


def read_segments_csv(path: str | os.PathLike) -> tuple[list[Segment], list[BadRow]]:
    """Read an AudioSet segments CSV (`# ...` header lines, then `YTID, start, end, "mid,mid"`).

    Malformed rows come back as `BadRow`s with their line number and reason, never as exceptions. A header
    row without `#` (`YTID, start_seconds, ...`) is tolerated as the first data row.
    """
    segments: list[Segment] = []
    bad_rows: list[BadRow] = []
    for line, fields, error, text in csv_records(path):
        if not segments and not bad_rows and error is None and fields[0].lower() == "ytid":
            continue
        key = fields[0] or None
        if error is not None:
            bad_rows.append(BadRow(line, error, text, key))
            continue
        if len(fields) != 4:
            bad_rows.append(BadRow(line, f"expected 4 columns, got {len(fields)}", row_text(fields), key))
            continue
        if key is None:
            bad_rows.append(BadRow(line, "empty YTID", row_text(fields), None))
            continue
        try:
            start_s, end_s = float(fields[1]), float(fields[2])
        except ValueError:
            bad_rows.append(BadRow(line, "start/end are not numbers", row_text(fields), key))
            continue
        if not (math.isfinite(start_s) and math.isfinite(end_s) and 0.0 <= start_s < end_s):
            bad_rows.append(BadRow(line, "start/end must satisfy 0 <= start < end", row_text(fields), key))
            continue
        segments.append(Segment(key, start_s, end_s, split_labels(fields[3]), line))
    return segments, bad_rows


def read_class_labels(path: str | os.PathLike) -> list[ClassLabel]:
    """Read `class_labels_indices.csv` (`index,mid,display_name`); indices must be 0..n-1 in order."""
    records = list(csv_records(path))
    if not records or [name.lower() for name in records[0].fields] != ["index", "mid", "display_name"]:
        where = f"{path}:{records[0].line}" if records else str(path)
        raise ManifestError(f"{where}: expected the header 'index,mid,display_name'")
    classes: list[ClassLabel] = []
    for line, fields, error, text in records[1:]:
        if error is not None:
            raise ManifestError(f"{path}:{line}: {error}: {text!r}")
        if len(fields) != 3 or not fields[0].isdigit() or not fields[1]:
            raise ManifestError(f"{path}:{line}: bad class row {row_text(fields)!r}")
        if int(fields[0]) != len(classes):
            raise ManifestError(f"{path}:{line}: index {fields[0]} out of order (expected {len(classes)})")
        classes.append(ClassLabel(int(fields[0]), fields[1], fields[2]))
    duplicates = [mid for mid, count in Counter(label.mid for label in classes).items() if count > 1]
    if duplicates:
        raise ManifestError(f"{path}: duplicate MIDs {duplicates[:LEAK_EXAMPLES]}")
    if not classes:
        raise ManifestError(f"{path}: no classes")
    return classes


def class_list(class_labels_csv: str, labels: Iterable[str]) -> list[ClassLabel]:
    """The classes of `class_labels_csv` when it is set, else the sorted distinct `labels` (mid = display
    name = the label)."""
    if class_labels_csv:
        return read_class_labels(class_labels_csv)
    return [ClassLabel(index, label, label) for index, label in enumerate(sorted(set(labels)))]
