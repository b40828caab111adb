"""Mixture groups, no-mix windows, and the two mixing domains (DESIGN.md; SSLAM_SPEC §9.1, §9.5, §14.1-14.3).

A group of G clips is a cycle: mixture i has primary clip i and foreign ("partner") clip (i - 1) mod G.
Each mixture has two no-mix windows of r time-patch rows, [i1, i1 + r) and [i2, i2 + r), where only the
primary is present. Window rows become spectrogram frames as [row * patch_size, (row + r) * patch_size).

`logmel_max` (default, §9.1): the mixture is the elementwise max of the raw log-mels, with the partner
absent on the window frames. `mix_padding` says what the zero rows padded after a short clip mean:

* "zero" (the reference's artefact): padded rows are ordinary values 0 and take part in the max, so a
  short partner's padding (0 is louder than most audio) wins the max in mixed rows.
* "silence": a clip is absent on its padded rows (frames >= its valid frame count). Where both sources
  are present the mixture is their max; where one is present it is that one; where neither is (primary
  padding inside a window, or both padded) it is the primary's own value, i.e. its zero padding. Since
  raw fbank is never below the log floor (`pipeline.audio.LOG_FLOOR`), this is the max with padded rows
  set to the log floor, except that rows with no source keep the zero padding of every clean clip. In both
  modes the mixture equals the primary exactly on the window frames.

`waveform_sum` (§14.3): each source has its clip mean removed (the front-end's step §1.5, per source),
the partner is set to exact zeros over every sample that an analysis frame in the windows widened by one
frame on each side reads, scaled by a gain, cut or zero-padded to the primary's length and added to the
primary. The caller runs the front-end on the sum. Its clip-mean removal then subtracts a constant, which
Kaldi's per-frame DC removal (`remove_dc_offset`) cancels, so window frames equal the primary's fbank.

This module is the math; the strategies that preprocessing, the loader and inspect call are `pipeline.mixers`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.audio import frame_geometry
from pipeline.config import AudioConfig

# The reference's window length for Tp = 64 time patches (240 frames).
REFERENCE_NOMIX_ROWS = 15
REFERENCE_TIME_PATCHES = 64
MIX_PADDINGS = ("zero", "silence")

# No-mix windows as half-open time-patch row ranges: [[i1, i1 + r], [i2, i2 + r]].
Windows = Sequence[Sequence[int]]


def nomix_rows(time_patches: int, configured_rows: int = 0) -> int:
    """Rows r per no-mix window: the configured value if > 0, else 15 for Tp = 64, max(1, floor(15 Tp / 64))."""
    if time_patches < 1:
        raise ValueError(f"time_patches must be >= 1, got {time_patches}")
    if configured_rows < 0:
        raise ValueError(f"nomix_rows must be >= 0 (0 = derived from Tp), got {configured_rows}")
    if configured_rows > 0:
        rows = configured_rows
    else:
        rows = max(1, REFERENCE_NOMIX_ROWS * time_patches // REFERENCE_TIME_PATCHES)
    if time_patches < 4 * rows:
        raise ValueError(
            f"two no-mix windows of {rows} rows do not fit in {time_patches} time patches "
            f"(need time_patches >= 4 * rows = {4 * rows})"
        )
    return rows


def draw_windows(time_patches: int, rows: int, rng: np.random.Generator) -> tuple[int, int]:
    """Draw (i1, i2): i1 uniform over [0, Tp//2 - 1], i2 uniform over [i1 + r, Tp - r - 1] (§9.1, §9.5).

    For Tp = 64, r = 15 this is the reference's support: i1 in 0..31, i2 in i1+15..48.
    """
    i1, i2 = draw_windows_batch(time_patches, rows, rng, 1)
    return int(i1[0]), int(i2[0])


def draw_windows_batch(
    time_patches: int, rows: int, rng: np.random.Generator, count: int
) -> tuple[np.ndarray, np.ndarray]:
    """`count` independent draws of `draw_windows`, as two int64 arrays."""
    if rows < 1 or time_patches < 4 * rows:
        raise ValueError(f"windows of {rows} rows do not fit in {time_patches} time patches (need Tp >= 4r, r >= 1)")
    i1 = rng.integers(0, time_patches // 2, size=count)
    i2 = rng.integers(i1 + rows, time_patches - rows, size=count)
    return i1, i2


def window_ranges(i1: int, i2: int, rows: int) -> list[list[int]]:
    """The two windows as half-open time-patch row ranges [[i1, i1 + r], [i2, i2 + r]]."""
    return [[int(i1), int(i1) + rows], [int(i2), int(i2) + rows]]


def nomix_mask(i1: int, i2: int, rows: int, time_patches: int) -> np.ndarray:
    """bool (Tp,), True on the 2r rows of the windows [i1, i1 + r) and [i2, i2 + r)."""
    if not (0 <= i1 and i1 + rows <= i2 and i2 + rows <= time_patches and rows >= 1):
        raise ValueError(f"invalid windows i1={i1}, i2={i2}, r={rows} for {time_patches} time patches")
    mask = np.zeros(time_patches, dtype=bool)
    mask[i1 : i1 + rows] = True
    mask[i2 : i2 + rows] = True
    return mask


def group_cycle(group_size: int) -> tuple[int, ...]:
    """Partner index of each mixture of a group: mixture i has primary i and partner (i - 1) mod G."""
    if group_size < 2:
        raise ValueError(f"a mixture group needs at least 2 clips, got {group_size}")
    return tuple((i - 1) % group_size for i in range(group_size))


def _check_mix_padding(mix_padding: str) -> None:
    if mix_padding not in MIX_PADDINGS:
        raise ValueError(f"mix_padding must be one of {MIX_PADDINGS}, got {mix_padding!r}")


def logmel_max_mixture(
    primary: torch.Tensor,
    partner: torch.Tensor,
    windows: Windows,
    patch_size: int,
    mix_padding: str = "zero",
    primary_valid_frames: int | None = None,
    partner_valid_frames: int | None = None,
) -> torch.Tensor:
    """Log-mel max mixture of one primary (T, F) with one partner (T, F); see the module docstring.

    `windows` are the no-mix time-patch row ranges [[a, b], [c, d]]. The valid frame counts (None: all T
    frames) matter only for mix_padding="silence".
    """
    _check_mix_padding(mix_padding)
    if primary.ndim != 2 or primary.shape != partner.shape or primary.dtype != partner.dtype:
        raise ValueError(
            f"primary and partner must be (T, F) tensors of one shape and dtype, got "
            f"{tuple(primary.shape)} {primary.dtype} and {tuple(partner.shape)} {partner.dtype}"
        )
    frames = primary.shape[0]
    partner_present = torch.ones(frames, dtype=torch.bool, device=primary.device)
    for start, end in windows:
        if not 0 <= start < end <= frames // patch_size:
            raise ValueError(f"window rows [{start}, {end}) outside [0, {frames // patch_size})")
        partner_present[start * patch_size : end * patch_size] = False
    primary_present = torch.ones_like(partner_present)
    if mix_padding == "silence":
        primary_present[_valid(primary_valid_frames, frames) :] = False
        partner_present[_valid(partner_valid_frames, frames) :] = False
    both = torch.maximum(primary, partner)
    only_partner = torch.where(primary_present[:, None], both, partner)
    return torch.where(partner_present[:, None], only_partner, primary)


def _valid(valid_frames: int | None, frames: int) -> int:
    if valid_frames is None:
        return frames
    if not 0 <= valid_frames <= frames:
        raise ValueError(f"valid frame count {valid_frames} outside [0, {frames}]")
    return int(valid_frames)


def logmel_max_batch(
    clean: torch.Tensor,
    partner_index: torch.Tensor,
    nomix: torch.Tensor,
    patch_size: int,
    mix_padding: str = "zero",
    valid_frames: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-mel max mixtures of a batch: mixture i = mix(clean[i], clean[partner_index[i]]) with windows nomix[i].

    clean (N, 1, T, F) or (N, T, F); partner_index long (N,); nomix bool (N, Tp) with Tp * patch_size == T;
    valid_frames long (N,) per clip (None: all T frames), used only for mix_padding="silence".
    Returns a tensor shaped like `clean`.
    """
    _check_mix_padding(mix_padding)
    spectra = clean.squeeze(1) if clean.ndim == 4 else clean
    if spectra.ndim != 3 or (clean.ndim == 4 and clean.shape[1] != 1):
        raise ValueError(f"clean must be (N, 1, T, F) or (N, T, F), got {tuple(clean.shape)}")
    count, frames, _ = spectra.shape
    expected_nomix = (count, frames // patch_size)
    if nomix.dtype != torch.bool or tuple(nomix.shape) != expected_nomix or frames % patch_size:
        raise ValueError(
            f"nomix must be bool (N, T / patch_size) = {expected_nomix} with T a multiple of {patch_size}, "
            f"got {nomix.dtype} {tuple(nomix.shape)}"
        )
    if partner_index.shape != (count,) or bool(((partner_index < 0) | (partner_index >= count)).any()):
        raise ValueError(f"partner_index must be (N,) = ({count},) with values in [0, {count})")
    partner = spectra[partner_index]
    partner_present = ~nomix.repeat_interleave(patch_size, dim=1)
    primary_present = torch.ones_like(partner_present)
    if mix_padding == "silence" and valid_frames is not None:
        if valid_frames.shape != (count,) or bool(((valid_frames < 0) | (valid_frames > frames)).any()):
            raise ValueError(f"valid_frames must be (N,) = ({count},) with values in [0, {frames}]")
        positions = torch.arange(frames, device=spectra.device)
        primary_present = positions[None, :] < valid_frames[:, None].to(spectra.device)
        partner_present = partner_present & primary_present[partner_index]
    both = torch.maximum(spectra, partner)
    only_partner = torch.where(primary_present[..., None], both, partner)
    mixed = torch.where(partner_present[..., None], only_partner, spectra)
    return mixed.view_as(clean)


def silenced_sample_ranges(
    windows: Windows, patch_size: int, cfg: AudioConfig, num_samples: int
) -> list[tuple[int, int]]:
    """Sample ranges [s, e) read by any snip-edges analysis frame of the window frames widened by one frame.

    Frame k reads samples [k * shift, k * shift + length); windows cover frames [a * p, b * p), widened to
    [a * p - 1, b * p + 1).
    """
    length, shift, _ = frame_geometry(cfg)
    ranges = []
    for start, end in windows:
        first_frame = max(0, start * patch_size - 1)
        last_frame = end * patch_size  # inclusive: the frame right after the window
        begin = min(num_samples, first_frame * shift)
        stop = min(num_samples, last_frame * shift + length)
        ranges.append((begin, stop))
    return ranges


def waveform_sum_mixture(
    primary_wave: torch.Tensor,
    partner_wave: torch.Tensor,
    windows: Windows,
    gain: float,
    cfg: AudioConfig,
    patch_size: int,
) -> torch.Tensor:
    """Waveform-sum mixture (§14.3) of two 1-D 16 kHz mono waveforms; returns the sum, primary's length.

    Both sources are mean-centred first; the partner is silenced (exact zeros) over
    `silenced_sample_ranges`, scaled by `gain`, cut or zero-padded to the primary's length, and added.
    """
    if primary_wave.ndim != 1 or partner_wave.ndim != 1:
        raise ValueError(
            f"waveforms must be 1-D, got {tuple(primary_wave.shape)} and {tuple(partner_wave.shape)}"
        )
    if primary_wave.numel() == 0 or partner_wave.numel() == 0:
        raise ValueError("waveforms must not be empty")
    num_samples = primary_wave.numel()
    primary = primary_wave - primary_wave.mean()
    centred_partner = (partner_wave - partner_wave.mean()).to(primary.dtype)
    partner = torch.zeros_like(primary)
    overlap = min(num_samples, centred_partner.numel())
    partner[:overlap] = centred_partner[:overlap]
    for begin, stop in silenced_sample_ranges(windows, patch_size, cfg, num_samples):
        partner[begin:stop] = 0.0
    return primary + gain * partner
