"""Where the shards of a set are: `ShardSource` resolves a shard location (a folder or URL holding
`dataset.json`, a glob / brace pattern of shard names in one, or the json itself) into the set's
`dataset.json`, the shard URLs of a split and epoch, and their sample counts (`index.parquet`, or a scan of
the tar headers when there is no index), and refuses a set whose shards were written by another plan
(`MixedShardSetError`). `open_shard` opens one shard for reading, locally or at any fsspec URL.
"""

from __future__ import annotations

import glob as globbing
import io
import logging
from collections import Counter
from collections.abc import Sequence
from urllib.parse import urlparse

import braceexpand
import fsspec
from webdataset.gopen import gopen, gopen_schemes

from pipeline.plan import parse_shard_name
from pipeline.shards import ShardFormatError, iter_shard_samples
from pipeline.shardset import DATASET_INFO, INDEX_TABLE, read_dataset_info, split_location
from pipeline.storage import locate

logger = logging.getLogger(__name__)


def _is_url(text: str) -> bool:
    return "://" in text or text.startswith("pipe:")


def open_shard(url: str) -> io.IOBase:
    """A readable byte stream of a shard: local paths and WebDataset's URL schemes via its `gopen`,
    any other URL (s3://, memory://, ...) via fsspec."""
    scheme = urlparse(url).scheme
    if scheme in ("", "file") or scheme in gopen_schemes:
        return gopen(url, "rb")
    return fsspec.open(url, "rb").open()


def count_shard_samples(url: str) -> int:
    """Samples (distinct consecutive keys) in a shard, read from its tar headers; a broken tail ends the count."""
    count = 0

    def tally(key: str) -> bool:
        nonlocal count
        count += 1
        return False  # counted, not read

    stream = open_shard(url)
    try:
        for _ in iter_shard_samples(stream, select=tally, keep_bad=True):
            pass
    except (ShardFormatError, OSError) as error:
        logger.warning("shard %s is unreadable after %d samples while counting: %s", url, count, error)
    finally:
        stream.close()
    return count


class MixedShardSetError(ValueError):
    """Shards of a set were written by another plan than the one its dataset.json describes."""


class ShardSource:
    """A shard set: its `dataset.json`, the shard URLs of a split and epoch, and their sample counts.

    `location` is a local folder or URL prefix holding `dataset.json`, `index.parquet` and the shards, or a
    glob / brace pattern of shard names in such a folder (it restricts which shards are used), or the path
    of `dataset.json` itself.

    `sample_counts` refuses (MixedShardSetError) a shard whose index rows carry another fingerprint than
    dataset.json, and, in an index that carries fingerprints, a shard it does not list that holds samples.
    An index without fingerprints (sets written before they existed, hand-made sets) is not checked.
    """

    def __init__(self, location: str):
        self.location = str(location)
        self.root, self.pattern = split_location(self.location)
        self._resolved = locate(self.root)
        self.info = read_dataset_info(self.location)
        self._counts: dict[str, int] | None = None
        self._fingerprints: dict[str, set] = {}
        self._allowed = self._pattern_names() if self.pattern is not None else None

    @property
    def classes(self) -> list[dict]:
        return list(self.info.get("classes", []))

    def split(self, name: str) -> dict:
        splits = self.info["splits"]
        if name not in splits:
            raise ValueError(f"split {name!r} is not in {self.root}/{DATASET_INFO} (splits: {sorted(splits)})")
        return splits[name]

    def mixture_epoch(self, split: str, epoch: int) -> int:
        """Training epoch e reads mixture epoch e mod K of a mix split; other splits have epoch 0 only."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        entry = self.split(split)
        if not entry.get("mix", False):
            return 0
        epochs = int(self.info.get("mixture_epochs") or len(entry["shards_per_epoch"]))
        return epoch % epochs

    def shard_names(self, split: str, epoch: int) -> list[str]:
        """Names of the split's shards read in training epoch `epoch`, in dataset.json order."""
        mixture_epoch = self.mixture_epoch(split, epoch)
        per_epoch = self.split(split).get("shards_per_epoch", {})
        names = per_epoch.get(str(mixture_epoch))
        if names is None:
            raise ValueError(
                f"{self.root}/{DATASET_INFO}: split {split!r} lists no shards for mixture epoch {mixture_epoch} "
                f"(has {sorted(per_epoch)})"
            )
        for name in names:
            parse_shard_name(name)
        if self._allowed is not None:
            names = [name for name in names if name in self._allowed]
        if not names:
            raise ValueError(f"no shards of split {split!r}, mixture epoch {mixture_epoch} in {self.location!r}")
        return list(names)

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def sample_counts(self, names: Sequence[str]) -> list[int]:
        """Samples per shard, from `index.parquet` when present, else by reading the shards' tar headers."""
        if self._counts is None:
            self._counts = self._index_counts()
        missing = [name for name in names if name not in self._counts]
        if missing:
            logger.warning(
                "%d shards are not in %s/%s: counting their samples by reading them",
                len(missing), self.root, INDEX_TABLE,
            )
            self._counts.update({name: count_shard_samples(self.url(name)) for name in missing})
        self._check_fingerprints(names, missing)
        return [self._counts[name] for name in names]

    def _index_counts(self) -> dict[str, int]:
        if not self._resolved.exists(INDEX_TABLE):
            return {}
        fingerprinted = "fingerprint" in self._resolved.read_schema(INDEX_TABLE).names
        columns = ["shard", "fingerprint"] if fingerprinted else ["shard"]
        table = self._resolved.read_table(INDEX_TABLE, columns=columns)
        shard_column = table.column("shard").to_pylist()
        if fingerprinted:
            for name, fingerprint in zip(shard_column, table.column("fingerprint").to_pylist()):
                self._fingerprints.setdefault(name, set()).add(fingerprint)
            if all(found == {None} for found in self._fingerprints.values()):
                self._fingerprints = {}
        return dict(Counter(shard_column))

    def _check_fingerprints(self, names: Sequence[str], unindexed: Sequence[str]) -> None:
        if not self._fingerprints:
            return
        expected = self.info.get("fingerprint")
        foreign = {
            name: "index rows of fingerprint " + ", ".join(sorted(str(f)[:12] for f in self._fingerprints[name]))
            for name in names
            if self._fingerprints.get(name, {expected}) != {expected}
        }
        foreign.update({name: "not in the index but holds samples" for name in unindexed if self._counts.get(name)})
        if foreign:
            shown = "; ".join(f"{name}: {why}" for name, why in sorted(foreign.items())[:5])
            raise MixedShardSetError(
                f"{self.root}: {len(foreign)} shards were not written by the plan of {DATASET_INFO} (fingerprint "
                f"{str(expected)[:12]}): {shown}{'; ...' if len(foreign) > 5 else ''}. The set mixes runs: rebuild "
                "it (sslam preprocess --overwrite)"
            )

    def _pattern_names(self) -> set[str]:
        assert self.pattern is not None
        names: set[str] = set()
        for expanded in braceexpand.braceexpand(self.pattern):
            if set("*?[") & set(expanded):
                if _is_url(self.root):
                    filesystem, path = fsspec.core.url_to_fs(f"{self.root}/{expanded}")
                    names.update(p.rsplit("/", 1)[-1] for p in filesystem.glob(path))
                else:
                    names.update(p.rsplit("/", 1)[-1] for p in globbing.glob(f"{self.root}/{expanded}"))
            else:
                names.add(expanded)
        return names
