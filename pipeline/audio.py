"""The audio front-end (SSLAM_SPEC §1, §14.8): decode and validate a file, resample, and the one batched fbank.

* `decode` reads a whole file with soundfile (float32 in [-1, 1]), averages the channels to mono and validates
  it. Anything unusable raises `AudioError` whose `reason` is one of `AudioErrorReason` (the preprocessing job
  writes it to its quarantine table).
* `to_model_rate` resamples to `AudioConfig.sample_rate` with torchaudio's filter (§1.3) at any rate in
  [min_sample_rate, max_sample_rate]; `load_waveform` chains decode, down-mix, resample and the `too_short`
  check (mono **before** resampling, §14.8). It decodes only the head of a file that the features use
  (`head_samples` at the model rate, plus the resampler's margin), so a long file costs what a 10 s one does.
* `fbank_batch` is the only feature function of the project: raw (un-normalised) Kaldi log-mel of every clip,
  zero rows appended / head cropped to `target_length` (§1.7-§1.8). It frames clips of any lengths together in
  cache-sized chunks and agrees with `torchaudio.compliance.kaldi.fbank` (the §1.7 arguments, on the
  mean-removed clip) to about 1e-6, about 2x faster on one CPU thread (benchmarks/frontend.py).

Long files: the §1.5 mean is taken over the decoded head, not the whole file. Kaldi removes every frame's own
mean before anything else (§1.7 `remove_dc_offset`), so a constant offset does not reach the features: the
difference from a whole-file decode is float32 rounding (tests/test_audio_long.py). Clips that fit the read
budget are decoded whole, exactly as before.
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
# torchaudio.functional.resample's defaults (§1.3): Hann-windowed sinc, 6 zero crossings, cut-off 0.99 Nyquist.
LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99

# Frames per feature chunk. Small chunks stay in the CPU cache: one 10 s clip (998 frames, ~2 MiB per
# intermediate) per chunk ran ~1.5x faster than 16 clips per chunk on one core (benchmarks/frontend.py).
_FRAMES_PER_CHUNK = 1024
# Filters per block of the mel product: a block touches only the FFT bins of its filters, so the product costs a
# fraction of the dense (bins x mel_bins) matmul while staying a BLAS call.
_MEL_FILTERS_PER_BLOCK = 16
# torchaudio resamples a -> b Hz with a (b/g) x (a/g + taps) kernel, g = gcd(a, b): odd rates such as 44099 Hz
# would need gigabytes. Above this product the same filter is evaluated per output sample instead
# (`_windowed_sinc_resample`); at or below it torchaudio runs, bit for bit as before.
_MAX_RESAMPLE_RATIO_PRODUCT = 1 << 22
# Output samples per block of `_windowed_sinc_resample` (bounds its memory to a few MiB).
_SINC_OUTPUTS_PER_BLOCK = 4096
# A long file is decoded to its head only; these last frames are then read to detect a truncated end, and
# should they not decode, the whole file is decoded (and discarded) this many frames at a time.
_TAIL_FRAMES = 4096
_DECODE_BLOCK_FRAMES = 1 << 16
# Channel counts whose down-mix is summed column by column (numpy's mean sums fewer than 8 values in order from
# 0, so this is bit-identical to it and avoids its slow strided reduction); wider files use np.mean itself.
_SEQUENTIAL_MEAN_CHANNELS = 8
# Largest Ogg page: 27-byte header, 255 lacing values, 255 segments of 255 bytes.
_OGG_MAX_PAGE_BYTES = 27 + 255 + 255 * 255
# libsndfile's "Format not recognised" error code.
_SF_UNRECOGNISED_FORMAT = 1
# File extensions of formats the installed libsndfile decodes (mp3 needs libsndfile >= 1.1).
_DECODABLE_EXTENSIONS = {name.lower() for name in soundfile.available_formats()} | {"aif", "aifc", "oga", "opus"}


class AudioErrorReason(StrEnum):
    """Why a file was rejected; the value is what the quarantine table stores."""

    MISSING = "missing"
    NOT_A_FILE = "not_a_file"
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
    """Read a whole audio file as mono float32 samples (channels averaged) and its sample rate; raise AudioError.

    The container is identified from the content, not the extension. Truncation is detected where the format
    declares its length: fewer frames decoded than the header announces, a WAV data chunk longer than the file,
    or an Ogg stream without its end-of-stream page. Directories, FIFOs, sockets and devices are refused
    (`not_a_file`) without being opened for decoding.
    """
    samples, sample_rate, _ = _decode(path, cfg, None)
    return samples, sample_rate


def _decode(path: str | os.PathLike, cfg: AudioConfig, head: int | None) -> tuple[np.ndarray, int, bool]:
    """(mono samples, rate, whether the whole file was read). With `head`, a file longer than the frames that
    resampling `head` model-rate samples needs is read only that far (its end is still checked for truncation)."""
    try:
        info = os.stat(path)
    except OSError as error:
        raise AudioError(path, AudioErrorReason.MISSING, error.strerror or "cannot stat") from error
    _require_nonempty_regular_file(path, info)
    try:
        # O_NONBLOCK: should the path become a FIFO after the stat, opening it must not wait for a writer.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as error:
        raise AudioError(path, AudioErrorReason.MISSING, error.strerror or "cannot open") from error
    except OSError as error:
        raise AudioError(path, AudioErrorReason.CORRUPT, f"cannot open: {error.strerror}") from error
    try:
        opened = os.fstat(descriptor)
        _require_nonempty_regular_file(path, opened)
        with open(descriptor, "rb", closefd=False) as handle:
            return _decode_open_file(path, descriptor, handle, opened.st_size, cfg, head)
    finally:
        os.close(descriptor)


def _require_nonempty_regular_file(path: str | os.PathLike, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket",
                 stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}
        kind = next((name for test, name in kinds.items() if test(info.st_mode)), "not a regular file")
        raise AudioError(path, AudioErrorReason.NOT_A_FILE, f"{kind}, not a regular file")
    if info.st_size == 0:
        raise AudioError(path, AudioErrorReason.EMPTY_FILE, "0 bytes")


def _decode_open_file(
    path: str | os.PathLike, descriptor: int, handle: BinaryIO, size: int, cfg: AudioConfig, head: int | None
) -> tuple[np.ndarray, int, bool]:
    try:
        sound = soundfile.SoundFile(descriptor, closefd=False)
    except soundfile.LibsndfileError as error:
        header_rate = _header_sample_rate(handle)
        problem = None if header_rate is None else _sample_rate_problem(header_rate, cfg)
        if problem:
            raise AudioError(path, AudioErrorReason.BAD_SAMPLE_RATE, problem) from error
        raise AudioError(path, _open_failure_reason(path, error.code), error.error_string) from error
    except soundfile.SoundFileError as error:
        raise AudioError(path, AudioErrorReason.CORRUPT, str(error)) from error
    with sound:
        sample_rate, declared, container = sound.samplerate, sound.frames, sound.format
        problem = _sample_rate_problem(sample_rate, cfg)
        if problem:
            raise AudioError(path, AudioErrorReason.BAD_SAMPLE_RATE, problem)
        # MP3 lengths come from a Xing/LAME header or an mpg123 scan: allow 1 % for decoder delay.
        required = math.ceil(0.99 * declared) if container == "MP3" else declared
        budget = None if head is None else input_frames(head, sample_rate, cfg.sample_rate)
        whole = budget is None or required <= budget
        try:
            samples = sound.read(-1 if whole else budget, dtype="float32", always_2d=True)
            tail = None if whole else _read_tail(sound, required)
        except soundfile.SoundFileError as error:
            raise AudioError(path, AudioErrorReason.CORRUPT, f"decoding failed: {error}") from error

    wanted, decoded = (required if whole else budget), samples.shape[0]
    non_finite = _non_finite_count(samples)
    if tail is not None:
        non_finite += _non_finite_count(tail)
    elif not whole and decoded == wanted:
        # The end did not decode after a seek, which is not sample-exact in every decoder (libsndfile's Vorbis
        # can land late): decode the whole file block by block, as a whole-file read would.
        decoded, non_finite = _decode_blocks(path, descriptor)
        wanted = required
    truncation = _truncation(handle, size, container, wanted, declared, decoded)
    if truncation:
        raise AudioError(path, AudioErrorReason.CORRUPT, f"truncated: {truncation}")
    if samples.size == 0:
        raise AudioError(path, AudioErrorReason.NO_SAMPLES, f"{container} file with 0 frames")
    if non_finite:
        raise AudioError(path, AudioErrorReason.NON_FINITE, f"{non_finite} NaN/inf samples")
    return down_mix(samples), sample_rate, whole


def down_mix(samples: np.ndarray) -> np.ndarray:
    """Mono float32 of (frames, channels) samples: the only channel as it is, else the channel mean,
    bit-identical to `samples.mean(axis=1, dtype=np.float32)` (the down-mix this replaced, ~35x slower)."""
    frames, channels = samples.shape
    if channels == 1:
        return np.ascontiguousarray(samples[:, 0])
    if channels >= _SEQUENTIAL_MEAN_CHANNELS:
        return samples.mean(axis=1, dtype=np.float32)
    total = np.zeros(frames, dtype=np.float32)
    for channel in range(channels):
        total += samples[:, channel]
    total /= np.float32(channels)
    return total


def _read_tail(sound: soundfile.SoundFile, required: int) -> np.ndarray | None:
    """The last _TAIL_FRAMES frames before `required`, or None when they do not all decode after a seek: a cheap
    test that a file read only to its head is not truncated (truncation cuts the end)."""
    start = max(0, required - _TAIL_FRAMES)
    try:
        sound.seek(start)
        tail = sound.read(required - start, dtype="float32", always_2d=True)
    except soundfile.SoundFileError:
        return None
    return tail if tail.shape[0] == required - start else None


def _decode_blocks(path: str | os.PathLike, descriptor: int) -> tuple[int, int]:
    """(frames, NaN/inf samples) of the whole open file, decoded in blocks of bounded size."""
    os.lseek(descriptor, 0, os.SEEK_SET)
    frames = non_finite = 0
    try:
        with soundfile.SoundFile(descriptor, closefd=False) as sound:
            block = np.empty((_DECODE_BLOCK_FRAMES, sound.channels), dtype=np.float32)
            while True:
                decoded = sound.read(out=block)
                frames += decoded.shape[0]
                non_finite += _non_finite_count(decoded)
                if decoded.shape[0] < _DECODE_BLOCK_FRAMES:
                    return frames, non_finite
    except soundfile.SoundFileError as error:
        raise AudioError(path, AudioErrorReason.CORRUPT, f"decoding failed: {error}") from error


def _non_finite_count(samples: np.ndarray) -> int:
    finite = np.isfinite(samples)
    return 0 if finite.all() else finite.size - int(finite.sum())


def _open_failure_reason(path: str | os.PathLike, code: int) -> AudioErrorReason:
    """Unrecognised content is `corrupt` when the extension names a format we decode, else `unsupported_format`."""
    if code != _SF_UNRECOGNISED_FORMAT:
        return AudioErrorReason.CORRUPT
    extension = Path(path).suffix.lower().lstrip(".")
    return AudioErrorReason.CORRUPT if extension in _DECODABLE_EXTENSIONS else AudioErrorReason.UNSUPPORTED_FORMAT


def _header_sample_rate(handle: BinaryIO) -> int | None:
    """The sample rate a WAV fmt chunk or FLAC STREAMINFO declares (libsndfile refuses to open a 0 Hz file
    without saying why), or None for other containers."""
    handle.seek(0)
    start = handle.read(64)
    if start[:4] == b"fLaC" and len(start) >= 21:
        return int.from_bytes(start[18:21], "big") >> 4  # STREAMINFO: the first 20 bits after 10 bytes
    if start[:4] == b"RIFF" and start[8:12] == b"WAVE":
        position = 12
        while position + 16 <= len(start):
            chunk_id, chunk_size = struct.unpack("<4sI", start[position : position + 8])
            if chunk_id == b"fmt ":
                return struct.unpack("<I", start[position + 12 : position + 16])[0]
            position += 8 + chunk_size + (chunk_size & 1)
    return None


def _sample_rate_problem(sample_rate: int, cfg: AudioConfig) -> str | None:
    if not cfg.min_sample_rate <= sample_rate <= cfg.max_sample_rate:
        return f"{sample_rate} Hz outside [{cfg.min_sample_rate}, {cfg.max_sample_rate}]"
    return None


def _truncation(
    handle: BinaryIO, size: int, container: str, wanted: int, declared: int, decoded: int
) -> str | None:
    """Why a decoded file looks truncated, or None. `wanted`: the frames the read had to return."""
    if decoded < wanted:
        return f"decoded {decoded} of the {declared} frames the header announces"
    if container == "MP3":
        return None
    handle.seek(0)
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
    """Resample a mono CPU waveform to cfg.sample_rate with torchaudio's filter (identity at equal rates).

    Rates whose gcd-reduced ratio keeps torchaudio's kernel small run `torchaudio.functional.resample` (a cached
    kernel; the same bits); any other rate in [min_sample_rate, max_sample_rate] (8012 Hz, 44099 Hz, ...) the
    same windowed sinc evaluated per output sample in float64 (`_windowed_sinc_resample`).
    """
    tensor = torch.as_tensor(wave, dtype=torch.float32)
    if sample_rate == cfg.sample_rate:
        return tensor
    problem = _sample_rate_problem(sample_rate, cfg)
    if problem:
        raise ValueError(f"cannot resample: {problem}")
    if _has_small_kernel(sample_rate, cfg.sample_rate):
        return _kernel_resampler(sample_rate, cfg.sample_rate)(tensor)
    return _windowed_sinc_resample(tensor, sample_rate, cfg.sample_rate)


def _has_small_kernel(orig: int, new: int) -> bool:
    common = math.gcd(orig, new)
    return (orig // common) * (new // common) <= _MAX_RESAMPLE_RATIO_PRODUCT


@functools.lru_cache(maxsize=4)
def _kernel_resampler(orig: int, new: int) -> torchaudio.transforms.Resample:
    # A float32 kernel, as torchaudio.functional.resample builds for a float32 waveform: identical output.
    return torchaudio.transforms.Resample(
        orig, new, lowpass_filter_width=LOWPASS_FILTER_WIDTH, rolloff=ROLLOFF, dtype=torch.float32
    )


def _filter_half_width(orig: int, new: int) -> int:
    """Input samples on each side of an output sample that torchaudio's filter reaches (its `width`)."""
    return math.ceil(LOWPASS_FILTER_WIDTH * orig / (min(orig, new) * ROLLOFF))


def input_frames(output_samples: int, orig: int, new: int) -> int:
    """Input frames at `orig` Hz that the first `output_samples` samples resampled to `new` Hz depend on.

    torchaudio computes output blocks of new/g samples from strides of orig/g inputs and a filter reaching
    `_filter_half_width` inputs beyond; one more input covers rounding. Resampling this prefix gives the same
    first `output_samples` values as resampling the whole file (tests/test_audio_long.py checks the bits).
    """
    if orig == new:
        return output_samples
    margin = _filter_half_width(orig, new) + 1
    if _has_small_kernel(orig, new):
        common = math.gcd(orig, new)
        return -(-output_samples // (new // common)) * (orig // common) + margin
    return (output_samples * orig) // new + margin


def _windowed_sinc_resample(wave: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    """torchaudio's resampling filter evaluated at each output sample's own offset, in float64.

    y[j] = sum_i x[i] h((i / orig - j / new) * base), base = min(orig, new) * ROLLOFF, h the Hann-windowed
    sinc of `_get_sinc_resample_kernel` (zero beyond LOWPASS_FILTER_WIDTH crossings), x zero outside the clip;
    ceil(length * new / orig) outputs, as torchaudio gives. Cost: outputs x (2 * half width + 1) taps, memory
    one block of outputs, whatever the gcd of the rates.
    """
    length = wave.numel()
    outputs = -(-length * new // orig)
    base = min(orig, new) * ROLLOFF
    half = _filter_half_width(orig, new)
    padded = torch.nn.functional.pad(wave.to(torch.float64), (half, half))
    offsets = torch.arange(-half, half + 1)
    result = torch.empty(outputs, dtype=torch.float32)
    for first in range(0, outputs, _SINC_OUTPUTS_PER_BLOCK):
        j = torch.arange(first, min(first + _SINC_OUTPUTS_PER_BLOCK, outputs))
        taps = ((j * orig) // new)[:, None] + offsets  # input indices around each output
        # (i / orig - j / new) * base with an exact integer numerator
        t = (taps * new - j[:, None] * orig).to(torch.float64) * (base / (orig * new))
        t.clamp_(-LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
        window = torch.cos(t * (math.pi / (2 * LOWPASS_FILTER_WIDTH))).square_()
        t.mul_(math.pi)
        sinc = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t)
        kernel = sinc.mul_(window).mul_(base / orig)
        result[first : first + j.numel()] = (padded[taps + half] * kernel).sum(dim=1)
    return result


def head_samples(cfg: AudioConfig) -> int:
    """Model-rate samples of a clip that `load_waveform` keeps: those the target_length frames read, or the
    minimum duration when that is longer."""
    window, shift, _ = frame_geometry(cfg)
    return max(window + (cfg.target_length - 1) * shift, _minimum_samples(cfg))


def _minimum_samples(cfg: AudioConfig) -> int:
    window, _, _ = frame_geometry(cfg)
    return max(round(cfg.min_duration_s * cfg.sample_rate), window)


def load_waveform(path: str | os.PathLike, cfg: AudioConfig) -> torch.Tensor:
    """Decode, down-mix, resample to the model rate; reject clips shorter than min_duration_s (or one frame).

    A file longer than the read budget (`input_frames` of `head_samples`) is decoded only that far and its
    waveform is its first `head_samples(cfg)` samples; a shorter one is decoded and resampled whole.
    """
    keep = head_samples(cfg)
    samples, sample_rate, whole = _decode(path, cfg, keep)
    wave = to_model_rate(samples, sample_rate, cfg)
    if not whole:
        wave = wave[:keep]
    minimum = _minimum_samples(cfg)
    if wave.numel() < minimum:
        raise AudioError(
            path, AudioErrorReason.TOO_SHORT, f"{wave.numel()} samples at {cfg.sample_rate} Hz, need {minimum}"
        )
    return wave


# ------------------------------------------------------------------------------------------ features


def frame_geometry(cfg: AudioConfig) -> tuple[int, int, int]:
    """(window, shift, fft_size) in samples, truncated exactly as Kaldi does; the one frame geometry of the project
    (the front-end frames with it, and `pipeline.mixing` silences the samples those frames read)."""
    window = int(cfg.sample_rate * cfg.frame_length_ms * 0.001)
    shift = int(cfg.sample_rate * cfg.frame_shift_ms * 0.001)
    if window < 2 or shift < 1:
        raise ValueError(f"frame length {window} / shift {shift} samples are too small")
    return window, shift, 1 << (window - 1).bit_length()


def frame_count(num_samples: int, cfg: AudioConfig) -> int:
    """Kaldi frames (snip_edges) of a clip of num_samples at cfg.sample_rate, before padding or cropping."""
    window, shift, _ = frame_geometry(cfg)
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
    window, shift, fft_size = frame_geometry(cfg)
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
    window, shift, _ = frame_geometry(cfg)
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
