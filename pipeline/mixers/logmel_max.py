"""The `logmel_max` mixer (SSLAM_SPEC §9.1, the default): the elementwise max of the raw log-mels, the partner
absent on the window frames, padded rows treated as `mix_padding` says (`pipeline.mixing.logmel_max_batch`).
It needs only the stored clips, so the loader can form its mixtures when they are not materialised."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.config import MixingConfig
from pipeline.mixers.base import MixSettings, MixtureGroup
from pipeline.mixing import MIX_PADDINGS, logmel_max_batch


class LogmelMax:
    name = "logmel_max"
    loader_can_form = True
    allowed_mix_paddings = MIX_PADDINGS

    def check_config(self, mixing: MixingConfig) -> None:
        """Every mix_padding and either materialisation are honoured."""

    def mix(self, groups: Sequence[MixtureGroup], settings: MixSettings) -> list[torch.Tensor]:
        return [
            logmel_max_batch(
                group.clean, group.partner, group.nomix, settings.patch_size, settings.mix_padding, group.valid_frames
            )
            for group in groups
        ]
