"""Does pre-training learn? Linear probes of pre-trained vs random-init tiny encoders on short, varied recordings.

    python -m benchmarks.learning                       # the full budget (<= 10 minutes on 2 cores)
    python -m benchmarks.learning --smoke               # a tiny budget (the test)

1. Data: `pipeline.synth` with `profile: events` (one percussive / speech-like class per clip, 0.7-10 s, three
   quarters shorter than the 5.12 s model input, so most inputs end in zero padding), train + eval splits.
   Polyphonic splits are written beside them: seeded mixtures of 2-3 clips of different classes of the train
   (`poly_train`) resp. eval (`poly_eval`) split, each source decoded and resampled by the front-end
   (`pipeline.audio.load_waveform`), scaled to the same RMS (matched loudness), summed from time 0 (the mixture
   as long as its longest source), peak-limited to 0.9; labels: the union of the sources' labels.
2. Ray preprocessing (`python -m jobs.preprocess`): train (mixed, `--mixture-epochs`), eval, poly_train, poly_eval.
3. Pre-training (`sslam pretrain --ranks 1`, CPU DeepSpeed), per padding mode of `--modes` (`aware` runs mix with
   `data.mixing.mix_padding: silence` and use `model.utterance_norm: layer_norm` with `model.utterance_center:
   running`, or `batch` with `--utterance-center batch`; mixtures are made by the loader, not stored): stage 1
   (EAT, tiny_stage1, `--stage1-updates`); stage 2 (SSLAM, tiny_stage2, init_from stage 1, `--extra-updates`); and
   the equal-compute control "stage1_continued": the stage-2 run with `model.stage=1` (same init, schedule and
   update count, EAT loss only). Every run takes `--micro-batch-clips` clips per micro-batch (48: the CLS target's
   centre is less noisy than with the tiny configs' 6; README "Does pre-training learn?" has the figures).
4. Probes (jobs.evaluate's `extract` and `train_probe`, config `probe` with `eval.whiten`): the student encoder of
   each run and a random-init encoder of the same config (seeded as stage 1 starts), loaded through the registered
   model's code (jobs.mlops.pyfunc_model). Multi-label protocol on every row (binary cross-entropy probe, mAP) so
   that mono and polyphonic rows compare: mono = probe trained on train clips, scored on eval clips; poly = trained
   on poly_train, scored on poly_eval. Poolings: CLS and content-mean (`eval.pooling: content_mean`, or `mean` over
   all patches where the config has no `content_mean`). Padding modes: `reference` and `aware` (`model.padding`,
   where ModelConfig has it; otherwise the aware rows say "not available").

Prints one JSON line: every mAP, the label prior per evaluation set, the budget used (seconds per step) and the
configuration. Pre-training runs with `--threads` torch threads (OMP_NUM_THREADS; 1 by default: on a shared
2-core machine the tiny model trained ~1.6x faster on one thread than on two), `--parallel-modes` padding modes
at a time (2: the reference and aware runs train side by side), Ray with `--ray-cpus`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import soundfile
import torch
import yaml

from jobs.train.config import Config, EvalConfig, load_config
from model.config import ModelConfig

EVENT_CLASSES = 10
POLY_SOURCES = (2, 3)
POLY_RMS = 0.1
POLY_PEAK = 0.9
POLY_SPLITS = {"poly_train": "train", "poly_eval": "eval"}
# Evaluation set -> (probe training split, test split).
EVAL_SETS = {"mono": ("train", "eval"), "poly": ("poly_train", "poly_eval")}
MODELS = ("random", "stage1", "stage2", "stage1_continued")
NOT_AVAILABLE = "not available"

FULL = {"train_clips": 320, "eval_clips": 150, "poly_clips": 160, "stage1_updates": 1000, "extra_updates": 300,
        "mixture_epochs": 4, "probe_epochs": 300, "micro_batch_clips": 48}
SMOKE = {"train_clips": 24, "eval_clips": 12, "poly_clips": 12, "stage1_updates": 3, "extra_updates": 2,
         "mixture_epochs": 1, "probe_epochs": 5, "micro_batch_clips": 6}


# ------------------------------------------------------------------------------------- what the config offers


def _literal_options(cls: type, name: str) -> tuple:
    """The allowed values of a dataclass's Literal field, () when the class has no such field."""
    if name not in {f.name for f in dataclasses.fields(cls)}:
        return ()
    return typing.get_args(typing.get_type_hints(cls)[name])


def padding_modes() -> dict[str, str | None]:
    """Padding mode -> None when available, else why not (ModelConfig without `padding` or without the mode)."""
    options = _literal_options(ModelConfig, "padding")
    modes: dict[str, str | None] = {"reference": None, "aware": None}
    for mode in modes:
        if not options and mode != "reference":
            modes[mode] = "ModelConfig has no 'padding' field"
        elif options and mode not in options:
            modes[mode] = f"model.padding allows {list(options)}"
    return modes


def poolings() -> dict[str, str]:
    """Row name -> the eval.pooling used: cls, and content_mean (mean over all patches where unavailable)."""
    options = _literal_options(EvalConfig, "pooling")
    return {"cls": "cls", "content_mean": "content_mean" if "content_mean" in options else "mean"}


# ----------------------------------------------------------------------------------------------------- data


def make_data(data_dir: Path, train_clips: int, eval_clips: int, poly_clips: int, seed: int) -> dict:
    from pipeline.config import SynthConfig
    from pipeline.synth import make_sample_dataset

    synth = SynthConfig(train_clips=train_clips, eval_clips=eval_clips, num_classes=EVENT_CLASSES,
                        broken_files=False, seed=seed, profile="events")
    summary = make_sample_dataset(data_dir, synth)
    for split_code, (poly, source) in enumerate(POLY_SPLITS.items()):
        csv = Path(summary["splits"][source]["csv"])
        write_polyphonic_split(data_dir, csv, poly, poly_clips, np.random.default_rng([seed, split_code]))
    return summary


def write_polyphonic_split(data_dir: Path, source_csv: Path, name: str, count: int, rng: np.random.Generator) -> None:
    """`count` mixtures of 2-3 clips of different classes of `source_csv` (module docstring, step 1), as 16 kHz
    WAV files in data_dir/audio and the AudioSet-style CSV data_dir/{name}_segments.csv."""
    from pipeline.audio import load_waveform
    from pipeline.config import AudioConfig
    from pipeline.csv_rows import read_segments_csv

    audio_cfg = AudioConfig()
    segments, bad = read_segments_csv(source_csv)
    if bad:
        raise ValueError(f"{source_csv}: malformed rows {bad}")
    paths = {s.ytid: next((data_dir / "audio").glob(f"{s.ytid}.*")) for s in segments}
    classes = sorted({mid for s in segments for mid in s.label_mids})
    if len(classes) < max(POLY_SOURCES):
        raise ValueError(f"{source_csv}: polyphonic mixtures need {max(POLY_SOURCES)} classes, found {len(classes)}")
    lines = [f"# Polyphonic mixtures of {source_csv.name} (benchmarks.learning)\n",
             f"# num_ytids={count}\n", "# YTID, start_seconds, end_seconds, positive_labels\n"]
    waves_of: dict[str, np.ndarray] = {}
    for index in range(count):
        chosen: list = []
        for position in rng.permutation(len(segments)):
            segment = segments[position]
            if not set(segment.label_mids) & {mid for s in chosen for mid in s.label_mids}:
                chosen.append(segment)
            if len(chosen) == POLY_SOURCES[index % len(POLY_SOURCES)]:
                break
        for segment in chosen:
            if segment.ytid not in waves_of:
                waves_of[segment.ytid] = load_waveform(paths[segment.ytid], audio_cfg).numpy()
        waves = [waves_of[s.ytid] for s in chosen]
        mixture = np.zeros(max(w.size for w in waves))
        for wave in waves:
            mixture[: wave.size] += POLY_RMS * wave / max(float(np.sqrt(np.mean(wave**2))), 1e-9)
        mixture *= POLY_PEAK / max(float(np.abs(mixture).max()), POLY_PEAK)
        ytid = f"poly{name[5]}{index:06d}"
        soundfile.write(data_dir / "audio" / f"{ytid}.wav", mixture.astype(np.float32), audio_cfg.sample_rate,
                        subtype="PCM_16")
        mids = sorted({mid for s in chosen for mid in s.label_mids})
        lines.append(f'{ytid}, 0.000, {mixture.size / audio_cfg.sample_rate:.3f}, "{",".join(mids)}"\n')
    (data_dir / f"{name}_segments.csv").write_text("".join(lines), encoding="utf-8")


# --------------------------------------------------------------------------------------------------- configs


def data_section(data_dir: Path, shards: Path, mixture_epochs: int) -> dict:
    splits = [{"name": "train", "csv": str(data_dir / "balanced_train_segments.csv"), "mix": True},
              {"name": "eval", "csv": str(data_dir / "eval_segments.csv"), "mix": False}]
    splits += [{"name": name, "csv": str(data_dir / f"{name}_segments.csv"), "mix": False} for name in POLY_SPLITS]
    return {
        "source": {"audio_root": str(data_dir / "audio"),
                   "class_labels_csv": str(data_dir / "class_labels_indices.csv"), "splits": splits},
        # Mixed on the fly by the loader, so that each run mixes with its own data.mixing.mix_padding.
        "mixing": {"mixture_epochs": mixture_epochs, "materialize_mixtures": False},
        "shards": {"output": str(shards)},
        "loader": {"shards": str(shards)},
    }


def write_run_configs(work: Path, data: dict, padding: str, args: argparse.Namespace) -> dict[str, Path]:
    """Config files of the three runs of one padding mode: stage1, stage2 (init_from stage1) and
    stage1_continued (stage 2's run with model.stage=1)."""
    model = {"padding": padding} if _literal_options(ModelConfig, "padding") else {}
    if padding == "aware":
        # The instance-normed CLS target is ~0 for every clip (its per-clip channel means are removed);
        # layer_norm keeps what a clip's tokens share (model/targets.py, utterance_target).
        model["utterance_norm"] = "layer_norm"
        # With a mostly random-init teacher the targets share a large common part; centring removes it.
        model["utterance_center"] = args.utterance_center
        # A short partner's zero padding would win the log-mel max over the primary's content.
        data = {**data, "mixing": {**data["mixing"], "mix_padding": "silence"}}
    # A multiple of data.mixing.group_size; the update counts stay, so a larger micro-batch sees more clips.
    data = {**data, "loader": {**data["loader"], "micro_batch_clips": args.micro_batch_clips}}
    common = {"data": data, "tracking": {"enabled": False}}
    stage1_dir = work / padding / "stage1"
    extra = {"max_updates": args.extra_updates, "warmup_updates": max(1, args.extra_updates // 10),
             "checkpoint_interval": args.extra_updates, "keep_checkpoints": 1, "init_from": str(stage1_dir),
             "seed": args.seed}
    runs = {
        "stage1": {"base": "tiny_stage1", **common, "model": model, "train": {
            "output_dir": str(stage1_dir), "max_updates": args.stage1_updates,
            "warmup_updates": max(1, args.stage1_updates // 10), "checkpoint_interval": args.stage1_updates,
            "keep_checkpoints": 1, "seed": args.seed}},
        "stage2": {"base": "tiny_stage2", **common, "model": model,
                   "train": {**extra, "output_dir": str(work / padding / "stage2")}},
        "stage1_continued": {"base": "tiny_stage2", **common, "model": {**model, "stage": 1},
                             "train": {**extra, "output_dir": str(work / padding / "stage1_continued")}},
    }
    paths = {}
    for name, values in runs.items():
        paths[name] = work / padding / f"{name}.yaml"
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        paths[name].write_text(yaml.safe_dump(values, sort_keys=False))
    return paths


def run_settings(config: Config) -> dict:
    """What distinguishes the runs, for the report."""
    train, model = config.train, config.model
    return {"stage": model.stage, "peak_lr": train.peak_lr, "warmup_updates": train.warmup_updates,
            "max_updates": train.max_updates, "micro_batch_clips": config.data.loader.micro_batch_clips,
            "clone_batch": model.clone_batch, "init_from": Path(train.init_from).name if train.init_from else "",
            "padding": getattr(model, "padding", "reference"),
            "utterance_center": getattr(model, "utterance_center", "none")}


# ------------------------------------------------------------------------------------------------- the jobs


# A rendezvous set in the calling environment would be shared by the modes' runs training side by side.
RENDEZVOUS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


def job_env(threads: int) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in RENDEZVOUS_VARIABLES}
    return dict(env, DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(threads))


def run_job(command: list[str], log_path: Path, threads: int) -> None:
    with open(log_path, "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=job_env(threads))
    if code:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"`{' '.join(command)}` exited with {code}; log {log_path}:\n{tail}")


def preprocess(config_path: Path, work: Path, cpus: int) -> dict:
    summary = work / "preprocess.json"
    run_job([sys.executable, "-m", "jobs.preprocess", "--config", str(config_path), "--no-progress",
             "--num-cpus", str(cpus), "--summary-json", str(summary)], work / "preprocess.log", cpus)
    return json.loads(summary.read_text())


def pretrain(config_path: Path, threads: int) -> dict:
    """`sslam pretrain --ranks 1`; returns updates and the last logged loss of the run."""
    output_dir = Path(load_config(str(config_path)).train.output_dir)
    run_job([sys.executable, "-m", "jobs.cli", "pretrain", "--config", str(config_path), "--ranks", "1"],
            config_path.with_suffix(".log"), threads)
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"updates": lines[-1]["update"], "final_loss": round(lines[-1]["loss"], 5)}


def train_mode(paths: dict[str, Path], threads: int) -> dict[str, dict]:
    """One padding mode's runs in order (stage 2 and the control start from stage 1), each with its seconds."""
    runs = {}
    for name, path in paths.items():
        started = time.perf_counter()
        runs[name] = {**run_settings(load_config(str(path))), **pretrain(path, threads)}
        runs[name]["seconds"] = round(time.perf_counter() - started, 1)
    return runs


# ---------------------------------------------------------------------------------------------------- probes


def encoder_model(weights, config: Config, folder: Path):
    """The registered model's code (jobs.mlops.pyfunc_model) over `weights`, from the artifacts jobs.mlops.pyfunc_package writes."""
    from jobs.mlops.pyfunc_model import SSLAMEncoderModel
    from jobs.mlops.pyfunc_package import audio_config_for, model_spec
    from jobs.train.checkpointing import sha256_file
    from model.checkpoint import save_weights

    folder.mkdir(parents=True, exist_ok=True)
    artifacts = {"weights": str(folder / "encoder.safetensors"), "config": str(folder / "model_config.json")}
    save_weights(weights, artifacts["weights"])
    spec = model_spec(weights.config, audio_config_for(weights.config, config.data.audio),
                      weights_sha256=sha256_file(artifacts["weights"]))
    Path(artifacts["config"]).write_text(json.dumps(spec))
    model = SSLAMEncoderModel()
    model.load_context(SimpleNamespace(artifacts=artifacts, model_config={"device": "cpu"}))
    return model


def random_weights(config: Config):
    """The student encoder as stage 1 starts: SSLAM(model config) after torch.manual_seed(train.seed)."""
    from model.checkpoint import ImportedCheckpoint
    from model.sslam import SSLAM

    torch.manual_seed(config.train.seed)
    model = SSLAM(config.model)
    return ImportedCheckpoint(config=config.model, kind="encoder", student_encoder=dict(model.encoder.state_dict()))


def trained_weights(config: Config):
    from jobs.train import checkpointing
    from jobs.mlops.registration import student_encoder_weights

    root = checkpointing.checkpoint_root(config.train.output_dir)
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's consolidation prints; stdout is the JSON line
        return student_encoder_weights(root / checkpointing.latest_tag(root), config.model)


def probe_config(shards: str, pooling: str, epochs: int) -> Config:
    """The `probe` config with this pooling and epoch count, whitened; the loader reads in-process (no worker
    start-up). Standardised only and trained 100 epochs, the probe underfit (random init: mAP 0.43 -> 0.55 whitened
    at 300 epochs, seed 1) and ranked pre-trained encoders, whose features concentrate in a few directions, below
    random init on every row."""
    return load_config("probe", [f"eval.pooling={pooling}", f"eval.epochs={epochs}", "eval.whiten=true",
                                 f"eval.train_shards={shards}", f"eval.test_shards={shards}",
                                 "data.loader.num_workers=0"])


def probe_map(python_model, config: Config, shards: str, train_split: str, test_split: str) -> tuple[float, float]:
    """(probe mAP, label-prior mAP) on test_split of a probe trained on train_split (multi-label protocol)."""
    from jobs.evaluate import extract, label_prior, mean_average_precision, train_probe

    train = extract(python_model, config, shards, train_split)
    test = extract(python_model, config, shards, test_split)
    probe = train_probe(train.features, train.labels, config.eval, multi_label=True)
    with torch.no_grad():
        scores = torch.sigmoid(probe(test.features)).numpy()
    value, _ = mean_average_precision(test.labels.numpy(), scores)
    prior, _ = mean_average_precision(test.labels.numpy(), label_prior(train.labels, len(test.labels)))
    return value, prior


# ------------------------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace, work: Path) -> dict:
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        seconds[name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    data_dir, shards = work / "data", work / "shards"
    summary = make_data(data_dir, args.train_clips, args.eval_clips, args.poly_clips, args.seed)
    now = lap("data", started)
    data = data_section(data_dir, shards, args.mixture_epochs)
    modes = {mode: why for mode, why in padding_modes().items() if mode in args.modes}
    configs = {mode: write_run_configs(work, data, mode, args) for mode, missing in modes.items() if missing is None}
    prep = preprocess(next(iter(configs.values()))["stage1"], work, args.ray_cpus)
    now = lap("preprocess", now)

    # The modes' runs are independent single-thread jobs: on 2 cores two modes train side by side.
    with ThreadPoolExecutor(max_workers=max(1, min(args.parallel_modes, len(configs)))) as pool:
        futures = {mode: pool.submit(train_mode, paths, args.threads) for mode, paths in configs.items()}
        runs = {mode: future.result() for mode, future in futures.items()}
    now = lap("pretrain", now)
    seconds.update({f"pretrain_{mode}_{name}": run["seconds"] for mode in runs for name, run in runs[mode].items()})

    # Probes are tiny matrix products: on a busy machine more threads only add synchronisation (20x slower).
    torch.set_num_threads(1)
    pooling_used = poolings()
    rows, priors = [], {}
    for mode, missing in modes.items():
        if missing is not None:
            rows += [{"padding": mode, "pooling": pooling, "eval": eval_set, "mAP": NOT_AVAILABLE, "why": missing}
                     for pooling in pooling_used for eval_set in EVAL_SETS]
            continue
        stage1 = load_config(str(configs[mode]["stage1"]))
        weights = {"random": random_weights(stage1)}
        weights.update({name: trained_weights(load_config(str(path))) for name, path in configs[mode].items()})
        models = {name: encoder_model(w, stage1, work / mode / "encoders" / name) for name, w in weights.items()}
        for pooling, used in pooling_used.items():
            config = probe_config(str(shards), used, args.probe_epochs)
            for eval_set, (train_split, test_split) in EVAL_SETS.items():
                maps = {}
                for name in MODELS:
                    maps[name], priors[eval_set] = probe_map(models[name], config, str(shards), train_split, test_split)
                maps = {name: round(value, 4) for name, value in maps.items()}
                rows.append({"padding": mode, "pooling": pooling, "pooling_used": used, "eval": eval_set, "mAP": maps,
                             "beats_random": [n for n in MODELS[1:] if maps[n] > maps["random"]]})
        now = lap(f"probe_{mode}", now)
    seconds["total"] = round(time.perf_counter() - started, 1)
    measured = [row for row in rows if isinstance(row["mAP"], dict)]
    return {
        "benchmark": "learning",
        "rows": rows,
        "label_prior": {name: round(value, 4) for name, value in priors.items()},
        "pretrained_beats_random_everywhere": {
            mode: (all(len(r["beats_random"]) == len(MODELS) - 1 for r in measured if r["padding"] == mode)
                   if missing is None else NOT_AVAILABLE)
            for mode, missing in modes.items()
        },
        "runs": runs,
        "budget": {"seconds": seconds, "threads": args.threads, "ray_cpus": args.ray_cpus,
                   "parallel_modes": args.parallel_modes,
                   "updates": {"stage1": args.stage1_updates, "stage2": args.extra_updates,
                               "stage1_continued": args.extra_updates}},
        "data": {"profile": summary["profile"], "classes": len(summary["classes"]), "train_clips": args.train_clips,
                 "eval_clips": args.eval_clips, "poly_clips_per_split": args.poly_clips,
                 "mixture_epochs": args.mixture_epochs, "samples": prep.get("samples")},
        "config": {"smoke": args.smoke, "seed": args.seed, "probe_epochs": args.probe_epochs,
                   "aware_utterance_center": args.utterance_center,
                   "stage1": "tiny_stage1", "stage2": "tiny_stage2", "probe": "probe",
                   "padding_modes": {m: NOT_AVAILABLE if why else "measured" for m, why in modes.items()},
                   "poolings": pooling_used},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learning", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny budget (end-to-end test)")
    for name, default in FULL.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=f"default {default} ({SMOKE[name]} with --smoke)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the pre-training runs")
    parser.add_argument("--parallel-modes", type=int, default=2,
                        help="padding modes pre-trained at the same time (default 2: both, one core each)")
    parser.add_argument("--ray-cpus", type=int, default=2, help="CPUs of the local Ray of the preprocessing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--modes", nargs="+", choices=list(padding_modes()), default=list(padding_modes()),
                        help="padding modes to measure (default: both)")
    parser.add_argument("--utterance-center", choices=["batch", "running"], default="running",
                        help="model.utterance_center of the aware runs (default: running)")
    parser.add_argument("--work-dir", default="", help="keep everything here (default: a temporary folder, removed)")
    args = parser.parse_args(argv)
    for name, default in (SMOKE if args.smoke else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.work_dir:
        work = Path(args.work_dir)
        if work.exists() and any(work.iterdir()):
            # Runs resume from checkpoints they find (train.resume=auto): an old folder would skip training.
            print(f"benchmarks.learning: --work-dir {work} is not empty", file=sys.stderr)
            return 2
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    else:
        work = Path(tempfile.mkdtemp(prefix="sslam-learning-"))
        try:
            result = run(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
