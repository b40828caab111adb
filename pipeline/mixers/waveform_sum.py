"""The `waveform_sum` mixer (SSLAM_SPEC §14.3): the primary's waveform plus the gained partner silenced around
the windows (`pipeline.mixing.waveform_sum_mixture`), then the front-end (`pipeline.audio.fbank_batch`) over all
mixtures of all groups at once. It needs the waveforms, so its mixtures must be materialised in preprocessing."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline import audio
from pipeline.config import MixingConfig
from pipeline.mixers.base import MixSettings, MixtureGroup
from pipeline.mixing import waveform_sum_mixture


class WaveformSum:
    name = "waveform_sum"
    loader_can_form = False
    allowed_mix_paddings = ("zero",)

    def check_config(self, mixing: MixingConfig) -> None:
        if not mixing.materialize_mixtures:
            raise ValueError(
                "data.mixing.domain=waveform_sum needs materialize_mixtures: true (the loader can only form "
                "log-mel max mixtures)"
            )
        if mixing.mix_padding not in self.allowed_mix_paddings:
            raise ValueError("data.mixing.mix_padding applies to logmel_max only; use 'zero' with waveform_sum")

    def mix(self, groups: Sequence[MixtureGroup], settings: MixSettings) -> list[torch.Tensor]:
        if settings.audio is None or any(group.waves is None for group in groups):
            raise ValueError("waveform_sum mixes waveforms: it needs the clips' waves and the audio settings")
        sums = []
        for group in groups:
            for i, windows in enumerate(group.windows):
                primary, foreign = group.waves[i], group.waves[int(group.partner[i])]
                sums.append(
                    waveform_sum_mixture(
                        primary, foreign, windows, settings.waveform_gain, settings.audio, settings.patch_size
                    )
                )
        spectra = audio.fbank_batch(sums, settings.audio) if sums else None
        result = []
        offset = 0
        for group in groups:
            result.append(spectra[offset : offset + len(group.windows)])
            offset += len(group.windows)
        return result
