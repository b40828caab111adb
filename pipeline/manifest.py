"""The clip manifest: AudioSet CSVs, the class list, or a folder of audio -> an Arrow table + quarantine rows.

This module owns reading the CSV formats (AudioSet segment lists, `class_labels_indices.csv`, a folder's
`path,labels` list), finding each clip's audio file, the leak check between evaluation and training splits,
and the parquet I/O of the manifest. It never decodes audio; decoding errors belong to the Ray job.

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

CSV files (all three kinds) are UTF-8, with or without a byte order mark, with LF, CRLF or CR line ends.
Blank lines and lines starting with `#` are skipped; every other physical line is one data row (a header
row, where the format has one, excepted): a quoted field may hold commas and doubled quotes but not a line
break, so a quote left open is a bad row of its own line and the next line is read as the next row (a
quoted field spread over k lines counts as k data rows, each quarantined unless it is a valid row by
itself). Hence: written + quarantined rows = data lines of the CSVs. In `class_labels_indices.csv`,
which has no per-row quarantine, any bad line is a `ManifestError` naming the file and line.

AudioSet file names come from `SourceConfig.filename_pattern` formatted with `{ytid}`, `{split}`, `{ext}`,
`{start}` and `{end}`. `{start}`/`{end}` without a format spec are integer milliseconds (`30000`); with a
spec they format as floats, so `{start:.3f}` gives `30.000`. `{ext}` is tried in `extensions` order and the
first candidate that is a readable regular file wins (failing that, the first that exists as anything else
gives the reason). The audio root is listed once (top level and one level of subfolders); a name not found
at the top level is looked up by base name in the subfolders (first in sorted order wins).

`extensions` empty (the default) means every extension of a format the installed libsndfile decodes
(`decodable_extensions`, derived from `soundfile.available_formats()` through `FORMAT_EXTENSIONS`).

Folder sources, scanned (`audio_root` set): every entry under `audio_root` (recursive; symlinked directories
are not followed) whose extension is in `extensions`; the key is the relative path without extension; of a
key's entries, the regular files come first (sorted), then the rest. A split's CSV (optional) has rows
`path,labels` (an optional header row `path,labels`, `#` comments) where `path` is relative to `audio_root`
(the extension may be omitted) and `labels` is one field holding labels separated by `;` (or `,` inside
quotes). Files listed in a split's CSV belong to that split; unlisted files go to the catch-all split: the
one split without a CSV, or the only split when there is just one (no splits configured means one split
"train", mix=True).

Folder sources, listed (`audio_root` empty): only the files the splits' CSVs list are read, nothing is
scanned, and every split needs a CSV. A `path` is absolute, or relative to the first of `audio_roots` (in
order), then the CSV's own folder, that holds it; without an accepted extension each extension is tried. The
key is the normalised `path` without its extension, an absolute path under one of those folders made relative
to it (so one file spelled two ways is one key for the leak check and the duplicate rule).

Labels are MIDs of the class list (`class_labels_csv`); folder labels may also be display names. Without a
class list, the classes are the sorted distinct labels seen in the CSVs (mid = display name = the label).
The class list travels in the manifest's schema metadata (`manifest_classes`).

Paths in the manifest are absolute, so Ray workers with another working directory can open them.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
import soundfile

from pipeline.config import SourceConfig, SplitConfig

logger = logging.getLogger(__name__)

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
# Lone surrogates are how undecodable bytes come out of errors="surrogateescape".
_SURROGATES = re.compile("[\udc80-\udcff]")
CLASSES_METADATA_KEY = b"sslam.classes"
# How many leaked keys a ManifestError names.
LEAK_EXAMPLES = 5
# File extensions of each libsndfile format (soundfile.available_formats() names). RAW is headerless (it cannot
# be decoded without being told its layout) and MPC2K has no extension of its own, so neither is listed.
FORMAT_EXTENSIONS = {
    "WAV": ("wav", "wave"), "WAVEX": ("wav",), "FLAC": ("flac",), "OGG": ("ogg", "oga", "opus"), "MP3": ("mp3",),
    "AIFF": ("aiff", "aif", "aifc"), "AU": ("au", "snd"), "AVR": ("avr",), "CAF": ("caf",), "HTK": ("htk",),
    "SVX": ("iff", "svx", "8svx"), "MAT4": ("mat",), "MAT5": ("mat",), "PAF": ("paf",), "PVF": ("pvf",),
    "RF64": ("rf64",), "SD2": ("sd2",), "SDS": ("sds",), "IRCAM": ("sf", "ircam"), "VOC": ("voc",),
    "W64": ("w64",), "NIST": ("nist", "sph"), "WVE": ("wve",), "XI": ("xi",),
}
# Tried first (AudioSet `{ext}` lookup order): the formats AudioSet downloads come in.
PREFERRED_EXTENSIONS = ("wav", "flac", "ogg", "mp3")

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("mix", pa.bool_(), nullable=False),
        pa.field("label_mids", pa.list_(pa.string()), nullable=False),
        pa.field("label_indices", pa.list_(pa.int32()), nullable=False),
        pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()),
        pa.field("duration_s", pa.float64()),
        pa.field("sample_rate", pa.int32()),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("path", pa.string()),
        pa.field("split", pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        # The labels the CSV gave the clip (as written), null where none are known (unlisted files, bad rows).
        pa.field("labels", pa.list_(pa.string())),
    ]
)


class ManifestError(ValueError):
    """A configuration or data error that no per-clip quarantine can absorb (leaks, bad class list, ...)."""


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


@dataclass
class _Clip:
    """A manifest candidate before file lookup and quarantine decisions."""

    key: str
    split: SplitConfig
    labels: tuple[str, ...]
    origin: str  # "csv:line" or the audio file's relative path, for quarantine details
    start_s: float | None = None
    end_s: float | None = None
    path: str | None = None  # absolute path when known
    candidates: list[str] = field(default_factory=list)  # relative names tried when path is None
    file_problem: _FileProblem | None = None  # set when path is an entry that cannot be decoded
    tried: str = ""  # (folders) the paths and extensions looked for, for a missing_file detail


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


def decodable_extensions() -> list[str]:
    """Every file extension of a format the installed libsndfile decodes (`data.source.extensions: []`):
    PREFERRED_EXTENSIONS first, then the others in sorted order."""
    available = {extension for name in soundfile.available_formats() for extension in FORMAT_EXTENSIONS.get(name, ())}
    preferred = [extension for extension in PREFERRED_EXTENSIONS if extension in available]
    return preferred + sorted(available - set(preferred))


def _csv_records(path: str | os.PathLike) -> Iterator[_Record]:
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
            if _SURROGATES.search(text):
                text = _SURROGATES.sub("\ufffd", text)
                error = "not valid UTF-8"
            fields, parse_error = parser.parse(text)
            error = error or parse_error
            if error is None and not any(fields):
                error = "every field is empty"
            yield _Record(line, fields, error, text)


def _row_text(fields: list[str]) -> str:
    return ", ".join(fields)


def _split_labels(text: str) -> tuple[str, ...]:
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
    for line, fields, error, text in _csv_records(path):
        if not segments and not bad_rows and error is None and fields[0].lower() == "ytid":
            continue
        key = fields[0] or None
        if error is not None:
            bad_rows.append(BadRow(line, error, text, key))
            continue
        if len(fields) != 4:
            bad_rows.append(BadRow(line, f"expected 4 columns, got {len(fields)}", _row_text(fields), key))
            continue
        if key is None:
            bad_rows.append(BadRow(line, "empty YTID", _row_text(fields), None))
            continue
        try:
            start_s, end_s = float(fields[1]), float(fields[2])
        except ValueError:
            bad_rows.append(BadRow(line, "start/end are not numbers", _row_text(fields), key))
            continue
        if not (math.isfinite(start_s) and math.isfinite(end_s) and 0.0 <= start_s < end_s):
            bad_rows.append(BadRow(line, "start/end must satisfy 0 <= start < end", _row_text(fields), key))
            continue
        segments.append(Segment(key, start_s, end_s, _split_labels(fields[3]), line))
    return segments, bad_rows


def read_class_labels(path: str | os.PathLike) -> list[ClassLabel]:
    """Read `class_labels_indices.csv` (`index,mid,display_name`); indices must be 0..n-1 in order."""
    records = list(_csv_records(path))
    if not records or [name.lower() for name in records[0].fields] != ["index", "mid", "display_name"]:
        where = f"{path}:{records[0].line}" if records else str(path)
        raise ManifestError(f"{where}: expected the header 'index,mid,display_name'")
    classes: list[ClassLabel] = []
    for line, fields, error, text in records[1:]:
        if error is not None:
            raise ManifestError(f"{path}:{line}: {error}: {text!r}")
        if len(fields) != 3 or not fields[0].isdigit() or not fields[1]:
            raise ManifestError(f"{path}:{line}: bad class row {_row_text(fields)!r}")
        if int(fields[0]) != len(classes):
            raise ManifestError(f"{path}:{line}: index {fields[0]} out of order (expected {len(classes)})")
        classes.append(ClassLabel(int(fields[0]), fields[1], fields[2]))
    duplicates = [mid for mid, count in Counter(label.mid for label in classes).items() if count > 1]
    if duplicates:
        raise ManifestError(f"{path}: duplicate MIDs {duplicates[:LEAK_EXAMPLES]}")
    if not classes:
        raise ManifestError(f"{path}: no classes")
    return classes


class _Seconds(float):
    """A time that formats as integer milliseconds by default and as a float with an explicit spec."""

    def __format__(self, spec: str) -> str:
        if not spec:
            return str(round(float(self) * 1000))
        return float.__format__(self, spec)


class _FileProblem(NamedTuple):
    """Why a directory entry named like audio is not a clip: a quarantine reason and what the entry is."""

    reason: str
    what: str


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _entry_problem(entry: os.DirEntry) -> _FileProblem | None:
    """None for a readable regular file (or a link to one). Decided from the directory entry and stat alone:
    nothing is opened, since opening a FIFO blocks."""
    try:
        if entry.is_file():
            return _readability(entry.path)
        mode = entry.stat().st_mode
    except OSError as error:
        return _FileProblem(NOT_REGULAR_FILE, f"a symlink whose target cannot be reached ({error.strerror})")
    what = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), f"an entry of mode {stat.filemode(mode)}")
    link = "a symlink to " if entry.is_symlink() else ""
    return _FileProblem(NOT_REGULAR_FILE, f"{link}{what}, not a regular file")


def _follows_to(check: Callable[[], bool]) -> bool:
    """`entry.is_file` / `entry.is_dir` (which follow symlinks), False where following fails (a symlink loop)."""
    try:
        return check()
    except OSError:
        return False


def _readability(path: str) -> _FileProblem | None:
    if os.access(path, os.R_OK):
        return None
    return _FileProblem(UNREADABLE_FILE, "a regular file without read permission")


class _AudioIndex:
    """The entries of an audio root, listed once: top level by name, one subfolder level by relative path
    and by base name. Regular files and entries that are something else (directories, FIFOs, sockets, broken
    links) are kept apart, so a name that exists only as the latter is reported as such."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.relative: set[str] = set()
        self.by_basename: dict[str, str] = {}
        self.irregular: dict[str, _FileProblem] = {}  # relative name -> what it is
        self.irregular_by_basename: dict[str, str] = {}
        top = sorted(os.scandir(root), key=lambda entry: entry.name)
        for entry in top:
            self._add(entry, entry.name)
        for entry in top:
            if _follows_to(entry.is_dir):
                try:
                    children = sorted(os.scandir(entry.path), key=lambda child: child.name)
                except OSError as error:
                    logger.warning("cannot list %s (%s): its clips will be missing_file", entry.path, error)
                    continue
                for child in children:
                    self._add(child, f"{entry.name}/{child.name}")

    def _add(self, entry: os.DirEntry, relative: str) -> None:
        nested = "/" in relative
        if _follows_to(entry.is_file):
            self.relative.add(relative)
            if nested:
                self.by_basename.setdefault(entry.name, relative)
            return
        problem = _entry_problem(entry)
        if problem is not None:
            self.irregular[relative] = problem
            if nested:
                self.irregular_by_basename.setdefault(entry.name, relative)

    def find(self, name: str) -> str | None:
        """The relative path of the regular file `name` (a relative path from the pattern), or None."""
        if name in self.relative:
            return name
        if "/" not in name:
            return self.by_basename.get(name)
        return None

    def find_irregular(self, name: str) -> str | None:
        """The relative path of an entry called `name` that is not a regular file, or None."""
        if name in self.irregular:
            return name
        if "/" not in name:
            return self.irregular_by_basename.get(name)
        return None


def _audioset_clips(
    source: SourceConfig, splits: list[SplitConfig]
) -> tuple[list[_Clip], list[dict], dict[str, str]]:
    """Clips, bad-row quarantine rows, and the keys of bad rows (key -> "csv:line") to withhold."""
    clips: list[_Clip] = []
    quarantine: list[dict] = []
    withheld: dict[str, str] = {}
    for split in splits:
        segments, bad_rows = read_segments_csv(split.csv)
        for bad in bad_rows:
            detail = f"{split.csv}:{bad.line}: {bad.reason}: {bad.text}"
            quarantine.append(_quarantine_row(bad.key, None, split.name, BAD_CSV_ROW, detail))
            if bad.key is not None:
                withheld.setdefault(bad.key, f"{split.csv}:{bad.line}")
        for segment in segments:
            clip = _Clip(segment.ytid, split, segment.label_mids, f"{split.csv}:{segment.line}")
            clip.start_s, clip.end_s = segment.start_s, segment.end_s
            clips.append(clip)
    return clips, quarantine, withheld


def _check_audioset_root(source: SourceConfig) -> None:
    """A missing audio root would turn every clip into a `missing_file` row: refuse it as a config error."""
    root = os.path.abspath(source.audio_root)
    if not os.path.exists(root):
        raise ManifestError(f"data.source.audio_root {root} does not exist")
    if not os.path.isdir(root):
        raise ManifestError(f"data.source.audio_root {root} is not a directory")


def _locate_audioset_files(source: SourceConfig, clips: list[_Clip]) -> None:
    """Set each clip's path to the first candidate that is a readable regular file; failing that, to the
    first candidate that exists as something else, with its problem."""
    root = os.path.abspath(source.audio_root)
    index = _AudioIndex(root)
    for clip in clips:
        fields = {
            "ytid": clip.key,
            "split": clip.split.name,
            "start": _Seconds(clip.start_s),
            "end": _Seconds(clip.end_s),
        }
        extensions = source.extensions if "{ext" in source.filename_pattern else [""]
        unusable: tuple[str, _FileProblem] | None = None
        for extension in extensions:
            name = source.filename_pattern.format(ext=extension, **fields)
            clip.candidates.append(name)
            found = index.find(name)
            if found is not None:
                path = os.path.join(root, found)
                problem = _readability(path)
                if problem is None:
                    clip.path = path
                    break
                unusable = unusable or (path, problem)
            irregular = index.find_irregular(name)
            if irregular is not None and unusable is None:
                unusable = (os.path.join(root, irregular), index.irregular[irregular])
        if clip.path is None and unusable is not None:
            clip.path, clip.file_problem = unusable


class _FolderEntry(NamedTuple):
    relative: str  # posix path under the root
    problem: _FileProblem | None  # None: a readable regular file


def _scan_folder(root: str, extensions: Iterable[str]) -> tuple[list[_FolderEntry], list[dict]]:
    """Every entry under root (recursive, symlinked directories not followed) whose name has an audio
    extension, sorted, and quarantine rows for subdirectories that cannot be listed."""
    wanted = {extension.lower() for extension in extensions}
    found: list[_FolderEntry] = []
    unlistable: list[dict] = []
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as error:
            detail = f"{directory}: cannot list the directory ({error.strerror}); its files are not in the manifest"
            unlistable.append(_quarantine_row(None, directory, None, UNREADABLE_FILE, detail))
            continue
        for entry in entries:
            is_directory = entry.is_dir(follow_symlinks=False)
            if is_directory:
                pending.append(entry.path)
            if "." in entry.name and entry.name.rsplit(".", 1)[-1].lower() in wanted:
                problem = _FileProblem(NOT_REGULAR_FILE, "a directory, not a regular file") if is_directory else (
                    _entry_problem(entry)
                )
                relative = Path(os.path.relpath(entry.path, root)).as_posix()
                if _SURROGATES.search(relative):
                    relative = _SURROGATES.sub("\ufffd", relative)
                    problem = _FileProblem(BAD_FILE_NAME, "a path that is not valid UTF-8")
                found.append(_FolderEntry(relative, problem))
    return sorted(found), unlistable


def _strip_extension(relative: str, extensions: Iterable[str]) -> str:
    stem, dot, extension = relative.rpartition(".")
    if dot and extension.lower() in {value.lower() for value in extensions}:
        return stem
    return relative


def _folder_key(path_field: str, root: str, extensions: list[str]) -> tuple[str | None, str | None]:
    """(key, None) for a labels CSV `path` field, or (None, why it names no file under root)."""
    if not path_field:
        return None, "empty path"
    relative = path_field
    if os.path.isabs(relative):
        relative = os.path.relpath(relative, root)
    relative = Path(os.path.normpath(relative)).as_posix()
    if relative.startswith("../") or relative == "..":
        return None, "path outside audio_root"
    return _strip_extension(relative, extensions), None


class _LabelRow(NamedTuple):
    """A good row of a folder split's `path,labels` CSV."""

    key: str
    labels: tuple[str, ...]
    line: int
    path: str  # the `path` field as written


def _read_folder_labels(
    split: SplitConfig, key_of: Callable[[str], tuple[str | None, str | None]]
) -> tuple[list[_LabelRow], list[dict], dict[str, str]]:
    """The good rows of a folder split's `path,labels` CSV, its bad rows, and the keys of the bad rows
    (key -> "csv:line") to withhold. `key_of` gives a `path` field's key, or why it names no file."""
    rows: list[_LabelRow] = []
    quarantine: list[dict] = []
    withheld: dict[str, str] = {}
    for line, fields, error, text in _csv_records(split.csv):
        if not rows and not quarantine and error is None and [value.lower() for value in fields] == ["path", "labels"]:
            continue
        key, reason = key_of(fields[0])
        if error is not None:
            reason = error
        elif len(fields) not in (1, 2):
            reason = f"expected 'path,labels', got {len(fields)} columns"
        if reason is not None:
            detail = f"{split.csv}:{line}: {reason}: {text if error else _row_text(fields)}"
            quarantine.append(_quarantine_row(key, None, split.name, BAD_CSV_ROW, detail))
            if key is not None:
                withheld.setdefault(key, f"{split.csv}:{line}")
            continue
        labels = _split_labels(fields[1]) if len(fields) == 2 else ()
        rows.append(_LabelRow(key, labels, line, fields[0]))
    return rows, quarantine, withheld


def _folder_clips(
    source: SourceConfig, splits: list[SplitConfig]
) -> tuple[list[_Clip], list[dict], dict[str, str]]:
    """Clips, quarantine rows, and the keys of bad CSV rows to withhold. A key's entries are its regular
    files in sorted order, then its other entries; the first is the clip's file (taken by the CSV rows that
    list the key, bad ones included), each further one is a quarantine row."""
    if not source.audio_root:
        return _listed_folder_clips(source, splits)
    if source.audio_roots:
        raise ManifestError(
            "a folder source takes data.source.audio_root (scanned) or data.source.audio_roots (only the CSVs' "
            f"files are read), not both: got audio_root {source.audio_root!r} and audio_roots {source.audio_roots}"
        )
    root = os.path.abspath(source.audio_root)
    if not os.path.isdir(root):
        raise ManifestError(f"audio_root {root} is not a directory")
    catch_all = [split for split in splits if not split.csv]
    if len(catch_all) > 1:
        names = [split.name for split in catch_all]
        raise ManifestError(f"folder source: at most one split may have no csv, got {names}")
    catch_all_split = catch_all[0] if catch_all else (splits[0] if len(splits) == 1 else None)

    entries, quarantine = _scan_folder(root, source.extensions)
    entries_by_key: dict[str, list[_FolderEntry]] = {}
    for entry in sorted(entries, key=lambda entry: (entry.problem is not None, entry.relative)):
        entries_by_key.setdefault(_strip_extension(entry.relative, source.extensions), []).append(entry)

    clips: list[_Clip] = []
    withheld: dict[str, str] = {}
    listed: dict[str, str] = {}  # key -> name of the first split whose csv lists it (in a good or bad row)
    for split in splits:
        if not split.csv:
            continue
        rows, bad_rows, bad_keys = _read_folder_labels(
            split, lambda path_field: _folder_key(path_field, root, source.extensions)
        )
        quarantine.extend(bad_rows)
        for key, origin in bad_keys.items():
            withheld.setdefault(key, origin)
            listed.setdefault(key, split.name)
        for key, labels, line, _ in rows:
            clip = _Clip(key, split, labels, f"{split.csv}:{line}")
            if key in entries_by_key:
                first = entries_by_key[key][0]
                clip.path, clip.file_problem = os.path.join(root, first.relative), first.problem
            clip.candidates.append(key)
            clip.tried = _tried([os.path.join(root, key)], source.extensions)
            listed.setdefault(key, split.name)
            clips.append(clip)

    for key, key_entries in entries_by_key.items():
        first = key_entries[0]
        split_name = listed.get(key, catch_all_split.name if catch_all_split else None)
        for entry in key_entries[1:]:
            path = os.path.join(root, entry.relative)
            if entry.problem is not None:
                detail = f"{entry.relative}: {entry.problem.what}"
                quarantine.append(_quarantine_row(key, path, split_name, entry.problem.reason, detail))
            else:
                detail = f"{entry.relative}: key {key!r} already taken by {first.relative}"
                quarantine.append(_quarantine_row(key, path, split_name, DUPLICATE_KEY, detail))
        if key in listed:
            continue
        path = os.path.join(root, first.relative)
        if catch_all_split is None:
            if first.problem is not None:
                reason, detail = first.problem.reason, f"{first.relative}: {first.problem.what}"
            else:
                reason = UNLISTED_FILE
                detail = f"{first.relative}: listed in no split's csv and no split takes unlisted files"
            quarantine.append(_quarantine_row(key, path, None, reason, detail))
            continue
        clip = _Clip(key, catch_all_split, (), first.relative)
        clip.path, clip.file_problem = path, first.problem
        clips.append(clip)
    return clips, quarantine, withheld


def _listed_folder_clips(
    source: SourceConfig, splits: list[SplitConfig]
) -> tuple[list[_Clip], list[dict], dict[str, str]]:
    """A folder source without audio_root: only the files the splits' CSVs list are read (nothing is scanned).

    A row's `path` is absolute, or relative to the first of `audio_roots` (in order), then the CSV's own
    folder, that holds it. Its key is the `path` normalised, without an accepted extension, and (an absolute
    path under one of those folders) relative to the first that holds it, so one file under two spellings is
    one key (the leak check and duplicate rule see it)."""
    without_csv = [split.name for split in splits if not split.csv]
    if without_csv:
        raise ManifestError(
            f"folder source without data.source.audio_root: every split needs a csv listing its files (splits "
            f"{without_csv} have none); set audio_root to scan a folder instead"
        )
    roots = [os.path.abspath(root) for root in source.audio_roots]
    not_folders = [root for root in roots if not os.path.isdir(root)]
    if not_folders:
        raise ManifestError(f"data.source.audio_roots: {not_folders} are not directories")
    clips: list[_Clip] = []
    quarantine: list[dict] = []
    withheld: dict[str, str] = {}
    for split in splits:
        csv_folder = os.path.dirname(os.path.abspath(split.csv))
        rows, bad_rows, bad_keys = _read_folder_labels(
            split, lambda path_field: _listed_key(path_field, [*roots, csv_folder], source.extensions)
        )
        quarantine.extend(bad_rows)
        for key, origin in bad_keys.items():
            withheld.setdefault(key, origin)
        for key, labels, line, path_field in rows:
            clip = _Clip(key, split, labels, f"{split.csv}:{line}")
            if os.path.isabs(path_field):
                bases = [os.path.normpath(path_field)]
            else:
                bases = [os.path.normpath(os.path.join(root, path_field)) for root in [*roots, csv_folder]]
            _locate_listed_file(clip, list(dict.fromkeys(bases)), source.extensions)
            clips.append(clip)
    return clips, quarantine, withheld


def _listed_key(path_field: str, roots: list[str], extensions: list[str]) -> tuple[str | None, str | None]:
    if not path_field:
        return None, "empty path"
    normalized = os.path.normpath(path_field)
    if os.path.isabs(normalized):
        root = next((root for root in roots if normalized.startswith(os.path.join(root, ""))), None)
        if root is not None:
            normalized = os.path.relpath(normalized, root)
    return _strip_extension(Path(normalized).as_posix(), extensions), None


def _has_extension(path: str, extensions: Iterable[str]) -> bool:
    return _strip_extension(path, extensions) != path


def _locate_listed_file(clip: _Clip, bases: list[str], extensions: list[str]) -> None:
    """Set the clip's path to the first readable regular file among `bases` (each as written when it has an
    accepted extension, else with each extension added); failing that, to the first that exists as something
    else, with its problem; failing that, say what was tried."""
    names = [base for base in bases if _has_extension(base, extensions)]
    bare = [base for base in bases if not _has_extension(base, extensions)]
    names += [f"{base}.{extension}" for base in bare for extension in extensions]
    unusable: tuple[str, _FileProblem] | None = None
    for name in names:
        found, problem = _path_problem(name)
        if found and problem is None:
            clip.path = name
            return
        if found and unusable is None:
            unusable = (name, problem)
    if unusable is not None:
        clip.path, clip.file_problem = unusable
        return
    clip.candidates.append(names[0])
    exact = [base for base in bases if _has_extension(base, extensions)]
    clip.tried = "; ".join(exact) if exact else _tried(bases, extensions)


def _path_problem(path: str) -> tuple[bool, _FileProblem | None]:
    """(whether anything is at path, why it is not a readable regular file or None). Decided by stat alone:
    nothing is opened, since opening a FIFO blocks."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if os.path.lexists(path):
            return True, _FileProblem(NOT_REGULAR_FILE, f"a symlink whose target cannot be reached ({error.strerror})")
        return False, None
    if stat.S_ISREG(mode):
        return True, _readability(path)
    what = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), f"an entry of mode {stat.filemode(mode)}")
    link = "a symlink to " if os.path.islink(path) else ""
    return True, _FileProblem(NOT_REGULAR_FILE, f"{link}{what}, not a regular file")


def _tried(stems: list[str], extensions: list[str]) -> str:
    """`/root/a.{wav,flac,...}` per stem looked for, and a note when a stem is itself a file whose extension
    is not accepted (the usual cause: a format left out of data.source.extensions)."""
    looked = "; ".join(f"{stem}.{{{','.join(extensions)}}}" for stem in stems)
    present = next((stem for stem in stems if os.path.isfile(stem)), None)
    if present is None:
        return looked
    extension = Path(present).suffix.lstrip(".")
    why = f"its extension {extension!r} is not" if extension else "it has no extension, which is not"
    return f"{looked} ({present} exists, but {why} among data.source.extensions)"


def _resolve_classes(
    source: SourceConfig, clips: list[_Clip], allow_display_names: bool
) -> tuple[list[ClassLabel], dict[str, int]]:
    """The class list and a lookup from accepted label strings to class index."""
    if source.class_labels_csv:
        classes = read_class_labels(source.class_labels_csv)
    else:
        seen = sorted({label for clip in clips for label in clip.labels})
        classes = [ClassLabel(index, label, label) for index, label in enumerate(seen)]
    lookup: dict[str, int] = {}
    if allow_display_names:
        lookup.update({label.display_name: label.index for label in classes})
    lookup.update({label.mid: label.index for label in classes})
    return classes, lookup


def _check_leaks(clips: list[_Clip]) -> None:
    """Refuse a key that is in an evaluation split (mix=False) and in a training split (mix=True)."""
    splits_by_key: dict[str, dict[bool, list[str]]] = {}
    for clip in clips:
        by_mix = splits_by_key.setdefault(clip.key, {True: [], False: []})
        if clip.split.name not in by_mix[clip.split.mix]:
            by_mix[clip.split.mix].append(clip.split.name)
    leaked = sorted(key for key, by_mix in splits_by_key.items() if by_mix[True] and by_mix[False])
    if leaked:
        examples = ", ".join(
            f"{key} (eval: {'/'.join(splits_by_key[key][False])}, train: {'/'.join(splits_by_key[key][True])})"
            for key in leaked[:LEAK_EXAMPLES]
        )
        raise ManifestError(
            f"{len(leaked)} keys are in both an evaluation split (mix=false) and a training split (mix=true): "
            f"{examples}{', ...' if len(leaked) > LEAK_EXAMPLES else ''}"
        )


def _quarantine_row(
    key: str | None, path: str | None, split: str | None, reason: str, detail: str, labels: Iterable[str] | None = None
) -> dict:
    return {
        "key": key, "path": path, "split": split, "stage": STAGE, "reason": reason, "detail": detail,
        "labels": None if labels is None else list(labels),
    }


def _probe(path: str) -> tuple[float | None, int | None]:
    """Duration and sample rate from the file header; (None, None) when the header cannot be read."""
    try:
        info = soundfile.info(path)
    except Exception:  # any header problem just means "unknown" here; decoding reports it later
        return None, None
    if info.samplerate <= 0:
        return None, None
    return info.frames / info.samplerate, int(info.samplerate)


def _resolved_splits(source: SourceConfig) -> list[SplitConfig]:
    splits = list(source.splits)
    if source.kind == "folder" and not splits:
        splits = [SplitConfig(name="train", csv="", mix=True)]
    if not splits:
        raise ManifestError(f"source kind {source.kind!r} needs at least one split")
    names = [split.name for split in splits]
    if len(set(names)) != len(names):
        raise ManifestError(f"split names must be unique, got {names}")
    if source.kind == "audioset":
        missing_csv = [split.name for split in splits if not split.csv]
        if missing_csv:
            raise ManifestError(f"audioset splits need a csv: {missing_csv}")
    for split in splits:
        if split.csv:
            _check_csv_file(split.csv, f"split {split.name!r}: csv")
    if source.class_labels_csv:
        _check_csv_file(source.class_labels_csv, "data.source.class_labels_csv")
    return splits


def _check_csv_file(path: str, what: str) -> None:
    """Refuse a CSV path that is missing or not a regular file (opening a FIFO would block the job)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise ManifestError(f"{what} {path} does not exist ({error.strerror})") from error
    if not stat.S_ISREG(mode):
        kind = next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), "not a regular file")
        raise ManifestError(f"{what} {path} is {kind}, not a regular file")


def build_manifest(
    source: SourceConfig, *, probe_audio: bool = False, probe_workers: int = 8
) -> tuple[pa.Table, pa.Table]:
    """Build the manifest and its quarantine rows from a source.

    With `probe_audio`, duration_s and sample_rate are read from each file's header (soundfile.info,
    in `probe_workers` threads); a header that cannot be read leaves them null. Rows are sorted by split
    order, then key. Raises `ManifestError` for configuration errors and evaluation/training leaks.
    """
    splits = _resolved_splits(source)
    source = replace(source, extensions=list(source.extensions) or decodable_extensions())
    if source.kind == "audioset":
        _check_audioset_root(source)
        clips, quarantine, withheld = _audioset_clips(source, splits)
    elif source.kind == "folder":
        clips, quarantine, withheld = _folder_clips(source, splits)
    else:
        raise ManifestError(f"unknown source kind {source.kind!r} (expected 'audioset' or 'folder')")
    _check_leaks(clips)
    classes, lookup = _resolve_classes(source, clips, allow_display_names=source.kind == "folder")

    if source.kind == "audioset":
        _locate_audioset_files(source, clips)
    unknown_labels = {id(clip): [label for label in clip.labels if label not in lookup] for clip in clips}
    for clip in clips:
        if unknown_labels[id(clip)]:
            withheld.setdefault(clip.key, clip.origin)
    kept: list[tuple[_Clip, list[int]]] = []
    seen_keys: dict[str, str] = {}
    for clip in clips:
        unknown = unknown_labels[id(clip)]
        if unknown:
            detail = f"{clip.origin}: labels not in the class list: {unknown}"
            quarantine.append(_quarantine_row(clip.key, clip.path, clip.split.name, UNKNOWN_LABEL, detail, clip.labels))
            continue
        if clip.key in withheld:
            detail = f"{clip.origin}: key also on the quarantined row {withheld[clip.key]}, so no row of it is written"
            quarantine.append(_quarantine_row(clip.key, clip.path, clip.split.name, DUPLICATE_KEY, detail, clip.labels))
            continue
        if clip.key in seen_keys:
            detail = f"{clip.origin}: key already taken by {seen_keys[clip.key]}"
            quarantine.append(_quarantine_row(clip.key, clip.path, clip.split.name, DUPLICATE_KEY, detail, clip.labels))
            continue
        seen_keys[clip.key] = clip.origin
        kept.append((clip, list(dict.fromkeys(lookup[label] for label in clip.labels))))

    present: list[tuple[_Clip, list[int]]] = []
    for clip, indices in kept:
        if clip.path is None:
            if clip.tried:
                detail = f"{clip.origin}: no audio file {clip.tried}"
            else:
                detail = f"{clip.origin}: no file under {source.audio_root} among: {', '.join(clip.candidates)}"
            path = os.path.join(os.path.abspath(source.audio_root), clip.candidates[0])
            quarantine.append(_quarantine_row(clip.key, path, clip.split.name, MISSING_FILE, detail, clip.labels))
        elif clip.file_problem is not None:
            detail = f"{clip.origin}: {clip.path} is {clip.file_problem.what}"
            reason = clip.file_problem.reason
            quarantine.append(_quarantine_row(clip.key, clip.path, clip.split.name, reason, detail, clip.labels))
        else:
            present.append((clip, indices))

    split_order = {split.name: position for position, split in enumerate(splits)}
    present.sort(key=lambda item: (split_order[item[0].split.name], item[0].key))
    probes: list[tuple[float | None, int | None]]
    if probe_audio:
        with ThreadPoolExecutor(max_workers=max(1, probe_workers)) as pool:
            probes = list(pool.map(_probe, [clip.path for clip, _ in present]))
    else:
        probes = [(None, None)] * len(present)

    manifest = pa.Table.from_pylist(
        [
            {
                "key": clip.key,
                "path": clip.path,
                "split": clip.split.name,
                "mix": clip.split.mix,
                "label_mids": [classes[index].mid for index in indices],
                "label_indices": indices,
                "start_s": clip.start_s,
                "end_s": clip.end_s,
                "duration_s": duration_s,
                "sample_rate": sample_rate,
            }
            for (clip, indices), (duration_s, sample_rate) in zip(present, probes)
        ],
        schema=MANIFEST_SCHEMA,
    )
    classes_json = json.dumps([list(label) for label in classes]).encode()
    manifest = manifest.replace_schema_metadata({CLASSES_METADATA_KEY: classes_json})

    quarantine.sort(key=lambda row: (split_order.get(row["split"], len(splits)), row["key"] or "", row["reason"]))
    quarantine_table = pa.Table.from_pylist(quarantine, schema=QUARANTINE_SCHEMA)
    logger.info(
        "manifest: %d clips, %d quarantined (%s)",
        manifest.num_rows,
        quarantine_table.num_rows,
        dict(Counter(row["reason"] for row in quarantine)),
    )
    return manifest, quarantine_table


def manifest_classes(table: pa.Table) -> list[ClassLabel]:
    """The class list stored in a manifest's schema metadata."""
    metadata = table.schema.metadata or {}
    if CLASSES_METADATA_KEY not in metadata:
        raise ManifestError("manifest has no class list in its metadata")
    return [ClassLabel(int(index), mid, name) for index, mid, name in json.loads(metadata[CLASSES_METADATA_KEY])]


def write_manifest(table: pa.Table, path: str | os.PathLike) -> None:
    """Write a manifest (or quarantine) table as parquet: a temporary name first, then a rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    pq.write_table(table, temporary)
    os.replace(temporary, target)


def read_manifest(path: str | os.PathLike) -> pa.Table:
    """Read a manifest written by `write_manifest`; refuses a table without the manifest columns."""
    table = pq.read_table(path)
    missing = [name for name in MANIFEST_SCHEMA.names if name not in table.schema.names]
    if missing:
        raise ManifestError(f"{path}: not a manifest, missing columns {missing}")
    return table
