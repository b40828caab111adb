"""The mixer registry (pipeline.mixers): a third strategy registered in `MIXERS` alone reaches every dispatch
point (preprocessing's refusals and mixing, shard validation, inspect, the loader's collation) with no other
file touched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from jobs.train.config import ConfigError, load_config
from pipeline import mixing, shards
from pipeline.config import AudioConfig, DataConfig, MixingConfig
from pipeline.inspect import _loader_mixtures
from pipeline.mixers import MIXERS, mixer
from pipeline.mixers.base import MixSettings, MixtureGroup, assemble_group
from pipeline.preprocess import check_config
from pipeline.preprocess_errors import PreprocessConfigError
from pipeline.share_reader import Geometry, collate_groups
from pipeline.shard_task import ShardJob, process_shard

T, F, PATCH, G = 128, 32, 16, 3
ROWS = 1
WINDOWS = (0, 3)  # (i1, i2): rows [0, 1) and [3, 4)


class MeanMixer:
    """A toy strategy: the mean of primary and partner outside the windows, the primary inside them."""

    name = "toy_mean"
    loader_can_form = True
    allowed_mix_paddings = ("zero",)

    def check_config(self, mixing_cfg: MixingConfig) -> None:
        if mixing_cfg.mix_padding not in self.allowed_mix_paddings:
            raise ValueError("toy_mean knows no mix_padding but 'zero'")

    def mix(self, groups: list[MixtureGroup], settings: MixSettings) -> list[torch.Tensor]:
        result = []
        for group in groups:
            mean = (group.clean + group.clean[group.partner]) / 2
            inside = group.nomix.repeat_interleave(settings.patch_size, dim=1)[..., None]
            result.append(torch.where(inside, group.clean, mean))
        return result


class WavesOnly(MeanMixer):
    """The toy strategy as if it needed the waveforms."""

    name = "toy_waves"
    loader_can_form = False


@pytest.fixture
def toy(monkeypatch) -> MeanMixer:
    registered = MeanMixer()
    monkeypatch.setitem(MIXERS, registered.name, registered)
    return registered


def test_the_registry_names_the_domains_and_refuses_an_unknown_one():
    assert tuple(MIXERS) == ("logmel_max", "waveform_sum")
    assert all(mixer(name).name == name for name in MIXERS)
    assert mixer("logmel_max").loader_can_form and not mixer("waveform_sum").loader_can_form
    with pytest.raises(ValueError, match="unknown mixing domain 'nope'"):
        mixer("nope")


def test_assembly_reads_partner_windows_and_valid_frames():
    layout = [{"partner": (i - 1) % G, "nomix": mixing.window_ranges(*WINDOWS, ROWS)} for i in range(G)]
    group = assemble_group(layout, torch.zeros(G, T, F), PATCH, [T, 50, 7])
    assert group.partner.tolist() == [2, 0, 1]
    assert group.windows == (((0, 1), (3, 4)),) * G
    assert group.nomix.tolist() == [mixing.nomix_mask(*WINDOWS, ROWS, T // PATCH).tolist()] * G
    assert group.valid_frames.tolist() == [T, 50, 7] and group.waves is None
    assert assemble_group(layout, torch.zeros(G, T, F), PATCH).valid_frames is None


def test_a_registered_mixer_passes_and_refuses_preprocessing_config(toy):
    data = DataConfig(audio=AudioConfig(target_length=T, mel_bins=F), mixing=MixingConfig(domain="toy_mean"))
    check_config(data, PATCH)
    data.mixing.mix_padding = "silence"
    with pytest.raises(PreprocessConfigError, match="toy_mean knows no mix_padding but 'zero'"):
        check_config(data, PATCH)
    data.mixing.domain = "unregistered"
    with pytest.raises(PreprocessConfigError, match="must be one of .*'toy_mean'"):
        check_config(data, PATCH)


def _clips(tmp_path: Path, count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = tmp_path / f"clip{index}.wav"
        soundfile.write(path, (0.1 * (index + 1) * rng.standard_normal(16000)).astype(np.float32), 16000)
        paths.append(path)
    return paths


def test_a_registered_mixer_writes_the_shard_mixtures_and_inspect_forms_them(tmp_path, toy):
    paths = _clips(tmp_path, G)
    rows = [
        {"sample": 0, "slot": slot, "key": path.stem, "filler": False, "i1": WINDOWS[0], "i2": WINDOWS[1],
         "path": str(path), "label_indices": [0]}
        for slot, path in enumerate(paths)
    ]
    job = ShardJob(
        name="train-e00-000000.tar", mix=True, rows=rows, output=str(tmp_path / "out"),
        audio=AudioConfig(target_length=T, mel_bins=F), mixing=MixingConfig(group_size=G, domain="toy_mean"),
        patch_size=PATCH, nomix_rows=ROWS, seed=0, fingerprint="test",
    )
    process_shard(job)
    [(_, members)] = list(shards.read_shard_samples(str(tmp_path / "out" / job.name)))
    sample = shards.decode_sample(members, expected_shape=(T, F), group_size=G, time_patches=T // PATCH)
    assert {spec["domain"] for spec in sample["meta"]["mixtures"]} == {"toy_mean"}
    clips = np.stack(sample["clips"]).astype(np.float32)
    stored = np.stack(sample["mixtures"]).astype(np.float32)
    inside = np.repeat(mixing.nomix_mask(*WINDOWS, ROWS, T // PATCH), PATCH)
    assert np.array_equal(stored[:, inside], clips[:, inside])
    expected = (clips + clips[[2, 0, 1]]) / 2
    assert np.allclose(stored[:, ~inside], expected[:, ~inside], atol=2e-2)

    formed = _loader_mixtures({**sample, "mixtures": []}, {"patch_size": PATCH, "domain": "toy_mean"})
    assert np.allclose(np.stack(formed), expected * ~inside[None, :, None] + clips * inside[None, :, None])


def test_shard_validation_asks_the_registry_whether_the_loader_can_form_a_domain(monkeypatch, toy):
    monkeypatch.setitem(MIXERS, WavesOnly.name, WavesOnly())
    clip = np.zeros((T, F), dtype=np.float32)
    arguments = dict(clips=[clip] * G, clip_keys=["a", "b", "c"], labels=[[0]] * G, filler=[False] * G,
                     windows=[WINDOWS] * G, rows=ROWS, seed=0)
    shards.encode_sample(domain="toy_mean", **arguments)
    with pytest.raises(shards.ShardFormatError, match="toy_waves mixtures must be materialised"):
        shards.encode_sample(domain="toy_waves", **arguments)
    with pytest.raises(shards.ShardFormatError, match="domain must be one of"):
        shards.encode_sample(domain="unregistered", **arguments)


def test_the_loader_forms_unstored_mixtures_with_the_sets_mixer(toy):
    rng = np.random.default_rng(1)
    groups = []
    for seed in range(2):
        clips = [rng.standard_normal((T, F)).astype(np.float16) for _ in range(G)]
        members = shards.encode_sample(clips=clips, clip_keys=["a", "b", "c"], labels=[[0]] * G, filler=[False] * G,
                                       windows=[WINDOWS] * G, rows=ROWS, domain="toy_mean", seed=seed, frames=[T] * G)
        groups.append(shards.decode_sample(members))
    geometry = Geometry(target_length=T, mel_bins=F, patch_size=PATCH, group_size=G, rows=ROWS, num_classes=1,
                        materialized=False, mix_padding="zero", domain="toy_mean")
    batch = collate_groups(groups, geometry)
    assert batch["partner"].tolist() == [2, 0, 1, 5, 3, 4]
    clean = batch["clean"][:, 0]
    inside = batch["nomix"].repeat_interleave(PATCH, dim=1)[..., None]
    expected = torch.where(inside, clean, (clean + clean[batch["partner"]]) / 2)
    assert torch.equal(batch["mixed"][:, 0], expected)


def test_a_config_may_name_a_registered_mixer_and_no_other(toy):
    assert load_config("tiny_stage2", ["data.mixing.domain=toy_mean"]).data.mixing.domain == "toy_mean"
    with pytest.raises(ConfigError, match="'data.mixing.domain' must be one of .*'toy_mean', got 'toy_other'"):
        load_config("tiny_stage2", ["data.mixing.domain=toy_other"])
