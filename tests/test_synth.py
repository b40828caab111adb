"""pipeline.synth: determinism, official CSV formats, multi-hot labels, broken files, manifest over the output; the
"events" profile (short percussive clips of varied length) and the unchanged default output."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import soundfile

from pipeline.config import SourceConfig, SplitConfig, SynthConfig
from pipeline.csv_rows import read_class_labels, read_segments_csv
from pipeline.manifest import build_manifest
from pipeline.synth import (
    BROKEN_KINDS,
    EVENTS_CLIP_SECONDS,
    SAMPLE_RATES,
    SCENE_KINDS,
    make_sample_dataset,
    synth_classes,
)

# sha256 over the CSV and WAV files of the default profile (seed 3, 12 + 4 clips), as generated before the
# "events" profile was added: the default output must not change.
DEFAULT_PROFILE_DIGEST = "497b2abaa7944d8338f35392d832b1130874a39bfa55f68cebaa18d876eaec72"
SMALL = SynthConfig(train_clips=24, eval_clips=8, num_classes=12, broken_files=True, seed=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("sample")
    return out, make_sample_dataset(out, SMALL)


def files_of(root: Path) -> dict[str, Path]:
    return {path.relative_to(root).as_posix(): path for path in sorted(root.rglob("*")) if path.is_file()}


def test_same_seed_same_files(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    out, summary = dataset
    again = make_sample_dataset(tmp_path, SMALL)
    assert {k: v for k, v in again.items() if k not in ("out_dir", "splits")} == {
        k: v for k, v in summary.items() if k not in ("out_dir", "splits")
    }
    first, second = files_of(out), files_of(tmp_path)
    assert first.keys() == second.keys()
    for name, path in first.items():
        if name.endswith(".ogg"):
            # libsndfile picks a random Ogg stream serial: compare decoded samples instead of bytes.
            a, rate_a = soundfile.read(path)
            b, rate_b = soundfile.read(second[name])
            assert rate_a == rate_b and np.array_equal(a, b), name
        else:
            assert path.read_bytes() == second[name].read_bytes(), name


def test_different_seed_different_dataset(dataset: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = dataset
    other = SynthConfig(train_clips=SMALL.train_clips, eval_clips=SMALL.eval_clips, seed=SMALL.seed + 1)
    make_sample_dataset(tmp_path, other)
    assert (out / "balanced_train_segments.csv").read_text() != (tmp_path / "balanced_train_segments.csv").read_text()
    assert not set(files_of(out / "audio")) & set(files_of(tmp_path / "audio"))


def test_csvs_parse_and_labels_are_from_the_class_list(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    classes = read_class_labels(out / "class_labels_indices.csv")
    assert [c.mid for c in classes] == [f"/m/syn{i:04d}" for i in range(1, 13)]
    assert [c.display_name for c in classes] == summary["classes"]
    mids = {c.mid for c in classes}
    header = (out / "balanced_train_segments.csv").read_text().splitlines()[:3]
    assert header[1].startswith("# num_ytids=30, num_segs=30,")
    assert header[2] == "# YTID, start_seconds, end_seconds, positive_labels"

    train, train_bad = read_segments_csv(out / "balanced_train_segments.csv")
    evaluation, eval_bad = read_segments_csv(out / "eval_segments.csv")
    assert train_bad == [] and eval_bad == []
    assert len(train) == SMALL.train_clips + len(BROKEN_KINDS) and len(evaluation) == SMALL.eval_clips
    assert not {s.ytid for s in train} & {s.ytid for s in evaluation}
    for segment in train + evaluation:
        assert len(segment.ytid) == 11
        assert 1 <= len(segment.label_mids) <= 3 and set(segment.label_mids) <= mids
        assert len(set(segment.label_mids)) == len(segment.label_mids)
    assert max(len(s.label_mids) for s in train) > 1  # some clips are multi-label


def test_clips_vary_in_rate_channels_length_and_format(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    segments, _ = read_segments_csv(out / "balanced_train_segments.csv")
    broken = set(summary["broken"].values())
    infos = {}
    for segment in segments:
        if segment.ytid in broken:
            continue
        (path,) = (out / "audio").glob(f"{segment.ytid}.*")
        info = soundfile.info(path)
        infos[segment.ytid] = info
        assert info.frames / info.samplerate == pytest.approx(segment.end_s - segment.start_s, abs=1e-3)
        data, _ = soundfile.read(path, always_2d=True)
        assert np.isfinite(data).all() and np.abs(data).max() <= 1.0
    assert {info.samplerate for info in infos.values()} == set(SAMPLE_RATES)
    assert {info.channels for info in infos.values()} == {1, 2}
    assert {info.format for info in infos.values()} == {"WAV", "FLAC", "OGG"}
    durations = [info.frames / info.samplerate for info in infos.values()]
    assert min(durations) < 10.0 < max(durations) <= 12.0
    assert summary["total_bytes"] < 10 * 2**20


def test_broken_files_exist_as_listed(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    broken = summary["broken"]
    assert set(broken) == set(BROKEN_KINDS)
    audio = out / "audio"
    assert (audio / f"{broken['empty']}.wav").stat().st_size == 0
    assert not list(audio.glob(f"{broken['missing']}.*"))
    with pytest.raises(soundfile.LibsndfileError):
        soundfile.read(audio / f"{broken['truncated_flac']}.flac")
    truncated_wav = soundfile.info(audio / f"{broken['truncated_wav']}.wav")
    assert truncated_wav.frames < 3 * truncated_wav.samplerate  # fewer frames than were written
    nan_samples, _ = soundfile.read(audio / f"{broken['nan']}.wav")
    assert np.isnan(nan_samples).any()
    short = soundfile.info(audio / f"{broken['too_short']}.wav")
    assert short.frames / short.samplerate == pytest.approx(0.2)


def test_manifest_over_the_sample_dataset(dataset: tuple[Path, dict]) -> None:
    out, summary = dataset
    source = SourceConfig(
        kind="audioset",
        audio_root=str(out / "audio"),
        class_labels_csv=str(out / "class_labels_indices.csv"),
        filename_pattern="{ytid}.{ext}",
        splits=[
            SplitConfig(name="train", csv=str(out / "balanced_train_segments.csv"), mix=True),
            SplitConfig(name="eval", csv=str(out / "eval_segments.csv"), mix=False),
        ],
    )
    manifest, quarantine = build_manifest(source)
    assert [(r["key"], r["reason"]) for r in quarantine.to_pylist()] == [(summary["broken"]["missing"], "missing_file")]
    rows = summary["splits"]["train"]["rows"] + summary["splits"]["eval"]["rows"]
    assert manifest.num_rows == rows - 1
    labels = manifest.column("label_indices").to_pylist()
    assert all(0 <= index < SMALL.num_classes for row in labels for index in row)


def test_classes_have_distinct_signatures() -> None:
    """Log spectrograms of the class generators differ pairwise (the probe must be able to tell them apart)."""
    sample_rate, frame = 16000, 512
    vectors = []
    for synth_class in synth_classes(24):
        t = np.arange(sample_rate) / sample_rate
        wave = synth_class.kind.generate(np.random.default_rng(0), t, float(sample_rate), synth_class.pitch)
        frames = wave[: (wave.size // frame) * frame].reshape(-1, frame) * np.hanning(frame)
        vector = np.log(np.abs(np.fft.rfft(frames, axis=1)) ** 2 + 1e-6).ravel()
        vector -= vector.mean()
        vectors.append(vector / np.linalg.norm(vector))
    similarity = np.array(vectors) @ np.array(vectors).T
    np.fill_diagonal(similarity, 0.0)
    assert similarity.max() < 0.98


# ------------------------------------------------------------------------------------- the "events" profile

EVENTS = SynthConfig(train_clips=40, eval_clips=20, num_classes=10, broken_files=False, seed=5, profile="events")


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("events")
    return out, make_sample_dataset(out, EVENTS)


def test_default_profile_output_is_unchanged(tmp_path: Path) -> None:
    """The default sample set is byte-identical to the one before profiles existed (CSVs and PCM WAV files)."""
    make_sample_dataset(tmp_path, SynthConfig(train_clips=12, eval_clips=4, seed=3))
    digest = hashlib.sha256()
    for name, path in files_of(tmp_path).items():
        if name.endswith((".csv", ".wav")):
            digest.update(name.encode() + path.read_bytes())
    assert digest.hexdigest() == DEFAULT_PROFILE_DIGEST


def test_events_clip_lengths_are_short_and_varied(events: tuple[Path, dict]) -> None:
    out, summary = events
    assert summary["profile"] == "events" and summary["broken"] == {}
    segments = [s for name in ("balanced_train_segments.csv", "eval_segments.csv") for s in read_segments_csv(out / name)[0]]
    durations = []
    for segment in segments:
        (path,) = (out / "audio").glob(f"{segment.ytid}.*")
        info = soundfile.info(path)
        durations.append(info.frames / info.samplerate)
        assert durations[-1] == pytest.approx(segment.end_s - segment.start_s, abs=1e-3)
    durations = np.array(durations)
    assert durations.min() >= EVENTS_CLIP_SECONDS[0] - 1e-3 and durations.max() <= EVENTS_CLIP_SECONDS[1] + 1e-3
    assert np.median(durations) < 4.0  # most clips well under 10 s ...
    # ... and clips both shorter and longer than the tiny configs' 5.12 s input.
    assert (durations < 2.0).mean() > 0.25 and (durations > 5.12).mean() > 0.1


def test_events_have_one_label_from_the_scene_classes(events: tuple[Path, dict]) -> None:
    out, summary = events
    classes = read_class_labels(out / "class_labels_indices.csv")
    assert [c.display_name for c in classes] == [kind.name for kind in SCENE_KINDS] == summary["classes"]
    segments = read_segments_csv(out / "balanced_train_segments.csv")[0]
    assert all(len(s.label_mids) == 1 for s in segments)
    assert len({s.label_mids[0] for s in segments}) >= 8  # 40 clips cover most of the 10 classes


def test_events_are_percussive_over_a_background(events: tuple[Path, dict]) -> None:
    """Hits with sharp onsets and decays: the loudest 10 ms frame is far above the clip's median frame."""
    out, _ = events
    ratios = []
    for path in sorted((out / "audio").iterdir()):
        samples, rate = soundfile.read(path, always_2d=True)
        frame = rate // 100
        energy = np.sqrt((samples[: len(samples) // frame * frame, 0].reshape(-1, frame) ** 2).mean(axis=1))
        ratios.append(energy.max() / max(np.median(energy), 1e-9))
        assert np.isfinite(samples).all() and np.abs(samples).max() <= 1.0
    assert np.median(ratios) > 3.0


def test_events_same_seed_same_files(events: tuple[Path, dict], tmp_path: Path) -> None:
    out, summary = events
    again = make_sample_dataset(tmp_path, EVENTS)
    assert again["classes"] == summary["classes"] and again["total_bytes"] == summary["total_bytes"]
    first, second = files_of(out), files_of(tmp_path)
    assert first.keys() == second.keys()
    for name, path in first.items():
        if name.endswith(".ogg"):
            assert np.array_equal(soundfile.read(path)[0], soundfile.read(second[name])[0]), name
        else:
            assert path.read_bytes() == second[name].read_bytes(), name
    other = make_sample_dataset(tmp_path / "other", SynthConfig(**{**EVENTS.__dict__, "seed": EVENTS.seed + 1}))
    assert other["total_bytes"] != summary["total_bytes"]


def test_unknown_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="profile"):
        synth_classes(3, profile="speechy")
