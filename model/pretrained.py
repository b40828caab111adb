"""The encoder as users take it away: `load_encoder(folder)` / `PretrainedEncoder.from_pretrained(folder)`, and a
waveform -> embeddings call at any sample rate.

A folder is either an export written by `sslam export` (jobs/export.py): `config.json` ({"format":
"sslam-export", "model": ModelConfig, "audio": front-end settings, "classes", "pooling"}) + `model.safetensors`
(this project's weights format: the encoder, plus fc_norm + head for a fine-tuned source); or a training checkpoint
folder (`config.yaml` + the full student's `student.safetensors`; DeepSpeed's pickles are never opened).

The front-end lives here, not in pipeline/ (model/ never imports pipeline/, DESIGN.md): resampling with
`torchaudio.functional.resample` (Hann-windowed sinc, 6 zero crossings, roll-off 0.99: the training front-end's
filter, the same bits) and `torchaudio.compliance.kaldi.fbank` with the reference's arguments on the mean-removed
clip, then zero rows appended / head cropped to the target length. It agrees with pipeline.audio.fbank_batch to
about 1e-6 in log-mel and the embeddings with the registered pyfunc's to 1e-5 (tests/test_export.py). Rates
whose gcd-reduced ratio with the model rate needs a huge torchaudio kernel (e.g. 44099 Hz) are refused with a
clear error: resample those first (pipeline.audio.to_model_rate handles them).

A waveform longer than the target length is cropped to its head, as the training front-end does, with a warning;
`sslam infer` embeds long files window by window instead.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torchaudio
import yaml
from torch import Tensor
from torchaudio.compliance import kaldi

from model.build import build_classifier, build_encoder
from model.checkpoint import CheckpointError, ImportedCheckpoint, load_weights
from model.config import ModelConfig
from model.features import extract_features

log = logging.getLogger(__name__)

EXPORT_FORMAT = "sslam-export"
EXPORT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_CONFIG = "config.yaml"
CHECKPOINT_WEIGHTS = "student.safetensors"
POOLINGS = ("cls", "mean")
# torchaudio's resampling kernel is (new/g) x (orig/g + taps) floats; above this product it needs gigabytes.
MAX_RESAMPLE_RATIO_PRODUCT = 1 << 22


@dataclass(frozen=True)
class FrontEnd:
    """Waveform -> raw Kaldi log-mel (target_length, mel_bins): the fields of pipeline.config.AudioConfig that the
    features depend on."""

    sample_rate: int = 16000
    mel_bins: int = 128
    target_length: int = 1024
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FrontEnd:
        """From an AudioConfig dict (its other fields, such as min_duration_s, do not change the features)."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    @property
    def window_samples(self) -> int:
        return int(self.sample_rate * self.frame_length_ms * 0.001)

    def resample(self, wave: Tensor, sample_rate: int) -> Tensor:
        if sample_rate == self.sample_rate:
            return wave
        common = math.gcd(sample_rate, self.sample_rate)
        if (sample_rate // common) * (self.sample_rate // common) > MAX_RESAMPLE_RATIO_PRODUCT:
            raise ValueError(
                f"{sample_rate} Hz -> {self.sample_rate} Hz needs a resampling kernel of gigabytes: resample to a "
                "common rate first (pipeline.audio.to_model_rate handles any rate)"
            )
        return torchaudio.functional.resample(
            wave, sample_rate, self.sample_rate,
            lowpass_filter_width=6, rolloff=0.99, resampling_method="sinc_interp_hann",
        )

    def fbank(self, wave: np.ndarray | Tensor, sample_rate: int) -> Tensor:
        """Waveform in [-1, 1] at `sample_rate` Hz, (frames,) or (frames, channels) -> (target_length, mel_bins) raw
        log-mel, float32."""
        samples = torch.as_tensor(np.asarray(wave, dtype=np.float32))
        if samples.dim() == 2:  # (frames, channels), as soundfile reads: the channel mean, as the training front-end
            samples = samples.mean(dim=1)
        if samples.dim() != 1:
            raise ValueError(f"expected a (frames,) or (frames, channels) waveform, got shape {tuple(samples.shape)}")
        if not torch.isfinite(samples).all():
            raise ValueError("the waveform holds NaN/inf samples")
        samples = self.resample(samples, int(sample_rate))
        window = self.window_samples
        if samples.numel() < window:
            raise ValueError(
                f"{samples.numel()} samples at {self.sample_rate} Hz are shorter than one {window}-sample frame"
            )
        shift = int(self.sample_rate * self.frame_shift_ms * 0.001)
        frames = 1 + (samples.numel() - window) // shift
        if frames > self.target_length:
            log.warning(
                "%.2f s of audio: only the first %.2f s are embedded (the target length); `sslam infer` embeds long "
                "files in windows", samples.numel() / self.sample_rate, self.target_length * shift / self.sample_rate,
            )
        used = window + (min(frames, self.target_length) - 1) * shift
        features = kaldi.fbank(
            (samples - samples.mean())[:used][None],
            htk_compat=True,
            sample_frequency=float(self.sample_rate),
            use_energy=False,
            window_type="hanning",
            num_mel_bins=self.mel_bins,
            dither=0.0,
            frame_shift=self.frame_shift_ms,
            frame_length=self.frame_length_ms,
        )
        fitted = torch.zeros(self.target_length, self.mel_bins)
        fitted[: features.shape[0]] = features
        return fitted


def content_frames(fbank: Tensor) -> int:
    """Frames of a FrontEnd.fbank output before its zero padding (a Kaldi log-mel row is never all zeros: every
    mel energy is floored before the log), so a `model.padding: aware` encoder attends to the clip alone."""
    filled = (fbank != 0).any(dim=1).nonzero()
    return int(filled[-1]) + 1 if filled.numel() else 0


class PretrainedEncoder:
    """An encoder (+ classifier head) with its front-end: `embed(waveform, sample_rate)` -> embeddings."""

    def __init__(
        self,
        weights: ImportedCheckpoint,
        front_end: FrontEnd | None = None,
        classes: list[dict] | None = None,
        pooling: Literal["cls", "mean"] = "cls",
        device: str | torch.device = "cpu",
    ) -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.config: ModelConfig = weights.config
        self.front_end = front_end or FrontEnd(mel_bins=self.config.mel_bins, target_length=self.config.target_length)
        if (self.front_end.mel_bins, self.front_end.target_length) != (self.config.mel_bins, self.config.target_length):
            raise ValueError(
                f"front-end ({self.front_end.target_length} x {self.front_end.mel_bins}) does not match the model "
                f"({self.config.target_length} x {self.config.mel_bins})"
            )
        self.device = torch.device(device)
        self.pooling = pooling
        self.encoder = build_encoder(weights).to(self.device)
        self.classifier = None
        self.classes = None
        if weights.head is not None:
            self.classifier = build_classifier(weights, pooling=pooling).classifier.to(self.device).eval()
            count = int(weights.head["head.weight"].shape[0])
            self.classes = classes or [{"index": i, "mid": "", "name": f"class {i}"} for i in range(count)]
            if len(self.classes) != count:
                raise ValueError(f"{len(self.classes)} class names for a head of {count} classes")

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> PretrainedEncoder:
        """From an `sslam export` folder or a training checkpoint folder (config.yaml + student.safetensors)."""
        path = Path(path)
        if (path / CONFIG_FILE).is_file():
            spec = json.loads((path / CONFIG_FILE).read_text())
            if spec.get("format") != EXPORT_FORMAT or spec.get("format_version") != EXPORT_VERSION:
                raise CheckpointError(
                    f"{path / CONFIG_FILE} is not an {EXPORT_FORMAT} v{EXPORT_VERSION} config (format "
                    f"{spec.get('format')!r} v{spec.get('format_version')!r})"
                )
            weights = load_weights(path / WEIGHTS_FILE, device="cpu")
            if ModelConfig(**spec["model"]) != weights.config:
                raise CheckpointError(f"{path / CONFIG_FILE} and the config inside {WEIGHTS_FILE} disagree")
            return cls(weights, FrontEnd.from_dict(spec["audio"]), spec.get("classes"), spec.get("pooling", "cls"),
                       device)
        if (path / CHECKPOINT_WEIGHTS).is_file() and (path / CHECKPOINT_CONFIG).is_file():
            model_cfg, audio = checkpoint_configs(path / CHECKPOINT_CONFIG)
            weights = load_weights(path / CHECKPOINT_WEIGHTS, config=model_cfg)
            return cls(weights, FrontEnd.from_dict(audio) if audio else None, device=device)
        raise CheckpointError(
            f"{path} holds neither {CONFIG_FILE} + {WEIGHTS_FILE} (`sslam export`) nor {CHECKPOINT_CONFIG} + "
            f"{CHECKPOINT_WEIGHTS} (a training checkpoint)"
        )

    @torch.no_grad()
    def embed_fbank(
        self, fbank: Tensor, pooling: str | None = None, valid_frames: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Raw log-mel (B, target_length, mel_bins) -> {utterance (B, D), frames (B, N, D)} (+ logits, scores
        with a head), float32 on the CPU. `valid_frames` (B,): each clip's frames before its padding, which a
        `model.padding: aware` encoder attends to alone (model.features.extract_features)."""
        pooling = pooling or self.pooling
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        features = extract_features(self.encoder, fbank.to(self.device), pooling=pooling, valid_frames=valid_frames)
        result = {"utterance": features["utterance"].cpu(), "frames": features["frames"].cpu()}
        if self.classifier is not None:
            pooled = features["utterance"] if pooling == self.pooling else (
                extract_features(self.encoder, fbank.to(self.device), pooling=self.pooling,
                                 valid_frames=valid_frames)["utterance"])
            logits = self.classifier(pooled).float().cpu()
            result.update(logits=logits, scores=torch.sigmoid(logits))
        return result

    def embed(
        self, waveform: np.ndarray | Tensor, sample_rate: int, pooling: str | None = None
    ) -> dict[str, np.ndarray]:
        """One waveform (samples in [-1, 1], mono or (frames, channels)) at any sample rate -> numpy `utterance` (D,)
        and `frames` (N, D)
        (time-major patch tokens); with a head also `scores` (C,) (sigmoid) and `labels` (class names by score)."""
        fbank = self.front_end.fbank(waveform, sample_rate)
        outputs = self.embed_fbank(fbank[None], pooling, valid_frames=torch.tensor([content_frames(fbank)]))
        result = {key: value[0].numpy() for key, value in outputs.items()}
        if "scores" in result:
            order = np.argsort(-result["scores"], kind="stable")
            result["labels"] = [self.classes[i]["name"] for i in order]
        return result


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> PretrainedEncoder:
    """`PretrainedEncoder.from_pretrained(path)`: an `sslam export` folder or a training checkpoint folder."""
    return PretrainedEncoder.from_pretrained(path, device)


def checkpoint_configs(path: Path) -> tuple[ModelConfig, dict[str, Any] | None]:
    """(ModelConfig, data.audio dict or None) from a training checkpoint's resolved config.yaml."""
    values = yaml.safe_load(path.read_text()) or {}
    model_values = values.get("model")
    if not isinstance(model_values, dict):
        raise CheckpointError(f"{path} has no `model` section")
    unknown = sorted(set(model_values) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise CheckpointError(f"{path}: unknown model fields {unknown}")
    model_cfg = ModelConfig(**model_values)
    model_cfg.validate()
    audio = (values.get("data") or {}).get("audio")
    return model_cfg, audio if isinstance(audio, dict) else None
