"""`sslam infer INPUT... --model MODEL [--hop S] [--out FILE.parquet]`: embed (or tag) audio files window by window.

INPUT: files, folders (their audio files, recursively) or glob patterns. MODEL: a registry URI (`models:/NAME@ALIAS`,
`models:/NAME/VERSION`: its files are checked against the version's sha256 tags before its code runs,
jobs.mlops.registry.load_verified; a tampered model is refused) or a folder written by `sslam export` (model/pretrained.py).

Each file is streamed in windows of the model's target length (pipeline/windows.py): window k starts at k * hop
seconds (default: the target length's span, no overlap), a file shorter than one window is one window and the last
window of a longer one is padded and marked partial. Memory is bounded by one batch of windows whatever the file's
length. Features are the training front-end's (pipeline.audio.fbank_batch on each window at the model rate).

`--out FILE.parquet` writes one row per window, streamed one row group per batch: file, window, start_s, end_s,
valid_frames, partial, utterance (D floats), frames (N * D floats, time-major patch tokens; the schema metadata's
`frames_shape` is [Tp, Fp, D]; left out with --no-frames) and, for a model with a classifier head, top_indices,
top_labels, top_scores. The console shows each file's window layout and embedding shapes, and with a head its top
labels (window scores averaged). A file that cannot be read is reported and skipped; one found damaged while
streaming (a cut FLAC) keeps the rows of the windows before the damage; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import CheckpointError
from model.pretrained import FrontEnd, PretrainedEncoder, load_encoder
from pipeline.atomic import publish_file, temporary_path
from pipeline.audio import AudioError, fbank_batch
from pipeline.config import AudioConfig
from pipeline.windows import AUDIO_EXTENSIONS, WindowPlan, plan_windows, stream_windows, window_seconds

log = logging.getLogger("sslam.infer")

WINDOWS_PER_BATCH = 16
DEFAULT_TOP_K = 5
GLOB_CHARACTERS = frozenset("*?[")


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """(audio files in order, without repeats; problems): folders are searched recursively for files whose
    extension is a decodable format, globs are expanded (recursive `**` allowed). A path or pattern that matches
    nothing is a problem, never skipped silently."""
    files: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in AUDIO_EXTENSIONS
            )
            if not found:
                problems.append(f"{item}: a folder without audio files")
            files.extend(found)
        elif GLOB_CHARACTERS & set(item) and not path.exists():
            found = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not found:
                problems.append(f"{item}: no file matches")
            files.extend(found)
        else:
            files.append(path)
    unique = list(dict.fromkeys(files))
    return unique, problems


def load_model(spec: str, device: str = "auto") -> tuple[PretrainedEncoder, str]:
    """(encoder, what was loaded): an `sslam export` folder, or a registry URI checked by load_verified."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if Path(spec).is_dir():
        return load_encoder(spec, device=device), str(spec)
    from jobs.export import from_registry

    exported = from_registry(spec)
    front_end = FrontEnd.from_dict(dataclasses.asdict(exported.audio))
    return PretrainedEncoder(exported.weights, front_end, exported.classes, exported.pooling, device), exported.source


def model_load_errors() -> tuple[type[Exception], ...]:
    """What a failed load raises. MLflow is imported only for a registry URI (an exported folder needs none of it:
    a lighter process), so its errors join only once it is loaded."""
    errors: tuple[type[Exception], ...] = (CheckpointError, OSError)
    if "mlflow" in sys.modules:
        from mlflow.exceptions import MlflowException

        from jobs.mlops.registration import RegistrationRefused

        errors += (MlflowException, RegistrationRefused)
    return errors


def audio_config_of(model: PretrainedEncoder) -> AudioConfig:
    return AudioConfig(**dataclasses.asdict(model.front_end))


class ParquetSink:
    """Window rows streamed to a Parquet file, one row group per batch."""

    def __init__(self, path: str | Path, model: PretrainedEncoder, frames: bool, metadata: dict[str, Any]) -> None:
        import pyarrow as pa

        cfg = model.config
        self.path = Path(path)
        self.frames = frames
        fields = [
            pa.field("file", pa.string()), pa.field("window", pa.int32()), pa.field("start_s", pa.float64()),
            pa.field("end_s", pa.float64()), pa.field("valid_frames", pa.int32()), pa.field("partial", pa.bool_()),
            pa.field("utterance", pa.list_(pa.float32(), cfg.embed_dim)),
        ]
        if frames:
            fields.append(pa.field("frames", pa.list_(pa.float32(), cfg.num_patches * cfg.embed_dim)))
        if model.classifier is not None:
            fields += [pa.field("top_indices", pa.list_(pa.int32())), pa.field("top_labels", pa.list_(pa.string())),
                       pa.field("top_scores", pa.list_(pa.float32()))]
        shape = [cfg.time_patches, cfg.freq_patches, cfg.embed_dim]
        self.schema = pa.schema(fields, metadata={
            "frames_shape": json.dumps(shape), **{key: json.dumps(value) for key, value in metadata.items()}})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = temporary_path(self.path)
        import pyarrow.parquet as pq

        self.writer = pq.ParquetWriter(str(self.partial), self.schema)

    def write(self, rows: dict[str, Any], outputs: dict[str, np.ndarray]) -> None:
        import pyarrow as pa

        columns = dict(rows)
        columns["utterance"] = pa.FixedSizeListArray.from_arrays(
            pa.array(outputs["utterance"].reshape(-1)), outputs["utterance"].shape[1])
        if self.frames:
            flat = outputs["frames"].reshape(outputs["frames"].shape[0], -1)
            columns["frames"] = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), flat.shape[1])
        for key in ("top_indices", "top_labels", "top_scores"):
            if key in outputs:
                columns[key] = [list(row) for row in outputs[key]]
        self.writer.write_table(pa.Table.from_pydict(columns, schema=self.schema))

    def close(self) -> None:
        self.writer.close()
        publish_file(self.partial, self.path)  # readers never see a half-written file under the final name


def _top(model: PretrainedEncoder, scores: np.ndarray, k: int) -> dict[str, np.ndarray]:
    k = min(k, scores.shape[1])
    indices = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    names = [entry["name"] for entry in model.classes]
    return {
        "top_indices": indices.astype(np.int32),
        "top_scores": np.take_along_axis(scores, indices, axis=1).astype(np.float32),
        "top_labels": np.array([[names[i] for i in row] for row in indices], dtype=object),
    }


def embed_file(
    path: Path, model: PretrainedEncoder, model_label: str, hop_s: float | None = None, top_k: int = DEFAULT_TOP_K,
    sink: ParquetSink | None = None, batch: int = WINDOWS_PER_BATCH,
) -> dict[str, Any]:
    """Stream one file through the model window by window; returns its summary (rows go to `sink`)."""
    audio_cfg = audio_config_of(model)
    plan: WindowPlan = plan_windows(path, audio_cfg, hop_s)
    cfg = model.config
    count = 0
    norms: list[float] = []
    score_sum = None
    last = None

    def flush(windows) -> None:
        nonlocal count, score_sum
        outputs = {key: value.numpy() for key, value in
                   model.embed_fbank(fbank_batch([w.wave for w in windows], audio_cfg),
                                     valid_frames=torch.tensor([w.valid_frames for w in windows])).items()}
        norms.extend(np.linalg.norm(outputs["utterance"], axis=1).tolist())
        if "scores" in outputs:
            outputs.update(_top(model, outputs["scores"], top_k))
            total = outputs["scores"].sum(axis=0)
            score_sum = total if score_sum is None else score_sum + total
        if sink is not None:
            sink.write({
                "file": [str(path)] * len(windows), "window": [w.index for w in windows],
                "start_s": [w.start_s for w in windows], "end_s": [w.end_s for w in windows],
                "valid_frames": [w.valid_frames for w in windows], "partial": [w.partial for w in windows],
            }, outputs)
        count += len(windows)

    pending = []
    try:
        for window in stream_windows(path, audio_cfg, hop_s):
            pending.append(window)
            last = window
            if len(pending) == batch:
                flush(pending)
                pending = []
    finally:  # a file found damaged while streaming keeps the windows decoded before the damage
        if pending:
            flush(pending)
    result: dict[str, Any] = {
        "file": str(path),
        "model_uri": model_label,
        "seconds": round(plan.seconds, 3),
        "sample_rate": plan.sample_rate,
        "windows": count,
        "window_s": round(window_seconds(audio_cfg), 4),
        "hop_s": round(plan.hop_frames / plan.sample_rate, 4),
        "last_window": {"start_s": round(last.start_s, 4), "seconds": round(last.end_s - last.start_s, 4),
                        "valid_frames": last.valid_frames, "partial": last.partial},
        "utterance_shape": [count, cfg.embed_dim],
        "frames_shape": [count, cfg.num_patches, cfg.embed_dim],
        "utterance_norm_mean": float(np.mean(norms)),
    }
    if score_sum is not None:
        mean = score_sum / count
        order = np.argsort(-mean, kind="stable")[: min(top_k, mean.size)]
        result["top"] = [{"index": int(i), "label": model.classes[i]["name"], "score": float(mean[i])} for i in order]
    return result


def infer(file: str | Path, model_uri: str, top_k: int = DEFAULT_TOP_K, hop_s: float | None = None) -> dict[str, Any]:
    """Summary of one audio file through a registry URI or an exported folder (see `embed_file`)."""
    model, label = load_model(model_uri)
    return embed_file(Path(file), model, label, hop_s, top_k)


def _print_summary(result: dict[str, Any]) -> None:
    last = result["last_window"]
    print(f"{result['file']}: {result['seconds']} s at {result['sample_rate']} Hz through {result['model_uri']}")
    tail = (f"the last one ({last['seconds']} s from {last['start_s']} s) padded after {last['valid_frames']} frames"
            if last["partial"] else "the last one full")
    plural = "window" if result["windows"] == 1 else "windows"
    print(f"  {result['windows']} {plural} of {result['window_s']} s every {result['hop_s']} s; {tail}")
    print(f"  utterance embeddings {tuple(result['utterance_shape'])} (mean norm {result['utterance_norm_mean']:.4f}), "
          f"frame embeddings {tuple(result['frames_shape'])} (patch tokens, time-major)")
    for rank, entry in enumerate(result.get("top", []), start=1):
        print(f"  {rank}. {entry['label']} ({entry['index']}): {entry['score']:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sslam infer", description="embed (or tag) audio files window by window")
    parser.add_argument("inputs", nargs="+", help="audio files, folders or glob patterns (quote them)")
    parser.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or an `sslam export` folder"
    )
    parser.add_argument("--hop", type=float, default=None,
                        help="seconds between window starts (default: the model's target length, no overlap)")
    parser.add_argument("--out", help="write every window's embeddings (and top labels) to this Parquet file")
    parser.add_argument("--no-frames", action="store_true", help="leave the frame embeddings out of --out")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="labels per window / file with a head")
    parser.add_argument("--batch", type=int, default=WINDOWS_PER_BATCH, help="windows per forward pass")
    parser.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:1, ...")
    parser.add_argument("--json", action="store_true", help="print the summaries as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.top_k < 1 or args.batch < 1 or (args.hop is not None and not args.hop > 0):
        parser.error("--top-k and --batch must be at least 1, --hop positive")
    files, problems = expand_inputs(args.inputs)
    for problem in problems:
        print(f"sslam infer: {problem}", file=sys.stderr)
    readable = []
    for path in files:
        try:
            plan_windows(path, AudioConfig(), None)
            readable.append(path)
        except AudioError as error:
            print(f"sslam infer: cannot read {path}: {error.reason} ({error.detail})", file=sys.stderr)
    if not readable:
        return 1
    try:
        model, label = load_model(args.model, args.device)
    except model_load_errors() as error:
        print(f"sslam infer: cannot load model {args.model}: {error}", file=sys.stderr)
        return 1
    window = window_seconds(audio_config_of(model))
    if args.hop is not None and round(args.hop * 1000) > round(window * 1000):
        print(f"sslam infer: --hop {args.hop} s is longer than the model's window ({window:.3f} s): audio between "
              "windows would be skipped", file=sys.stderr)
        return 2
    failed = len(files) - len(readable) + len(problems)
    sink = None
    if args.out:
        metadata = {"model": label, "hop_s": args.hop, "window_s": window}
        sink = ParquetSink(args.out, model, not args.no_frames, metadata)
    results = []
    try:
        for path in readable:
            try:
                result = embed_file(path, model, label, args.hop, args.top_k, sink, args.batch)
            except AudioError as error:  # found while streaming (e.g. a cut file): the windows before it stay
                print(f"sslam infer: cannot read {path}: {error.reason} ({error.detail})", file=sys.stderr)
                failed += 1
                continue
            results.append(result)
            if not args.json:
                _print_summary(result)
    finally:
        if sink is not None:
            sink.close()
    if args.json:
        print(json.dumps(results, indent=2))
    if sink is not None:
        print(f"wrote {sum(r['windows'] for r in results)} windows of {len(results)} files to {args.out}",
              file=sys.stderr if args.json else sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
