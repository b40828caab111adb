"""The AudioSet source: segment CSVs (`YTID, start, end, "mid,mid"`) per split and an audio root where
each segment's file is found by `SourceConfig.filename_pattern`.

AudioSet file names come from `SourceConfig.filename_pattern` formatted with `{ytid}`, `{split}`, `{ext}`,
`{start}` and `{end}`. `{start}`/`{end}` without a format spec are integer milliseconds (`30000`); with a
spec they format as floats, so `{start:.3f}` gives `30.000`. `{ext}` is tried in `extensions` order and the
first candidate that is a readable regular file wins (failing that, the first that exists as anything else
gives the reason). The audio root is listed once (top level and one level of subfolders); a name not found
at the top level is looked up by base name in the subfolders (first in sorted order wins).
"""

from __future__ import annotations

import logging
import os

from pipeline.clips import BAD_CSV_ROW, Clip, FileProblem, ManifestError, SourceClips, quarantine_row
from pipeline.config import SourceConfig, SplitConfig
from pipeline.csv_rows import ClassLabel, class_list, read_segments_csv
from pipeline.file_checks import entry_problem, follows_to, readability

logger = logging.getLogger(__name__)


class AudioSetSource:
    """`data.source.kind: audioset`: every split needs a segments CSV; labels are MIDs of the class list."""

    display_names = False

    def __init__(self, config: SourceConfig) -> None:
        self.config = config

    def default_splits(self) -> list[SplitConfig]:
        return []

    def check_splits(self, splits: list[SplitConfig]) -> None:
        missing_csv = [split.name for split in splits if not split.csv]
        if missing_csv:
            raise ManifestError(f"audioset splits need a csv: {missing_csv}")

    def clips(self, splits: list[SplitConfig]) -> SourceClips:
        _check_audioset_root(self.config)
        return _audioset_clips(self.config, splits)

    def classes(self, clips: list[Clip]) -> list[ClassLabel]:
        return class_list(self.config.class_labels_csv, (label for clip in clips for label in clip.labels))

    def locate(self, clips: list[Clip]) -> None:
        _locate_audioset_files(self.config, clips)


class _Seconds(float):
    """A time that formats as integer milliseconds by default and as a float with an explicit spec."""

    def __format__(self, spec: str) -> str:
        if not spec:
            return str(round(float(self) * 1000))
        return float.__format__(self, spec)


class _AudioIndex:
    """The entries of an audio root, listed once: top level by name, one subfolder level by relative path
    and by base name. Regular files and entries that are something else (directories, FIFOs, sockets, broken
    links) are kept apart, so a name that exists only as the latter is reported as such."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.relative: set[str] = set()
        self.by_basename: dict[str, str] = {}
        self.irregular: dict[str, FileProblem] = {}  # relative name -> what it is
        self.irregular_by_basename: dict[str, str] = {}
        top = sorted(os.scandir(root), key=lambda entry: entry.name)
        for entry in top:
            self._add(entry, entry.name)
        for entry in top:
            if follows_to(entry.is_dir):
                try:
                    children = sorted(os.scandir(entry.path), key=lambda child: child.name)
                except OSError as error:
                    logger.warning("cannot list %s (%s): its clips will be missing_file", entry.path, error)
                    continue
                for child in children:
                    self._add(child, f"{entry.name}/{child.name}")

    def _add(self, entry: os.DirEntry, relative: str) -> None:
        nested = "/" in relative
        if follows_to(entry.is_file):
            self.relative.add(relative)
            if nested:
                self.by_basename.setdefault(entry.name, relative)
            return
        problem = entry_problem(entry)
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
) -> tuple[list[Clip], list[dict], dict[str, str]]:
    """Clips, bad-row quarantine rows, and the keys of bad rows (key -> "csv:line") to withhold."""
    clips: list[Clip] = []
    quarantine: list[dict] = []
    withheld: dict[str, str] = {}
    for split in splits:
        segments, bad_rows = read_segments_csv(split.csv)
        for bad in bad_rows:
            detail = f"{split.csv}:{bad.line}: {bad.reason}: {bad.text}"
            quarantine.append(quarantine_row(bad.key, None, split.name, BAD_CSV_ROW, detail))
            if bad.key is not None:
                withheld.setdefault(bad.key, f"{split.csv}:{bad.line}")
        for segment in segments:
            clip = Clip(segment.ytid, split, segment.label_mids, f"{split.csv}:{segment.line}")
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


def _locate_audioset_files(source: SourceConfig, clips: list[Clip]) -> None:
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
        unusable: tuple[str, FileProblem] | None = None
        for extension in extensions:
            name = source.filename_pattern.format(ext=extension, **fields)
            clip.candidates.append(name)
            found = index.find(name)
            if found is not None:
                path = os.path.join(root, found)
                problem = readability(path)
                if problem is None:
                    clip.path = path
                    break
                unusable = unusable or (path, problem)
            irregular = index.find_irregular(name)
            if irregular is not None and unusable is None:
                unusable = (os.path.join(root, irregular), index.irregular[irregular])
        if clip.path is None and unusable is not None:
            clip.path, clip.file_problem = unusable
