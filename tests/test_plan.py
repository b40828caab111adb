"""The seeded shard plan (pipeline.plan)."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import plan as planning
from pipeline.config import MixingConfig, ShardConfig
from pipeline.mixing import nomix_rows

TIME_PATCHES = 16
GROUP = 3


def _manifest(train: int = 23, evaluation: int = 7, extra_split: str | None = None) -> pa.Table:
    rows = [(f"t{i:03d}", "train", True) for i in range(train)]
    rows += [(f"e{i:03d}", "eval", False) for i in range(evaluation)]
    if extra_split:
        rows += [(f"x{i:03d}", extra_split, True) for i in range(5)]
    return pa.table(
        {
            "key": [key for key, _, _ in rows],
            "path": [f"/audio/{key}.wav" for key, _, _ in rows],
            "split": [split for _, split, _ in rows],
            "mix": [mix for _, _, mix in rows],
            "label_mids": [[f"/m/{i % 4}"] for i in range(len(rows))],
            "label_indices": pa.array([[i % 4, 9] for i in range(len(rows))], pa.list_(pa.int32())),
        }
    )


def _plan(manifest: pa.Table | None = None, seed: int = 7, epochs: int = 3) -> pa.Table:
    return planning.make_plan(
        manifest if manifest is not None else _manifest(),
        MixingConfig(group_size=GROUP, mixture_epochs=epochs),
        ShardConfig(groups_per_shard=2, clips_per_eval_shard=3),
        TIME_PATCHES,
        seed,
    )


def _rows(plan: pa.Table, split: str) -> list[dict]:
    return [row for row in plan.to_pylist() if row["split"] == split]


def test_every_clip_is_a_primary_once_per_epoch_and_fillers_are_recorded() -> None:
    plan = _plan()
    train_keys = {f"t{i:03d}" for i in range(23)}
    for epoch in range(3):
        rows = [row for row in _rows(plan, "train") if row["epoch"] == epoch]
        primaries = Counter(row["key"] for row in rows if not row["filler"])
        assert set(primaries) == train_keys and set(primaries.values()) == {1}
        fillers = [row for row in rows if row["filler"]]
        assert len(fillers) == 1  # 23 clips, G = 3: the last group needs one filler
        assert len(rows) == 24
        groups: dict[tuple[int, int], list[dict]] = {}
        for row in rows:
            groups.setdefault((row["shard"], row["sample"]), []).append(row)
        assert len(groups) == 8 and max(shard for shard, _ in groups) == 3  # 2 groups per shard
        for members in groups.values():
            assert [row["slot"] for row in members] == [0, 1, 2]
            assert len({row["key"] for row in members}) == GROUP  # a filler is never in its own group twice
        last_group = groups[(3, 1)]
        assert [row["filler"] for row in last_group] == [False, False, True]


def test_windows_follow_the_rule_and_labels_travel() -> None:
    plan = _plan()
    rows = nomix_rows(TIME_PATCHES)
    assert planning.plan_metadata(plan)["r"] == rows
    for row in _rows(plan, "train"):
        assert 0 <= row["i1"] <= TIME_PATCHES // 2 - 1
        assert row["i1"] + rows <= row["i2"] <= TIME_PATCHES - rows - 1
        index = int(row["key"][1:])
        assert row["label_indices"] == [index % 4, 9] and row["path"] == f"/audio/{row['key']}.wav"


def test_eval_split_has_one_clip_per_sample() -> None:
    rows = _rows(_plan(), "eval")
    assert [row["key"] for row in rows] == [f"e{i:03d}" for i in range(7)]
    assert {(row["epoch"], row["slot"], row["filler"], row["i1"], row["i2"]) for row in rows} == {(0, 0, False, -1, -1)}
    assert [(row["shard"], row["sample"]) for row in rows] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]


def test_plan_is_deterministic_and_epochs_differ() -> None:
    plan = _plan()
    again = _plan()
    assert plan.equals(again) and planning.plan_fingerprint(plan) == planning.plan_fingerprint(again)
    # Row order of the manifest does not matter, only its content.
    manifest = _manifest()
    shuffled = manifest.take(np.random.default_rng(0).permutation(manifest.num_rows))
    assert _plan(shuffled).equals(plan)
    assert planning.plan_fingerprint(_plan(seed=8)) != planning.plan_fingerprint(plan)

    orders = [
        [row["key"] for row in _rows(plan, "train") if row["epoch"] == epoch and not row["filler"]]
        for epoch in range(3)
    ]
    assert orders[0] != orders[1] and orders[1] != orders[2]
    windows = [[(row["i1"], row["i2"]) for row in _rows(plan, "train") if row["epoch"] == e] for e in range(3)]
    assert windows[0] != windows[1]
    # Adding another split leaves the plan of the existing splits unchanged.
    with_extra = _plan(_manifest(extra_split="more"))
    assert _rows(with_extra, "train") == _rows(plan, "train")


def test_fingerprint_ignores_chunking_and_paths_but_not_windows() -> None:
    plan = _plan()
    fingerprint = planning.plan_fingerprint(plan)
    buffer = io.BytesIO()
    pq.write_table(plan, buffer)
    assert planning.plan_fingerprint(pq.read_table(io.BytesIO(buffer.getvalue()))) == fingerprint
    rechunked = pa.concat_tables([plan.slice(0, 10), plan.slice(10)])
    assert planning.plan_fingerprint(rechunked) == fingerprint
    moved = plan.set_column(
        plan.schema.get_field_index("path"), "path", pa.array([f"/elsewhere/{k}" for k in plan["key"].to_pylist()])
    )
    assert planning.plan_fingerprint(moved) == fingerprint
    i1 = plan["i1"].to_pylist()
    i1[-1] = (i1[-1] + 1) % 8
    changed = plan.set_column(plan.schema.get_field_index("i1"), "i1", pa.array(i1, pa.int32()))
    assert planning.plan_fingerprint(changed) != fingerprint


def test_manifest_digest_ignores_paths_and_row_order_but_not_labels_or_splits() -> None:
    manifest = _manifest()
    digest = planning.manifest_digest(manifest)
    assert planning.manifest_digest(manifest.take(list(reversed(range(manifest.num_rows))))) == digest
    moved = manifest.set_column(1, "path", pa.array([f"/elsewhere/{i}" for i in range(manifest.num_rows)]))
    assert planning.manifest_digest(moved) == digest
    labels = manifest["label_indices"].to_pylist()
    labels[0] = [3]
    relabelled = manifest.set_column(
        manifest.schema.get_field_index("label_indices"), "label_indices", pa.array(labels, pa.list_(pa.int32()))
    )
    assert planning.manifest_digest(relabelled) != digest
    assert planning.manifest_digest(_manifest(train=24)) != digest


def test_shard_tasks_and_names() -> None:
    plan = _plan()
    tasks = planning.shard_tasks(plan)
    names = [name for name, _ in tasks]
    assert names[:3] == ["eval-e00-000000.tar", "eval-e00-000001.tar", "eval-e00-000002.tar"]
    assert names[3:7] == [f"train-e00-{shard:06d}.tar" for shard in range(4)]
    assert len(names) == 3 + 3 * 4 and len(set(names)) == len(names)
    assert sum(table.num_rows for _, table in tasks) == plan.num_rows
    for name, table in tasks:
        split, epoch, shard = planning.parse_shard_name(name)
        assert set(table["split"].to_pylist()) == {split}
        assert set(table["epoch"].to_pylist()) == {epoch} and set(table["shard"].to_pylist()) == {shard}
        assert planning.plan_metadata(table) == planning.plan_metadata(plan)
    assert planning.sample_key("train", 1, 2, 3) == "train-e01-000002-000003"
    assert planning.parse_shard_name("unbalanced_train-e12-000345.tar") == ("unbalanced_train", 12, 345)
    with pytest.raises(ValueError):
        planning.shard_name("bad.split", 0, 0)
    with pytest.raises(ValueError):
        planning.parse_shard_name("train-000001.tar")


def test_plan_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="fewer than the group size"):
        _plan(_manifest(train=2))
    duplicated = pa.concat_tables([_manifest(), _manifest().slice(0, 1)])
    with pytest.raises(ValueError, match="repeats keys"):
        _plan(duplicated)
    with pytest.raises(ValueError, match="lacks columns"):
        _plan(_manifest().drop_columns(["path"]))
    with pytest.raises(ValueError, match="do not fit"):
        planning.make_plan(_manifest(), MixingConfig(nomix_rows=5), ShardConfig(), TIME_PATCHES, 0)


def test_exact_multiple_has_no_fillers() -> None:
    plan = _plan(_manifest(train=24), epochs=1)
    assert not any(row["filler"] for row in _rows(plan, "train"))
    assert len(_rows(plan, "train")) == 24
