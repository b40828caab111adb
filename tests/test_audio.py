"""pipeline.audio: batched fbank vs torchaudio's Kaldi fbank, padding/cropping, down-mix, resampling, bad files."""

from __future__ import annotations

import math
import os
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torchaudio

import pipeline.audio as audio
from pipeline.audio import (
    LOG_FLOOR,
    AudioError,
    AudioErrorReason,
    decode,
    fbank,
    fbank_batch,
    frame_count,
    kaldi_reference,
    load_waveform,
    to_model_rate,
)
from pipeline.config import AudioConfig

CFG = AudioConfig()
RATE = CFG.sample_rate


def assert_matches_kaldi(features: torch.Tensor, wave: torch.Tensor, cfg: AudioConfig = CFG) -> None:
    """Head of the Kaldi fbank within 1e-4 (the log floor region within 1.0), zero rows after it."""
    reference = kaldi_reference(wave, cfg)[: cfg.target_length]
    valid = reference.shape[0]
    ours = features[:valid]
    above_floor = reference > LOG_FLOOR + 1.0
    assert above_floor.float().mean() > 0.5
    torch.testing.assert_close(ours[above_floor], reference[above_floor], atol=1e-4, rtol=0)
    assert torch.all((ours[~above_floor] - reference[~above_floor]).abs() < 1.0)
    assert torch.equal(features[valid:], torch.zeros_like(features[valid:]))


def realistic_wave(seconds: float, seed: int) -> torch.Tensor:
    """Tones + noise + a DC offset, with digital-silence gaps."""
    generator = torch.Generator().manual_seed(seed)
    n = round(seconds * RATE)
    t = torch.arange(n) / RATE
    wave = 0.3 * torch.sin(2 * math.pi * 440 * t) + 0.1 * torch.sin(2 * math.pi * 3150 * t + 1.0)
    wave = wave * (0.5 + 0.5 * torch.sin(2 * math.pi * 0.7 * t)) + 0.02 * torch.randn(n, generator=generator) + 0.05
    wave[n // 5 : n // 5 + n // 10] = 0.0
    wave[-n // 20 :] = 0.0
    return wave.float()


# --------------------------------------------------------------------------------------------- features


def test_fbank_batch_matches_kaldi_on_mixed_lengths() -> None:
    generator = torch.Generator().manual_seed(0)
    waves = [
        0.3 * torch.randn(3 * RATE, generator=generator),
        realistic_wave(10.0, seed=1),
        realistic_wave(12.5, seed=2),  # 1248 frames: cropped to the head
        realistic_wave(1.0, seed=3),
        0.1 * torch.randn(480, generator=generator),  # a single frame
    ]
    features = fbank_batch(waves, CFG)
    assert features.shape == (len(waves), CFG.target_length, CFG.mel_bins)
    assert features.dtype == torch.float32
    for feats, wave in zip(features, waves):
        assert_matches_kaldi(feats, wave)


def test_ten_seconds_gives_998_frames_then_26_zero_rows() -> None:
    wave = realistic_wave(10.0, seed=4)
    assert frame_count(wave.numel(), CFG) == 998
    features = fbank(wave, CFG)
    assert features.shape == (1024, CFG.mel_bins)
    assert torch.equal(features[998:], torch.zeros(26, CFG.mel_bins))
    assert (features[:998] != 0).any(dim=1).all()


def test_crop_keeps_the_head_of_the_full_fbank() -> None:
    wave = realistic_wave(15.0, seed=5)
    full = kaldi_reference(wave, CFG)
    assert full.shape[0] == 1498
    torch.testing.assert_close(fbank(wave, CFG), full[:1024], atol=1e-4, rtol=0)


def test_chunking_does_not_change_features(monkeypatch: pytest.MonkeyPatch) -> None:
    waves = [realistic_wave(seconds, seed) for seed, seconds in enumerate([0.7, 2.0, 0.9, 3.1, 0.8])]
    expected = torch.stack([fbank(wave, CFG) for wave in waves])
    monkeypatch.setattr(audio, "_FRAMES_PER_CHUNK", 300)  # several clips per chunk, and chunks of one
    assert torch.equal(fbank_batch(waves, CFG), expected)


def test_config_shapes_are_respected() -> None:
    cfg = AudioConfig(mel_bins=64, target_length=200, frame_shift_ms=20.0)
    wave = realistic_wave(3.0, seed=6)
    assert frame_count(wave.numel(), cfg) == 1 + (wave.numel() - 400) // 320
    features = fbank(wave, cfg)
    assert features.shape == (200, 64)
    assert_matches_kaldi(features, wave, cfg)


def test_frame_count_follows_snip_edges() -> None:
    assert [frame_count(n, CFG) for n in (0, 399, 400, 559, 560, 160000)] == [0, 0, 1, 1, 2, 998]


def test_fbank_rejects_clips_without_a_frame_and_non_mono_input() -> None:
    with pytest.raises(ValueError, match="fewer than one 400-sample frame"):
        fbank_batch([torch.zeros(1000), torch.zeros(399)], CFG)
    with pytest.raises(ValueError, match="1-D mono"):
        fbank_batch([torch.zeros(2, 1000)], CFG)
    assert fbank_batch([], CFG).shape == (0, CFG.target_length, CFG.mel_bins)


def test_log_floor_is_log_of_float32_eps() -> None:
    assert LOG_FLOOR == pytest.approx(math.log(1.1920929e-07))
    silent = fbank(torch.zeros(RATE), CFG)
    assert torch.equal(silent[:98], torch.full((98, CFG.mel_bins), LOG_FLOOR))


# ------------------------------------------------------------------------------- decoding and resampling


def tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_stereo_is_averaged_before_resampling(tmp_path: Path) -> None:
    left = tone(1.0, 44100)
    cancelling = tmp_path / "cancel.wav"
    soundfile.write(cancelling, np.stack([left, -left], axis=1), 44100, subtype="FLOAT")
    samples, rate = decode(cancelling, CFG)
    assert rate == 44100 and samples.shape == (44100,)
    assert not samples.any()
    assert not load_waveform(cancelling, CFG).any()

    stereo = np.stack([left, tone(1.0, 44100, freq=1234.0)], axis=1)
    path = tmp_path / "stereo.flac"
    soundfile.write(path, stereo, 44100)
    written, _ = soundfile.read(path, dtype="float32")
    samples, _ = decode(path, CFG)
    np.testing.assert_array_equal(samples, written.mean(axis=1, dtype=np.float32))
    expected = torchaudio.functional.resample(torch.from_numpy(samples), 44100, RATE)
    assert torch.equal(load_waveform(path, CFG), expected)


@pytest.mark.parametrize("channels", range(1, 10))
def test_down_mix_is_numpys_channel_mean_bit_for_bit(channels: int) -> None:
    samples = np.random.default_rng(channels).standard_normal((5000, channels)).astype(np.float32)
    samples[:100] = -0.0  # the sum starts from +0.0 in numpy: -0.0 channels average to +0.0
    samples[100:200] = np.float32(3e38)  # overflow to inf, as numpy's float32 sum does
    with np.errstate(over="ignore"):
        mixed = audio.down_mix(samples)
        expected = samples[:, 0] if channels == 1 else samples.mean(axis=1, dtype=np.float32)
    assert mixed.dtype == np.float32 and mixed.flags.c_contiguous
    np.testing.assert_array_equal(mixed.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resampled_lengths(tmp_path: Path, rate: int) -> None:
    path = tmp_path / f"clip_{rate}.wav"
    soundfile.write(path, tone(1.3, rate), rate, subtype="FLOAT")
    wave = load_waveform(path, CFG)
    reference = torchaudio.functional.resample(torch.zeros(round(1.3 * rate)), rate, RATE)
    assert wave.dtype == torch.float32 and wave.dim() == 1
    assert wave.numel() == reference.numel() == math.ceil(round(1.3 * rate) * RATE / rate)


def test_model_rate_is_the_identity(tmp_path: Path) -> None:
    path = tmp_path / "native.wav"
    soundfile.write(path, tone(1.0, RATE), RATE, subtype="FLOAT")
    samples, rate = decode(path, CFG)
    assert rate == RATE
    np.testing.assert_array_equal(load_waveform(path, CFG).numpy(), samples)
    assert torch.equal(to_model_rate(torch.ones(5), RATE, CFG), torch.ones(5))
    with pytest.raises(ValueError, match="outside"):
        to_model_rate(np.zeros(100, np.float32), 500, CFG)


def test_extension_that_lies_is_decoded_from_content(tmp_path: Path) -> None:
    flac_named_wav = tmp_path / "really_flac.wav"
    soundfile.write(flac_named_wav, tone(1.0, 22050), 22050, format="FLAC")
    samples, rate = decode(flac_named_wav, CFG)
    assert rate == 22050
    np.testing.assert_allclose(samples, tone(1.0, 22050), atol=1e-4)


@pytest.mark.parametrize("fmt", ["OGG", "MP3"])
def test_compressed_formats_decode(tmp_path: Path, fmt: str) -> None:
    if fmt not in soundfile.available_formats():
        pytest.skip(f"libsndfile {soundfile.__libsndfile_version__} cannot handle {fmt}")
    path = tmp_path / f"clip.{fmt.lower()}"
    soundfile.write(path, tone(1.0, RATE), RATE, format=fmt)
    wave = load_waveform(path, CFG)
    assert wave.numel() == RATE
    assert 0.2 < wave.abs().max() < 0.6


# ------------------------------------------------------------------------------------------ bad audio


def write_wav_with_rate(path: Path, rate: int) -> None:
    soundfile.write(path, tone(1.0, RATE), RATE, subtype="PCM_16")
    header = bytearray(path.read_bytes())
    header[24:28] = struct.pack("<I", rate)  # fmt chunk sample rate of a canonical 44-byte header
    path.write_bytes(bytes(header))


def truncated(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def make_bad_file(tmp_path: Path, case: str) -> Path:
    rng = np.random.default_rng(0)
    noise = (0.1 * rng.standard_normal(3 * RATE)).astype(np.float32)
    match case:
        case "missing":
            return tmp_path / "nowhere.wav"
        case "zero_bytes":
            path = tmp_path / "empty.wav"
            path.write_bytes(b"")
        case "zero_frames":
            path = tmp_path / "no_frames.wav"
            soundfile.write(path, np.zeros(0, np.float32), RATE)
        case "too_short_native":
            path = tmp_path / "short.wav"
            soundfile.write(path, noise[:9999], RATE)
        case "too_short_after_resampling":
            path = tmp_path / "short_44k.wav"
            soundfile.write(path, noise[:27000], 44100)  # 9796 samples at 16 kHz
        case "random_bytes_wav":
            path = tmp_path / "noise.wav"
            path.write_bytes(rng.bytes(20000))
        case "truncated_wav":
            path = tmp_path / "cut.wav"
            soundfile.write(path, noise, RATE, subtype="PCM_16")
            truncated(path, 0.6)
        case "truncated_flac":
            path = tmp_path / "cut.flac"
            soundfile.write(path, noise, RATE)
            truncated(path, 0.6)
        case "truncated_ogg":
            path = tmp_path / "cut.ogg"
            soundfile.write(path, noise, RATE)
            truncated(path, 0.6)
        case "text_xyz":
            path = tmp_path / "notes.xyz"
            path.write_text("not audio at all\n" * 50)
        case "random_bytes_m4a":
            path = tmp_path / "clip.m4a"
            path.write_bytes(rng.bytes(20000))
        case "nan_samples":
            path = tmp_path / "nan.wav"
            bad = noise.copy()
            bad[100] = np.nan
            soundfile.write(path, bad, RATE, subtype="FLOAT")
        case "inf_samples":
            path = tmp_path / "inf.flac.wav"
            bad = noise.copy()
            bad[-1] = -np.inf
            soundfile.write(path, bad, RATE, subtype="DOUBLE")
        case "rate_1_hz":
            path = tmp_path / "one_hz.wav"
            write_wav_with_rate(path, 1)
        case "rate_10_mhz":
            path = tmp_path / "ten_mhz.wav"
            write_wav_with_rate(path, 10_000_000)
        case "rate_0_hz":
            path = tmp_path / "zero_hz.wav"
            write_wav_with_rate(path, 0)  # libsndfile refuses to open it; the fmt chunk says why
        case "rate_0_hz_flac":
            path = tmp_path / "zero_hz.flac"
            soundfile.write(path, noise, RATE)
            header = bytearray(path.read_bytes())
            header[18:21] = bytes([0, 0, header[20] & 0x0F])  # STREAMINFO's 20-bit sample rate
            path.write_bytes(bytes(header))
        case "truncated_long_flac":
            path = tmp_path / "cut_long.flac"  # cut after the head that load_waveform decodes
            soundfile.write(path, np.tile(noise, 10), RATE)
            truncated(path, 0.6)
        case _:
            raise AssertionError(case)
    return path


BAD_FILES = {
    "missing": "missing",
    "zero_bytes": "empty_file",
    "zero_frames": "no_samples",
    "too_short_native": "too_short",
    "too_short_after_resampling": "too_short",
    "random_bytes_wav": "corrupt",
    "truncated_wav": "corrupt",
    "truncated_flac": "corrupt",
    "truncated_ogg": "corrupt",
    "text_xyz": "unsupported_format",
    "random_bytes_m4a": "unsupported_format",
    "nan_samples": "non_finite",
    "inf_samples": "non_finite",
    "rate_1_hz": "bad_sample_rate",
    "rate_10_mhz": "bad_sample_rate",
    "rate_0_hz": "bad_sample_rate",
    "rate_0_hz_flac": "bad_sample_rate",
    "truncated_long_flac": "corrupt",
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_audio_raises_with_reason(tmp_path: Path, case: str) -> None:
    path = make_bad_file(tmp_path, case)
    with pytest.raises(AudioError) as caught:
        load_waveform(path, CFG)
    error = caught.value
    assert error.reason == BAD_FILES[case]
    assert error.reason in {reason.value for reason in AudioErrorReason}
    assert error.path == str(path)
    assert error.detail
    assert str(error) == f"{path}: {error.reason} ({error.detail})"


def test_text_named_mp3_is_corrupt_when_mp3_is_decodable(tmp_path: Path) -> None:
    """The extension names a format this libsndfile decodes, so content it cannot parse is corrupt."""
    path = tmp_path / "lyrics.mp3"
    path.write_text("not audio at all\n" * 50)
    expected = "corrupt" if "MP3" in soundfile.available_formats() else "unsupported_format"
    with pytest.raises(AudioError) as caught:
        decode(path, CFG)
    assert caught.value.reason == expected


def test_unknown_data_size_of_streamed_wav_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "streamed.wav"
    soundfile.write(path, tone(1.0, RATE), RATE, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    data[40:44] = struct.pack("<I", 0xFFFFFFFF)  # data chunk size of a canonical 44-byte header
    path.write_bytes(bytes(data))
    samples, _ = decode(path, CFG)
    assert samples.shape == (RATE,)


def test_truncated_mp3_is_corrupt(tmp_path: Path) -> None:
    if "MP3" not in soundfile.available_formats():
        pytest.skip(f"libsndfile {soundfile.__libsndfile_version__} cannot handle MP3")
    path = tmp_path / "cut.mp3"
    soundfile.write(path, tone(3.0, RATE), RATE)
    with pytest.raises(AudioError) as caught:
        decode(truncated(path, 0.6), CFG)
    assert caught.value.reason == "corrupt"


# ------------------------------------------------------------------------------------ non-regular files


def _decode_in_thread(path: Path) -> AudioError | BaseException | None:
    """decode(path) in a thread; a decode that blocks (opening a FIFO waits for a writer) fails the test."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            decode(path, CFG)
            outcome.append(None)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome.append(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout=20)
    if worker.is_alive():
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # release the blocked reader
        pytest.fail(f"decode blocked on {path}")
    return outcome[0]


def test_non_regular_files_are_refused_without_opening(tmp_path: Path) -> None:
    fifo = tmp_path / "clip.wav"
    os.mkfifo(fifo)
    directory = tmp_path / "folder.flac"
    directory.mkdir()
    link_to_directory = tmp_path / "link.flac"
    link_to_directory.symlink_to(directory)
    socket_path = tmp_path / "s.wav"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(socket_path))
    cases = {fifo: "a FIFO", directory: "a directory", link_to_directory: "a directory", socket_path: "a socket",
             Path("/dev/null"): "a character device"}
    try:
        for path, kind in cases.items():
            error = _decode_in_thread(path)
            assert isinstance(error, AudioError), (path, error)
            assert (error.reason, error.detail) == ("not_a_file", f"{kind}, not a regular file")
            with pytest.raises(AudioError, match="not_a_file"):
                load_waveform(path, CFG)
    finally:
        listener.close()
    dangling = tmp_path / "dangling.wav"
    dangling.symlink_to(tmp_path / "nowhere.wav")
    with pytest.raises(AudioError) as caught:
        decode(dangling, CFG)
    assert caught.value.reason == "missing"


def test_a_path_that_turns_into_a_fifo_after_the_check_does_not_block(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kind is checked again on the opened descriptor (opened non-blocking), so swapping a checked file for
    a FIFO cannot hang the task."""
    regular = tmp_path / "regular.wav"
    soundfile.write(regular, tone(1.0, RATE), RATE)
    fifo = tmp_path / "swapped.wav"
    os.mkfifo(fifo)
    real_stat = os.stat
    monkeypatch.setattr(audio.os, "stat", lambda path, *a, **k: real_stat(regular if path == fifo else path, *a, **k))
    error = _decode_in_thread(fifo)
    assert isinstance(error, AudioError) and error.reason == "not_a_file", error
