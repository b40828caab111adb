"""Sample schema, deterministic tar shards, atomic publication and the index (pipeline.shards)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from pipeline import shards, storage
from pipeline.shards import ShardFormatError
from pipeline.storage import locate

SHAPE = (32, 8)
GROUP = 3


def _clips(seed: int, count: int = GROUP) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-15.0, 2.0, SHAPE).astype(np.float32) for _ in range(count)]


def _group(seed: int = 0, materialise: bool = True, domain: str = "logmel_max") -> dict[str, bytes]:
    clips = _clips(seed)
    mixtures = [np.maximum(clips[i], clips[(i - 1) % GROUP]) for i in range(GROUP)] if materialise else None
    return shards.encode_sample(
        clips,
        clip_keys=[f"clip{seed}-{i}" for i in range(GROUP)],
        labels=[[1, 4], [], [2]],
        filler=[False, False, True],
        windows=[(0, 4), (1, 6), (3, 5)],
        rows=2,
        domain=domain,
        seed=11,
        mixtures=mixtures,
        frames=[32, 20, 7],
    )


def _samples(count: int = 3) -> list[tuple[str, dict[str, bytes]]]:
    return [(f"train-e00-000000-{i:06d}", _group(i)) for i in range(count)]


def test_group_sample_round_trip() -> None:
    clips = _clips(0)
    decoded = shards.decode_sample(_group(0), expected_shape=SHAPE, group_size=GROUP, time_patches=8)
    assert len(decoded["clips"]) == GROUP and len(decoded["mixtures"]) == GROUP
    for stored, original in zip(decoded["clips"], clips):
        assert stored.dtype == np.float16 and np.array_equal(stored, original.astype(np.float16))
    meta = decoded["meta"]
    assert meta["clips"] == ["clip0-0", "clip0-1", "clip0-2"]
    assert meta["filler"] == [False, False, True] and meta["labels"] == [[1, 4], [], [2]]
    assert meta["mixtures"][0] == {"primary": 0, "partner": 2, "nomix": [[0, 2], [4, 6]], "domain": "logmel_max"}
    assert meta["r"] == 2 and meta["seed"] == 11 and meta["frames"] == [32, 20, 7]

    lazy = shards.decode_sample(_group(0, materialise=False))
    assert lazy["mixtures"] == [] and sorted(_group(0, materialise=False)) == ["c0.npy", "c1.npy", "c2.npy", "json"]
    # WebDataset's own fields are ignored.
    assert shards.decode_sample({**_group(0), "__key__": b"k", "__url__": b"u"})["meta"] == meta


def test_eval_sample_round_trip() -> None:
    clip = _clips(1, 1)[0]
    members = shards.encode_eval_sample(clip, "eval-clip", [3, 5], frames=30)
    assert sorted(members) == ["c0.npy", "json"]
    decoded = shards.decode_sample(members, expected_shape=SHAPE)
    assert decoded["meta"] == {"clips": ["eval-clip"], "labels": [[3, 5]], "frames": [30]}
    assert np.array_equal(decoded["clips"][0], clip.astype(np.float16)) and decoded["mixtures"] == []


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _with_meta(change) -> dict[str, bytes]:
    members = _group(0)
    meta = json.loads(members["json"])
    change(meta)
    return {**members, "json": json.dumps(meta).encode()}


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({**_group(0), "c1.npy": _npy(np.zeros(SHAPE, np.float32))}, "dtype float32"),
        ({**_group(0), "c1.npy": _npy(np.zeros((2, *SHAPE), np.float16))}, "expected 2-D"),
        ({**_group(0), "m2.npy": _npy(np.zeros((32, 9), np.float16))}, "shape"),
        ({**_group(0), "c0.npy": b"not an array"}, "not a readable .npy"),
        ({**_group(0), "c0.npy": _npy(np.full(SHAPE, np.inf, np.float16))}, "non-finite"),
        ({**_group(0), "json": b"{not json"}, "not UTF-8 JSON"),
        ({**_group(0), "json": b"\xff\xfe"}, "not UTF-8 JSON"),
        ({**_group(0), "json": b"[1, 2]"}, "top level"),
        (_with_meta(lambda m: m.pop("labels")), "'labels'"),
        (_with_meta(lambda m: m["mixtures"][1].update(partner=2)), "partner 0"),
        (_with_meta(lambda m: m["mixtures"][0].update(nomix=[[0, 2], [1, 3]])), "non-overlapping"),
        (_with_meta(lambda m: m["mixtures"][0].update(nomix=[[0, 3], [4, 7]])), "r=2"),
        (_with_meta(lambda m: m["mixtures"][0].update(domain="mel_sum")), "domain"),
        (_with_meta(lambda m: m.update(filler=[0, 0, 1])), "'filler'"),
        (_with_meta(lambda m: m.update(frames=[32, 33, 1])), "exceed"),
        ({**_group(0), "x.npy": b""}, "unexpected members"),
        ({**_group(0), "../c0.npy": b""}, "unexpected members"),
        ({key: value for key, value in _group(0).items() if key != "c1.npy"}, "missing clip"),
        ({key: value for key, value in _group(0).items() if key != "m1.npy"}, "all or none"),
        ({key: value for key, value in _group(0).items() if key != "json"}, "no 'json'"),
        (
            {k: v for k, v in _group(0, domain="waveform_sum").items() if not k.startswith("m")},
            "materialised",
        ),
    ],
)
def test_decode_rejects_malformed_samples(members: dict[str, bytes], message: str) -> None:
    with pytest.raises(ShardFormatError, match=message):
        shards.decode_sample(members, expected_shape=SHAPE)


def test_decode_checks_expected_shape_group_size_and_windows() -> None:
    with pytest.raises(ShardFormatError, match=r"expected \(64, 8\)"):
        shards.decode_sample(_group(0), expected_shape=(64, 8))
    with pytest.raises(ShardFormatError, match="expected 4"):
        shards.decode_sample(_group(0), group_size=4)
    with pytest.raises(ShardFormatError, match=r"inside \[0, 5\)"):
        shards.decode_sample(_group(0), time_patches=5)
    with pytest.raises(ValueError):
        shards.encode_eval_sample(np.zeros((2, 2, 2)), "k", [])


def test_shard_bytes_are_deterministic(tmp_path) -> None:
    samples = _samples()
    size_a, sha_a = shards.write_shard(samples, locate(tmp_path / "a"), "train-e00-000000.tar")
    # Same content built again, members given in another order.
    reordered = [(key, dict(reversed(list(members.items())))) for key, members in _samples()]
    size_b, sha_b = shards.write_shard(reordered, locate(tmp_path / "b"), "train-e00-000000.tar")
    data = (tmp_path / "a" / "train-e00-000000.tar").read_bytes()
    assert (size_a, sha_a) == (size_b, sha_b) == (len(data), hashlib.sha256(data).hexdigest())
    assert data == (tmp_path / "b" / "train-e00-000000.tar").read_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as archive:
        infos = archive.getmembers()
    assert [info.name for info in infos[:5]] == [
        f"train-e00-000000-000000.{member}" for member in ("c0.npy", "c1.npy", "c2.npy", "json", "m0.npy")
    ]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode, i.type) for i in infos} == {
        (0, 0, 0, "", "", 0o644, tarfile.REGTYPE)
    }
    assert shards.read_shard_samples(tmp_path / "a" / "train-e00-000000.tar") == [
        (key, dict(sorted(members.items()))) for key, members in samples
    ]
    assert locate(tmp_path / "a").is_published("train-e00-000000.tar")
    assert locate(tmp_path / "a").is_published("train-e00-000000.tar", sha_a)
    assert not locate(tmp_path / "a").is_published("train-e00-000000.tar", "0" * 64)
    assert os.listdir(tmp_path / "a") == ["train-e00-000000.tar"]  # no temporaries, no marker


def test_failed_local_write_leaves_nothing(tmp_path, monkeypatch) -> None:
    def failing_fsync(descriptor: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(shards.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk gone"):
        shards.write_shard(_samples(), locate(tmp_path), "train-e00-000001.tar")
    assert os.listdir(tmp_path) == []
    assert not locate(tmp_path).is_published("train-e00-000001.tar")


def test_stale_temporaries_are_removed(tmp_path) -> None:
    shards.write_shard(_samples(1), locate(tmp_path), "train-e00-000000.tar")
    stale = f".train-e00-000001.tar.tmp-{uuid.uuid4().hex}"
    (tmp_path / stale).write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("keep")
    assert locate(tmp_path).remove_stale() == [stale]
    assert sorted(os.listdir(tmp_path)) == ["notes.txt", "train-e00-000000.tar"]
    assert locate(tmp_path / "missing").remove_stale() == []


def test_object_store_publication_with_done_marker(monkeypatch) -> None:
    directory = f"memory://bucket-{uuid.uuid4().hex}/shards"
    name = "train-e01-000002.tar"
    location = locate(directory)
    size, sha = shards.write_shard(_samples(), location, name)
    assert location.is_published(name) and location.is_published(name, sha)
    assert not location.is_published(name, "0" * 64)
    with location.filesystem.open_input_stream(location.join(name + ".done")) as stream:
        assert stream.read().decode() == sha
    samples = shards.read_shard_samples(f"{directory}/{name}")
    assert [key for key, _ in samples] == [key for key, _ in _samples()]

    # The data lands but the marker does not: not published, and removed as stale on resume.
    calls = []
    real_put = storage._put

    def put_then_fail(filesystem, path, data):
        calls.append(path)
        if path.endswith(".done"):
            raise OSError("connection reset")
        real_put(filesystem, path, data)

    monkeypatch.setattr(storage, "_put", put_then_fail)
    with pytest.raises(OSError):
        shards.write_shard(_samples(), location, "train-e01-000003.tar")
    assert len(calls) == 2 and not location.is_published("train-e01-000003.tar")
    assert location.remove_stale() == ["train-e01-000003.tar"]
    assert location.is_published(name)


def test_explicit_pyarrow_filesystems(tmp_path) -> None:
    local = pafs.LocalFileSystem()
    shards.write_shard(_samples(1), locate(str(tmp_path), local), "eval-e00-000000.tar")
    assert os.listdir(tmp_path) == ["eval-e00-000000.tar"]  # local path: rename, no marker
    sub = pafs.SubTreeFileSystem(str(tmp_path / "tree"), local)  # a non-local filesystem object: marker
    _, sha = shards.write_shard(_samples(1), locate("out", sub), "eval-e00-000001.tar")
    assert sorted(os.listdir(tmp_path / "tree" / "out")) == ["eval-e00-000001.tar", "eval-e00-000001.tar.done"]
    assert locate("out", sub).is_published("eval-e00-000001.tar", sha)


def _tar(entries: list[tarfile.TarInfo], payload: bytes = b"x") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info in entries:
            if info.isreg():
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
            else:
                archive.addfile(info)
    return buffer.getvalue()


def _info(name: str, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    return info


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([_info("../k.json")], r"'\.\.'"),
        ([_info("/abs/k.json")], "absolute"),
        ([_info("dir/k.json")], "inside a directory"),
        ([_info("k.json", tarfile.SYMTYPE)], "not a regular file"),
        ([_info("k", tarfile.DIRTYPE)], "not a regular file"),
        ([_info("nodot")], "key.member"),
        ([_info("a.json"), _info("b.json"), _info("a.c0.npy")], "appears twice"),
        ([_info("a.json"), _info("a.json")], "appears twice"),
    ],
)
def test_read_refuses_unsafe_members(entries: list[tarfile.TarInfo], message: str) -> None:
    with pytest.raises(ShardFormatError, match=message):
        shards.read_shard_samples(_tar(entries))


def test_read_refuses_oversized_members_and_garbage() -> None:
    with pytest.raises(ShardFormatError, match="limit"):
        shards.read_shard_samples(_tar([_info("k.json")], b"y" * 100), max_member_bytes=99)
    with pytest.raises(ShardFormatError, match="readable tar"):
        shards.read_shard_samples(b"\x01" * 700)
    data = shards.shard_bytes(_samples(2))
    assert len(shards.read_shard_samples(data)) == 2
    member_ends = [info.offset_data + info.size for info in tarfile.open(fileobj=io.BytesIO(data)).getmembers()]
    # Cut inside a member's data, inside a header, at a header boundary, and just before the end marker.
    for cut in (member_ends[3] - 10, member_ends[9] + 100, 14848, member_ends[-1]):
        with pytest.raises(ShardFormatError, match="unexpected end of data|truncated"):
            shards.read_shard_samples(data[:cut])


def test_writer_refuses_bad_names(tmp_path) -> None:
    with pytest.raises(ValueError):
        shards.write_shard([("bad.key", _group(0))], locate(tmp_path), "train-e00-000000.tar")
    with pytest.raises(ValueError):
        shards.write_shard(_samples(1) * 2, locate(tmp_path), "train-e00-000000.tar")
    with pytest.raises(ValueError):
        shards.write_shard(_samples(1), locate(tmp_path), "shard.tar")
    assert os.listdir(tmp_path) == []


def test_index_rows_and_tables(tmp_path) -> None:
    samples = _samples(2) + [("train-e00-000000-000009", shards.encode_eval_sample(_clips(5, 1)[0], "solo", [7]))]
    rows = shards.index_rows("train-e00-000000.tar", samples, fingerprint="f" * 64)
    assert rows[0] == {
        "shard": "train-e00-000000.tar",
        "split": "train",
        "epoch": 0,
        "key": "train-e00-000000-000000",
        "clips": ["clip0-0", "clip0-1", "clip0-2"],
        "labels": [[1, 4], [], [2]],
        "filler": [False, False, True],
        "bytes": sum(len(data) for data in samples[0][1].values()),
        "fingerprint": "f" * 64,
    }
    assert rows[2]["filler"] == [False]
    assert {row["fingerprint"] for row in shards.index_rows("train-e00-000000.tar", samples)} == {None}
    table = shards.index_table(rows)
    assert table.schema.equals(shards.INDEX_SCHEMA) and table.num_rows == 3

    locate(tmp_path).write_table("index.parquet", table)
    assert os.listdir(tmp_path) == ["index.parquet"]
    assert locate(tmp_path).read_table("index.parquet").equals(table)
    directory = f"memory://bucket-{uuid.uuid4().hex}/out"
    locate(directory).write_table("index.parquet", table)
    assert locate(directory).read_table("index.parquet").equals(table)
    assert not locate(directory).is_published("index.parquet")  # tables carry no done-marker
    assert isinstance(locate(directory).read_table("index.parquet"), pa.Table)

    # Listing and removing files, locally and on a URL.
    for location in (locate(tmp_path), locate(directory)):
        assert location.list() == ["index.parquet"]
        location.remove("index.parquet")
        location.remove("index.parquet")  # already gone: fine
        assert location.list() == []
    assert locate(tmp_path / "nowhere").list() == []


def test_reader_keeps_bad_samples_in_place_and_selects() -> None:
    (first, members_a), (second, members_b), (third, members_c) = _samples(3)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for key, members in ((first, members_a), ("../" + second, members_b), (third, members_c)):
            for member, data in sorted(members.items()):
                info = tarfile.TarInfo(f"{key}.{member}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    read = list(shards.iter_shard_samples(io.BytesIO(data), keep_bad=True))
    assert [key for key, _ in read] == [first, "../" + second, third]
    assert read[0][1] == members_a and read[2][1] == members_c
    assert isinstance(read[1][1], ShardFormatError) and "'..'" in str(read[1][1])
    with pytest.raises(ShardFormatError, match=r"'\.\.'"):
        list(shards.iter_shard_samples(io.BytesIO(data)))
    offered: list[str] = []
    selected = shards.iter_shard_samples(io.BytesIO(data), select=lambda key: offered.append(key) or key != first,
                                         keep_bad=True)
    assert [key for key, _ in selected] == ["../" + second, third] and offered == [first, "../" + second, third]
