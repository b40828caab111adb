"""Every bad audio kind through the real preprocessing job (jobs.preprocess.run_preprocess on a local Ray).

The hostile dataset (conftest.hostile_job) puts one train row per kind of tests/test_audio.py's BAD_FILES
(missing, zero bytes, zero frames, too short before/after resampling, random bytes, truncated wav/flac/ogg,
unsupported formats, NaN and inf samples, absurd and unusable sample rates) beside valid clips, a valid FLAC
named .wav, and a corrupt file in the evaluation split. Each bad file must land in quarantine.parquet with its
reason and stage, and every valid clip must be in the shards: nothing is lost.
"""

from __future__ import annotations

import glob
import json
from collections import Counter

import pyarrow.parquet as pq

from pipeline import shards
from reliability_support import BAD_AUDIO_STAGE, EPOCHS, EVAL_CORRUPT, EXTENSION_LIES, F, T


def _quarantine(job) -> list[dict]:
    return pq.read_table(job.output / "quarantine.parquet").to_pylist()


def _written_primaries(job) -> dict[tuple[str, int], Counter]:
    """Non-filler clip keys per (split, mixture epoch), read back from the published tar files."""
    found: dict[tuple[str, int], Counter] = {}
    for path in sorted(glob.glob(str(job.output / "*.tar"))):
        split, epoch = path.rsplit("/", 1)[1].split("-")[:2]
        for _, members in shards.read_shard_samples(path):
            decoded = shards.decode_sample(members, expected_shape=(T, F))
            meta = decoded["meta"]
            fillers = meta.get("filler", [False] * len(meta["clips"]))
            for key, filler in zip(meta["clips"], fillers):
                if not filler:
                    found.setdefault((split, int(epoch[1:])), Counter())[key] += 1
    return found


def test_every_bad_audio_kind_is_quarantined_with_its_reason_and_stage(hostile_job):
    """Tried: one train row per bad audio kind. Survives: one quarantine row per mixture epoch at stage
    `decode` with the decoder's reason, the file's path and a detail (a missing file: one `manifest` row)."""
    rows = _quarantine(hostile_job)
    data = hostile_job.data
    for key, case in data.bad_audio.items():
        stage, reason = BAD_AUDIO_STAGE[case]
        mine = [row for row in rows if row["key"] == key]
        assert {(row["stage"], row["reason"]) for row in mine} == {(stage, reason)}, (case, mine)
        assert all(row["detail"] for row in mine), mine
        if stage == "decode":
            assert sorted(row["epoch"] for row in mine) == list(range(EPOCHS)), (case, mine)
            assert all(row["path"] == str(data.audio_paths[key]) for row in mine), (case, mine)
            assert all(row["shard"].startswith(f"train-e{row['epoch']:02d}-") for row in mine), mine
        else:
            assert len(mine) == 1 and mine[0]["epoch"] is None, mine


def test_a_corrupt_evaluation_clip_is_quarantined_once(hostile_job):
    """Tried: random bytes named .wav in the evaluation split. Survives: one decode/corrupt row (evaluation
    splits have a single epoch), the other evaluation clips are written."""
    mine = [row for row in _quarantine(hostile_job) if row["key"] == EVAL_CORRUPT]
    assert [(row["split"], row["stage"], row["reason"], row["epoch"]) for row in mine] == [
        ("eval", "decode", "corrupt", 0)]
    assert _written_primaries(hostile_job)[("eval", 0)] == Counter(hostile_job.data.good_eval)


def test_every_valid_clip_is_written_once_per_mixture_epoch(hostile_job):
    """Tried: valid clips sharing shards with failing ones (failed slots get filler clips). Survives: read back
    from the tar files, each valid train clip is a primary exactly once per mixture epoch, including the FLAC
    whose name says .wav, and no bad clip is written."""
    written = _written_primaries(hostile_job)
    expected = Counter(hostile_job.data.good_train)
    assert EXTENSION_LIES in expected
    for epoch in range(EPOCHS):
        assert written[("train", epoch)] == expected, epoch
    bad = set(hostile_job.data.bad_audio) | {EVAL_CORRUPT}
    assert not bad & {key for counter in written.values() for key in counter}


def test_the_ledger_accounts_for_every_manifest_clip(hostile_job):
    """Tried: the job's own ledger over the hostile run. Survives: per split and mixture epoch, manifest rows =
    primaries written + clips quarantined after the manifest, as the summary and dataset.json both say."""
    data = hostile_job.data
    decode_failures = sum(stage == "decode" for stage, _ in (
        BAD_AUDIO_STAGE[case] for case in data.bad_audio.values()))
    expected_train = {"manifest": len(data.good_train) + decode_failures, "primaries": len(data.good_train),
                      "quarantined": decode_failures}
    ledger = hostile_job.summary["ledger"]
    for epoch in map(str, range(EPOCHS)):
        counts = {k: v for k, v in ledger["train"][epoch].items() if k != "fillers"}
        assert counts == expected_train, (epoch, ledger["train"][epoch])
    assert ledger["eval"]["0"] == {"manifest": len(data.good_eval) + 1, "primaries": len(data.good_eval),
                                   "fillers": 0, "quarantined": 1}
    info = json.loads((hostile_job.output / "dataset.json").read_text())
    assert info["splits"]["train"]["ledger"] == ledger["train"]
    reasons = Counter(reason for stage, reason in map(BAD_AUDIO_STAGE.get, data.bad_audio.values())
                      if stage == "decode")
    reasons["corrupt"] += 1  # the evaluation clip
    assert hostile_job.summary["quarantined"]["decode"] == dict(reasons)
