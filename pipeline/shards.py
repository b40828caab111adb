"""Shard samples on disk: the sample schema (encode/decode with validation), the tar writer, the index.

A mixture-group sample (DESIGN.md, "Mixture groups") has the WebDataset key
`{split}-e{epoch:02d}-{shard:06d}-{sample:06d}` (`pipeline.plan.sample_key`) and members

* `c0.npy … c{G-1}.npy`: the clips' raw fbank, float16 (T, F), `np.save` format;
* `m0.npy … m{G-1}.npy`: mixture i (primary clip i), same format; all present or all absent
  (absent when mixtures are not materialised: the loader forms log-mel max mixtures itself);
* `json` (UTF-8): {"clips": [clip keys], "labels": [[class index, ...] per clip], "filler": [bool per clip],
  "mixtures": [{"primary": i, "partner": (i - 1) % G, "nomix": [[i1, i1 + r], [i2, i2 + r]],
  "domain": "logmel_max" | "waveform_sum"} per clip], "seed": int, "r": int}, plus optionally
  "frames": [valid frame count per clip] (the rows before a short clip's zero padding; the loader serves
  them as the batch key `valid_frames`, for `mix_padding: silence` and `model.padding: aware`).

An evaluation sample has `c0.npy` and `json` {"clips": [key], "labels": [[...]]} (optionally "frames").
`decode_sample` checks all of this and raises `ShardFormatError`, which the loader counts and skips.
Unknown JSON fields are ignored (room for additions); unknown members are errors.

The one reader of the tar format is `iter_shard_samples` (validation reads through it, and so does the
loader). Shards are published by `pipeline.storage` (visible only when complete). Tar bytes are deterministic:
sorted member names, mtime 0, uid/gid 0, empty owner names, mode 0o644, PAX format, so equal input gives
byte-identical shards.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.mixers import MIXERS
from pipeline.plan import parse_shard_name

logger = logging.getLogger(__name__)

META_MEMBER = "json"
CLIP_MEMBER = re.compile(r"c(0|[1-9][0-9]*)\.npy")
MIXTURE_MEMBER = re.compile(r"m(0|[1-9][0-9]*)\.npy")
SAMPLE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# A float16 (1024, 128) array is 256 KiB; anything far larger in a shard is not ours.
DEFAULT_MAX_MEMBER_BYTES = 64 * 1024 * 1024
# A tar archive ends with two zero blocks.
END_MARKER_BYTES = 2 * tarfile.BLOCKSIZE
FEATURE_DTYPE = np.float16

INDEX_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("epoch", pa.int32(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("clips", pa.list_(pa.string()), nullable=False),
        pa.field("labels", pa.list_(pa.list_(pa.int32())), nullable=False),
        pa.field("filler", pa.list_(pa.bool_()), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        # The dataset fingerprint of the run that wrote the shard (null in sets written without one).
        pa.field("fingerprint", pa.string()),
    ]
)


class ShardFormatError(ValueError):
    """A shard or sample that does not follow the schema of this module."""


# ---------------------------------------------------------------------------------------------------------
# Sample schema


def encode_array(array: Any) -> bytes:
    """`np.save` bytes of a 2-D array cast to float16 (torch CPU tensors are accepted)."""
    values = np.asarray(array)
    if values.ndim != 2 or not np.issubdtype(values.dtype, np.floating):
        raise ValueError(f"features must be a 2-D float array, got {values.dtype} {values.shape}")
    values = np.ascontiguousarray(values, dtype=FEATURE_DTYPE)
    if not np.isfinite(values).all():
        raise ValueError("features hold non-finite values (after the cast to float16)")
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return buffer.getvalue()


def decode_array(data: bytes, name: str, expected_shape: tuple[int, int] | None = None) -> np.ndarray:
    """The float16 2-D array of one `.npy` member; ShardFormatError when it is anything else."""
    try:
        values = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as error:  # np.load raises ValueError, OSError, EOFError... on bad bytes
        raise ShardFormatError(f"{name}: not a readable .npy array ({error})") from error
    if values.dtype != FEATURE_DTYPE:
        raise ShardFormatError(f"{name}: dtype {values.dtype}, expected float16")
    if values.ndim != 2:
        raise ShardFormatError(f"{name}: shape {values.shape}, expected 2-D (T, F)")
    if expected_shape is not None and tuple(values.shape) != tuple(expected_shape):
        raise ShardFormatError(f"{name}: shape {values.shape}, expected {tuple(expected_shape)}")
    if not np.isfinite(values).all():
        raise ShardFormatError(f"{name}: non-finite values")
    return values


def _meta_bytes(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")


def encode_sample(
    clips: Sequence[Any],
    clip_keys: Sequence[str],
    labels: Sequence[Sequence[int]],
    filler: Sequence[bool],
    windows: Sequence[tuple[int, int]],
    rows: int,
    domain: str,
    seed: int,
    mixtures: Sequence[Any] | None = None,
    frames: Sequence[int] | None = None,
) -> dict[str, bytes]:
    """Members of a mixture-group sample; `windows[i]` = (i1, i2) of mixture i, `rows` = r.

    `mixtures` (mixture i has primary clip i) is None when mixtures are not materialised. The result
    passes `decode_sample`.
    """
    group_size = len(clips)
    meta: dict[str, Any] = {
        "clips": list(clip_keys),
        "labels": [[int(label) for label in clip_labels] for clip_labels in labels],
        "filler": [bool(flag) for flag in filler],
        "mixtures": [
            {
                "primary": i,
                "partner": (i - 1) % group_size,
                "nomix": [[int(i1), int(i1) + rows], [int(i2), int(i2) + rows]],
                "domain": domain,
            }
            for i, (i1, i2) in enumerate(windows)
        ],
        "seed": int(seed),
        "r": int(rows),
    }
    if frames is not None:
        meta["frames"] = [int(count) for count in frames]
    members = {f"c{i}.npy": encode_array(clip) for i, clip in enumerate(clips)}
    if mixtures is not None:
        members.update({f"m{i}.npy": encode_array(mixture) for i, mixture in enumerate(mixtures)})
    members[META_MEMBER] = _meta_bytes(meta)
    decode_sample(members)
    return members


def encode_eval_sample(
    clip: Any, clip_key: str, labels: Sequence[int], frames: int | None = None
) -> dict[str, bytes]:
    """Members of an evaluation sample: `c0.npy` + `json`."""
    meta: dict[str, Any] = {"clips": [clip_key], "labels": [[int(label) for label in labels]]}
    if frames is not None:
        meta["frames"] = [int(frames)]
    members = {"c0.npy": encode_array(clip), META_MEMBER: _meta_bytes(meta)}
    decode_sample(members)
    return members


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int_list(value: Any, field: str, length: int, minimum: int = 0) -> None:
    if not isinstance(value, list) or len(value) != length or not all(_is_int(v) and v >= minimum for v in value):
        raise ShardFormatError(f"json: {field!r} must be a list of {length} integers >= {minimum}")


def parse_meta(data: bytes, time_patches: int | None = None) -> dict:
    """Parse and validate the `json` member (no array checks); ShardFormatError when malformed."""
    try:
        meta = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShardFormatError(f"json: not UTF-8 JSON ({error})") from error
    if not isinstance(meta, dict):
        raise ShardFormatError("json: top level must be an object")
    clip_keys = meta.get("clips")
    if not isinstance(clip_keys, list) or not clip_keys or not all(isinstance(k, str) and k for k in clip_keys):
        raise ShardFormatError("json: 'clips' must be a non-empty list of clip keys")
    count = len(clip_keys)
    labels = meta.get("labels")
    if not isinstance(labels, list) or len(labels) != count:
        raise ShardFormatError(f"json: 'labels' must hold one list per clip ({count})")
    for clip_labels in labels:
        if not isinstance(clip_labels, list) or not all(_is_int(v) and v >= 0 for v in clip_labels):
            raise ShardFormatError("json: 'labels' entries must be lists of class indices >= 0")
    if "frames" in meta:
        _check_int_list(meta["frames"], "frames", count, minimum=1)
    if "mixtures" not in meta:
        if count != 1:
            raise ShardFormatError(f"json: an evaluation sample holds one clip, got {count}")
        return meta
    _validate_group_meta(meta, count, time_patches)
    return meta


def _validate_group_meta(meta: dict, count: int, time_patches: int | None) -> None:
    if count < 2:
        raise ShardFormatError(f"json: a mixture group needs at least 2 clips, got {count}")
    filler = meta.get("filler")
    if not isinstance(filler, list) or len(filler) != count or not all(isinstance(f, bool) for f in filler):
        raise ShardFormatError(f"json: 'filler' must be a list of {count} booleans")
    rows = meta.get("r")
    if not _is_int(rows) or rows < 1:
        raise ShardFormatError("json: 'r' must be an integer >= 1")
    if not _is_int(meta.get("seed")):
        raise ShardFormatError("json: 'seed' must be an integer")
    mixtures = meta.get("mixtures")
    if not isinstance(mixtures, list) or len(mixtures) != count:
        raise ShardFormatError(f"json: 'mixtures' must hold one entry per clip ({count})")
    for i, mixture in enumerate(mixtures):
        if not isinstance(mixture, dict):
            raise ShardFormatError(f"json: mixture {i} must be an object")
        if mixture.get("primary") != i or mixture.get("partner") != (i - 1) % count:
            raise ShardFormatError(f"json: mixture {i} must have primary {i} and partner {(i - 1) % count}")
        if mixture.get("domain") not in MIXERS:
            raise ShardFormatError(f"json: mixture {i} domain must be one of {tuple(MIXERS)}")
        nomix = mixture.get("nomix")
        if (
            not isinstance(nomix, list)
            or len(nomix) != 2
            or not all(isinstance(w, list) and len(w) == 2 and all(_is_int(v) for v in w) for w in nomix)
        ):
            raise ShardFormatError(f"json: mixture {i} 'nomix' must be [[i1, i1 + r], [i2, i2 + r]]")
        (a, b), (c, d) = nomix
        upper = time_patches if time_patches is not None else math.inf
        if not (0 <= a and b - a == rows and b <= c and d - c == rows and d <= upper):
            raise ShardFormatError(
                f"json: mixture {i} windows {nomix} are not two ordered, non-overlapping windows of r={rows} rows"
                + (f" inside [0, {time_patches})" if time_patches is not None else "")
            )


def decode_sample(
    members: Mapping[str, bytes],
    expected_shape: tuple[int, int] | None = None,
    group_size: int | None = None,
    time_patches: int | None = None,
) -> dict[str, Any]:
    """Validate and decode one sample's members (keys starting with "__", WebDataset's, are ignored).

    Returns {"meta": parsed json, "clips": [float16 (T, F)], "mixtures": [float16 (T, F)] or []}.
    `expected_shape` (T, F), `group_size` and `time_patches` add checks when given.
    """
    names = {name for name in members if not name.startswith("__")}
    if META_MEMBER not in names:
        raise ShardFormatError("sample has no 'json' member")
    meta = parse_meta(members[META_MEMBER], time_patches)
    count = len(meta["clips"])
    is_group = "mixtures" in meta
    if group_size is not None and is_group and count != group_size:
        raise ShardFormatError(f"sample holds a group of {count} clips, expected {group_size}")
    clip_names = {f"c{i}.npy" for i in range(count)}
    mixture_names = {f"m{i}.npy" for i in range(count)} if is_group else set()
    present_mixtures = names & mixture_names
    unexpected = names - clip_names - mixture_names - {META_MEMBER}
    if unexpected:
        raise ShardFormatError(f"unexpected members {sorted(unexpected)}")
    if clip_names - names:
        raise ShardFormatError(f"missing clip members {sorted(clip_names - names)}")
    if present_mixtures and present_mixtures != mixture_names:
        raise ShardFormatError(f"mixture members must be all or none, missing {sorted(mixture_names - names)}")
    if is_group and not present_mixtures:
        unformable = sorted({m["domain"] for m in meta["mixtures"] if not MIXERS[m["domain"]].loader_can_form})
        if unformable:
            raise ShardFormatError(f"{', '.join(unformable)} mixtures must be materialised (m*.npy members missing)")
    clips = [decode_array(members[f"c{i}.npy"], f"c{i}.npy", expected_shape) for i in range(count)]
    shape = clips[0].shape
    for i, clip in enumerate(clips):
        if clip.shape != shape:
            raise ShardFormatError(f"c{i}.npy: shape {clip.shape} differs from c0.npy {shape}")
    mixtures = []
    if present_mixtures:
        mixtures = [decode_array(members[f"m{i}.npy"], f"m{i}.npy", shape) for i in range(count)]
    if "frames" in meta and any(frames > shape[0] for frames in meta["frames"]):
        raise ShardFormatError(f"json: 'frames' exceed the {shape[0]} rows of the clips")
    return {"meta": meta, "clips": clips, "mixtures": mixtures}


# ---------------------------------------------------------------------------------------------------------
# Tar bytes


def shard_bytes(samples: Sequence[tuple[str, Mapping[str, bytes]]]) -> bytes:
    """Deterministic tar bytes: samples in the given order, members `{key}.{member}` in sorted order."""
    buffer = io.BytesIO()
    seen: set[str] = set()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for key, members in samples:
            if not SAMPLE_KEY.fullmatch(key):
                raise ValueError(f"sample key {key!r} may only hold letters, digits, '_' and '-'")
            if key in seen:
                raise ValueError(f"sample key {key!r} appears twice in one shard")
            seen.add(key)
            for member in sorted(members):
                storage.check_plain_name(member)
                data = bytes(members[member])
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                info.type = tarfile.REGTYPE
                archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class _TailStream:
    """A read-only view of a stream that remembers the last bytes read, so the reader can look at the bytes
    after the last member (tarfile's stream mode cannot seek back to them)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.position = 0  # bytes read so far
        self.tail = bytearray()  # at least the last `_TAIL_BYTES` of them (all of them while fewer)

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.position += len(data)
        self.tail += data
        if len(self.tail) > 2 * _TAIL_BYTES:
            del self.tail[: len(self.tail) - _TAIL_BYTES]  # cheap: a bytearray drops its head in place
        return data

    def bytes_at(self, offset: int, size: int) -> bytes:
        """`size` bytes from `offset` on (reading on as needed), fewer at the end of the stream."""
        while self.position < offset + size and self.read(size):
            pass
        start = offset - (self.position - len(self.tail))
        if start < 0:
            raise ValueError(f"offset {offset} is no longer held")
        return bytes(self.tail[start : start + size])


# Enough for tarfile's read-ahead (one 10 KiB record past the end-of-archive header) and the end marker.
_TAIL_BYTES = 32 * 1024


def _member_key(name: str) -> str:
    """The sample a member belongs to: its name up to the first '.' after the last separator (WebDataset's
    grouping, so a damaged name still groups with its sample), the whole name when there is none."""
    match = _MEMBER_NAME.fullmatch(name)
    return match.group(1) if match else name


# A member name is `{key}.{member}`; the key is everything before the first '.' of the last path part.
_MEMBER_NAME = re.compile(r"((?:.*[/\\])?[^/\\.]*)\.[^/\\]*", re.DOTALL)


def _check_member(info: tarfile.TarInfo, max_member_bytes: int) -> str:
    """The member part of a plain `{key}.{member}` regular file of at most `max_member_bytes`."""
    name = info.name
    if name.startswith("/") or name.startswith("\\"):
        raise ShardFormatError(f"member {name!r} has an absolute path")
    if ".." in re.split(r"[/\\]", name):
        raise ShardFormatError(f"member {name!r} leaves the archive ('..')")
    if "/" in name or "\\" in name:
        raise ShardFormatError(f"member {name!r} is inside a directory; shards are flat")
    if not info.isreg():
        raise ShardFormatError(f"member {name!r} is not a regular file")
    if info.size > max_member_bytes:
        raise ShardFormatError(f"member {name!r} has {info.size} bytes, more than the limit {max_member_bytes}")
    key, _, member = name.partition(".")
    if not key or not member:
        raise ShardFormatError(f"member {name!r} is not of the form key.member")
    return member


def iter_shard_samples(
    stream: BinaryIO,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    select: Callable[[str], bool] | None = None,
    keep_bad: bool = False,
) -> Iterator[tuple[str, dict[str, bytes] | ShardFormatError]]:
    """(key, {member: bytes}) of every sample of a shard stream, in tar order: the one reader of the format.

    Member names must be `{key}.{member}` plain names (no directories, no '..', not absolute), regular files
    no larger than `max_member_bytes`, each once; a sample's members must be contiguous. A sample that breaks
    these rules is bad: its error is raised, or, with `keep_bad`, yielded as (key, ShardFormatError) in its
    place, and reading goes on (the member's header is intact; its data is skipped unread). A tar that cannot
    be read on, or lacks its end-of-archive marker (so a truncated shard is an error, not fewer samples),
    raises ShardFormatError after the samples before the damage. With `select` (called once per sample, in
    order), only the samples whose key it accepts are read, checked and yielded.
    """
    source = _TailStream(stream)
    key: str | None = None
    members: dict[str, bytes] = {}
    problem: ShardFormatError | None = None
    finished: set[str] = set()
    taken = False
    try:
        with tarfile.open(fileobj=source, mode="r|") as archive:
            for info in archive:
                name = _member_key(info.name)
                if name != key:
                    if taken:
                        yield key, problem or members
                    if key is not None:
                        finished.add(key)
                    key, members, problem = name, {}, None
                    taken = select is None or select(key)
                    if taken and key in finished:
                        problem = ShardFormatError(f"sample {key!r} appears twice (members not contiguous)")
                if taken and problem is None:
                    try:
                        member = _check_member(info, max_member_bytes)
                        if member in members:
                            raise ShardFormatError(f"member {info.name!r} appears twice")
                    except ShardFormatError as error:
                        problem = error
                    else:
                        handle = archive.extractfile(info)
                        members[member] = handle.read() if handle is not None else b""
                if problem is not None and not keep_bad:
                    raise problem
            end = archive.offset
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ShardFormatError(f"not a readable tar archive ({error})") from error
    # tarfile takes a cut inside a header for the end of the archive; the end marker tells the difference.
    if source.bytes_at(end, END_MARKER_BYTES) != bytes(END_MARKER_BYTES):
        raise ShardFormatError(f"truncated tar archive: no end-of-archive marker after {end} bytes")
    if taken:
        yield key, problem or members


def read_shard_samples(
    source: str | os.PathLike | bytes, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> list[tuple[str, dict[str, bytes]]]:
    """(key, members) of every sample of a shard (bytes, local path or URL), checked by `iter_shard_samples`."""
    if not isinstance(source, (bytes, bytearray, memoryview)):
        location, name = storage.locate_file(source)
        source = location.read(name)
    return list(iter_shard_samples(io.BytesIO(source), max_member_bytes))


def write_shard(
    samples: Sequence[tuple[str, Mapping[str, bytes]]], location: storage.Location, name: str
) -> tuple[int, str]:
    """Write and publish one shard (with its done-marker off the local disk); returns (bytes, sha256 hex)."""
    parse_shard_name(name)
    data = shard_bytes(samples)
    digest = location.publish(name, data, done_marker=True)
    logger.debug("published %s (%d samples, %d bytes)", name, len(samples), len(data))
    return len(data), digest

# ---------------------------------------------------------------------------------------------------------
# Index and tables


def index_rows(
    shard: str, samples: Sequence[tuple[str, Mapping[str, bytes]]], fingerprint: str | None = None
) -> list[dict[str, Any]]:
    """index.parquet rows (INDEX_SCHEMA) of one shard's encoded samples, each carrying `fingerprint`."""
    split, epoch, _ = parse_shard_name(shard)
    rows = []
    for key, members in samples:
        meta = parse_meta(members[META_MEMBER])
        rows.append(
            {
                "shard": shard,
                "split": split,
                "epoch": epoch,
                "key": key,
                "clips": meta["clips"],
                "labels": meta["labels"],
                "filler": meta.get("filler", [False] * len(meta["clips"])),
                "bytes": sum(len(data) for data in members.values()),
                "fingerprint": fingerprint,
            }
        )
    return rows


def index_table(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """The index table (INDEX_SCHEMA) of `index_rows` output."""
    return pa.Table.from_pylist(list(rows), schema=INDEX_SCHEMA)
