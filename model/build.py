"""Eval-mode modules from imported or saved weights (model.checkpoint.ImportedCheckpoint): the student or teacher
`Encoder` (`build_encoder`) and the encoder with its fine-tuned classifier head (`build_classifier`)."""

from __future__ import annotations

from typing import Literal

from model.checkpoint import CheckpointError, ImportedCheckpoint, load_state_strict
from model.encoder import Encoder
from model.features import ClassifierHead, EncoderWithHead


def build_encoder(weights: ImportedCheckpoint, which: Literal["student", "teacher"] = "student") -> Encoder:
    """A fp32 Encoder in eval mode holding the student (default) or teacher weights."""
    state = weights.student_encoder if which == "student" else weights.teacher
    if state is None:
        raise CheckpointError(f"the weights have no {which} encoder")
    encoder = Encoder(weights.config)
    load_state_strict(encoder, state, f"{which} encoder")
    return encoder.eval()


def build_classifier(weights: ImportedCheckpoint, pooling: Literal["cls", "mean"] = "cls") -> EncoderWithHead:
    """Encoder + fc_norm + head of a fine-tuned checkpoint, in eval mode."""
    if weights.head is None:
        raise CheckpointError(f"{weights.kind} weights have no classifier head")
    head = ClassifierHead(weights.config.embed_dim, int(weights.head["head.weight"].shape[0]))
    load_state_strict(head, weights.head, "classifier head")
    return EncoderWithHead(build_encoder(weights), head, pooling=pooling).eval()
