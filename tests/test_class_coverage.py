"""Class coverage: clips per class before and after quarantine, per split, and a warning for a class that loses
more than `data.shards.warn_class_loss_share` of them (summary, dataset.json, `sslam inspect`).

One preprocessing run over a tiny folder source (tests/folder_set.py) whose "Dog" clips are all too short.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pyarrow as pa
import pytest
from folder_set import preprocess_folder_set

from jobs.train.config import ConfigError, load_config
from pipeline.inspect import summarize
from pipeline.manifest import CLASSES_METADATA_KEY, MANIFEST_SCHEMA
from pipeline.ledger import QUARANTINE_SCHEMA, class_coverage, coverage_lines, format_summary


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("coverage")
    return SimpleNamespace(output=root / "shards", summary=preprocess_folder_set(root))


def _by_name(rows: list[dict]) -> dict[str, dict]:
    return {row["name"]: row for row in rows}


def test_dataset_json_counts_clips_per_class_before_and_after_quarantine_per_split(folder_run):
    coverage = json.loads((folder_run.output / "dataset.json").read_text())["class_coverage"]
    train, evaluation = _by_name(coverage["splits"]["train"]), _by_name(coverage["splits"]["eval"])
    assert train["Dog"] == {"index": 0, "name": "Dog", "before": 4, "after": 0, "lost": {"too_short": 4}}
    assert train["Cat"] == {"index": 1, "name": "Cat", "before": 5, "after": 5, "lost": {}}
    assert train["Bird"] == {"index": 2, "name": "Bird", "before": 4, "after": 3, "lost": {"too_short": 1}}
    assert train["Owl"] == {"index": 3, "name": "Owl", "before": 1, "after": 0, "lost": {"missing_file": 1}}
    assert evaluation["Dog"]["after"] == 0 and evaluation["Cat"]["after"] == 1 and "Owl" not in evaluation
    assert coverage["warn_loss_share"] == 0.5 and coverage["absent"] == []
    assert coverage == folder_run.summary["class_coverage"]


def test_a_class_that_vanishes_is_a_warning_naming_it_and_its_reasons(folder_run):
    warnings = folder_run.summary["class_coverage"]["warnings"]
    assert warnings == [
        "class 'Dog' of split 'eval' lost 1 of its 1 clips (100%) to quarantine: too_short 1",
        "class 'Dog' of split 'train' lost 4 of its 4 clips (100%) to quarantine: too_short 4",
        "class 'Owl' of split 'train' lost 1 of its 1 clips (100%) to quarantine: missing_file 1",
    ]
    text = format_summary(folder_run.summary)
    assert "WARNING       class 'Dog' of split 'train' lost 4 of its 4 clips (100%)" in text
    assert ("train: 4 classes, 14 -> 8 clips per class (summed) after quarantine, 2 classes left without clips: "
            "Dog, Owl") in text
    assert "most lost: Dog 4->0, Owl 1->0, Bird 4->3" in text


def test_inspect_shows_the_same_coverage(folder_run):
    text = summarize(str(folder_run.output))
    expected = "WARNING        class 'Dog' of split 'train' lost 4 of its 4 clips (100%) to quarantine: too_short 4"
    assert expected in text
    assert "2 classes left without clips: Dog, Owl" in text and "Bird 4->3" in text


def _tables(rows: list[tuple], failed: list[tuple]) -> tuple[pa.Table, pa.Table]:
    """A manifest of (key, split, label indices) rows over classes A, B, C and quarantine rows of
    (key, split, stage, reason[, labels])."""
    classes = json.dumps([[0, "/m/a", "A"], [1, "/m/b", "B"], [2, "/m/c", "C"]])
    manifest = pa.Table.from_pylist(
        [{"key": key, "path": f"/a/{key}.wav", "split": split, "mix": True, "label_mids": [], "label_indices": labels}
         for key, split, labels in rows],
        schema=MANIFEST_SCHEMA,
    ).replace_schema_metadata({CLASSES_METADATA_KEY: classes})
    quarantine = pa.Table.from_pylist(
        [{"key": row[0], "split": row[1], "stage": row[2], "reason": row[3], "labels": row[4] if len(row) > 4 else None}
         for row in failed],
        schema=QUARANTINE_SCHEMA,
    )
    return manifest, quarantine


def test_the_share_is_a_strict_bound_and_configurable():
    rows = [("a1", "train", [0]), ("a2", "train", [0]), ("b1", "train", [1]), ("b2", "train", [1]),
            ("b3", "train", [1])]
    failed = [("a1", "train", "decode", "corrupt"), ("b1", "train", "decode", "too_short"),
              ("b1", "train", "decode", "too_short"),  # a second mixture epoch's row: one clip lost, not two
              ("x", None, "manifest", "unlisted_file")]
    manifest, quarantine = _tables(rows, failed)
    half = class_coverage(manifest, quarantine, 0.5)
    assert half["warnings"] == []  # A lost exactly half: not more than 50%
    assert _by_name(half["splits"]["train"])["B"]["lost"] == {"too_short": 1}
    assert half["absent"] == ["C"]
    third = class_coverage(manifest, quarantine, 0.3)
    assert [warning.split(" of split")[0] for warning in third["warnings"]] == ["class 'A'", "class 'B'"]
    assert class_coverage(manifest, quarantine, 1.0)["warnings"] == []


def test_clips_the_manifest_stage_quarantined_with_their_labels_count_as_lost():
    """A class whose every file is missing (e.g. an extension the source did not accept) never reaches the
    manifest: it is still counted, by its CSV labels (MID or display name)."""
    rows = [("a1", "train", [0])]
    failed = [("c1", "train", "manifest", "missing_file", ["C"]), ("c2", "train", "manifest", "missing_file", ["/m/c"]),
              ("c3", "train", "manifest", "unknown_label", ["C", "/m/nope"]),
              ("a1", "train", "manifest", "duplicate_key", ["A"]),  # the key's other row is the manifest's: no loss
              ("u", "train", "manifest", "unlisted_file", None)]
    coverage = class_coverage(*_tables(rows, failed), 0.5)
    classes = _by_name(coverage["splits"]["train"])
    assert classes["C"] == {"index": 2, "name": "C", "before": 3, "after": 0,
                            "lost": {"missing_file": 2, "unknown_label": 1}}
    assert classes["A"]["before"] == 1 and classes["A"]["after"] == 1
    assert coverage["absent"] == ["B"]
    assert coverage["warnings"] == [
        "class 'C' of split 'train' lost 3 of its 3 clips (100%) to quarantine: missing_file 2, unknown_label 1"]


def test_a_quarantine_table_without_labels_from_an_earlier_version_is_read():
    manifest, quarantine = _tables([("a1", "train", [0])], [("a1", "train", "decode", "corrupt")])
    coverage = class_coverage(manifest, quarantine.drop_columns(["labels"]), 0.5)
    assert _by_name(coverage["splits"]["train"])["A"]["lost"] == {"corrupt": 1}


def test_the_share_is_a_checked_config_field():
    assert load_config("sample", ["data.shards.warn_class_loss_share=0.2"]).data.shards.warn_class_loss_share == 0.2
    with pytest.raises(ConfigError, match="'data.shards.warn_class_loss_share' must be >= 0 and <= 1, got 1.5"):
        load_config("sample", ["data.shards.warn_class_loss_share=1.5"])


def test_the_text_names_at_most_ten_classes_and_warnings_a_kind():
    rows = [{"index": i, "name": f"k{i}", "before": 2, "after": 0, "lost": {"corrupt": 2}} for i in range(12)]
    warnings = [f"class 'k{i}' of split 'train' lost 2 of its 2 clips (100%) to quarantine: corrupt 2" for i in range(12)]
    lines = coverage_lines({"warn_loss_share": 0.5, "splits": {"train": rows}, "warnings": warnings, "absent": []})
    assert lines[0].endswith("12 classes left without clips: k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, ...")
    assert sum(line.startswith("WARNING       class") for line in lines) == 10
    assert lines[-1] == "WARNING       ... and 2 more classes (dataset.json class_coverage)"
