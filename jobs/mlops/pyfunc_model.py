"""The registered model's code: an MLflow "model from code" pyfunc over a student encoder (DESIGN.md, "Registered
model").

MLflow runs this file when a version is loaded (`mlflow.pyfunc.load_model("models:/NAME@candidate")`); nothing is
unpickled. `load_context` reads two artifacts written by `jobs.mlops.pyfunc_package`:

* `weights`: `encoder.safetensors`, this project's safetensors format (model.checkpoint): the encoder, plus the
  classifier head (fc_norm + head) for a fine-tuned import; the resolved ModelConfig is in its metadata.
* `config`: `model_config.json`: {"format", "model" (ModelConfig, normalisation constants included), "audio"
  (AudioConfig of the front-end), "classes" ([{index, mid, name}] of the head, or null), "pooling",
  "weights_sha256"}.

The registered copy of this file is not this file: `jobs.mlops.pyfunc_package.save_pyfunc` ships it with its
`from model...` / `from pipeline...` imports rewritten to a private package (`code/_sslam_pyfunc_<digest>/` of the
model folder, holding the modules they need), so the model loads in applications with top-level `model` /
`pipeline` modules of their own. Import project code here only as `from model.X import Y` / `from pipeline.X import Y` (anything else
is refused at save time), and nothing from `jobs`.

Before the weights are read, their sha256 is compared with `weights_sha256` of model_config.json and, when the
loader passes one (`model_config={"weights_sha256": ...}`, e.g. the version's tag), with that too: a swapped or
corrupted weights file is refused. (This file is itself an artifact: a party able to rewrite every artifact is
caught only by loaders that check the version's tags first, `jobs.mlops.registry.load_verified`.)

Input (the signature): a pandas DataFrame, one row per clip, each row holding exactly one of

* `waveform` (list of float: mono samples in [-1, 1]) with `sample_rate` (int, Hz). The row goes through the
  training front-end (`pipeline.audio`): resampling to the model rate, Kaldi fbank, zero rows appended / head
  cropped to the model's target length. At least one 25 ms frame is needed.
* `fbank` (list of T lists of F floats): raw (un-normalised) Kaldi log-mel at the model's mel bins; it is
  cropped / zero-padded to the target length like the front-end's output.

Params: `pooling` ("cls" | "mean", default the model's), `top_k` (int, heads only). The model runs on the GPU when
there is one (model_config `device: auto`), unless loaded with `mlflow.pyfunc.load_model(uri, model_config={"device":
"cpu"})`.

Output: a dict of numpy arrays, B = rows: `utterance` (B, D) float32 (CLS token or patch mean of the last block),
`frames` (B, N, D) float32 (patch tokens, time-major: reshape to (B, Tp, Fp, D)). With a classifier head also
`logits` (B, C), `scores` (B, C) (sigmoid), `top_indices` (B, k), `top_scores` (B, k) and `top_labels` (B, k)
(class display names).
"""

import hashlib
import json
import math
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from model.build import build_classifier, build_encoder
from model.checkpoint import load_weights
from model.config import ModelConfig
from model.features import extract_features
from pipeline.audio import fbank_batch, frame_count, to_model_rate
from pipeline.config import AudioConfig

CONFIG_FORMAT = "sslam-encoder"
# Clips per forward pass inside predict: bounds memory for large inputs.
CLIPS_PER_PASS = 16
DEFAULT_TOP_K = 5
MODEL_CONFIG = {"device": "auto"}  # logged with the model; overridable at load time
POOLINGS = ("cls", "mean")


def weights_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    return isinstance(value, float) and math.isnan(value)


class SSLAMEncoderModel(mlflow.pyfunc.PythonModel):
    """Waveforms or raw fbank -> utterance and frame embeddings (+ class scores when a head is present)."""

    def load_context(self, context) -> None:
        with open(context.artifacts["config"]) as handle:
            spec = json.load(handle)
        if spec.get("format") != CONFIG_FORMAT:
            raise ValueError(f"model_config.json has format {spec.get('format')!r}, expected {CONFIG_FORMAT!r}")
        loader_config = getattr(context, "model_config", None) or {}
        if not spec.get("weights_sha256"):
            raise ValueError("model_config.json records no weights_sha256: refusing weights that cannot be checked")
        recorded = [spec["weights_sha256"], loader_config.get("weights_sha256") or spec["weights_sha256"]]
        actual = weights_digest(context.artifacts["weights"])
        if any(digest != actual for digest in recorded):
            raise ValueError(
                f"the weights' sha256 {actual} is not the recorded {' / '.join(recorded)}: the weights file was "
                "altered or corrupted; refusing to load it"
            )
        device = loader_config.get("device", "auto")
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        weights = load_weights(context.artifacts["weights"])
        if ModelConfig(**spec["model"]) != weights.config:
            raise ValueError("model_config.json and the weights' embedded config disagree")
        self.model_cfg = weights.config
        self.audio_cfg = AudioConfig(**spec["audio"])
        self.pooling = spec.get("pooling", "cls")
        self.classes = spec.get("classes")
        self.encoder = build_encoder(weights).to(self.device)
        self.classifier = None
        if weights.head is not None:
            self.classifier = build_classifier(weights, pooling=self.pooling).classifier.to(self.device).eval()

    # ---- inputs ---------------------------------------------------------------------------------------------
    def fbank_of_rows(self, frame: pd.DataFrame) -> torch.Tensor:
        """Raw fbank (B, T, F) of a DataFrame of `waveform` + `sample_rate` or `fbank` rows."""
        return self.fbank_and_frames_of_rows(frame)[0]

    def fbank_and_frames_of_rows(self, frame: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
        """fbank_of_rows and (B,) long: each row's frames before its padding (at most the target length)."""
        columns = set(frame.columns)
        if not columns & {"waveform", "fbank"}:
            raise ValueError(f"input needs a 'waveform' (+ 'sample_rate') or an 'fbank' column, got {sorted(columns)}")
        clips: list[torch.Tensor | None] = [None] * len(frame)
        frames = [self.model_cfg.target_length] * len(frame)
        waves: list[tuple[int, torch.Tensor]] = []
        for row, record in enumerate(frame.to_dict("records")):
            wave, fbank = record.get("waveform"), record.get("fbank")
            has_wave, has_fbank = not _is_missing(wave), not _is_missing(fbank)
            if has_wave == has_fbank:
                raise ValueError(f"row {row}: give exactly one of 'waveform' and 'fbank'")
            if has_wave:
                waves.append((row, self._wave_at_model_rate(wave, record.get("sample_rate"), row)))
            else:
                clips[row] = self._fit_fbank(fbank, row)
                frames[row] = min(len(fbank), self.model_cfg.target_length)
        if waves:
            features = fbank_batch([wave for _, wave in waves], self.audio_cfg)
            for (row, wave), feature in zip(waves, features):
                clips[row] = feature
                frames[row] = min(frame_count(wave.numel(), self.audio_cfg), self.model_cfg.target_length)
        return torch.stack(clips), torch.tensor(frames, dtype=torch.long)  # type: ignore[arg-type]

    def _wave_at_model_rate(self, wave: Any, rate: Any, row: int) -> torch.Tensor:
        if _is_missing(rate):
            raise ValueError(f"row {row}: a 'waveform' needs its 'sample_rate'")
        samples = np.asarray(wave, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"row {row}: 'waveform' must be mono (1-D), got shape {samples.shape}")
        if not np.isfinite(samples).all():
            raise ValueError(f"row {row}: 'waveform' holds non-finite samples")
        resampled = to_model_rate(samples, int(rate), self.audio_cfg)
        if frame_count(resampled.numel(), self.audio_cfg) == 0:
            raise ValueError(f"row {row}: {samples.size} samples at {int(rate)} Hz are shorter than one frame")
        return resampled

    def _fit_fbank(self, rows: Any, row: int) -> torch.Tensor:
        """Crop the head / append zero rows to the target length, as the front-end does."""
        cfg = self.model_cfg
        try:
            fbank = np.stack([np.asarray(values, dtype=np.float32) for values in rows])
        except ValueError as error:
            raise ValueError(f"row {row}: 'fbank' is not a (T, F) matrix: {error}") from None
        if fbank.ndim != 2 or fbank.shape[1] != cfg.mel_bins or fbank.shape[0] == 0:
            raise ValueError(f"row {row}: 'fbank' must be (T, {cfg.mel_bins}) raw log-mel, got shape {fbank.shape}")
        if not np.isfinite(fbank).all():
            raise ValueError(f"row {row}: 'fbank' holds non-finite values")
        fitted = torch.zeros(cfg.target_length, cfg.mel_bins)
        frames = min(cfg.target_length, fbank.shape[0])
        fitted[:frames] = torch.from_numpy(fbank[:frames])
        return fitted

    # ---- outputs --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(
        self, fbank: torch.Tensor, pooling: str | None = None, valid_frames: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Raw fbank (B, T, F) or (B, 1, T, F) -> {utterance, frames} (+ logits with a head), float32 on the CPU.
        `valid_frames` (B,): each clip's frames before its padding (model.features.extract_features)."""
        pooling = pooling or self.pooling
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        outputs: dict[str, list[torch.Tensor]] = {}
        for start in range(0, fbank.shape[0], CLIPS_PER_PASS):
            chunk = fbank[start : start + CLIPS_PER_PASS].to(self.device)
            valid = None if valid_frames is None else valid_frames[start : start + CLIPS_PER_PASS]
            features = extract_features(self.encoder, chunk, pooling="cls", valid_frames=valid)
            pooled = {"cls": features["utterance"], "mean": features["frames"].mean(dim=1)}
            parts = {"utterance": pooled[pooling], "frames": features["frames"]}
            if self.classifier is not None:
                parts["logits"] = self.classifier(pooled[self.pooling])
            for key, value in parts.items():
                outputs.setdefault(key, []).append(value.float().cpu())
        return {key: torch.cat(values) for key, values in outputs.items()}

    # The DataFrame annotation (evaluated: no `from __future__ import annotations` here) tells MLflow to rely on
    # the logged signature rather than infer one from type hints.
    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        params = params or {}
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if len(frame) == 0:
            raise ValueError("empty input: one row per clip")
        fbank, valid = self.fbank_and_frames_of_rows(frame)
        aware = getattr(self.model_cfg, "padding", "reference") == "aware"  # it attends to content only
        pooling = params.get("pooling") or self.pooling
        outputs = self.embed(fbank, pooling=pooling, valid_frames=valid if aware else None)
        result = {key: value.numpy() for key, value in outputs.items() if key != "logits"}
        if "logits" in outputs:
            logits = outputs["logits"]
            scores = torch.sigmoid(logits)
            k = min(int(params.get("top_k") or DEFAULT_TOP_K), logits.shape[1])
            top_scores, top_indices = scores.topk(k, dim=1)
            names = [entry["name"] for entry in self.classes or []] or [str(i) for i in range(logits.shape[1])]
            result.update(
                logits=logits.numpy(),
                scores=scores.numpy(),
                top_indices=top_indices.numpy(),
                top_scores=top_scores.numpy(),
                top_labels=np.array([[names[i] for i in row] for row in top_indices.tolist()], dtype=object),
            )
        return result


mlflow.models.set_model(SSLAMEncoderModel())
