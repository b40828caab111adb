"""What every manifest source produces: clip candidates (`Clip`), quarantine rows and their reasons, and
`ManifestError` for what no per-clip quarantine can absorb.

Every CSV data row and every audio-named entry of a folder ends up either as a manifest row or as a
quarantine row (stage "manifest") with one of the reasons below (`REASONS`); nothing is dropped silently.
A quarantine row of a parsed CSV row carries the row's labels (so class coverage can count the loss).

* `bad_csv_row`: a line that is not a well-formed CSV record (a quote that does not close on its line, text
  after a closing quote, bytes that are not UTF-8, every field empty), the wrong column count, an empty
  key, or start/end times that are not finite with 0 <= start < end.
* `unknown_label`: a label that is not in the class list (the whole clip is quarantined).
* `duplicate_key`: the second and later occurrences of a key (in split order, then CSV order), and every
  other row of a key that has a `bad_csv_row` or `unknown_label` row anywhere: a key with a quarantined row
  is never written, not even from another row, split, or (folders) as an unlisted file.
* `missing_file`: no audio file for the row (the detail names the paths and extensions looked for, and a
  file that is there under an extension `extensions` does not accept).
* `not_regular_file`: the clip's entry is a directory, FIFO, socket, device or a symlink that leads nowhere
  (or to one of those). Decided by `os.scandir`/`stat` before anything opens it (opening a FIFO blocks).
* `unreadable_file`: a regular file without read permission for this process (`os.access`), or (folders)
  a subdirectory that cannot be listed (key null).
* `bad_file_name`: (folders) a path that is not valid UTF-8, which the manifest's string columns cannot hold
  (key and path are given with U+FFFD in place of the bad bytes).
* `unlisted_file`: (folder with several splits) an audio file that no split's CSV lists and no catch-all
  split takes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from pipeline.config import SplitConfig


STAGE = "manifest"
# Quarantine reasons of the manifest stage (the module docstring says when each applies).
BAD_CSV_ROW = "bad_csv_row"
UNKNOWN_LABEL = "unknown_label"
DUPLICATE_KEY = "duplicate_key"
MISSING_FILE = "missing_file"
UNLISTED_FILE = "unlisted_file"
NOT_REGULAR_FILE = "not_regular_file"
UNREADABLE_FILE = "unreadable_file"
BAD_FILE_NAME = "bad_file_name"
REASONS = (
    BAD_CSV_ROW, UNKNOWN_LABEL, DUPLICATE_KEY, MISSING_FILE, UNLISTED_FILE, NOT_REGULAR_FILE, UNREADABLE_FILE,
    BAD_FILE_NAME,
)
# How many leaked keys a ManifestError names.
LEAK_EXAMPLES = 5


class ManifestError(ValueError):
    """A configuration or data error that no per-clip quarantine can absorb (leaks, bad class list, ...)."""


class FileProblem(NamedTuple):
    """Why a directory entry named like audio is not a clip: a quarantine reason and what the entry is."""

    reason: str
    what: str


@dataclass
class Clip:
    """A manifest candidate before file lookup and quarantine decisions."""

    key: str
    split: SplitConfig
    labels: tuple[str, ...]
    origin: str  # "csv:line" or the audio file's relative path, for quarantine details
    start_s: float | None = None
    end_s: float | None = None
    path: str | None = None  # absolute path when known
    candidates: list[str] = field(default_factory=list)  # relative names tried when path is None
    file_problem: FileProblem | None = None  # set when path is an entry that cannot be decoded
    tried: str = ""  # (folders) the paths and extensions looked for, for a missing_file detail


# What a source's `clips` gives: the clips, quarantine rows, and the keys of quarantined rows to withhold
# (key -> "csv:line" of the row that withholds it).
SourceClips = tuple[list[Clip], list[dict], dict[str, str]]


def quarantine_row(
    key: str | None, path: str | None, split: str | None, reason: str, detail: str, labels: Iterable[str] | None = None
) -> dict:
    return {
        "key": key, "path": path, "split": split, "stage": STAGE, "reason": reason, "detail": detail,
        "labels": None if labels is None else list(labels),
    }
