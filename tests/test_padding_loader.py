"""Valid lengths through the loader: `valid_frames` in train and eval batches from the samples' "frames", full
length for older samples, and on-the-fly "silence" mixing that never lets a partner's padding overwrite content;
a loader batch drives `model.padding: aware`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from model.config import ModelConfig
from model.sslam import SSLAM
from pipeline import mixing, shards, storage
from pipeline.config import LoaderConfig
from pipeline.eval_loader import EvalLoader
from pipeline.loader import TrainLoader
from pipeline.plan import sample_key, shard_name

T, F, PATCH, G = 64, 16, 8, 2
TP = T // PATCH
ROWS = mixing.nomix_rows(TP)
VALID = [[20, 64], [64, 33]]  # per group: clip 0 short in the first group, clip 1 in the second
WINDOWS = [(0, 2), (0, 2)]  # no-mix rows 0 and 2


def _clip(rng: np.random.Generator, valid: int) -> np.ndarray:
    clip = rng.normal(-8.0, 1.0, size=(T, F)).astype(np.float16)  # quieter than the zero padding
    clip[valid:] = 0
    return clip


def write_set(directory: Path, with_frames: bool = True) -> None:
    rng = np.random.default_rng(0)
    samples = []
    for sample, valid in enumerate(VALID):
        key = sample_key("train", 0, 0, sample)
        clips = [_clip(rng, v) for v in valid]
        samples.append((key, shards.encode_sample(
            clips, [f"{key}-{i}" for i in range(G)], [[0], [1]], [False] * G, WINDOWS, ROWS, "logmel_max", seed=0,
            frames=valid if with_frames else None,
        )))
    train = shard_name("train", 0, 0)
    shards.write_shard(samples, storage.locate(directory), train)
    eval_samples = [
        (sample_key("eval", 0, 0, i),
         shards.encode_eval_sample(_clip(rng, v), f"e{i}", [i % 2], v if with_frames else None))
        for i, v in enumerate([17, 64, 40])
    ]
    evaluation = shard_name("eval", 0, 0)
    shards.write_shard(eval_samples, storage.locate(directory), evaluation)
    info = {
        "splits": {
            "train": {"mix": True, "shards_per_epoch": {"0": [train]}, "samples": len(samples)},
            "eval": {"mix": False, "shards_per_epoch": {"0": [evaluation]}, "samples": len(eval_samples)},
        },
        "group_size": G, "r": ROWS, "mixture_epochs": 1, "target_length": T, "mel_bins": F, "patch_size": PATCH,
        "classes": [{"index": i, "mid": f"/m/{i}", "name": f"class {i}"} for i in range(2)],
        "materialize_mixtures": False, "fingerprint": "test", "mix_padding": "silence",
    }
    (directory / "dataset.json").write_text(json.dumps(info))


def _train_batch(directory: Path) -> dict[str, torch.Tensor]:
    cfg = LoaderConfig(shards=str(directory), micro_batch_clips=2 * G, num_workers=0, shuffle_buffer=1)
    batches = list(TrainLoader(cfg, "train", 0, 1, epoch=0, seed=0))
    assert len(batches) == 1
    return batches[0]


def test_valid_frames_reach_train_and_eval_batches_and_silence_mixing_keeps_content(tmp_path):
    write_set(tmp_path)
    batch = _train_batch(tmp_path)
    valid = batch["valid_frames"]
    assert valid.dtype == torch.long and sorted(valid.tolist()) == sorted(sum(VALID, []))
    clean, mixed = batch["clean"][:, 0], batch["mixed"][:, 0]
    for i in range(2 * G):
        partner = int(batch["partner"][i])
        assert clean[i, valid[i]:].eq(0).all() and clean[i, : valid[i]].lt(0).all()
        # Mixed rows 1 and 3: where the partner is padding the mixture is the primary, not the louder zeros.
        for row in (1, *range(3, TP)):
            frames = torch.arange(row * PATCH, (row + 1) * PATCH)
            primary_only = frames[(frames < valid[i]) & (frames >= valid[partner])]
            assert torch.equal(mixed[i, primary_only], clean[i, primary_only])
            both = frames[(frames < valid[i]) & (frames < valid[partner])]
            assert torch.equal(mixed[i, both], torch.maximum(clean[i, both], clean[partner, both]))
    assert any(bool(((torch.arange(T) < valid[i]) & (torch.arange(T) >= valid[int(batch["partner"][i])])).any())
               for i in range(2 * G))  # the case above is exercised
    evaluation = list(EvalLoader(LoaderConfig(shards=str(tmp_path), num_workers=0), "eval", batch_size=8))
    assert evaluation[0]["valid_frames"].tolist() == [17, 64, 40]


def test_samples_without_frames_count_as_full_length_and_say_so(tmp_path, caplog):
    write_set(tmp_path, with_frames=False)
    with caplog.at_level(logging.WARNING, logger="pipeline.share_reader"):
        from pipeline import share_reader

        share_reader._log_full_length_once.cache_clear()
        batch = _train_batch(tmp_path)
    assert batch["valid_frames"].tolist() == [T] * (2 * G)
    assert "count as full length" in caplog.text


def test_a_loader_batch_drives_the_padding_aware_model(tmp_path):
    write_set(tmp_path)
    batch = _train_batch(tmp_path)
    cfg = ModelConfig(
        target_length=T, mel_bins=F, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2, decoder_dim=32,
        decoder_groups=4, decoder_layers=2, clone_batch=2, max_time_patches=TP, stage=2, padding="aware",
    )
    torch.manual_seed(0)
    model = SSLAM(cfg)
    loss, parts, stats = model(batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in parts.values())
    # S counts masked content tokens only: below all masked tokens, since 2 of the 4 clips are short.
    torch.manual_seed(0)
    reference = SSLAM(ModelConfig(**{**cfg.__dict__, "padding": "reference"}))
    _, _, reference_stats = reference(batch, torch.Generator().manual_seed(0))
    assert 0 < stats["sample_size"] < reference_stats["sample_size"]
