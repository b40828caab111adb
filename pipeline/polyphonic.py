"""Polyphonic evaluation mixtures: which clips go together, and their waveform sum at matched loudness.

A mixture of k sources is k clips whose label sets are pairwise disjoint (no class in two sources), drawn
by a seeded generator: the same (labels, count, k, seed) always gives the same mixtures. Its labels are the
union of its sources' labels.

Loudness ("rms"): each source has its mean removed and is scaled to the same RMS, that of the quietest
source of the mixture (so no source is amplified above its own level, and the noise floor of a quiet clip
is not raised). The sum is as long as the longest source (shorter ones are zero-padded:
`pipeline.mixing.waveform_sum_mixture` with no no-mix windows). A sum whose peak exceeds `PEAK_LIMIT` is
scaled down as a whole, which keeps the sources' loudness equal to each other.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.config import AudioConfig
from pipeline.mixing import waveform_sum_mixture

PEAK_LIMIT = 0.99
SILENCE_RMS = 1e-8
# Draws tried per wanted mixture before the sampler gives up on a label distribution.
ATTEMPTS_PER_MIXTURE = 50


def draw_mixtures(labels: Sequence[Sequence[int]], count: int, sources: int, seed: int) -> list[tuple[int, ...]]:
    """`count` tuples of `sources` clip indices (into `labels`) with pairwise disjoint, non-empty label sets.

    Raises ValueError when the clips hold fewer than `sources` classes, or when no such tuple turns up.
    """
    if sources < 2:
        raise ValueError(f"a mixture needs at least 2 sources, got {sources}")
    label_sets = [frozenset(int(k) for k in row) for row in labels]
    usable = [i for i, row in enumerate(label_sets) if row]
    classes = set().union(*(label_sets[i] for i in usable)) if usable else set()
    if len(classes) < sources or len(usable) < sources:
        raise ValueError(f"mixtures of {sources} clips of different classes need at least {sources} classes and "
                         f"clips; the split has {len(classes)} classes in {len(usable)} labelled clips")
    rng = np.random.default_rng([seed, sources])
    mixtures: list[tuple[int, ...]] = []
    for _ in range(count * ATTEMPTS_PER_MIXTURE):
        if len(mixtures) == count:
            break
        chosen: list[int] = []
        taken: set[int] = set()
        for index in rng.permutation(usable):
            if not label_sets[index] & taken:
                chosen.append(int(index))
                taken |= label_sets[index]
                if len(chosen) == sources:
                    break
        if len(chosen) == sources:
            mixtures.append(tuple(chosen))
    if len(mixtures) < count:
        raise ValueError(f"found only {len(mixtures)} of {count} mixtures of {sources} clips with disjoint labels")
    return mixtures


def union_labels(labels: Sequence[Sequence[int]], mixture: Sequence[int]) -> list[int]:
    return sorted({int(k) for index in mixture for k in labels[index]})


def rms(wave: torch.Tensor) -> float:
    """Root mean square of the mean-removed waveform."""
    centred = wave.double() - wave.double().mean()
    return float(centred.square().mean().sqrt())


def equal_loudness_sum(waves: Sequence[torch.Tensor], cfg: AudioConfig) -> torch.Tensor:
    """The sum of the module docstring: every source at the quietest source's RMS, peak-guarded."""
    levels = [rms(wave) for wave in waves]
    if min(levels) <= SILENCE_RMS:
        raise ValueError(f"a source of the mixture is silent (RMS {min(levels):.3g})")
    target = min(levels)
    order = sorted(range(len(waves)), key=lambda i: waves[i].numel(), reverse=True)
    first = order[0]
    mixture = (waves[first] - waves[first].mean()) * (target / levels[first])
    for index in order[1:]:
        mixture = waveform_sum_mixture(mixture, waves[index], [], target / levels[index], cfg, patch_size=1)
    peak = float(mixture.abs().max())
    if peak > PEAK_LIMIT:
        mixture = mixture * (PEAK_LIMIT / peak)
    return mixture.to(torch.float32)
