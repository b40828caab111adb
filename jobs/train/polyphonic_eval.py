"""The polyphonic half of `sslam evaluate`: mixtures of the test split's audio -> features scored like the clips.

The shards hold log-mel features only, so the mixtures are built from audio: the test split (`eval.test_split`)
of the manifest of the config's `data.source` (the source the shards were preprocessed from;
pipeline.manifest.build_manifest), mixed by pipeline.polyphonic (seeded by `eval.polyphonic.seed`, clips of
different classes, equal RMS), then the same front-end (pipeline.audio.load_waveform and fbank_batch with
`data.audio`) and the same encoder pooling as the monophonic clips. Labels are mapped to the shards' class
list by MID. A source clip that fails to decode drops its mixture, counted in `poly{K}_dropped`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from jobs.train.config import Config, ConfigError, PolyphonicConfig
from pipeline.audio import AudioError, fbank_batch, frame_count, load_waveform
from pipeline.polyphonic import draw_mixtures, equal_loudness_sum, union_labels

log = logging.getLogger("sslam.evaluate")


@dataclass
class MixtureSet:
    sources: int
    features: torch.Tensor  # (M, D)
    labels: torch.Tensor  # (M, C) multi-hot in the shards' class order
    logits: torch.Tensor | None
    dropped: int  # mixtures left out because a source did not decode: scored + dropped = eval.polyphonic.mixtures


def check_polyphonic(cfg: PolyphonicConfig) -> None:
    if cfg.enabled and (not cfg.sources or len(set(cfg.sources)) != len(cfg.sources)):
        raise ConfigError(f"eval.polyphonic.sources must be distinct source counts, got {cfg.sources}")


def manifest_test_clips(config: Config, classes: list[dict]) -> tuple[list[str], list[list[int]]]:
    """(audio paths, label indices in the shards' class order) of the manifest's test split."""
    from pipeline.manifest import build_manifest, manifest_classes

    if not (config.data.source.splits or config.data.source.audio_root):
        raise ConfigError("eval.polyphonic needs the data.source of the preprocessed set (its split CSVs and audio)")
    manifest, _ = build_manifest(config.data.source)
    mids = [entry.mid for entry in manifest_classes(manifest)]
    column = {entry.get("mid"): position for position, entry in enumerate(classes)}
    missing = sorted({mid for mid in mids if mid not in column})
    rows = [row for row in manifest.select(["path", "split", "label_indices"]).to_pylist()
            if row["split"] == config.eval.test_split]
    if not rows:
        raise ValueError(f"data.source has no clips in split {config.eval.test_split!r} for the polyphonic mixtures")
    labels = [[column[mids[k]] for k in row["label_indices"] if mids[k] in column] for row in rows]
    if missing and any(mids[k] in missing for row in rows for k in row["label_indices"]):
        raise ValueError(f"data.source labels {missing[:5]} are not in the shards' class list")
    return [row["path"] for row in rows], labels


def mixture_sets(python_model, config: Config, classes: list[dict], embed) -> list[MixtureSet]:
    """Features of `eval.polyphonic.mixtures` mixtures for each count of `eval.polyphonic.sources`.

    `embed(clean (N, T, F), valid_frames (N,)) -> (features, logits or None)` is the monophonic pooling."""
    cfg = config.eval.polyphonic
    paths, labels = manifest_test_clips(config, classes)
    audio = config.data.audio
    results = []
    for sources in cfg.sources:
        mixtures = draw_mixtures(labels, cfg.mixtures, sources, cfg.seed)
        features, targets, logits, failed = [], [], [], 0
        for start in range(0, len(mixtures), config.eval.batch_size):
            waves, batch_labels = [], []
            for mixture in mixtures[start : start + config.eval.batch_size]:
                try:
                    waves.append(equal_loudness_sum([load_waveform(paths[i], audio) for i in mixture], audio))
                except AudioError as error:
                    failed += 1
                    log.warning("polyphonic mixture %s left out: %s", mixture, error)
                    continue
                batch_labels.append(union_labels(labels, mixture))
            if not waves:
                continue
            valid = torch.tensor([min(frame_count(w.numel(), audio), audio.target_length) for w in waves])
            batch_features, batch_logits = embed(fbank_batch(waves, audio), valid)
            features.append(batch_features)
            if batch_logits is not None:
                logits.append(batch_logits)
            multi_hot = torch.zeros(len(batch_labels), len(classes))
            for row, indices in enumerate(batch_labels):
                multi_hot[row, indices] = 1.0
            targets.append(multi_hot)
        if not features:
            raise ValueError(f"no polyphonic mixture of {sources} sources could be decoded")
        log.info("polyphonic: %d mixtures of %d sources (%d left out as undecodable)",
                 sum(len(t) for t in targets), sources, failed)
        results.append(MixtureSet(sources, torch.cat(features), torch.cat(targets),
                                  torch.cat(logits) if logits else None, failed))
    return results
