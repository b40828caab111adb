"""Bad AudioSet CSV rows through the preprocessing job, not only through the reader (tests/test_manifest.py).

The hostile dataset (conftest.hostile_job) adds train rows with the wrong column count, bad times (start after
end, NaN, text), an unknown MID, a duplicate key and a row without a file, each with a valid audio file where
the row names one. A key in both the evaluation and the training split is a leak: `python -m jobs.preprocess`
refuses the whole job with exit 2 before writing anything.

`hostile_inputs_jobs` runs two more jobs (an AudioSet and a folder source) over CSVs with a byte order mark,
CRLF line ends, unterminated quotes, text after a quote, bytes that are not UTF-8 and a quoted field broken
over two lines, beside entries named like audio that are a directory, a FIFO, a socket, a broken symlink and
an unreadable file; and one job whose class_labels_indices.csv has an unterminated quote.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
import yaml

from pipeline.config import SynthConfig
from pipeline.synth import make_sample_dataset
from reliability_support import (
    BAD_CSV_ROWS,
    EPOCHS,
    PYTHON,
    assert_clean_failure,
    cpu_env,
    preprocess_config,
    run_command,
)
from test_manifest import run_bounded


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


# ---------------------------------------------------------------------------------------------------------
# Hostile CSV encodings and entries that are not audio files, through the real job (AudioSet and folder).

# AudioSet train rows (after the key) that are bad only as CSV; each key has a valid audio file.
HOSTILE_SEGMENT_ROWS = {
    "hostile-unterminated": (' 0.000, 10.000, "{mid}', "unterminated quote"),
    "hostile-text-after-quote": (' 0.000, 10.000, "{mid}"!', "malformed CSV"),
    "hostile-not-utf8": (' 0.000, 10.000, "{mid}\udcff"', "not valid UTF-8"),
}
# Entries named like audio that are not readable regular files: name -> (kind, expected reason).
ODD_ENTRIES = {
    "odd-dir.wav": ("dir", "not_regular_file"),
    "odd-fifo.flac": ("fifo", "not_regular_file"),
    "odd-socket.wav": ("socket", "not_regular_file"),
    "odd-broken-link.wav": ("broken_link", "not_regular_file"),
    "odd-locked.wav": ("locked", "unreadable_file"),
}


def _tone(path: Path, seconds: float = 2.0, rate: int = 16000) -> None:
    t = np.arange(round(seconds * rate)) / rate
    soundfile.write(path, (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32), rate)


def _make_odd_entries(directory: Path) -> set[str]:
    """The ODD_ENTRIES under directory; returns the paths that are locked (chmod 0)."""
    locked = set()
    for name, (kind, _) in ODD_ENTRIES.items():
        path = directory / name
        if kind == "dir":
            path.mkdir()
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "socket":
            previous = os.getcwd()
            os.chdir(directory)  # AF_UNIX paths are limited to ~100 bytes: bind a relative name
            try:
                with socket.socket(socket.AF_UNIX) as server:
                    server.bind(name)
            finally:
                os.chdir(previous)
        elif kind == "broken_link":
            path.symlink_to(directory / "nowhere.wav")
        else:
            _tone(path)
            path.chmod(0)
            locked.add(str(path))
    return locked


def _physical_data_lines(csv: Path, header: bool = False) -> int:
    lines = [line for line in re.split(rb"\r\n|\r|\n", csv.read_bytes().removeprefix(b"\xef\xbb\xbf")) if line.strip()]
    return sum(not line.lstrip().startswith(b"#") for line in lines) - (1 if header else 0)


def _folder_config(path: Path, template: Path, audio: Path, labels_csv: Path, output: Path) -> Path:
    document = yaml.safe_load(template.read_text())
    document["data"]["source"] = {
        "kind": "folder", "audio_root": str(audio), "extensions": ["wav", "flac"],
        "splits": [{"name": "train", "csv": str(labels_csv), "mix": True}],
    }
    document["data"]["shards"]["output"] = str(output)
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture(scope="module")
def hostile_inputs_jobs(tmp_path_factory) -> SimpleNamespace:
    """Two real preprocessing jobs on one local Ray: an AudioSet source whose train CSV has a BOM, CRLF line
    ends, an embedded line break and broken quoting/bytes, and a folder source whose labels CSV has the same;
    both audio roots hold entries named like audio that are not readable regular files. Also one job whose
    class_labels_indices.csv has an unterminated quote (it must be refused)."""
    import ray

    from jobs.train.config import load_config
    from jobs.preprocess import run_preprocess
    from pipeline.preprocess_errors import PreprocessConfigError

    root = tmp_path_factory.mktemp("hostile_inputs")
    make_sample_dataset(root / "audioset", SynthConfig(train_clips=9, eval_clips=3, broken_files=False, seed=11))
    data = SimpleNamespace(audio=root / "audioset" / "audio", class_csv=root / "audioset" / "class_labels_indices.csv",
                           train_csv=root / "audioset" / "balanced_train_segments.csv",
                           eval_csv=root / "audioset" / "eval_segments.csv")
    mid = data.class_csv.read_text().splitlines()[1].split(",")[1]
    good_train = [line.split(",")[0] for line in data.train_csv.read_text().splitlines() if line and line[0] != "#"]
    rows = [key + "," + rest.format(mid=mid) for key, (rest, _) in HOSTILE_SEGMENT_ROWS.items()]
    rows += ['hostile-embedded-newline, 0.000, 10.000, "' + mid + ",", mid + '"']
    rows += [f'{name.rsplit(".", 1)[0]}, 0.000, 10.000, "{mid}"' for name in ODD_ENTRIES]
    for key in [*HOSTILE_SEGMENT_ROWS, "hostile-embedded-newline"]:
        _tone(data.audio / f"{key}.wav")
    text = data.train_csv.read_text().rstrip("\n").split("\n") + rows
    data.train_csv.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(text).encode("utf-8", "surrogateescape") + b"\r\n")
    locked = _make_odd_entries(data.audio)

    folder = root / "folder" / "audio"
    (folder / "dogs").mkdir(parents=True)
    good_folder = [f"dogs/bark{index}" for index in range(4)] + [f"calm{index}" for index in range(3)]
    for key in good_folder + ["withheld-unterminated", "withheld-columns"]:
        _tone(folder / f"{key}.wav")
    locked |= _make_odd_entries(folder)
    labels_csv = root / "folder" / "labels.csv"
    label_rows = ["path,labels", *(f'{key}.wav,"{"dog" if "dogs" in key else "calm"}"' for key in good_folder),
                  'withheld-unterminated.wav,"dog', "withheld-columns.wav,dog,surplus", 'odd-fifo.flac,"dog"']
    labels_csv.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(label_rows).encode() + b"\r\n")

    bad_classes = root / "bad_classes.csv"
    class_lines = data.class_csv.read_text().splitlines()
    class_lines[1] = class_lines[1].rstrip('"')  # the first display name's quote never closes
    bad_classes.write_text("\n".join(class_lines) + "\n")
    outputs = SimpleNamespace(audioset=root / "audioset_shards", folder=root / "folder_shards")
    audioset_config = preprocess_config(root / "audioset.yaml", data, outputs.audioset)
    folder_config = _folder_config(root / "folder.yaml", audioset_config, folder, labels_csv, outputs.folder)
    bad_classes_data = SimpleNamespace(**{**vars(data), "class_csv": bad_classes})
    bad_classes_config = preprocess_config(root / "bad_classes.yaml", bad_classes_data, root / "never")
    real_access = os.access
    with pytest.MonkeyPatch.context() as patch:
        if locked and real_access(next(iter(locked)), os.R_OK):  # root reads anything: say what a user would see
            patch.setattr(os, "access", lambda p, mode, **kw: str(p) not in locked and real_access(p, mode, **kw))
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            started = time.monotonic()
            summaries = run_bounded(
                lambda: {name: run_preprocess(load_config(str(config)), progress=False)
                         for name, config in (("audioset", audioset_config), ("folder", folder_config))},
                240, [data.audio, folder],
            )
            elapsed = time.monotonic() - started
            with pytest.raises(PreprocessConfigError) as refused:
                run_preprocess(load_config(str(bad_classes_config)), progress=False)
        finally:
            ray.shutdown()
    return SimpleNamespace(data=data, good_train=good_train, folder=folder, good_folder=good_folder,
                           labels_csv=labels_csv, outputs=outputs, summaries=summaries, elapsed=elapsed,
                           refused=str(refused.value), bad_classes=bad_classes)


def _tables(output: Path) -> tuple[list[dict], list[dict], set[str]]:
    manifest = pq.read_table(output / "manifest.parquet").to_pylist()
    quarantine = pq.read_table(output / "quarantine.parquet").to_pylist()
    index = pq.read_table(output / "index.parquet").to_pylist()
    return manifest, quarantine, {key for row in index for key in row["clips"]}


def test_hostile_audioset_csv_and_odd_entries_through_the_job(hostile_inputs_jobs):
    """Tried: a train CSV with a BOM, CRLF, an unterminated quote, text after a quote, a non-UTF-8 byte and a
    quoted field broken over two lines, and rows naming a directory, FIFO, socket, broken symlink and an
    unreadable file. Survives: the job finishes (in bounded time), every good row is written, each bad line is
    a `bad_csv_row` naming file:line, each odd entry is quarantined with its reason before decoding, no bad key
    is written, and CSV physical data lines = manifest rows + manifest-stage quarantine rows."""
    jobs = hostile_inputs_jobs
    assert (jobs.outputs.audioset / "dataset.json").exists() and jobs.elapsed < 300
    manifest, quarantine, written = _tables(jobs.outputs.audioset)
    train = {row["key"] for row in manifest if row["split"] == "train"}
    assert train == set(jobs.good_train)
    assert set(jobs.good_train) <= written
    csv = str(jobs.data.train_csv)
    by_key = {}
    for row in quarantine:
        by_key.setdefault(row["key"], []).append(row)
    for key, (_, reason) in HOSTILE_SEGMENT_ROWS.items():
        assert [(r["stage"], r["reason"]) for r in by_key[key]] == [("manifest", "bad_csv_row")], by_key[key]
        assert by_key[key][0]["detail"].startswith(f"{csv}:") and reason in by_key[key][0]["detail"]
        assert key not in written
    broken = by_key["hostile-embedded-newline"]
    assert [(r["reason"], "unterminated quote" in r["detail"]) for r in broken] == [("bad_csv_row", True)]
    for name, (_, reason) in ODD_ENTRIES.items():
        key = name.rsplit(".", 1)[0]
        assert [(r["stage"], r["reason"]) for r in by_key[key]] == [("manifest", reason)], by_key[key]
        assert key not in written
    for split, path in (("train", jobs.data.train_csv), ("eval", jobs.data.eval_csv)):
        accounted = sum(r["split"] == split for r in manifest) + sum(
            r["split"] == split and r["stage"] == "manifest" for r in quarantine)
        assert accounted == _physical_data_lines(path), split
    assert jobs.summaries["audioset"]["ledger"]["train"]["0"]["manifest"] == len(jobs.good_train)


def test_hostile_folder_labels_csv_and_odd_entries_through_the_job(hostile_inputs_jobs):
    """Tried: a folder source whose labels CSV has a BOM before its header, CRLF, an unterminated quote and a
    row with too many columns (both for files that exist), a row naming a FIFO, and a directory, FIFO, socket,
    broken symlink and unreadable file named like audio. Survives: the job finishes; the good files are written
    with their labels; the badly listed files are quarantined as `bad_csv_row` and written nowhere (not even
    unlabelled); each odd entry is quarantined with its reason; no class comes from the header; and manifest +
    manifest-stage quarantine = audio-named entries + CSV data lines - entries those lines took."""
    jobs = hostile_inputs_jobs
    assert (jobs.outputs.folder / "dataset.json").exists()
    manifest, quarantine, written = _tables(jobs.outputs.folder)
    assert sorted(row["key"] for row in manifest) == sorted(jobs.good_folder)
    assert set(jobs.good_folder) <= written
    classes = json.loads((jobs.outputs.folder / "dataset.json").read_text())["classes"]
    assert [c["mid"] for c in classes] == ["calm", "dog"]
    reasons = {(row["key"], row["reason"]) for row in quarantine if row["stage"] == "manifest"}
    assert reasons == {("withheld-unterminated", "bad_csv_row"), ("withheld-columns", "bad_csv_row"),
                       *((name.rsplit(".", 1)[0], reason) for name, (_, reason) in ODD_ENTRIES.items())}
    assert not {"withheld-unterminated", "withheld-columns"} & written
    assert not [row for row in quarantine if row["stage"] != "manifest"]  # nothing odd reached the decoder
    entries = len(jobs.good_folder) + 2 + len(ODD_ENTRIES)
    lines = _physical_data_lines(jobs.labels_csv, header=True)
    taken = len(jobs.good_folder) + 3  # every good file, the two withheld ones and the FIFO are listed by a line
    assert len(manifest) + len(quarantine) == entries + lines - taken


def test_a_bad_class_labels_csv_line_refuses_the_job_naming_file_and_line(hostile_inputs_jobs):
    """Tried: class_labels_indices.csv with an unterminated quote. Survives: the job refuses to plan
    (PreprocessConfigError, exit 2 from the entry point) naming the file and line; nothing is written."""
    jobs = hostile_inputs_jobs
    assert f"{jobs.bad_classes}:2: unterminated quote" in jobs.refused, jobs.refused
    assert not (jobs.bad_classes.parent / "never" / "dataset.json").exists()
