"""Long audio as a stream of model-length windows (`sslam infer`): memory bounded by one window and one block, for
files of any length.

A window is what the model embeds at once: the source samples that resample to `head_samples(cfg)` model-rate
samples (the `target_length` frames). Window k starts at k * hop (seconds, rounded to source frames). Windows follow
one another until one reaches the end of the file, so a file shorter than one window is one window, and the last
window of a longer one is partial: its waveform is shorter, its rows past `valid_frames` are fbank_batch's zero
padding, and it is marked `partial`. Nothing is cropped silently: every sample belongs to some window.

Each window is decoded once, in order, from blocks read with soundfile (no seeking, which is not sample-exact for
every codec), down-mixed like the training front-end (pipeline.audio.down_mix) and resampled on its own, exactly as
the same span cut out of the file and embedded as a clip would be. Checks as in pipeline.audio.decode: a missing,
empty or non-regular file, an unreadable container, an absurd sample rate, NaN/inf samples and a file that ends
before its header's frame count raise AudioError.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import soundfile
import torch

from pipeline.audio import AudioError, AudioErrorReason, down_mix, frame_count, head_samples, to_model_rate
from pipeline.config import AudioConfig

# File extensions `sslam infer` picks up in folders: the installed libsndfile's formats (mp3 needs >= 1.1).
AUDIO_EXTENSIONS = frozenset({name.lower() for name in soundfile.available_formats()} | {"aif", "aifc", "oga", "opus"})
# Source frames per soundfile read: bounds memory (one block plus one window) whatever the file's length.
BLOCK_FRAMES = 1 << 16
# MP3 lengths are estimates (decoder delay): allow 1 % less than declared, as pipeline.audio does.
MP3_LENGTH_TOLERANCE = 0.99


@dataclass(frozen=True)
class WindowPlan:
    """How a file is cut: source rate and frames, window and hop in source frames, the window count."""

    sample_rate: int
    frames: int
    window_frames: int
    hop_frames: int
    channels: int
    container: str

    @property
    def count(self) -> int:
        """Windows of a file of `frames` frames (as declared; the stream stops where the data does)."""
        if self.frames <= self.window_frames:
            return 1
        return 1 + math.ceil((self.frames - self.window_frames) / self.hop_frames)

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate

    def start_seconds(self, index: int) -> float:
        return index * self.hop_frames / self.sample_rate


@dataclass
class Window:
    """One window: `wave` at the model rate (at most head_samples), its frames before padding, whether partial."""

    index: int
    start_s: float
    end_s: float
    wave: torch.Tensor
    valid_frames: int
    partial: bool


def window_seconds(cfg: AudioConfig) -> float:
    """The span the model embeds at once: target_length frames (frame_shift_ms apart, plus one frame's length)."""
    return head_samples(cfg) / cfg.sample_rate


def _check_path(path: str | os.PathLike) -> None:
    try:
        info = os.stat(path)
    except OSError as error:
        raise AudioError(path, AudioErrorReason.MISSING, error.strerror or "cannot stat") from error
    if not stat.S_ISREG(info.st_mode):
        raise AudioError(path, AudioErrorReason.NOT_A_FILE, "not a regular file")
    if info.st_size == 0:
        raise AudioError(path, AudioErrorReason.EMPTY_FILE, "0 bytes")


def _open(path: str | os.PathLike, cfg: AudioConfig) -> soundfile.SoundFile:
    _check_path(path)
    try:
        sound = soundfile.SoundFile(path)
    except soundfile.LibsndfileError as error:
        raise AudioError(path, AudioErrorReason.CORRUPT, error.error_string) from error
    except soundfile.SoundFileError as error:
        raise AudioError(path, AudioErrorReason.CORRUPT, str(error)) from error
    if not cfg.min_sample_rate <= sound.samplerate <= cfg.max_sample_rate:
        sound.close()
        raise AudioError(path, AudioErrorReason.BAD_SAMPLE_RATE,
                         f"{sound.samplerate} Hz outside [{cfg.min_sample_rate}, {cfg.max_sample_rate}]")
    if sound.frames == 0:
        sound.close()
        raise AudioError(path, AudioErrorReason.NO_SAMPLES, f"{sound.format} file with 0 frames")
    return sound


def plan_windows(path: str | os.PathLike, cfg: AudioConfig, hop_s: float | None = None) -> WindowPlan:
    """The window plan of a file from its header (nothing decoded). `hop_s` defaults to the target length's span
    (target_length * frame_shift: consecutive windows, one frame's overlap)."""
    with _open(path, cfg) as sound:
        return _plan(sound, cfg, hop_s)


def _plan(sound: soundfile.SoundFile, cfg: AudioConfig, hop_s: float | None) -> WindowPlan:
    rate = sound.samplerate
    hop_s = cfg.target_length * cfg.frame_shift_ms * 0.001 if hop_s is None else hop_s
    if not hop_s > 0:
        raise ValueError(f"hop must be positive, got {hop_s} s")
    window = math.ceil(head_samples(cfg) * rate / cfg.sample_rate)
    hop = max(1, round(hop_s * rate))
    if hop > window:
        raise ValueError(f"hop {hop_s} s is longer than the window ({window_seconds(cfg):.3f} s): audio between "
                         "windows would be skipped")
    return WindowPlan(rate, sound.frames, window, hop, sound.channels, sound.format)


def stream_windows(path: str | os.PathLike, cfg: AudioConfig, hop_s: float | None = None) -> Iterator[Window]:
    """The windows of a file in order (see the module docstring); raises AudioError, possibly after some windows."""
    keep = head_samples(cfg)
    frame_samples = int(cfg.sample_rate * cfg.frame_length_ms * 0.001)
    with _open(path, cfg) as sound:
        plan = _plan(sound, cfg, hop_s)
        buffer = np.empty(0, dtype=np.float32)
        buffer_start = 0  # source frame of buffer[0]
        decoded = 0
        at_end = False
        index = 0
        while True:
            start = index * plan.hop_frames
            end = start + plan.window_frames
            while decoded < end and not at_end:
                block = _read_block(path, sound)
                if block.shape[0] < BLOCK_FRAMES:
                    at_end = True
                buffer = np.concatenate([buffer, down_mix(block)]) if buffer.size else down_mix(block)
                decoded += block.shape[0]
            if at_end:
                _check_length(path, plan, decoded)
            segment = buffer[start - buffer_start : min(end, decoded) - buffer_start]
            if segment.size == 0:
                return  # the previous window ended exactly at the end of the file
            wave = to_model_rate(segment, plan.sample_rate, cfg)[:keep]
            valid = min(frame_count(wave.numel(), cfg), cfg.target_length)
            if wave.numel() < frame_samples:  # a tail shorter than one frame: padded to one
                if index == 0:
                    raise AudioError(path, AudioErrorReason.TOO_SHORT,
                                     f"{wave.numel()} samples at {cfg.sample_rate} Hz, shorter than one frame")
                wave = torch.nn.functional.pad(wave, (0, frame_samples - wave.numel()))
                valid = 1
            last = at_end and end >= decoded
            yield Window(index, start / plan.sample_rate, min(end, decoded) / plan.sample_rate, wave, valid,
                         partial=valid < cfg.target_length)
            if last:
                return
            index += 1
            drop = min(index * plan.hop_frames, decoded) - buffer_start
            buffer = buffer[drop:]
            buffer_start += drop


def _read_block(path: str | os.PathLike, sound: soundfile.SoundFile) -> np.ndarray:
    try:
        block = sound.read(BLOCK_FRAMES, dtype="float32", always_2d=True)
    except soundfile.SoundFileError as error:
        raise AudioError(path, AudioErrorReason.CORRUPT, f"decoding failed: {error}") from error
    finite = np.isfinite(block)
    if not finite.all():
        raise AudioError(path, AudioErrorReason.NON_FINITE, f"{finite.size - int(finite.sum())} NaN/inf samples")
    return block


def _check_length(path: str | os.PathLike, plan: WindowPlan, decoded: int) -> None:
    required = math.ceil(MP3_LENGTH_TOLERANCE * plan.frames) if plan.container == "MP3" else plan.frames
    if decoded < required:
        raise AudioError(path, AudioErrorReason.CORRUPT,
                         f"truncated: decoded {decoded} of the {plan.frames} frames the header announces")
