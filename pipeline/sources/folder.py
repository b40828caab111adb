"""The folder source: a folder of audio, scanned, or the files that `path,labels` CSVs list under several
roots.

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
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

from pipeline.clips import (
    BAD_CSV_ROW, BAD_FILE_NAME, DUPLICATE_KEY, NOT_REGULAR_FILE, UNLISTED_FILE, UNREADABLE_FILE, Clip,
    FileProblem, ManifestError, SourceClips, quarantine_row,
)
from pipeline.config import SourceConfig, SplitConfig
from pipeline.csv_rows import SURROGATES, ClassLabel, class_list, csv_records, row_text, split_labels
from pipeline.file_checks import entry_problem, path_problem


class FolderSource:
    """`data.source.kind: folder`: no splits configured means one split "train" (mix=True); labels are MIDs or
    display names of the class list. Files are found while the clips are read (`locate` has nothing left)."""

    display_names = True

    def __init__(self, config: SourceConfig) -> None:
        self.config = config

    def default_splits(self) -> list[SplitConfig]:
        return [SplitConfig(name="train", csv="", mix=True)]

    def check_splits(self, splits: list[SplitConfig]) -> None:
        """The split rules of a folder source depend on its roots; `clips` checks them."""

    def clips(self, splits: list[SplitConfig]) -> SourceClips:
        return _folder_clips(self.config, splits)

    def classes(self, clips: list[Clip]) -> list[ClassLabel]:
        return class_list(self.config.class_labels_csv, (label for clip in clips for label in clip.labels))

    def locate(self, clips: list[Clip]) -> None:
        """Nothing to do: `clips` found each clip's file."""


class _FolderEntry(NamedTuple):
    relative: str  # posix path under the root
    problem: FileProblem | None  # None: a readable regular file


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
            unlistable.append(quarantine_row(None, directory, None, UNREADABLE_FILE, detail))
            continue
        for entry in entries:
            is_directory = entry.is_dir(follow_symlinks=False)
            if is_directory:
                pending.append(entry.path)
            if "." in entry.name and entry.name.rsplit(".", 1)[-1].lower() in wanted:
                problem = FileProblem(NOT_REGULAR_FILE, "a directory, not a regular file") if is_directory else (
                    entry_problem(entry)
                )
                relative = Path(os.path.relpath(entry.path, root)).as_posix()
                if SURROGATES.search(relative):
                    relative = SURROGATES.sub("\ufffd", relative)
                    problem = FileProblem(BAD_FILE_NAME, "a path that is not valid UTF-8")
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
    for line, fields, error, text in csv_records(split.csv):
        if not rows and not quarantine and error is None and [value.lower() for value in fields] == ["path", "labels"]:
            continue
        key, reason = key_of(fields[0])
        if error is not None:
            reason = error
        elif len(fields) not in (1, 2):
            reason = f"expected 'path,labels', got {len(fields)} columns"
        if reason is not None:
            detail = f"{split.csv}:{line}: {reason}: {text if error else row_text(fields)}"
            quarantine.append(quarantine_row(key, None, split.name, BAD_CSV_ROW, detail))
            if key is not None:
                withheld.setdefault(key, f"{split.csv}:{line}")
            continue
        labels = split_labels(fields[1]) if len(fields) == 2 else ()
        rows.append(_LabelRow(key, labels, line, fields[0]))
    return rows, quarantine, withheld


def _folder_clips(
    source: SourceConfig, splits: list[SplitConfig]
) -> tuple[list[Clip], list[dict], dict[str, str]]:
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

    clips: list[Clip] = []
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
            clip = Clip(key, split, labels, f"{split.csv}:{line}")
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
                quarantine.append(quarantine_row(key, path, split_name, entry.problem.reason, detail))
            else:
                detail = f"{entry.relative}: key {key!r} already taken by {first.relative}"
                quarantine.append(quarantine_row(key, path, split_name, DUPLICATE_KEY, detail))
        if key in listed:
            continue
        path = os.path.join(root, first.relative)
        if catch_all_split is None:
            if first.problem is not None:
                reason, detail = first.problem.reason, f"{first.relative}: {first.problem.what}"
            else:
                reason = UNLISTED_FILE
                detail = f"{first.relative}: listed in no split's csv and no split takes unlisted files"
            quarantine.append(quarantine_row(key, path, None, reason, detail))
            continue
        clip = Clip(key, catch_all_split, (), first.relative)
        clip.path, clip.file_problem = path, first.problem
        clips.append(clip)
    return clips, quarantine, withheld


def _listed_folder_clips(
    source: SourceConfig, splits: list[SplitConfig]
) -> tuple[list[Clip], list[dict], dict[str, str]]:
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
    clips: list[Clip] = []
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
            clip = Clip(key, split, labels, f"{split.csv}:{line}")
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


def _locate_listed_file(clip: Clip, bases: list[str], extensions: list[str]) -> None:
    """Set the clip's path to the first readable regular file among `bases` (each as written when it has an
    accepted extension, else with each extension added); failing that, to the first that exists as something
    else, with its problem; failing that, say what was tried."""
    names = [base for base in bases if _has_extension(base, extensions)]
    bare = [base for base in bases if not _has_extension(base, extensions)]
    names += [f"{base}.{extension}" for base in bare for extension in extensions]
    unusable: tuple[str, FileProblem] | None = None
    for name in names:
        found, problem = path_problem(name)
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
