"""What a mixing strategy is (`Mixer`) and the one assembly of a group's mixing inputs (`assemble_group`).

A mixer turns mixture groups into mixtures: mixture i of a group mixes primary clip i with clip partner[i]
outside its no-mix windows (`pipeline.mixing` holds the math of each domain). Preprocessing, the loader and
inspect all describe a group the same way, by the sample json's "mixtures" entries ({"partner", "nomix"}) and the
clips' valid frame counts, and `assemble_group` turns that into the tensors every mixer reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from pipeline.config import AudioConfig, MixingConfig


@dataclass(frozen=True)
class MixtureGroup:
    """One group's mixing inputs (G clips, G mixtures)."""

    clean: torch.Tensor  # float32 (G, T, F) raw log-mels
    partner: torch.Tensor  # long (G,): mixture i's partner clip
    windows: tuple[tuple[tuple[int, int], ...], ...]  # per mixture, its no-mix time-patch row ranges [start, end)
    nomix: torch.Tensor  # bool (G, T / patch_size), True on the window rows
    valid_frames: torch.Tensor | None  # long (G,) per clip; None: every clip counts as full length
    waves: tuple[torch.Tensor, ...] | None  # the clips' 1-D waveforms (preprocessing only)


@dataclass(frozen=True)
class MixSettings:
    """What a mixer may need besides the groups. The loader and inspect know only the patch size and
    mix_padding (from dataset.json); `audio` is None there, so only a mixer that `loader_can_form` runs."""

    patch_size: int
    mix_padding: str = "zero"
    waveform_gain: float = 1.0
    audio: AudioConfig | None = None


class Mixer(Protocol):
    """A mixing strategy, registered in `pipeline.mixers.MIXERS` under its `name` (data.mixing.domain)."""

    name: ClassVar[str]
    # Whether the loader (and inspect) can form its mixtures from the stored clips, i.e. it needs no waveforms;
    # when False, preprocessing must materialise them.
    loader_can_form: ClassVar[bool]
    # The data.mixing.mix_padding values it honours.
    allowed_mix_paddings: ClassVar[tuple[str, ...]]

    def check_config(self, mixing: MixingConfig) -> None:
        """Raise ValueError (the refusal's text) for settings this strategy cannot honour."""

    def mix(self, groups: Sequence[MixtureGroup], settings: MixSettings) -> list[torch.Tensor]:
        """(G, T, F) float32 mixtures of each group, in order."""


def assemble_group(
    mixtures: Sequence[Mapping],
    clean: torch.Tensor,
    patch_size: int,
    valid_frames: Sequence[int] | None = None,
    waves: Sequence[torch.Tensor] | None = None,
) -> MixtureGroup:
    """The mixing inputs of a group from its json "mixtures" entries (mixture i: {"partner": j, "nomix": [[a, b],
    [c, d]]}), its clean log-mels (G, T, F) and, when known, its clips' valid frame counts and waveforms."""
    count, frames = clean.shape[0], clean.shape[1]
    nomix = torch.zeros(count, frames // patch_size, dtype=torch.bool)
    windows = []
    for i, mixture in enumerate(mixtures):
        ranges = tuple((int(start), int(end)) for start, end in mixture["nomix"])
        for start, end in ranges:
            nomix[i, start:end] = True
        windows.append(ranges)
    return MixtureGroup(
        clean=clean,
        partner=torch.tensor([int(mixture["partner"]) for mixture in mixtures], dtype=torch.long),
        windows=tuple(windows),
        nomix=nomix,
        valid_frames=None if valid_frames is None else torch.tensor(list(valid_frames), dtype=torch.long),
        waves=None if waves is None else tuple(waves),
    )
