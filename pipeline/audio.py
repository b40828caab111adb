"""The audio front-end (SSLAM_SPEC §1, §14.8): decode and validate a file, resample, and the one batched fbank.

* `decode` reads a file with soundfile (float32 in [-1, 1]), averages the channels to mono and validates it.
  Anything unusable raises `AudioError` whose `reason` is one of `AudioErrorReason` (the preprocessing job
  writes it to its quarantine table).
* `to_model_rate` resamples to `AudioConfig.sample_rate` with torchaudio's defaults; `load_waveform` chains
  decode, down-mix, resample and the `too_short` check (mono **before** resampling, §14.8).
* `fbank_batch` is the only feature function of the project: raw (un-normalised) Kaldi log-mel of every clip,
  zero rows appended / head cropped to `target_length` (§1.7-§1.8). It frames clips of any lengths together in
  cache-sized chunks and agrees with `torchaudio.compliance.kaldi.fbank` (the §1.7 arguments, on the
  mean-removed clip) to about 1e-6, about 2x faster on one CPU thread (benchmarks/frontend.py).
"""

from __future__ import annotations

import functools
import math
import os
import stat
import struct
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile
import torch
import torchaudio
from torchaudio.compliance import kaldi

from pipeline.config import AudioConfig

# Kaldi fbank settings of §1.7 that are not configurable in this project.
PREEMPHASIS = 0.97
LOW_FREQ_HZ = 20.0
HIGH_FREQ_HZ = 0.0  # 0 means Nyquist
_FLOAT32_EPS = torch.finfo(torch.float32).eps
LOG_FLOOR = math.log(_FLOAT32_EPS)  # value of a log-mel bin whose energy is below float32 eps

# Frames per feature chunk. Small chunks stay in the CPU cache: one 10 s clip (998 frames, ~2 MiB per
# intermediate) per chunk ran ~1.5x faster than 16 clips per chunk on one core (benchmarks/frontend.py).
_FRAMES_PER_CHUNK = 1024
# Filters per block of the mel product: a block touches only the FFT bins of its filters, so the product costs a
# fraction of the dense (bins x mel_bins) matmul while staying a BLAS call.
_MEL_FILTERS_PER_BLOCK = 16
# Resampling from a to b Hz builds a (b/g) x (a/g + taps) kernel, g = gcd(a, b); odd header rates such as
# 44099 Hz would need gigabytes, so rates whose reduced ratio exceeds this product are rejected.
_MAX_RESAMPLE_RATIO_PRODUCT = 1 << 22
# Largest Ogg page: 27-byte header, 255 lacing values, 255 segments of 255 bytes.
_OGG_MAX_PAGE_BYTES = 27 + 255 + 255 * 255
# libsndfile's "Format not recognised" error code.
_SF_UNRECOGNISED_FORMAT = 1
# File extensions of formats the installed libsndfile decodes (mp3 needs libsndfile >= 1.1).
_DECODABLE_EXTENSIONS = {name.lower() for name in soundfile.available_formats()} | {"aif", "aifc", "oga", "opus"}


class AudioErrorReason(StrEnum):
    """Why a file was rejected; the value is what the quarantine table stores."""

    MISSING = "missing"
    EMPTY_FILE = "empty_file"
    NO_SAMPLES = "no_samples"
    TOO_SHORT = "too_short"
    CORRUPT = "corrupt"
    UNSUPPORTED_FORMAT = "unsupported_format"
    NON_FINITE = "non_finite"
    BAD_SAMPLE_RATE = "bad_sample_rate"


class AudioError(Exception):
    """A file that cannot become a clip: `reason` is a short code (an `AudioErrorReason` value)."""

    def __init__(self, path: str | os.PathLike, reason: AudioErrorReason | str, detail: str) -> None:
        self.path = str(path)
        self.reason = str(reason)
        self.detail = detail
        super().__init__(f"{self.path}: {self.reason} ({detail})")


# --------------------------------------------------------------------------------------------- decoding


def decode(path: str | os.PathLike, cfg: AudioConfig) -> tuple[np.ndarray, int]:
    """Read an audio file as mono float32 samples (channels averaged) and its sample rate; raise AudioError.

    The container is identified from the content, not the extension. Truncation is detected where the format
    declares its length: fewer frames decoded than the header announces, a WAV data chunk longer than the file,
    or an Ogg stream without its end-of-stream page.
    """
    try:
        info = os.stat(path)
    except OSError as error:
        raise AudioError(path, AudioErrorReason.MISSING, error.strerror or "cannot stat") from error
    if not stat.S_ISREG(info.st_mode):
        raise AudioError(path, AudioErrorReason.MISSING, "not a regular file")
    if info.st_size == 0:
        raise AudioError(path, AudioErrorReason.EMPTY_FILE, "0 bytes")

    try:
        sound = soundfile.SoundFile(path)
    except soundfile.LibsndfileError as error:
        raise AudioError(path, _open_failure_reason(path, error.code), error.error_string) from error
    except soundfile.SoundFileError as error:
        raise AudioError(path, AudioErrorReason.CORRUPT, str(error)) from error
    with sound:
        sample_rate, declared_frames, container = sound.samplerate, sound.frames, sound.format
        problem = _sample_rate_problem(sample_rate, cfg)
        if problem:
            raise AudioError(path, AudioErrorReason.BAD_SAMPLE_RATE, problem)
        try:
            samples = sound.read(dtype="float32", always_2d=True)
        except soundfile.SoundFileError as error:
            raise AudioError(path, AudioErrorReason.CORRUPT, f"decoding failed: {error}") from error

    truncation = _truncation(path, info.st_size, container, declared_frames, samples.shape[0])
    if truncation:
        raise AudioError(path, AudioErrorReason.CORRUPT, f"truncated: {truncation}")
    if samples.size == 0:
        raise AudioError(path, AudioErrorReason.NO_SAMPLES, f"{container} file with 0 frames")
    finite = np.isfinite(samples)
    if not finite.all():
        raise AudioError(path, AudioErrorReason.NON_FINITE, f"{finite.size - int(finite.sum())} NaN/inf samples")
    mono = samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1, dtype=np.float32)
    return np.ascontiguousarray(mono), sample_rate


def _open_failure_reason(path: str | os.PathLike, code: int) -> AudioErrorReason:
    """Unrecognised content is `corrupt` when the extension names a format we decode, else `unsupported_format`."""
    if code != _SF_UNRECOGNISED_FORMAT:
        return AudioErrorReason.CORRUPT
    extension = Path(path).suffix.lower().lstrip(".")
    return AudioErrorReason.CORRUPT if extension in _DECODABLE_EXTENSIONS else AudioErrorReason.UNSUPPORTED_FORMAT


def _sample_rate_problem(sample_rate: int, cfg: AudioConfig) -> str | None:
    if not cfg.min_sample_rate <= sample_rate <= cfg.max_sample_rate:
        return f"{sample_rate} Hz outside [{cfg.min_sample_rate}, {cfg.max_sample_rate}]"
    common = math.gcd(sample_rate, cfg.sample_rate)
    if (sample_rate // common) * (cfg.sample_rate // common) > _MAX_RESAMPLE_RATIO_PRODUCT:
        return f"{sample_rate} Hz -> {cfg.sample_rate} Hz has no practical resampling ratio (gcd {common})"
    return None


def _truncation(path: str | os.PathLike, size: int, container: str, declared: int, decoded: int) -> str | None:
    """Why a decoded file looks truncated, or None."""
    if container == "MP3":
        # libsndfile takes an MP3's length from its Xing/LAME header or an mpg123 scan: allow 1 % for decoder delay.
        if decoded < 0.99 * declared:
            return f"decoded {decoded} of the {declared} frames the header announces"
        return None
    if decoded < declared:
        return f"decoded {decoded} of the {declared} frames the header announces"
    with open(path, "rb") as handle:
        magic = handle.read(12)
        if magic[:4] == b"RIFF" and magic[8:12] == b"WAVE":
            return _wav_data_shortfall(handle, size)
        if magic[:4] == b"OggS":
            return _ogg_tail_problem(handle, size)
    return None


def _wav_data_shortfall(handle: BinaryIO, size: int) -> str | None:
    """libsndfile silently shortens a WAV whose data chunk runs past the end of the file: compare sizes here."""
    position = 12
    while position + 8 <= size:
        handle.seek(position)
        chunk_id, chunk_size = struct.unpack("<4sI", handle.read(8))
        if chunk_id == b"data":
            # Streaming writers may leave the size at 0xFFFFFFFF: the length is then unknown, not wrong.
            if chunk_size == 0xFFFFFFFF or position + 8 + chunk_size <= size:
                return None
            return f"data chunk declares {chunk_size} bytes, the file holds {size - position - 8}"
        position += 8 + chunk_size + (chunk_size & 1)
    return None


def _ogg_tail_problem(handle: BinaryIO, size: int) -> str | None:
    """libsndfile decodes an Ogg stream cut mid-way without error; its last page must be whole and end the stream."""
    start = max(0, size - _OGG_MAX_PAGE_BYTES)
    handle.seek(start)
    tail = handle.read()
    page = tail.rfind(b"OggS")
    if page < 0 or page + 27 > len(tail):
        return "last Ogg page header is cut off"
    flags, segments = tail[page + 5], tail[page + 26]
    lacing = tail[page + 27 : page + 27 + segments]
    if len(lacing) < segments or page + 27 + segments + sum(lacing) > len(tail):
        return "last Ogg page is cut off"
    if not flags & 0x04:
        return "the stream has no end-of-stream page"
    return None


# ----------------------------------------------------------------------------------------- resampling


def to_model_rate(wave: np.ndarray | torch.Tensor, sample_rate: int, cfg: AudioConfig) -> torch.Tensor:
    """Resample a mono waveform to cfg.sample_rate (torchaudio defaults; identity when the rates are equal)."""
    tensor = torch.as_tensor(wave, dtype=torch.float32)
    if sample_rate == cfg.sample_rate:
        return tensor
    problem = _sample_rate_problem(sample_rate, cfg)
    if problem:
        raise ValueError(f"cannot resample: {problem}")
    return torchaudio.functional.resample(tensor, sample_rate, cfg.sample_rate)


def load_waveform(path: str | os.PathLike, cfg: AudioConfig) -> torch.Tensor:
    """Decode, down-mix, resample to the model rate; reject clips shorter than min_duration_s (or one frame)."""
    samples, sample_rate = decode(path, cfg)
    wave = to_model_rate(samples, sample_rate, cfg)
    window, _, _ = _frame_geometry(cfg)
    minimum = max(round(cfg.min_duration_s * cfg.sample_rate), window)
    if wave.numel() < minimum:
        raise AudioError(
            path, AudioErrorReason.TOO_SHORT, f"{wave.numel()} samples at {cfg.sample_rate} Hz, need {minimum}"
        )
    return wave


# ------------------------------------------------------------------------------------------ features


def _frame_geometry(cfg: AudioConfig) -> tuple[int, int, int]:
    """(window, shift, fft_size) in samples, truncated exactly as Kaldi does."""
    window = int(cfg.sample_rate * cfg.frame_length_ms * 0.001)
    shift = int(cfg.sample_rate * cfg.frame_shift_ms * 0.001)
    if window < 2 or shift < 1:
        raise ValueError(f"frame length {window} / shift {shift} samples are too small")
    return window, shift, 1 << (window - 1).bit_length()


def frame_count(num_samples: int, cfg: AudioConfig) -> int:
    """Kaldi frames (snip_edges) of a clip of num_samples at cfg.sample_rate, before padding or cropping."""
    window, shift, _ = _frame_geometry(cfg)
    return 0 if num_samples < window else 1 + (num_samples - window) // shift


@functools.lru_cache(maxsize=8)
def _mel_blocks(mel_bins: int, fft_size: int, sample_rate: int) -> tuple[tuple[int, int, torch.Tensor], ...]:
    """Kaldi's triangular filters as (first_bin, end_bin, weights (end_bin - first_bin, filters)) blocks."""
    no_vtln = {"vtln_low": 100.0, "vtln_high": -500.0, "vtln_warp_factor": 1.0}  # kaldi.fbank's defaults
    banks, _ = kaldi.get_mel_banks(mel_bins, fft_size, float(sample_rate), LOW_FREQ_HZ, HIGH_FREQ_HZ, **no_vtln)
    weights = banks.to(torch.float32).T  # (fft_size // 2, mel_bins); the Nyquist bin has no weight in Kaldi
    blocks = []
    for first in range(0, mel_bins, _MEL_FILTERS_PER_BLOCK):
        block = weights[:, first : first + _MEL_FILTERS_PER_BLOCK]
        bins = block.ne(0).any(dim=1).nonzero()[:, 0]
        low, high = (int(bins.min()), int(bins.max()) + 1) if bins.numel() else (0, 1)
        blocks.append((low, high, block[low:high].contiguous()))
    return tuple(blocks)


@functools.lru_cache(maxsize=8)
def _hann(window: int) -> torch.Tensor:
    return torch.hann_window(window, periodic=False, dtype=torch.float32)  # Kaldi's "hanning" is symmetric


def _log_mel(signal: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """Kaldi fbank (§1.7) of every frame of a (B, samples) batch: (B, frames, mel_bins).

    The time-domain steps repeat Kaldi's float32 operations one for one (frame mean removal, then pre-emphasis
    with y[0] = x[0] - a·x[0]): the lowest mel bins of pre-emphasised audio are ill-conditioned in float32, so
    any other order of rounding moves them by more than 1e-4 from `kaldi.fbank`.
    """
    window, shift, fft_size = _frame_geometry(cfg)
    frames = signal.unfold(1, window, shift)  # (B, T, window), a view
    centred = frames - frames.mean(dim=-1, keepdim=True)
    padded_frames = torch.empty(*frames.shape[:2], fft_size, dtype=torch.float32, device=signal.device)
    padded_frames[..., window:] = 0.0
    windowed = padded_frames[..., :window]
    torch.sub(centred[..., 1:], PREEMPHASIS * centred[..., :-1], out=windowed[..., 1:])
    windowed[..., 0] = centred[..., 0] - PREEMPHASIS * centred[..., 0]
    windowed.mul_(_hann(window).to(signal.device))

    spectrum = torch.view_as_real(torch.fft.rfft(padded_frames))
    power = torch.addcmul(spectrum[..., 0].square(), spectrum[..., 1], spectrum[..., 1])
    blocks = _mel_blocks(cfg.mel_bins, fft_size, cfg.sample_rate)
    energies = torch.cat([power[..., low:high] @ weights.to(signal.device) for low, high, weights in blocks], dim=-1)
    return energies.clamp_min_(_FLOAT32_EPS).log_()


def fbank_batch(waves: list[torch.Tensor], cfg: AudioConfig) -> torch.Tensor:
    """Raw log-mel of mono clips at cfg.sample_rate: (B, target_length, mel_bins) float32.

    Per clip: mean removal, then Kaldi fbank (§1.7) of its first min(frames, target_length) frames; the rows
    after a clip's own frames are zeros (§1.8). Clips may differ in length; each needs at least one frame.
    """
    window, shift, _ = _frame_geometry(cfg)
    clips = []
    for index, wave in enumerate(waves):
        clip = torch.as_tensor(wave, dtype=torch.float32)
        if clip.dim() != 1:
            raise ValueError(f"clip {index}: expected a 1-D mono waveform, got shape {tuple(clip.shape)}")
        if clip.numel() < window:
            raise ValueError(f"clip {index}: {clip.numel()} samples, fewer than one {window}-sample frame")
        clips.append(clip)
    device = clips[0].device if clips else torch.device("cpu")
    features = torch.empty(len(clips), cfg.target_length, cfg.mel_bins, dtype=torch.float32, device=device)

    for chunk in _chunks_by_frames([min(frame_count(clip.numel(), cfg), cfg.target_length) for clip in clips]):
        longest = max(count for _, count in chunk)
        signal = torch.empty(len(chunk), window + (longest - 1) * shift, dtype=torch.float32, device=device)
        for row, (index, count) in enumerate(chunk):
            used = window + (count - 1) * shift
            torch.sub(clips[index][:used], clips[index].mean(), out=signal[row, :used])
            signal[row, used:] = 0.0
        log_mel = _log_mel(signal, cfg)
        for row, (index, count) in enumerate(chunk):
            features[index, :count] = log_mel[row, :count]
            features[index, count:] = 0.0
    return features


def _chunks_by_frames(counts: list[int]) -> list[list[tuple[int, int]]]:
    """Consecutive (clip index, frames) groups whose padded frame total stays within _FRAMES_PER_CHUNK."""
    chunks: list[list[tuple[int, int]]] = []
    longest = 0
    for index, count in enumerate(counts):
        if chunks and (len(chunks[-1]) + 1) * max(longest, count) <= _FRAMES_PER_CHUNK:
            chunks[-1].append((index, count))
            longest = max(longest, count)
        else:
            chunks.append([(index, count)])
            longest = count
    return chunks


def kaldi_reference(wave: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """The per-clip definition `fbank_batch` is checked and timed against (SSLAM_SPEC §1.5, §1.7): clip mean
    removal, then `torchaudio.compliance.kaldi.fbank` with the reference's arguments; unpadded (n_frames, F)."""
    return kaldi.fbank(
        (wave - wave.mean())[None],
        htk_compat=True,
        sample_frequency=float(cfg.sample_rate),
        use_energy=False,
        window_type="hanning",
        num_mel_bins=cfg.mel_bins,
        dither=0.0,
        frame_shift=cfg.frame_shift_ms,
        frame_length=cfg.frame_length_ms,
    )


def fbank(wave: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """(target_length, mel_bins) raw log-mel of one clip; see fbank_batch."""
    return fbank_batch([wave], cfg)[0]
