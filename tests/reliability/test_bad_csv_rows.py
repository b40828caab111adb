"""Bad AudioSet CSV rows through the preprocessing job, not only through the reader (tests/test_manifest.py).

The hostile dataset (conftest.hostile_job) adds train rows with the wrong column count, bad times (start after
end, NaN, text), an unknown MID, a duplicate key and a row without a file, each with a valid audio file where
the row names one. A key in both the evaluation and the training split is a leak: `python -m jobs.preprocess`
refuses the whole job with exit 2 before writing anything.
"""

from __future__ import annotations

import glob
from collections import Counter

import pyarrow.parquet as pq

from reliability_support import (
    BAD_CSV_ROWS,
    EPOCHS,
    PYTHON,
    assert_clean_failure,
    cpu_env,
    preprocess_config,
    run_command,
)


def _data_rows(csv) -> list[str]:
    return [line for line in csv.read_text().splitlines() if line.strip() and not line.startswith("#")]


def test_each_bad_row_is_quarantined_at_the_manifest_stage(hostile_job):
    """Tried: one train row per CSV problem. Survives: a `manifest` quarantine row with the expected reason
    and a detail pointing at the CSV line; none of these keys reaches the shards."""
    rows = pq.read_table(hostile_job.output / "quarantine.parquet").to_pylist()
    index = pq.read_table(hostile_job.output / "index.parquet").to_pylist()
    written = {key for row in index for key in row["clips"]}
    csv = str(hostile_job.data.train_csv)
    for key, (_, reason) in BAD_CSV_ROWS.items():
        mine = [row for row in rows if row["key"] == key]
        assert [(row["stage"], row["reason"], row["split"]) for row in mine] == [("manifest", reason, "train")], mine
        assert mine[0]["detail"].startswith(f"{csv}:"), mine
        assert key not in written


def test_a_duplicate_key_keeps_its_first_row_and_quarantines_the_second(hostile_job):
    """Tried: a valid key listed twice. Survives: one `duplicate_key` row naming the first occurrence; the clip
    is still written as a primary once per mixture epoch (not twice, not zero times)."""
    key = hostile_job.data.duplicate_key
    rows = pq.read_table(hostile_job.output / "quarantine.parquet").to_pylist()
    mine = [row for row in rows if row["key"] == key]
    assert [(row["stage"], row["reason"]) for row in mine] == [("manifest", "duplicate_key")], mine
    assert "already taken by" in mine[0]["detail"]
    index = pq.read_table(hostile_job.output / "index.parquet").to_pylist()
    as_primary = Counter(
        row["epoch"] for row in index if row["split"] == "train"
        for clip, filler in zip(row["clips"], row["filler"]) if clip == key and not filler
    )
    assert as_primary == {epoch: 1 for epoch in range(EPOCHS)}


def test_every_csv_row_is_in_the_manifest_or_the_quarantine(hostile_job):
    """Tried: the whole train and eval CSVs, good and bad rows. Survives: per split, CSV data rows = manifest
    rows + manifest-stage quarantine rows (nothing silently dropped by the reader)."""
    manifest = pq.read_table(hostile_job.output / "manifest.parquet").to_pylist()
    quarantine = pq.read_table(hostile_job.output / "quarantine.parquet").to_pylist()
    data = hostile_job.data
    for split, csv in (("train", data.train_csv), ("eval", data.eval_csv)):
        in_manifest = sum(row["split"] == split for row in manifest)
        at_manifest_stage = sum(row["split"] == split and row["stage"] == "manifest" for row in quarantine)
        assert len(_data_rows(csv)) == in_manifest + at_manifest_stage, split


def test_a_leak_between_evaluation_and_training_is_refused_with_exit_2(hostile_job, tmp_path):
    """Tried: `python -m jobs.preprocess` with an evaluation CSV that lists a training key. Survives: exit 2,
    one line naming the leaked key and both splits, no traceback, and no shard, table or dataset.json written."""
    data = hostile_job.data
    leaked = sorted(data.good_train)[1]
    leaking_csv = tmp_path / "eval_with_leak.csv"
    train_row = next(line for line in _data_rows(data.train_csv) if line.startswith(f"{leaked},"))
    leaking_csv.write_text("\n".join(_data_rows(data.eval_csv) + [train_row]) + "\n")
    output = tmp_path / "shards"
    config = preprocess_config(tmp_path / "leak.yaml", data, output, eval_csv=leaking_csv)
    result = run_command([PYTHON, "-m", "jobs.preprocess", "--config", str(config), "--no-progress", "--num-cpus", "1"],
                         cwd=tmp_path, env=cpu_env())
    assert_clean_failure(result, 2, "config error", leaked, "eval: eval", "train: train")
    assert not glob.glob(str(output / "*.tar")) and not (output / "dataset.json").exists()
