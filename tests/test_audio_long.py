"""pipeline.audio on files longer than the target length: only the head is decoded (bounded memory and time),
features equal to the whole-file path within the DESIGN tolerance, truncated ends still caught, and clips that
fit the read budget processed bit for bit as a whole-file decode does."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio
from torch_threads import one_torch_thread  # noqa: F401  (autouse: every test here)

from pipeline import audio
from pipeline.audio import AudioError, decode, fbank_batch, head_samples, input_frames, kaldi_reference, load_waveform
from pipeline.config import AudioConfig

CFG = AudioConfig()
RATE = CFG.sample_rate
KEEP = head_samples(CFG)  # 164,080 samples: the 1024 frames of a 10.255 s head
CHECKOUT = Path(__file__).resolve().parents[1]


def signal(seconds: float, rate: int, seed: int, dc: float = 0.05) -> np.ndarray:
    """Tones that change over time, noise and a DC offset that drifts, so head and whole-file means differ."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    wave = 0.3 * np.sin(2 * np.pi * 440 * t * (1 + 0.1 * np.sin(0.3 * t))) + 0.1 * np.sin(2 * np.pi * 2500 * t)
    return (wave + 0.02 * rng.standard_normal(t.size) + dc * (1 + t / t[-1])).astype(np.float32)


def whole_file_wave(path: Path) -> torch.Tensor:
    """The whole file, down-mixed and resampled; at rates with a practical torchaudio kernel that is exactly
    what the front-end did before head decoding (torchaudio.functional.resample)."""
    samples, rate = decode(path, CFG)
    wave = audio.to_model_rate(samples, rate, CFG)
    if audio._has_small_kernel(rate, RATE):
        assert torch.equal(wave, torchaudio.functional.resample(torch.from_numpy(samples), rate, RATE))
    return wave


def assert_head_features_match(features: torch.Tensor, head: torch.Tensor, whole: torch.Tensor) -> None:
    """The features of the decoded head against kaldi.fbank of the head (the DESIGN contract: 1e-4 per element
    above the log floor) and of the whole file (the reference: mean of the whole file, head frames kept).

    The two references differ only by the constant subtracted (§1.5); kaldi.fbank removes each frame's mean, so
    that reaches the features as float32 rounding, largest in the near-floor low mel bins (up to ~2e-3 within a few
    units of the floor, measured). Ours may differ from the whole-file reference by no more than kaldi.fbank
    itself does.
    """
    of_head = kaldi_reference(head, CFG)[: CFG.target_length]
    of_whole = kaldi_reference(whole, CFG)[: CFG.target_length]
    above_floor = of_whole > audio.LOG_FLOOR + 1.0
    assert above_floor.float().mean() > 0.9
    torch.testing.assert_close(features[above_floor], of_head[above_floor], atol=1e-4, rtol=0)
    ours, kaldis = (features - of_whole).abs()[above_floor], (of_head - of_whole).abs()[above_floor]
    assert torch.all(ours <= kaldis + 1e-5)
    clear = of_whole > audio.LOG_FLOOR + 8.0
    torch.testing.assert_close(features[clear], of_whole[clear], atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    ("rate", "channels", "fmt"), [(16000, 1, "FLAC"), (44100, 2, "FLAC"), (22050, 1, "WAV"), (8012, 1, "OGG")]
)
def test_a_long_file_is_decoded_to_its_head_only(tmp_path: Path, rate: int, channels: int, fmt: str) -> None:
    mono = signal(25.0, rate, seed=rate)
    samples = np.stack([mono * (0.8 + 0.1 * c) for c in range(channels)], axis=1)
    path = tmp_path / f"long_{rate}.{fmt.lower()}"
    soundfile.write(path, samples, rate, format=fmt)

    reads: list[int] = []
    original_read = soundfile.SoundFile.read

    def counting_read(self, frames=-1, *args, **kwargs):
        result = original_read(self, frames, *args, **kwargs)
        reads.append(len(result))
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(soundfile.SoundFile, "read", counting_read)
        wave = load_waveform(path, CFG)
    budget = input_frames(KEEP, rate, RATE)
    assert reads[0] == budget < 0.45 * mono.size  # the head, then only the short tail check
    assert sum(reads[1:]) <= audio._TAIL_FRAMES

    whole = whole_file_wave(path)
    assert wave.shape == (KEEP,)
    assert torch.equal(wave, whole[:KEEP])  # the cut edge of the head does not reach the kept samples
    # The mean of the head differs from the whole file's; per-frame DC removal keeps the features equal.
    assert abs(float(wave.mean()) - float(whole.mean())) > 1e-3
    assert_head_features_match(fbank_batch([wave], CFG)[0], wave, whole)


@pytest.mark.parametrize("rate", [16000, 44100, 44099])
def test_clips_within_the_read_budget_are_processed_whole_as_before(tmp_path: Path, rate: int) -> None:
    budget = input_frames(KEEP, rate, RATE)
    for frames in (round(10.0 * rate), budget):
        path = tmp_path / f"clip_{rate}_{frames}.wav"
        soundfile.write(path, signal(frames / rate, rate, seed=frames)[:frames], rate, subtype="FLOAT")
        wave = load_waveform(path, CFG)
        assert torch.equal(wave, whole_file_wave(path))
    path = tmp_path / f"one_more_{rate}.wav"
    soundfile.write(path, signal((budget + 1) / rate, rate, seed=1)[: budget + 1], rate, subtype="FLOAT")
    assert load_waveform(path, CFG).numel() == KEEP  # one frame over the budget: cut to the head


def test_input_frames_cover_the_filter_of_the_kept_samples() -> None:
    """Resampling exactly input_frames(n) frames gives the same first n samples as resampling more; the
    margin is the filter's reach (plus torchaudio's block rounding), not more."""
    generator = torch.Generator().manual_seed(0)
    kept = 5000
    for rate in (8000, 11025, 22050, 44100, 48000, 96000, 8012, 44099):
        needed = input_frames(kept, rate, RATE)
        wave = torch.randn(needed + 3 * rate // 100, generator=generator)
        full = audio.to_model_rate(wave, rate, CFG)
        # Equal up to float rounding: torch may pick another conv kernel for another length (seen on one CPU: 1e-7);
        # a sample of the filter's reach missing moves the result by ~1e-2.
        gap = (audio.to_model_rate(wave[:needed], rate, CFG)[:kept] - full[:kept]).abs().max().item()
        assert gap <= 1e-5, (rate, gap)
        last_centre = (kept - 1) * rate // RATE  # input position of the last kept sample
        cut = audio.to_model_rate(wave[: last_centre + 1], rate, CFG)
        assert (cut[:kept] - full[:kept]).abs().max().item() > 1e-3, rate  # the filter's reach is needed
        common = math.gcd(rate, RATE)
        assert needed <= last_centre + audio._filter_half_width(rate, RATE) + rate // common + 2, rate


@pytest.mark.parametrize("fmt", ["FLAC", "OGG", "MP3", "WAV"])
def test_a_long_file_cut_after_its_head_is_corrupt(tmp_path: Path, fmt: str) -> None:
    if fmt not in soundfile.available_formats():
        pytest.skip(f"libsndfile {soundfile.__libsndfile_version__} cannot handle {fmt}")
    path = tmp_path / f"long.{fmt.lower()}"
    soundfile.write(path, signal(60.0, RATE, seed=2), RATE, format=fmt)
    assert load_waveform(path, CFG).numel() == KEEP
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])  # 36 s of 60 s remain: far past the 10.3 s head
    with pytest.raises(AudioError) as caught:
        load_waveform(path, CFG)
    assert caught.value.reason == "corrupt"
    assert caught.value.detail.startswith(("truncated", "decoding failed")), caught.value.detail


def test_an_end_that_does_not_decode_after_a_seek_is_counted_frame_by_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seeking is not sample-exact in every decoder (a valid 2.4 s stereo Vorbis file of the sample dataset read
    256 frames short after its seek): then the frames are counted by a full decode, and only a real shortfall
    is corruption."""
    monkeypatch.setattr(audio, "_read_tail", lambda sound, required: None)
    for fmt in ("OGG", "FLAC"):
        path = tmp_path / f"long.{fmt.lower()}"
        soundfile.write(path, signal(25.0, RATE, seed=8), RATE, format=fmt)
        assert load_waveform(path, CFG).numel() == KEEP
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.7)])
    with pytest.raises(AudioError) as caught:
        load_waveform(path, CFG)
    assert caught.value.reason == "corrupt"


def test_non_finite_samples_are_looked_for_in_the_frames_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The head and the last frames (read for the truncation check) are checked; the middle of a long file is
    never decoded, so a NaN there cannot reach the features and is not seen, unless the end had to be
    decoded block by block."""
    samples = signal(25.0, RATE, seed=9)
    cases = {"head": 1000, "end": samples.size - 10, "middle": samples.size // 2}
    reasons = {}
    for where, index in cases.items():
        path = tmp_path / f"nan_{where}.wav"
        bad = samples.copy()
        bad[index] = np.nan
        soundfile.write(path, bad, RATE, subtype="FLOAT")
        try:
            reasons[where] = load_waveform(path, CFG).numel()
        except AudioError as error:
            reasons[where] = error.reason
    assert reasons == {"head": "non_finite", "end": "non_finite", "middle": KEEP}
    monkeypatch.setattr(audio, "_read_tail", lambda sound, required: None)
    with pytest.raises(AudioError, match="non_finite"):
        load_waveform(tmp_path / "nan_middle.wav", CFG)


def _hour_flac(path: Path) -> None:
    """1 h of 16 kHz mono FLAC, written 10 s at a time."""
    chunk = signal(10.0, RATE, seed=3)
    with soundfile.SoundFile(path, "w", RATE, 1, subtype="PCM_16", format="FLAC") as sound:
        for _ in range(360):
            sound.write(chunk)


RSS_PROBE = """
import json, resource, sys, time
import torch
from pipeline.audio import fbank_batch, load_waveform
from pipeline.config import AudioConfig
torch.set_num_threads(1)
cfg = AudioConfig()
fbank_batch([load_waveform(sys.argv[1], cfg)], cfg)  # warm-up: lazy imports, allocator pools, cached kernels
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
features = fbank_batch([load_waveform(sys.argv[2], cfg)], cfg)
seconds = time.perf_counter() - started
print(json.dumps({"base_kib": base, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "seconds": seconds, "shape": list(features.shape)}))
"""


def _probe(warm_up: Path, clip: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CHECKOUT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", RSS_PROBE, str(warm_up), str(clip)], capture_output=True,
                            text=True, env=env, timeout=300, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_peak_memory_of_a_one_hour_file_is_that_of_a_ten_second_clip(tmp_path: Path) -> None:
    warm_up, ten, hour = tmp_path / "warm.flac", tmp_path / "ten.flac", tmp_path / "hour.flac"
    soundfile.write(warm_up, signal(1.0, RATE, seed=4), RATE)
    soundfile.write(ten, signal(10.0, RATE, seed=5), RATE)
    _hour_flac(hour)
    assert soundfile.info(hour).frames == 3600 * RATE
    short, long = _probe(warm_up, ten), _probe(warm_up, hour)
    assert short["shape"] == long["shape"] == [1, CFG.target_length, CFG.mel_bins]
    grown_short = short["peak_kib"] - short["base_kib"]
    grown_long = long["peak_kib"] - long["base_kib"]
    # A whole-file decode of the hour holds 230 MB of float32 samples (measured: +281 MB, against +8 MB).
    assert grown_long <= 2 * grown_short + 16 * 1024, (short, long)
    assert long["peak_kib"] <= 1.1 * short["peak_kib"], (short, long)
    assert long["seconds"] < 10 * short["seconds"] + 0.5, (short, long)


def test_head_decoding_time_does_not_grow_with_the_file(tmp_path: Path) -> None:
    ten, minute = tmp_path / "ten.flac", tmp_path / "minute.flac"
    soundfile.write(ten, signal(10.0, 44100, seed=6), 44100)
    soundfile.write(minute, signal(60.0, 44100, seed=7), 44100)

    def best_seconds(path: Path) -> float:
        best = math.inf
        for _ in range(5):
            started = time.perf_counter()
            load_waveform(path, CFG)
            best = min(best, time.perf_counter() - started)
        return best

    # A whole decode of the minute costs ~6x the 10 s clip; the head costs about the same as the clip.
    assert best_seconds(minute) < 3.0 * best_seconds(ten)
