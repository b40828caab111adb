"""Mixture groups, no-mix windows and both mixing domains (pipeline.mixing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio

from pipeline import mixing
from pipeline.audio import frame_geometry
from pipeline.config import AudioConfig


def test_nomix_rows_reference_and_scaled() -> None:
    assert mixing.nomix_rows(64) == 15
    assert mixing.nomix_rows(16) == 3
    assert mixing.nomix_rows(32) == 7
    assert mixing.nomix_rows(4) == 1
    assert mixing.nomix_rows(64, 16) == 16
    with pytest.raises(ValueError, match="do not fit"):
        mixing.nomix_rows(3)
    with pytest.raises(ValueError, match="do not fit"):
        mixing.nomix_rows(64, 17)
    with pytest.raises(ValueError):
        mixing.nomix_rows(64, -1)


@pytest.mark.parametrize("time_patches", [4, 16, 17, 64, 101])
def test_windows_obey_the_rule(time_patches: int) -> None:
    rows = mixing.nomix_rows(time_patches)
    rng = np.random.default_rng(0)
    for _ in range(300):
        i1, i2 = mixing.draw_windows(time_patches, rows, rng)
        assert 0 <= i1 <= time_patches // 2 - 1
        assert i1 + rows <= i2 <= time_patches - rows - 1
        mask = mixing.nomix_mask(i1, i2, rows, time_patches)
        assert mask.dtype == bool and mask.shape == (time_patches,)
        assert mask.sum() == 2 * rows  # non-overlapping
        assert mask[i1 : i1 + rows].all() and mask[i2 : i2 + rows].all()
        assert not mask[-1]  # the last row is always mixed


def test_windows_refuse_when_they_cannot_fit() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        mixing.draw_windows(59, 15, rng)
    with pytest.raises(ValueError):
        mixing.draw_windows(64, 0, rng)
    with pytest.raises(ValueError):
        mixing.nomix_mask(3, 5, 3, 16)  # overlapping windows


def test_window_distribution_reproduces_the_reference_for_tp64() -> None:
    # The reference draws frame offsets: idx1 in range(0, 501, 16), idx2 in range(idx1 + 240, 1023 - 240, 16).
    reference = {(idx1 // 16, idx2 // 16) for idx1 in range(0, 501, 16) for idx2 in range(idx1 + 240, 1023 - 240, 16)}
    assert {i1 for i1, _ in reference} == set(range(32))
    assert all(i1 + 15 <= i2 <= 48 for i1, i2 in reference)

    i1, i2 = mixing.draw_windows_batch(64, 15, np.random.default_rng(123), 200_000)
    assert set(zip(i1.tolist(), i2.tolist())) == reference
    # i1 is uniform over 32 values, i2 uniform given i1.
    counts = np.bincount(i1, minlength=32)
    assert counts.min() > 0.9 * len(i1) / 32 and counts.max() < 1.1 * len(i1) / 32
    given_zero = np.bincount(i2[i1 == 0])[15:49]
    assert len(given_zero) == 34 and given_zero.min() > 0.7 * given_zero.mean()


def test_group_cycle() -> None:
    assert mixing.group_cycle(3) == (2, 0, 1)
    assert mixing.group_cycle(2) == (1, 0)
    partners = mixing.group_cycle(5)
    assert sorted(partners) == list(range(5))  # every clip is the foreign source of exactly one mixture
    assert all(partner != primary for primary, partner in enumerate(partners))
    with pytest.raises(ValueError):
        mixing.group_cycle(1)


PATCH = 4
FRAMES = 64  # Tp = 16, r = 3
BINS = 8


def _spectra(seed: int, count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, FRAMES, BINS, generator=generator) * 12.0 - 14.0  # raw log-mel range, all < 0


def test_logmel_max_equals_primary_in_windows_and_max_elsewhere() -> None:
    primary, partner = _spectra(0, 2)
    windows = [[2, 5], [9, 12]]
    mixed = mixing.logmel_max_mixture(primary, partner, windows, PATCH)
    # The spec's formulation: blank the partner with -inf on the window frames, then take the max.
    blanked = partner.clone()
    for start, end in windows:
        blanked[start * PATCH : end * PATCH] = -torch.inf
    assert torch.equal(mixed, torch.maximum(primary, blanked))
    in_window = torch.from_numpy(np.repeat(mixing.nomix_mask(2, 9, 3, FRAMES // PATCH), PATCH))
    assert torch.equal(mixed[in_window], primary[in_window])
    assert torch.equal(mixed[~in_window], torch.maximum(primary, partner)[~in_window])
    assert not torch.equal(mixed[~in_window], primary[~in_window])


def test_logmel_max_padding_modes() -> None:
    primary, partner = _spectra(1, 2)
    primary_valid, partner_valid = 40, 30
    primary[primary_valid:] = 0.0  # front-end zero padding
    partner[partner_valid:] = 0.0
    windows = [[0, 3], [12, 15]]  # frames [0, 12) and [48, 60)
    zero = mixing.logmel_max_mixture(primary, partner, windows, PATCH, "zero", primary_valid, partner_valid)
    # Reference artefact: the partner's zero padding wins the max in mixed rows.
    assert torch.equal(zero[30:40], torch.zeros(10, BINS))

    silence = mixing.logmel_max_mixture(primary, partner, windows, PATCH, "silence", primary_valid, partner_valid)
    assert torch.equal(silence[:12], primary[:12])  # window
    assert torch.equal(silence[12:30], torch.maximum(primary, partner)[12:30])  # both present
    assert torch.equal(silence[30:40], primary[30:40])  # partner padded: primary only
    assert torch.equal(silence[40:], primary[40:])  # both padded or window: the primary's zero padding

    # A long partner fills a short primary's padding outside the windows.
    silence = mixing.logmel_max_mixture(primary, partner, windows, PATCH, "silence", primary_valid, None)
    assert torch.equal(silence[40:48], partner[40:48])
    assert torch.equal(silence[48:60], primary[48:60])  # window rows stay the primary's
    assert torch.equal(silence[60:], partner[60:])
    with pytest.raises(ValueError):
        mixing.logmel_max_mixture(primary, partner, windows, PATCH, "loud")
    with pytest.raises(ValueError):
        mixing.logmel_max_mixture(primary, partner, [[14, 17]], PATCH)


@pytest.mark.parametrize("mix_padding", ["zero", "silence"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batched_equals_per_sample(mix_padding: str, dtype: torch.dtype) -> None:
    groups, group_size = 3, 3
    count = groups * group_size
    clean = _spectra(2, count).to(dtype)
    valid = torch.tensor([64, 50, 33, 64, 17, 64, 40, 64, 21])
    for i, frames in enumerate(valid.tolist()):
        clean[i, frames:] = 0.0
    cycle = mixing.group_cycle(group_size)
    partner = torch.tensor([g * group_size + cycle[i] for g in range(groups) for i in range(group_size)])
    rng = np.random.default_rng(5)
    windows = [mixing.draw_windows(FRAMES // PATCH, 3, rng) for _ in range(count)]
    nomix = torch.from_numpy(np.stack([mixing.nomix_mask(i1, i2, 3, FRAMES // PATCH) for i1, i2 in windows]))

    batched = mixing.logmel_max_batch(clean[:, None], partner, nomix, PATCH, mix_padding, valid)
    assert batched.shape == (count, 1, FRAMES, BINS) and batched.dtype == dtype
    assert torch.equal(mixing.logmel_max_batch(clean, partner, nomix, PATCH, mix_padding, valid), batched[:, 0])
    for i, (i1, i2) in enumerate(windows):
        single = mixing.logmel_max_mixture(
            clean[i], clean[partner[i]], mixing.window_ranges(i1, i2, 3), PATCH, mix_padding,
            int(valid[i]), int(valid[partner[i]]),
        )
        assert torch.equal(batched[i, 0], single)
    with pytest.raises(ValueError):
        mixing.logmel_max_batch(clean, partner, nomix[:, :-1], PATCH)


def _reference_fbank(wave: torch.Tensor, cfg: AudioConfig) -> torch.Tensor:
    """pipeline.audio.fbank_batch when present, else the §1.7 Kaldi fbank with mean removal and pad/crop."""
    try:
        from pipeline.audio import fbank_batch
    except ImportError:
        features = torchaudio.compliance.kaldi.fbank(
            (wave - wave.mean())[None], htk_compat=True, sample_frequency=cfg.sample_rate, use_energy=False,
            window_type="hanning", num_mel_bins=cfg.mel_bins, dither=0.0, frame_shift=cfg.frame_shift_ms,
            frame_length=cfg.frame_length_ms,
        )[: cfg.target_length]
        return torch.nn.functional.pad(features, (0, 0, 0, cfg.target_length - features.shape[0]))
    return fbank_batch([wave], cfg)[0]


def test_silenced_sample_ranges() -> None:
    cfg = AudioConfig()
    assert frame_geometry(cfg) == (400, 160, 512)
    # Rows [2, 5) with patch 16 = frames [32, 80), widened to [31, 81): samples [31*160, 80*160 + 400).
    assert mixing.silenced_sample_ranges([[2, 5]], 16, cfg, 100_000) == [(4960, 13200)]
    assert mixing.silenced_sample_ranges([[0, 2]], 16, cfg, 3000) == [(0, 3000)]


def test_waveform_sum_windows_equal_primary_fbank() -> None:
    cfg = AudioConfig(target_length=256, mel_bins=32)
    patch = 16
    time_patches = cfg.target_length // patch
    rows = mixing.nomix_rows(time_patches)
    length, shift, _ = frame_geometry(cfg)
    num_samples = (cfg.target_length - 1) * shift + length
    generator = torch.Generator().manual_seed(3)
    primary = 0.05 * torch.randn(num_samples, generator=generator) + 0.02
    partner = 0.5 * torch.randn(num_samples + 5000, generator=generator) - 0.3  # longer, offset
    i1, i2 = 1, 9
    windows = mixing.window_ranges(i1, i2, rows)

    mixture = mixing.waveform_sum_mixture(primary, partner, windows, 0.8, cfg, patch)
    assert mixture.shape == primary.shape
    clean_fbank = _reference_fbank(primary, cfg)
    mixed_fbank = _reference_fbank(mixture, cfg)
    in_window = torch.from_numpy(np.repeat(mixing.nomix_mask(i1, i2, rows, time_patches), patch))
    assert (mixed_fbank[in_window] - clean_fbank[in_window]).abs().max() < 1e-3
    # The partner is loud outside the windows.
    assert (mixed_fbank[~in_window] - clean_fbank[~in_window]).mean() > 3.0


def test_waveform_sum_partner_length_and_gain() -> None:
    cfg = AudioConfig()
    primary = torch.linspace(-1.0, 1.0, 20_000)
    short_partner = torch.ones(5_000) + torch.arange(5_000) % 2  # mean 1.5, values 1 or 2
    mixture = mixing.waveform_sum_mixture(primary, short_partner, [[100, 101]], 0.5, cfg, 16)
    centred = primary - primary.mean()
    assert torch.allclose(mixture[:5_000], centred[:5_000] + 0.5 * (short_partner - 1.5))
    assert torch.equal(mixture[5_000:], centred[5_000:])  # zero-padded partner
    with pytest.raises(ValueError):
        mixing.waveform_sum_mixture(primary[None], short_partner, [[0, 1]], 1.0, cfg, 16)
