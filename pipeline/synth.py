"""The AudioSet-like sample dataset: procedurally generated sound events, official CSV formats, broken files.

`make_sample_dataset(out_dir, cfg)` writes

* `class_labels_indices.csv` (`index,mid,display_name`, quoted names; MIDs `/m/syn0001`, ...),
* `balanced_train_segments.csv` and `eval_segments.csv` (AudioSet's comment header, `YTID, start, end,
  "mid,mid"` rows; the two splits have disjoint YTIDs),
* `audio/{YTID}.{wav|flac|ogg}`: mono and stereo clips at 8-48 kHz, mostly 2-4 s with a few of 1-2 s and
  10-12 s, each holding 1-3 overlapping events of distinct classes (the clip's multi-hot labels) over a faint
  noise floor,
* with `cfg.broken_files`, extra train rows whose files are broken on purpose (see `BROKEN_KINDS`).

Classes are rows of `EVENT_KINDS`, a table of generator functions with distinct spectral signatures; class
i uses kind i mod len(EVENT_KINDS), its pitch raised by 1.5x for every further pass over the table, so any
`num_classes` works.

`cfg.profile: events` writes recordings closer to real ones instead (same file layout and CSVs):
clip lengths log-uniform over `EVENTS_CLIP_SECONDS` (0.7-10 s, three quarters under 5 s), each clip one
class of `SCENE_KINDS` (footsteps, drums, keyboard typing, speech-like syllables, knocks, bells, ...):
short hits with sharp onsets and exponential decays, repeated at the class's own rhythm with jitter, over a
coloured noise background of random level. Labels: the clip's one class. The default profile's output is
unchanged by this option (tests/test_synth.py pins its bytes).

Everything derives from `cfg.seed`: the same seed gives byte-identical CSV, WAV and FLAC files. Ogg Vorbis
files are not byte-identical across runs (libsndfile draws a random Ogg stream serial number) but decode to
identical samples.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import soundfile

from pipeline.config import SynthConfig

logger = logging.getLogger(__name__)

SAMPLE_RATES = (8000, 16000, 22050, 32000, 44100, 48000)
# Container -> libsndfile subtype.
FORMATS = {"wav": "PCM_16", "flac": "PCM_16", "ogg": "VORBIS"}
# Event content stays below this frequency so that 8 kHz clips hold it without aliasing.
MAX_EVENT_HZ = 3500.0
YTID_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
YTID_LENGTH = 11
# (kind, share of clips, duration range in seconds): mostly short clips keep the dataset small.
LENGTH_CLASSES = (("short", 8, (2.0, 4.0)), ("tiny", 1, (1.0, 2.0)), ("long", 1, (10.0, 12.0)))
# Share of stereo clips, as a repeating pattern of channel counts.
CHANNEL_PATTERN = (1, 1, 1, 2)
EVENTS_PER_CLIP = (1, 3)
EVENT_SECONDS = (0.4, 2.5)
EVENT_GAIN = (0.2, 0.5)
NOISE_FLOOR = 1e-3
RAMP_SECONDS = 0.01
PEAK = 0.9

Generator = Callable[[np.random.Generator, np.ndarray, float, float], np.ndarray]


class EventKind(NamedTuple):
    """A class of sound event: its display name and a generator (rng, t seconds, sample rate, pitch) -> wave."""

    name: str
    generate: Generator


def _tone(t: np.ndarray, hz: np.ndarray | float) -> np.ndarray:
    return np.sin(2 * np.pi * np.asarray(hz) * t)


def _max_hz(sample_rate: float) -> float:
    return min(MAX_EVENT_HZ, 0.45 * sample_rate)


def _cap(hz: float, sample_rate: float) -> float:
    return min(hz, _max_hz(sample_rate))


def _harmonics(t: np.ndarray, f0: float, orders: range, sample_rate: float) -> np.ndarray:
    """Sum of the harmonics k*f0 (amplitude 1/k) that stay below the event frequency limit."""
    wave = np.zeros_like(t)
    for k in orders:
        if k * f0 < _max_hz(sample_rate):
            wave += _tone(t, k * f0) / k
    return wave


def _band_noise(rng: np.random.Generator, n: int, sample_rate: float, low_hz: float, high_hz: float) -> np.ndarray:
    spectrum = np.fft.rfft(rng.standard_normal(n))
    frequencies = np.fft.rfftfreq(n, 1.0 / sample_rate)
    spectrum[(frequencies < low_hz) | (frequencies > high_hz)] = 0.0
    return np.fft.irfft(spectrum, n)


def _pure_tone(rng: np.random.Generator, t: np.ndarray, sr: float, pitch: float) -> np.ndarray:
    return _tone(t, _cap(440.0 * pitch * rng.uniform(0.97, 1.03), sr))


def _harmonic_stack(rng: np.random.Generator, t: np.ndarray, sr: float, pitch: float) -> np.ndarray:
    f0 = 150.0 * pitch * rng.uniform(0.97, 1.03)
    return _harmonics(t, f0, range(1, 9), sr)


def _chirp(t: np.ndarray, start_hz: float, end_hz: float) -> np.ndarray:
    duration = max(t[-1], 1e-6)
    phase = 2 * np.pi * (start_hz * t + 0.5 * (end_hz - start_hz) / duration * t**2)
    return np.sin(phase)


def _up_chirp(rng: np.random.Generator, t: np.ndarray, sr: float, pitch: float) -> np.ndarray:
    return _chirp(t, _cap(300.0 * pitch, sr), _cap(2500.0 * pitch, sr))


def _down_chirp(rng: np.random.Generator, t: np.ndarray, sr: float, pitch: float) -> np.ndarray:
    return _chirp(t, _cap(2500.0 * pitch, sr), _cap(300.0 * pitch, sr))


def _noise_burst(rng: np.random.Generator, t: np.ndarray, sr: float, pitch: float) -> np.ndarray:
    # Broadband noise in bursts of 0.1 s every 0.25 s.
    gate = (np.mod(t, 0.25 / pitch) < 0.1 / pitch).astype(float)
    return _band_noise(rng, t.size, sr, 50.0, _max_hz(sr)) * gate


def _band_passed_noise(rng: np.random.Generator, t: np.ndarray, sr: float, pitch: float) -> np.ndarray:
    return _band_noise(rng, t.size, sr, _cap(1000.0 * pitch, sr) * 0.9, _cap(1500.0 * pitch, sr))


def _click_train(rng: np.random.Generator, t: np.ndarray, sr: float, pitch: float) -> np.ndarray:
    wave = np.zeros(t.size)
    period = max(1, int(round(sr / (20.0 * pitch))))
    wave[rng.integers(0, period) :: period] = 1.0
    return wave


def _am_tone(rng: np.random.Generator, t: np.ndarray, sr: float, pitch: float) -> np.ndarray:
    return _tone(t, _cap(1000.0 * pitch, sr)) * (0.5 + 0.5 * _tone(t, 8.0))


def _fm_tone(rng: np.random.Generator, t: np.ndarray, sr: float, pitch: float) -> np.ndarray:
    carrier, depth, rate = _cap(700.0 * pitch, sr), 150.0 * pitch, 5.0
    return np.sin(2 * np.pi * carrier * t - depth / rate * np.cos(2 * np.pi * rate * t))


def _low_rumble(rng: np.random.Generator, t: np.ndarray, sr: float, pitch: float) -> np.ndarray:
    return _band_noise(rng, t.size, sr, 20.0, 150.0 * pitch)


def _buzz(rng: np.random.Generator, t: np.ndarray, sr: float, pitch: float) -> np.ndarray:
    f0 = 220.0 * pitch
    return _harmonics(t, f0, range(1, 16, 2), sr)


def _dual_tone(rng: np.random.Generator, t: np.ndarray, sr: float, pitch: float) -> np.ndarray:
    return _tone(t, _cap(697.0 * pitch, sr)) + _tone(t, _cap(1209.0 * pitch, sr))


EVENT_KINDS: tuple[EventKind, ...] = (
    EventKind("Pure tone", _pure_tone),
    EventKind("Harmonic stack", _harmonic_stack),
    EventKind("Up-chirp", _up_chirp),
    EventKind("Down-chirp", _down_chirp),
    EventKind("White noise burst", _noise_burst),
    EventKind("Band-passed noise", _band_passed_noise),
    EventKind("Click train", _click_train),
    EventKind("AM tone", _am_tone),
    EventKind("FM tone", _fm_tone),
    EventKind("Low rumble", _low_rumble),
    EventKind("Buzz", _buzz),
    EventKind("Dual tone", _dual_tone),
)

# Broken train files (cfg.broken_files): kind -> what the file is.
BROKEN_KINDS = {
    "empty": "a 0-byte .wav",
    "truncated_wav": "a PCM wav cut to half its bytes (libsndfile reads the remaining frames)",
    "truncated_flac": "a flac cut to half its bytes (the decoder loses sync)",
    "nan": "a float wav with NaN samples",
    "too_short": "a valid 0.2 s wav",
    "missing": "listed in the CSV, no file",
}
TOO_SHORT_SECONDS = 0.2


# ------------------------------------------------------------------------------------- the "events" profile

EVENTS_CLIP_SECONDS = (0.7, 10.0)  # log-uniform
BACKGROUND_RMS = (0.002, 0.03)
HIT_GAIN = (0.25, 0.6)


def _decay(rng: np.random.Generator, n: int, sr: float, seconds: float) -> np.ndarray:
    """An exponential decay with time constant `seconds` (+-20 %) after a 1 ms attack."""
    t = np.arange(n) / sr
    attack = np.minimum(1.0, t / 1e-3)
    return attack * np.exp(-t / (seconds * rng.uniform(0.8, 1.2)))


def _hit_samples(sr: float, seconds: float) -> int:
    return max(8, int(seconds * sr))


def _footstep(rng: np.random.Generator, sr: float, pitch: float) -> np.ndarray:
    n = _hit_samples(sr, 0.25)
    return _band_noise(rng, n, sr, 40.0, _cap(350.0 * pitch, sr)) * _decay(rng, n, sr, 0.04)


def _kick(rng: np.random.Generator, sr: float, pitch: float) -> np.ndarray:
    n = _hit_samples(sr, 0.4)
    t = np.arange(n) / sr
    hz = 50.0 * pitch + 110.0 * pitch * np.exp(-t / 0.03)
    return np.sin(2 * np.pi * np.cumsum(hz) / sr) * _decay(rng, n, sr, 0.12)


def _snare(rng: np.random.Generator, sr: float, pitch: float) -> np.ndarray:
    n = _hit_samples(sr, 0.3)
    t = np.arange(n) / sr
    body = 0.5 * _tone(t, 190.0 * pitch) + _band_noise(rng, n, sr, 300.0, _max_hz(sr))
    return body * _decay(rng, n, sr, 0.06)


def _hihat(rng: np.random.Generator, sr: float, pitch: float) -> np.ndarray:
    n = _hit_samples(sr, 0.1)
    return _band_noise(rng, n, sr, _cap(2400.0 * pitch, sr) * 0.9, _max_hz(sr)) * _decay(rng, n, sr, 0.02)


def _key_press(rng: np.random.Generator, sr: float, pitch: float) -> np.ndarray:
    n = _hit_samples(sr, 0.06)
    click = _band_noise(rng, n, sr, _cap(900.0 * pitch, sr) * 0.8, _cap(3200.0 * pitch, sr)) * _decay(rng, n, sr, 0.006)
    release = int(rng.uniform(0.02, 0.04) * sr)
    if release < n:
        click[release:] += 0.4 * click[: n - release]
    return click


def _syllable(rng: np.random.Generator, sr: float, pitch: float) -> np.ndarray:
    """A voiced syllable: a falling glottal pitch, harmonics weighted by two formants, a smooth envelope."""
    n = _hit_samples(sr, rng.uniform(0.12, 0.3))
    t = np.arange(n) / sr
    f0 = 130.0 * pitch * rng.uniform(0.85, 1.2) * (1.0 - 0.15 * t / t[-1])
    phase = 2 * np.pi * np.cumsum(f0) / sr
    formants = (rng.uniform(300.0, 800.0), rng.uniform(900.0, 2200.0))
    wave = np.zeros(n)
    for k in range(1, 30):
        hz = k * f0.mean()
        if hz >= _max_hz(sr):
            break
        weight = sum(np.exp(-(((hz - f) / 120.0) ** 2)) for f in formants) + 0.05
        wave += weight * np.sin(k * phase)
    return wave * np.sin(np.pi * t / t[-1]) ** 2


def _knock(rng: np.random.Generator, sr: float, pitch: float) -> np.ndarray:
    n = _hit_samples(sr, 0.15)
    t = np.arange(n) / sr
    body = _tone(t, 280.0 * pitch * rng.uniform(0.95, 1.05)) + 0.3 * _band_noise(rng, n, sr, 100.0, _cap(1500.0, sr))
    return body * _decay(rng, n, sr, 0.025)


def _bell(rng: np.random.Generator, sr: float, pitch: float) -> np.ndarray:
    n = _hit_samples(sr, 1.2)
    t = np.arange(n) / sr
    f0 = 520.0 * pitch * rng.uniform(0.98, 1.02)
    partials = sum(_tone(t, _cap(f0 * ratio, sr)) / (i + 1) for i, ratio in enumerate((1.0, 2.76, 5.40)))
    return partials * _decay(rng, n, sr, 0.35)


def _clap(rng: np.random.Generator, sr: float, pitch: float) -> np.ndarray:
    n = _hit_samples(sr, 0.12)
    wave = np.zeros(n)
    for start in (0.0, 0.008, 0.017):
        offset = int(start * sr)
        burst = _band_noise(rng, n - offset, sr, _cap(800.0 * pitch, sr) * 0.8, _cap(2600.0 * pitch, sr))
        wave[offset:] += burst * _decay(rng, n - offset, sr, 0.012)
    return wave


def _drip(rng: np.random.Generator, sr: float, pitch: float) -> np.ndarray:
    n = _hit_samples(sr, 0.08)
    t = np.arange(n) / sr
    hz = np.minimum(_max_hz(sr), 700.0 * pitch * (1.0 + 2.0 * t / t[-1]))
    return np.sin(2 * np.pi * np.cumsum(hz) / sr) * _decay(rng, n, sr, 0.015)


class SceneKind(NamedTuple):
    """A class of the events profile: a hit generator (rng, sample rate, pitch) -> wave and its rhythm,
    the seconds between hit onsets (low, high), drawn uniformly per gap."""

    name: str
    hit: Callable[[np.random.Generator, float, float], np.ndarray]
    gap_seconds: tuple[float, float]


SCENE_KINDS: tuple[SceneKind, ...] = (
    SceneKind("Footsteps", _footstep, (0.45, 0.6)),
    SceneKind("Kick drum", _kick, (0.3, 0.55)),
    SceneKind("Snare drum", _snare, (0.35, 0.7)),
    SceneKind("Hi-hat", _hihat, (0.1, 0.16)),
    SceneKind("Typing", _key_press, (0.06, 0.3)),
    SceneKind("Speech", _syllable, (0.15, 0.45)),
    SceneKind("Knock", _knock, (0.12, 0.9)),
    SceneKind("Bell", _bell, (0.8, 1.6)),
    SceneKind("Clapping", _clap, (0.2, 0.35)),
    SceneKind("Dripping", _drip, (0.25, 0.9)),
)


def _log_uniform_seconds(rng: np.random.Generator, low: float, high: float) -> float:
    return round(float(np.exp(rng.uniform(np.log(low), np.log(high)))), 3)


def _background(rng: np.random.Generator, n: int, sr: float) -> np.ndarray:
    """Noise with a 1/f-like tilt (brown or pink-ish, drawn per clip) at a random level."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    frequencies = np.fft.rfftfreq(n, 1.0 / sr)
    spectrum /= np.maximum(frequencies, 20.0) ** rng.uniform(0.3, 1.0)
    noise = np.fft.irfft(spectrum, n)
    return noise * rng.uniform(*BACKGROUND_RMS) / max(float(np.sqrt(np.mean(noise**2))), 1e-12)


def _render_scene(
    rng: np.random.Generator, plan: _ClipPlan, classes: list[SynthClass]
) -> tuple[np.ndarray, list[int]]:
    """(samples (n, channels) float32 in [-PEAK, PEAK], [its class]): hits of one class over a background."""
    sr = plan.sample_rate
    n = int(round(plan.seconds * sr))
    class_index = int(rng.integers(len(classes)))
    synth_class = classes[class_index]
    kind = synth_class.kind
    mix = _background(rng, n, sr) + NOISE_FLOOR * rng.standard_normal(n)
    onset = rng.uniform(0.0, min(0.3, 0.2 * plan.seconds))
    while True:
        start = int(onset * sr)
        hit = kind.hit(rng, sr, synth_class.pitch)
        hit = hit / max(np.max(np.abs(hit)), 1e-9) * rng.uniform(*HIT_GAIN)
        length = min(hit.size, n - start)
        mix[start : start + length] += hit[:length]
        onset += rng.uniform(*kind.gap_seconds)
        if onset >= plan.seconds - 0.05:
            break
    samples = mix[:, None] * (rng.uniform(0.6, 1.0, size=plan.channels)[None, :] if plan.channels > 1 else 1.0)
    samples *= PEAK / max(np.max(np.abs(samples)), PEAK)
    return samples.astype(np.float32), [class_index]


class SynthClass(NamedTuple):
    index: int
    mid: str
    display_name: str
    kind: EventKind | SceneKind
    pitch: float


def synth_classes(num_classes: int, profile: str = "sample") -> list[SynthClass]:
    """The class table of a profile: kind i mod len(kinds) of EVENT_KINDS ("sample") or SCENE_KINDS
    ("events"), pitch 1.5^(i // len)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    kinds = _profile_kinds(profile)
    classes = []
    for index in range(num_classes):
        kind = kinds[index % len(kinds)]
        octave = index // len(kinds)
        name = kind.name if octave == 0 else f"{kind.name} {octave + 1}"
        classes.append(SynthClass(index, f"/m/syn{index + 1:04d}", name, kind, 1.5**octave))
    return classes


class _ClipPlan(NamedTuple):
    ytid: str
    sample_rate: int
    channels: int
    seconds: float
    extension: str
    start_s: float


def _ytids(rng: np.random.Generator, count: int) -> list[str]:
    ids: dict[str, None] = {}
    while len(ids) < count:
        ids.setdefault("".join(rng.choice(YTID_ALPHABET, YTID_LENGTH)), None)
    return list(ids)


def _balanced(rng: np.random.Generator, values: list, count: int) -> list:
    """`count` values covering `values` as evenly as possible, in seeded random order."""
    return [values[i] for i in rng.permutation(np.resize(np.arange(len(values)), count))]


def _profile_kinds(profile: str) -> tuple[EventKind, ...] | tuple[SceneKind, ...]:
    kinds = {"sample": EVENT_KINDS, "events": SCENE_KINDS}
    if profile not in kinds:
        raise ValueError(f"profile must be one of {sorted(kinds)}, got {profile!r}")
    return kinds[profile]


def _plan_clips(rng: np.random.Generator, ytids: list[str], profile: str = "sample") -> list[_ClipPlan]:
    count = len(ytids)
    rates = _balanced(rng, list(SAMPLE_RATES), count)
    extensions = _balanced(rng, list(FORMATS), count)
    channels = _balanced(rng, list(CHANNEL_PATTERN), count)
    length_pattern = [ranges for _, share, ranges in LENGTH_CLASSES for _ in range(share)]
    lengths = _balanced(rng, length_pattern, count) if profile == "sample" else [EVENTS_CLIP_SECONDS] * count
    plans = []
    for ytid, rate, extension, channel_count, (low, high) in zip(ytids, rates, extensions, channels, lengths):
        if profile == "sample":
            seconds = round(float(rng.uniform(low, high)), 3)
        else:
            seconds = _log_uniform_seconds(rng, low, high)
        start_s = float(rng.integers(0, 300))
        plans.append(_ClipPlan(ytid, rate, channel_count, seconds, extension, start_s))
    return plans


def _render_clip(
    rng: np.random.Generator, plan: _ClipPlan, classes: list[SynthClass]
) -> tuple[np.ndarray, list[int]]:
    """(samples (n, channels) float32 in [-PEAK, PEAK], sorted class indices of its events)."""
    n = int(round(plan.seconds * plan.sample_rate))
    mix = NOISE_FLOOR * rng.standard_normal(n)
    event_count = int(rng.integers(EVENTS_PER_CLIP[0], EVENTS_PER_CLIP[1] + 1))
    chosen = sorted(int(i) for i in rng.choice(len(classes), size=min(event_count, len(classes)), replace=False))
    for class_index in chosen:
        synth_class = classes[class_index]
        seconds = rng.uniform(EVENT_SECONDS[0], min(EVENT_SECONDS[1], plan.seconds))
        length = max(2, int(seconds * plan.sample_rate))
        onset = int(rng.integers(0, n - length + 1))
        t = np.arange(length) / plan.sample_rate
        wave = synth_class.kind.generate(rng, t, plan.sample_rate, synth_class.pitch)
        wave = wave / max(np.max(np.abs(wave)), 1e-9)
        ramp = min(length // 2, int(RAMP_SECONDS * plan.sample_rate))
        if ramp > 0:
            fade = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, ramp))
            wave[:ramp] *= fade
            wave[length - ramp :] *= fade[::-1]
        mix[onset : onset + length] += rng.uniform(*EVENT_GAIN) * wave
    if plan.channels == 1:
        samples = mix[:, None]
    else:
        pan = rng.uniform(0.6, 1.0, size=plan.channels)
        samples = mix[:, None] * pan[None, :]
    samples *= PEAK / max(np.max(np.abs(samples)), PEAK)
    return samples.astype(np.float32), chosen


def _write_audio(path: Path, samples: np.ndarray, sample_rate: int, extension: str) -> None:
    soundfile.write(path, samples, sample_rate, format=extension.upper(), subtype=FORMATS[extension])


def _float_wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """A mono IEEE-float WAV built by hand: libsndfile adds a PEAK chunk with a timestamp to float files,
    which would break byte-identical output."""
    data = samples.astype("<f4").tobytes()
    fmt_chunk = struct.pack("<4sIHHIIHH", b"fmt ", 16, 3, 1, sample_rate, 4 * sample_rate, 4, 32)
    body = b"WAVE" + fmt_chunk + struct.pack("<4sI", b"data", len(data)) + data
    return struct.pack("<4sI", b"RIFF", len(body)) + body


def _write_broken(audio_dir: Path, kind: str, ytid: str, rng: np.random.Generator) -> str | None:
    """Write one broken file; returns its file name (None for 'missing')."""
    sample_rate = 16000
    if kind == "missing":
        return None
    if kind == "empty":
        name = f"{ytid}.wav"
        (audio_dir / name).write_bytes(b"")
        return name
    if kind in ("truncated_wav", "truncated_flac"):
        extension = kind.split("_")[1]
        name = f"{ytid}.{extension}"
        samples = (0.3 * rng.standard_normal((3 * sample_rate, 1))).astype(np.float32).clip(-PEAK, PEAK)
        _write_audio(audio_dir / name, samples, sample_rate, extension)
        data = (audio_dir / name).read_bytes()
        (audio_dir / name).write_bytes(data[: len(data) // 2])
        return name
    if kind == "nan":
        name = f"{ytid}.wav"
        samples = (0.3 * rng.standard_normal((2 * sample_rate, 1))).astype(np.float32)
        samples[sample_rate // 2 : sample_rate // 2 + 100] = np.nan
        (audio_dir / name).write_bytes(_float_wav_bytes(samples[:, 0], sample_rate))
        return name
    if kind == "too_short":
        name = f"{ytid}.wav"
        t = np.arange(int(TOO_SHORT_SECONDS * sample_rate)) / sample_rate
        _write_audio(audio_dir / name, (0.5 * _tone(t, 440.0))[:, None].astype(np.float32), sample_rate, "wav")
        return name
    raise ValueError(f"unknown broken kind {kind!r}")


def _segments_header(kind: str, seed: int, rows: list[tuple[str, float, float, list[str]]]) -> str:
    labels = [mid for _, _, _, mids in rows for mid in mids]
    return (
        f"# Segments csv created by pipeline.synth ({kind}, seed={seed})\n"
        f"# num_ytids={len(rows)}, num_segs={len(rows)}, num_unique_labels={len(set(labels))}, "
        f"num_positive_labels={len(labels)}\n"
        "# YTID, start_seconds, end_seconds, positive_labels\n"
    )


def _write_segments_csv(path: Path, kind: str, seed: int, rows: list[tuple[str, float, float, list[str]]]) -> None:
    lines = [f'{ytid}, {start:.3f}, {end:.3f}, "{",".join(mids)}"\n' for ytid, start, end, mids in rows]
    path.write_text(_segments_header(kind, seed, rows) + "".join(lines), encoding="utf-8")


def _write_class_labels(path: Path, classes: list[SynthClass]) -> None:
    lines = ["index,mid,display_name\n"]
    lines += [f'{c.index},{c.mid},"{c.display_name.replace(chr(34), chr(34) * 2)}"\n' for c in classes]
    path.write_text("".join(lines), encoding="utf-8")


def make_sample_dataset(out_dir: str | os.PathLike, cfg: SynthConfig) -> dict:
    """Write the sample dataset under out_dir and return a JSON-ready summary.

    Summary keys: out_dir, seed, profile, classes (display names), splits (per split: csv, rows, clips, broken),
    broken (kind -> YTID), formats, sample_rates, channels (counts over generated clips), total_bytes
    (of the files written by this call).
    """
    if cfg.train_clips < 1 or cfg.eval_clips < 1:
        raise ValueError(f"need at least one train and one eval clip, got {cfg.train_clips}, {cfg.eval_clips}")
    out = Path(out_dir)
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    classes = synth_classes(cfg.num_classes, cfg.profile)
    render = _render_clip if cfg.profile == "sample" else _render_scene
    rng = np.random.default_rng(cfg.seed)
    broken_kinds = list(BROKEN_KINDS) if cfg.broken_files else []
    ytids = _ytids(rng, cfg.train_clips + cfg.eval_clips + len(broken_kinds))
    split_ytids = {
        "train": ytids[: cfg.train_clips],
        "eval": ytids[cfg.train_clips : cfg.train_clips + cfg.eval_clips],
    }
    broken_ytids = dict(zip(broken_kinds, ytids[cfg.train_clips + cfg.eval_clips :]))
    csv_names = {"train": "balanced_train_segments.csv", "eval": "eval_segments.csv"}

    written: list[Path] = []
    counts: dict[str, Counter] = {"formats": Counter(), "sample_rates": Counter(), "channels": Counter()}
    summary_splits: dict[str, dict] = {}
    for split_code, (split, split_ids) in enumerate(split_ytids.items()):
        rows: list[tuple[str, float, float, list[str]]] = []
        for clip_index, plan in enumerate(_plan_clips(rng, split_ids, cfg.profile)):
            # Each clip has its own stream, so its content does not depend on the other clips.
            clip_rng = np.random.default_rng([cfg.seed, split_code, clip_index])
            samples, class_indices = render(clip_rng, plan, classes)
            written.append(audio_dir / f"{plan.ytid}.{plan.extension}")
            _write_audio(written[-1], samples, plan.sample_rate, plan.extension)
            rows.append((plan.ytid, plan.start_s, plan.start_s + plan.seconds, [classes[i].mid for i in class_indices]))
            counts["formats"][plan.extension] += 1
            counts["sample_rates"][str(plan.sample_rate)] += 1
            counts["channels"][str(plan.channels)] += 1
        broken_count = 0
        if split == "train":
            for kind_index, (kind, ytid) in enumerate(broken_ytids.items()):
                broken_rng = np.random.default_rng([cfg.seed, len(split_ytids), kind_index])
                name = _write_broken(audio_dir, kind, ytid, broken_rng)
                if name is not None:
                    written.append(audio_dir / name)
                label = classes[int(broken_rng.integers(len(classes)))].mid
                start_s = float(broken_rng.integers(0, 300))
                rows.append((ytid, start_s, start_s + 10.0, [label]))
            broken_count = len(broken_ytids)
        written.append(out / csv_names[split])
        _write_segments_csv(written[-1], split, cfg.seed, rows)
        summary_splits[split] = {
            "csv": str(written[-1]),
            "rows": len(rows),
            "clips": len(split_ids),
            "broken": broken_count,
        }
    written.append(out / "class_labels_indices.csv")
    _write_class_labels(written[-1], classes)

    summary = {
        "out_dir": str(out),
        "seed": cfg.seed,
        "profile": cfg.profile,
        "classes": [c.display_name for c in classes],
        "splits": summary_splits,
        "broken": broken_ytids,
        "formats": dict(sorted(counts["formats"].items())),
        "sample_rates": dict(sorted(counts["sample_rates"].items(), key=lambda item: int(item[0]))),
        "channels": dict(sorted(counts["channels"].items())),
        "total_bytes": sum(path.stat().st_size for path in written),
    }
    logger.info("sample dataset: %s", {k: v for k, v in summary.items() if k != "classes"})
    return summary
