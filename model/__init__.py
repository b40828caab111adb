"""SSLAM in PyTorch. The user-facing API: `from model import load_encoder` (model/pretrained.py), imported lazily
so that `import model.encoder` and friends do not pay for torchaudio."""

from __future__ import annotations

__all__ = ["PretrainedEncoder", "load_encoder"]


def __getattr__(name: str):
    if name in __all__:
        from model import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
