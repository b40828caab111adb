"""`sslam infer FILE --model URI`: one audio file through a registered model (jobs/pyfunc_model.py).

The file is decoded and down-mixed here (pipeline.audio.decode); the model resamples and computes features with
the training front-end. Prints the embedding shapes and a summary, or the top-k labels when the model carries a
classifier head. A registry URI's files are checked against the version's sha256 tags before its code runs
(jobs.registry.load_verified); a tampered model is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException

from jobs.registry import RegistrationRefused, load_verified
from jobs.tracking import mlflow_client
from pipeline.audio import AudioError, decode
from pipeline.config import AudioConfig

log = logging.getLogger("sslam.infer")


def infer(file: str | Path, model_uri: str, top_k: int = 5) -> dict[str, Any]:
    """Embeddings summary (and top-k labels with a head) of one audio file."""
    import pandas as pd

    samples, sample_rate = decode(file, AudioConfig())
    client = mlflow_client()  # the project store unless MLFLOW_TRACKING_URI is set
    _, _, model = load_verified(model_uri, client)
    signature = model.metadata.signature
    accepted = {spec.name for spec in signature.params.params} if signature and signature.params else set()
    params = {"top_k": int(top_k)} if "top_k" in accepted else None
    frame = pd.DataFrame({"waveform": [samples.tolist()], "sample_rate": [int(sample_rate)]})
    outputs = model.predict(frame, params=params)
    utterance = np.asarray(outputs["utterance"][0])
    result: dict[str, Any] = {
        "file": str(file),
        "model_uri": model_uri,
        "seconds": round(samples.shape[0] / sample_rate, 3),
        "sample_rate": int(sample_rate),
        "utterance_shape": list(np.asarray(outputs["utterance"]).shape),
        "frames_shape": list(np.asarray(outputs["frames"]).shape),
        "utterance_norm": float(np.linalg.norm(utterance)),
        "utterance_mean": float(utterance.mean()),
        "utterance_std": float(utterance.std()),
    }
    if "top_labels" in outputs:
        top = zip(outputs["top_indices"][0], outputs["top_labels"][0], outputs["top_scores"][0])
        result["top"] = [{"index": int(i), "label": str(label), "score": float(s)} for i, label, s in top]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sslam infer", description="embed (or tag) one audio file")
    parser.add_argument("file", help="audio file (wav, flac, ogg, mp3)")
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or a model path")
    parser.add_argument("--top-k", type=int, default=5, help="labels to show for a model with a classifier head")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = infer(args.file, args.model, args.top_k)
    except AudioError as error:
        print(f"sslam infer: cannot read {args.file}: {error}", file=sys.stderr)
        return 1
    except (MlflowException, RegistrationRefused) as error:
        print(f"sslam infer: cannot load model {args.model}: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['file']}: {result['seconds']} s at {result['sample_rate']} Hz through {result['model_uri']}")
    print(f"  utterance embedding {tuple(result['utterance_shape'][1:])}: norm {result['utterance_norm']:.4f}, "
          f"mean {result['utterance_mean']:.4f}, std {result['utterance_std']:.4f}")
    print(f"  frame embeddings {tuple(result['frames_shape'][1:])} (patch tokens, time-major)")
    for rank, entry in enumerate(result.get("top", []), start=1):
        print(f"  {rank}. {entry['label']} ({entry['index']}): {entry['score']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
