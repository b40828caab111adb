"""pipeline.audio at any sample rate soundfile decodes: common rates through torchaudio's cached kernel (bit for bit
torchaudio.functional.resample), odd rates (8012 Hz, 44099 Hz, ...) through the same filter evaluated per output
sample; both checked against float64 torchaudio and against scipy.signal.resample_poly; broken headers still
quarantined as bad_sample_rate."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import soundfile
import torch
import torchaudio
from torch_threads import one_torch_thread  # noqa: F401  (autouse: every test here)

from pipeline import audio
from pipeline.audio import AudioError, decode, fbank_batch, frame_count, load_waveform, to_model_rate
from pipeline.config import AudioConfig

CFG = AudioConfig()
RATE = CFG.sample_rate
# Tones as fractions of the band both resamplers keep, min(source, model rate) / 2. torchaudio's filter (§1.3:
# roll-off 0.99, 6 zero crossings, Hann) falls off from ~0.7 of the band (-1.5 dB at 0.875 against
# resample_poly's Kaiser filter, measured): the comparison stays below 0.65.
TONE_FRACTIONS = (0.02, 0.06, 0.15, 0.3, 0.45, 0.62)
TONE_DB_TOLERANCE = 0.05
FEATURE_MEAN_TOLERANCE = 0.05  # mean |log-mel difference| over the mel bins inside 0.6 of the band


def tones(rate: int, seconds: float, seed: int) -> tuple[np.ndarray, list[float]]:
    band = min(rate, RATE) / 2
    freqs = [fraction * band for fraction in TONE_FRACTIONS]
    t = np.arange(round(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    wave = sum(0.1 * np.sin(2 * np.pi * f * t + k) for k, f in enumerate(freqs)) + 0.01 * rng.standard_normal(t.size)
    return wave.astype(np.float32), freqs


def tone_levels_db(wave: np.ndarray, freqs: list[float]) -> np.ndarray:
    """Level of each tone in a Hann-windowed 2 s FFT of the middle of the clip."""
    start, size = RATE // 2, 2 * RATE
    spectrum = np.abs(np.fft.rfft(wave[start : start + size] * np.hanning(size)))
    bins = np.fft.rfftfreq(size, 1 / RATE)
    return np.array([20 * np.log10(spectrum[np.argmin(np.abs(bins - f))]) for f in freqs])


def mel_centres_hz(cfg: AudioConfig) -> np.ndarray:
    mel = lambda hz: 1127 * np.log(1 + hz / 700)  # noqa: E731
    edges = np.linspace(mel(audio.LOW_FREQ_HZ), mel(cfg.sample_rate / 2), cfg.mel_bins + 2)
    return 700 * (np.exp(edges[1:-1] / 1127) - 1)


ODD_RATES = [8012, 7351, 12345, 37811, 44099, 96001]
COMMON_RATES = [8000, 11025, 22050, 32000, 44100, 48000, 96000]


@pytest.mark.parametrize("rate", COMMON_RATES + ODD_RATES)
def test_any_rate_matches_an_independent_resampler(tmp_path: Path, rate: int) -> None:
    samples, freqs = tones(rate, 3.0, seed=rate)
    path = tmp_path / f"clip_{rate}.wav"
    soundfile.write(path, samples, rate, subtype="FLOAT")
    wave = load_waveform(path, CFG)
    assert wave.numel() == math.ceil(samples.size * RATE / rate)

    common = math.gcd(rate, RATE)
    reference = scipy.signal.resample_poly(samples.astype(np.float64), RATE // common, rate // common)
    assert reference.size == wave.numel()
    ours = wave.numpy().astype(np.float64)
    np.testing.assert_allclose(tone_levels_db(ours, freqs), tone_levels_db(reference, freqs), atol=TONE_DB_TOLERANCE)

    frames = frame_count(wave.numel(), CFG)
    features = fbank_batch([wave, torch.from_numpy(reference.astype(np.float32))], CFG)[:, 3 : frames - 3]
    inside = torch.from_numpy(mel_centres_hz(CFG) < 0.6 * min(rate, RATE) / 2)
    assert float((features[0] - features[1])[:, inside].abs().mean()) < FEATURE_MEAN_TOLERANCE


@pytest.mark.parametrize("rate", COMMON_RATES)
def test_common_rates_are_torchaudio_bit_for_bit(rate: int) -> None:
    samples, _ = tones(rate, 1.3, seed=1)
    expected = torchaudio.functional.resample(torch.from_numpy(samples), rate, RATE)
    assert torch.equal(to_model_rate(samples, rate, CFG), expected)
    assert torch.equal(to_model_rate(samples, rate, CFG), expected)  # the cached kernel, second use


@pytest.mark.parametrize("rate", [8012, 12345, 44104])
def test_odd_rates_are_torchaudios_filter_in_float64(rate: int) -> None:
    """Rates whose torchaudio kernel is too large for the pipeline but still fits a test: the per-output
    evaluation equals float64 torchaudio to float32 rounding (torchaudio's float32 kernel is off by up to ~5e-5)."""
    assert not audio._has_small_kernel(rate, RATE)
    samples, _ = tones(rate, 1.0, seed=2)
    ours = to_model_rate(samples, rate, CFG)
    reference = torchaudio.functional.resample(torch.from_numpy(samples).double(), rate, RATE)
    assert ours.dtype == torch.float32 and ours.shape == reference.shape
    torch.testing.assert_close(ours.double(), reference, atol=1e-7, rtol=0)


def test_the_per_output_filter_equals_torchaudio_at_a_common_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    samples, _ = tones(44100, 1.0, seed=3)
    monkeypatch.setattr(audio, "_MAX_RESAMPLE_RATIO_PRODUCT", 0)
    ours = to_model_rate(samples, 44100, CFG)
    reference = torchaudio.functional.resample(torch.from_numpy(samples).double(), 44100, RATE)
    torch.testing.assert_close(ours.double(), reference, atol=1e-7, rtol=0)


@pytest.mark.parametrize(("rate", "fmt"), [(8012, "OGG"), (7351, "FLAC"), (44099, "FLAC"), (22050, "OGG")])
def test_valid_files_at_odd_rates_decode(tmp_path: Path, rate: int, fmt: str) -> None:
    samples, _ = tones(rate, 2.0, seed=4)
    path = tmp_path / f"clip_{rate}.{fmt.lower()}"
    soundfile.write(path, samples, rate, format=fmt)
    assert decode(path, CFG)[1] == rate
    wave = load_waveform(path, CFG)
    assert wave.numel() == math.ceil(soundfile.info(path).frames * RATE / rate)
    assert 0.05 < float(wave.std()) < 0.5


def test_an_odd_rate_head_is_quick() -> None:
    samples = np.random.default_rng(5).standard_normal(audio.input_frames(audio.head_samples(CFG), 96001, RATE))
    started = time.perf_counter()
    to_model_rate(samples.astype(np.float32), 96001, CFG)  # the widest filter below 100 kHz: 75 taps
    assert time.perf_counter() - started < 5.0  # measured ~0.3 s on one core


@pytest.mark.parametrize("rate", [0, 999, 384001, 4_294_967_295])
def test_broken_header_rates_are_bad_sample_rate(tmp_path: Path, rate: int) -> None:
    path = tmp_path / "clip.wav"
    soundfile.write(path, np.zeros(RATE, np.float32), RATE, subtype="PCM_16")
    header = bytearray(path.read_bytes())
    header[24:28] = rate.to_bytes(4, "little")  # the fmt chunk's sample rate
    path.write_bytes(bytes(header))
    with pytest.raises(AudioError) as caught:
        load_waveform(path, CFG)
    assert caught.value.reason == "bad_sample_rate"
    assert str(rate) in caught.value.detail
    with pytest.raises(ValueError, match="outside"):
        to_model_rate(np.zeros(100, np.float32), rate, CFG)
