"""Manifest sources: the `Source` interface every `data.source.kind` implements, and `SOURCES`, the registry
from kind to its class. A new kind is one module in this package plus its line in `SOURCES`
(and its name in `SourceConfig.kind`); pipeline.manifest dispatches through the registry only."""

from __future__ import annotations

from typing import Protocol

from pipeline.clips import Clip, SourceClips
from pipeline.config import SourceConfig, SplitConfig
from pipeline.csv_rows import ClassLabel
from pipeline.sources.audioset import AudioSetSource
from pipeline.sources.folder import FolderSource


class Source(Protocol):
    """One kind of source, made from its `SourceConfig` (with `extensions` already resolved)."""

    # Whether labels may be display names of the class list as well as MIDs.
    display_names: bool

    def __init__(self, config: SourceConfig) -> None: ...

    def default_splits(self) -> list[SplitConfig]:
        """The splits when none are configured (empty: the kind needs configured splits)."""

    def check_splits(self, splits: list[SplitConfig]) -> None:
        """Raise `ManifestError` for splits this kind cannot read."""

    def clips(self, splits: list[SplitConfig]) -> SourceClips:
        """Every clip candidate of the splits (in split order, then CSV order), the quarantine rows found while
        reading them, and the keys to withhold."""

    def classes(self, clips: list[Clip]) -> list[ClassLabel]:
        """The class list: the configured `class_labels_csv`, or the labels the clips carry."""

    def locate(self, clips: list[Clip]) -> None:
        """Set each clip's path (or file problem / candidates tried); runs after the leak check."""


SOURCES: dict[str, type[Source]] = {"audioset": AudioSetSource, "folder": FolderSource}
