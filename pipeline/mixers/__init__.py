"""The registry of mixing strategies (data.mixing.domain -> `Mixer`, see `pipeline.mixers.base`).

Every place that depends on the domain (preprocessing's config refusals and mixing, shard validation, the
loader and inspect forming unmaterialised mixtures, the pretraining dataset check) asks this registry, so a new
strategy is one module of this package plus its line below.
"""

from __future__ import annotations

from pipeline.mixers.base import Mixer
from pipeline.mixers.logmel_max import LogmelMax
from pipeline.mixers.waveform_sum import WaveformSum

# The domain of a dataset.json that records none (sets written before the choice existed).
DEFAULT_DOMAIN = LogmelMax.name
MIXERS: dict[str, Mixer] = {
    LogmelMax.name: LogmelMax(),
    WaveformSum.name: WaveformSum(),
}


def mixer(name: str) -> Mixer:
    """The registered mixer of data.mixing.domain `name`; ValueError naming the known ones otherwise."""
    try:
        return MIXERS[name]
    except KeyError:
        raise ValueError(f"unknown mixing domain {name!r}, known: {tuple(MIXERS)}") from None
