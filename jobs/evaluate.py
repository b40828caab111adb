"""Linear evaluation of a registered encoder: frozen features -> linear probe -> metrics on a run and on the version.

    sslam evaluate --model models:/sslam-encoder@candidate --config probe [--promote] [--set eval.pooling=mean]

The protocol (fixed; every knob is in `eval.*` of the config and logged as a param):

1. Model: `models:/NAME@ALIAS` (or `/VERSION`, `/latest`) is resolved to its version first, then that version's
   files are checked against its sha256 tags and its pyfunc loaded (jobs.mlops.registry.load_verified; a tampered
   model is refused).
2. Features: the frozen encoder on every clip of `eval.train_split` of `eval.train_shards` and `eval.test_split` of
   `eval.test_shards` (pipeline.eval_loader.EvalLoader, raw fbank from the shards): the last block's CLS token
   (`eval.pooling: cls`), the mean of its patch tokens (`mean`) or the mean of the patch tokens that hold content
   (`content_mean`: tokens entirely in a clip's zero padding, from the batch's `valid_frames`, left out; the rule of
   model/padding.py). Both sets need the same class list.
3. Probe: features standardised with the training set's per-dimension mean and std, then, with `eval.whiten: true`,
   ZCA-whitened with the training set's covariance of the standardised features (eigenvalues floored by adding
   `WHITEN_EPS`, the mean eigenvalue being 1); one `torch.nn.Linear(D, C)`
   (seeded with `eval.seed`) trained with AdamW (`eval.lr`, `eval.weight_decay`) for `eval.epochs` epochs of
   shuffled mini-batches of `eval.batch_size`; binary cross-entropy per class when any clip has several labels
   (multi-label), else cross-entropy (single-label).
4. Metric: multi-label: mAP = nanmean over classes of sklearn's `average_precision_score` on sigmoid scores,
   classes without a positive test clip skipped (SSLAM_SPEC §11); single-label: accuracy.
5. Baseline: the label prior: every test clip scored with the training class frequencies (its mAP is the mean
   test prevalence of the scored classes; its accuracy that of always answering the most frequent class).
6. A model with a classifier head whose class MIDs cover the dataset's is scored directly (no probe) unless
   `eval.use_head: false`.
7. Polyphonic (`eval.polyphonic.enabled`; jobs.train.polyphonic_eval, pipeline.polyphonic): for each k in
   `eval.polyphonic.sources` (default 2, 3), `eval.polyphonic.mixtures` mixtures of k clips of the test split
   with no label in common, drawn with `eval.polyphonic.seed` from the audio of `data.source` (the shards hold
   no waveforms), each source mean-removed and scaled to the quietest source's RMS, summed (peak held at 0.99),
   labels = union; the same front-end, pooling and probe (or head) score them: `polyk_mAP` next to
   `polyk_baseline_mAP`, the training label prior on the mixtures (= their mean class prevalence, which grows
   with k: compare margins over the baseline, not raw mAP across k).

Metrics go onto the run and, with `model_id`, onto the version's LoggedModel (`models:/m-...`); the run also
holds `per_class_ap.csv` (class index, mid, name, positives and AP for mono, poly2, ...).

Results go to a new run in `tracking.experiment` (tags link it to the version) and, as tags `eval.<metric>`,
`eval.baseline_<metric>`, `eval.polyk_mAP`, `eval.polyk_baseline_mAP`, `eval.run_id`, ..., onto the version. The report names the two splits it used
(`train`, `test`: "LOCATION:SPLIT") and how much they share (`overlap`: shard files, sample keys, clip keys of
index.parquet). `--promote` moves alias `best` to the version when its metric beats the tag of the version
holding `best` (or nothing holds it), and refuses (exit 1, `promotion_refused`) when the probe's train and test
splits are the same set or share any shard, sample key or clip key: a score on training data promotes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from torch import nn

from jobs.train.config import Config, ConfigError, EvalConfig, add_config_arguments, config_from_args
from jobs.mlops.lineage import lineage_tags
from jobs.mlops.registry import BEST, load_verified
from jobs.mlops.client import ensure_experiment, mlflow_client, param_value
from jobs.train.metrics import accuracy, average_precision_per_class, mean_average_precision
from model.features import content_mean_frames

log = logging.getLogger("sslam.evaluate")

STD_FLOOR = 1e-6
WHITEN_EPS = 1e-2
POOLINGS = ("cls", "mean", "content_mean")
PER_CLASS_TABLE = "per_class_ap.csv"


@dataclass
class FeatureSet:
    features: torch.Tensor  # (N, D) float32
    labels: torch.Tensor  # (N, C) float32 multi-hot
    classes: list[dict]
    logits: torch.Tensor | None = None  # (N, C_head) when the model has a head
    keys: set[str] = dataclasses.field(default_factory=set)  # sample keys of the loaded clips


@dataclass
class SplitSource:
    """What identifies a split's data: its shard files, sample keys (as loaded) and clip keys (index.parquet)."""

    name: str  # "LOCATION:SPLIT"
    shards: set[str]
    samples: set[str]
    clips: set[str]


def is_multi_label(*label_sets: torch.Tensor) -> bool:
    return any(bool((labels.sum(dim=1) != 1).any()) for labels in label_sets)


def label_prior(train_labels: torch.Tensor, count: int) -> np.ndarray:
    """The baseline's scores: the training class frequencies for each of `count` clips."""
    return np.tile(train_labels.float().mean(dim=0).numpy(), (count, 1))


def score(labels: torch.Tensor, scores: np.ndarray, multi_label: bool) -> tuple[str, float, int]:
    """(metric name, value, classes scored)."""
    target = labels.numpy()
    if multi_label:
        value, scored = mean_average_precision(target, scores)
        return "mAP", value, scored
    return "accuracy", accuracy(target, scores), int(target.any(axis=0).sum())


# -------------------------------------------------------------------------------------------------- probe


def train_probe(features: torch.Tensor, labels: torch.Tensor, cfg: EvalConfig, multi_label: bool) -> nn.Module:
    """The linear probe of the module docstring (standardisation included in the returned module)."""
    torch.manual_seed(cfg.seed)
    mean = features.mean(dim=0)
    std = features.std(dim=0).clamp_min(STD_FLOOR)
    linear = nn.Linear(features.shape[1], labels.shape[1])
    steps: list[nn.Module] = [_Standardise(mean, std)]
    if cfg.whiten:
        steps.append(_Whiten.fit(steps[0](features)))
    probe = nn.Sequential(*steps, linear)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss() if multi_label else nn.CrossEntropyLoss()
    targets = labels if multi_label else labels.argmax(dim=1)
    generator = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        order = torch.randperm(features.shape[0], generator=generator)
        for start in range(0, len(order), cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            optimizer.zero_grad()
            loss_fn(probe(features[rows]), targets[rows]).backward()
            optimizer.step()
    return probe.eval()


class _Standardise(nn.Module):
    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class _Whiten(nn.Module):
    """ZCA whitening x -> x W, W = V diag((λ + WHITEN_EPS)^-1/2) V^T from the eigendecomposition of the
    covariance of centred (standardised) training features."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)

    @classmethod
    def fit(cls, standardised: torch.Tensor) -> _Whiten:
        centred = standardised.double() - standardised.double().mean(dim=0)
        covariance = centred.T @ centred / max(centred.shape[0] - 1, 1)
        eigenvalues, vectors = torch.linalg.eigh(covariance)
        scale = (eigenvalues.clamp_min(0.0) + WHITEN_EPS).rsqrt()
        return cls(((vectors * scale) @ vectors.T).to(standardised.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix


# ------------------------------------------------------------------------------------------------- data


def extract(python_model, config: Config, location: str, split: str) -> FeatureSet:
    """Frozen features (and head logits) of every clip of a split, in the loader's order."""
    from pipeline.eval_loader import EvalLoader

    loader_cfg = dataclasses.replace(config.data.loader, shards=location)
    loader = EvalLoader(loader_cfg, split, batch_size=config.eval.batch_size)
    features, labels, logits, keys = [], [], [], set()
    for batch in loader:
        batch_features, batch_logits = embed(python_model, config, batch["clean"][:, 0], batch["valid_frames"])
        features.append(batch_features)
        labels.append(batch["labels"])
        keys.update(loader.last_keys)
        if batch_logits is not None:
            logits.append(batch_logits)
    if not features:
        raise ValueError(f"split {split!r} of {location} holds no clips")
    if loader.skipped_samples or loader.skipped_shards:
        log.warning("%s/%s: %d samples and %d shards skipped as broken", location, split, loader.skipped_samples,
                    loader.skipped_shards)
    return FeatureSet(torch.cat(features), torch.cat(labels), loader.classes, torch.cat(logits) if logits else None,
                      keys)


def embed(python_model, config: Config, clean: torch.Tensor, valid_frames: torch.Tensor):
    """(pooled features (N, D), head logits or None) of raw fbank clips (N, T, F) by `eval.pooling`."""
    pooling = config.eval.pooling
    model_cfg = getattr(python_model, "model_cfg", None) or config.model
    # A padding-aware model attends to content only, so it needs the valid lengths for every pooling.
    lengths = {"valid_frames": valid_frames} if getattr(model_cfg, "padding", "reference") == "aware" else {}
    outputs = python_model.embed(clean, pooling="cls" if pooling == "content_mean" else pooling, **lengths)
    if pooling == "content_mean":
        patch = model_cfg.patch_size
        features = content_mean_frames(outputs["frames"], valid_frames, patch, model_cfg.mel_bins // patch)
    else:
        features = outputs["utterance"]
    return features, outputs.get("logits")


def split_source(location: str, split: str, sample_keys: set[str]) -> SplitSource:
    """The shard files (absolute for local folders), the loaded sample keys and the index's clip keys of a split."""
    import os

    from pipeline.shard_source import ShardSource
    from pipeline.shardset import INDEX_TABLE
    from pipeline.storage import locate

    source = ShardSource(location)
    names = source.shard_names(split, 0)
    urls = {source.url(name) for name in names}
    shards = {url if "://" in url else os.path.realpath(url) for url in urls}
    clips: set[str] = set()
    index = locate(source.root)
    if index.exists(INDEX_TABLE):
        table = index.read_table(INDEX_TABLE, columns=["shard", "clips", "filler"]).to_pylist()
        wanted = set(names)
        for row in table:
            if row["shard"] in wanted:
                clips.update(c for c, filler in zip(row["clips"], row["filler"] or [False] * len(row["clips"]))
                             if not filler)
    return SplitSource(f"{location}:{split}", shards, set(sample_keys), clips)


def split_overlap(train: SplitSource, test: SplitSource) -> dict[str, Any]:
    """How much two splits share; `disjoint` only when nothing is shared."""
    shared = {
        "same_set": train.shards == test.shards,
        "shared_shards": len(train.shards & test.shards),
        "shared_sample_keys": len(train.samples & test.samples),
        "shared_clip_keys": len(train.clips & test.clips),
    }
    shared["disjoint"] = not shared["same_set"] and not any(
        shared[key] for key in ("shared_shards", "shared_sample_keys", "shared_clip_keys"))
    return shared


def head_columns(model_classes: list[dict] | None, dataset_classes: list[dict]) -> list[int] | None:
    """Head output index of each dataset class (matched by MID), or None when the head does not cover them."""
    if not model_classes:
        return None
    by_mid = {entry.get("mid"): entry["index"] for entry in model_classes if entry.get("mid")}
    columns = [by_mid.get(entry.get("mid")) for entry in dataset_classes]
    return None if any(column is None for column in columns) else columns


# -------------------------------------------------------------------------------------------------- the job


def _load(model_uri: str, client):
    """(ModelVersion or None, the exact URI loaded, the pyfunc's python model)."""
    version, exact, model = load_verified(model_uri, client)
    return version, exact, model.unwrap_python_model()


def evaluate(
    model_uri: str, train_shards: str, test_shards: str, config: Config, promote: bool = False
) -> dict[str, Any]:
    """Run the protocol of the module docstring; returns the metrics plus `run_id`, `model_version`, `promoted`."""
    from jobs.train.polyphonic_eval import check_polyphonic, mixture_sets

    cfg = config.eval
    if cfg.pooling not in POOLINGS:
        raise ConfigError(f"eval.pooling must be one of {POOLINGS}, got {cfg.pooling!r}")
    check_polyphonic(cfg.polyphonic)
    client = mlflow_client()
    version, exact_uri, python_model = _load(model_uri, client)
    test = extract(python_model, config, test_shards, cfg.test_split)
    train = extract(python_model, config, train_shards, cfg.train_split)
    if [c.get("mid") for c in train.classes] != [c.get("mid") for c in test.classes]:
        raise ValueError(f"{train_shards} and {test_shards} have different class lists")
    train_source = split_source(train_shards, cfg.train_split, train.keys)
    test_source = split_source(test_shards, cfg.test_split, test.keys)
    overlap = split_overlap(train_source, test_source)
    if not overlap["disjoint"]:
        log.warning("the probe's train split %s and test split %s overlap (%s): the score is not a held-out one",
                    train_source.name, test_source.name, overlap)
    multi_label = is_multi_label(train.labels, test.labels)
    columns = head_columns(getattr(python_model, "classes", None), test.classes) if test.logits is not None else None
    if cfg.use_head and columns is not None:
        protocol = "head"

        def logits_of(features: torch.Tensor, head_logits: torch.Tensor | None) -> torch.Tensor:
            return head_logits[:, columns]
    else:
        protocol = "probe"
        probe = train_probe(train.features, train.labels, cfg, multi_label)

        def logits_of(features: torch.Tensor, head_logits: torch.Tensor | None) -> torch.Tensor:
            with torch.no_grad():
                return probe(features)

    def scores_of(features: torch.Tensor, head_logits: torch.Tensor | None) -> np.ndarray:
        logits = logits_of(features, head_logits)
        return torch.sigmoid(logits).numpy() if multi_label else logits.softmax(dim=1).numpy()

    test_scores = scores_of(test.features, test.logits)
    metric, value, scored = score(test.labels, test_scores, multi_label)
    _, baseline, _ = score(test.labels, label_prior(train.labels, len(test.labels)), multi_label)
    results: dict[str, Any] = {
        metric: value,
        f"baseline_{metric}": baseline,
        f"{metric}_over_baseline": value - baseline,
        "num_train": int(train.features.shape[0]),
        "num_test": int(test.features.shape[0]),
        "classes_scored": scored,
    }
    log.info("%s %s: %s %.4f, label-prior baseline %.4f (%d classes, %d train / %d test clips)",
             exact_uri, protocol, metric, value, baseline, scored, results["num_train"], results["num_test"])
    per_class = {"mono": (test.labels.numpy(), test_scores)}
    if cfg.polyphonic.enabled:
        for mixtures in mixture_sets(python_model, config, test.classes,
                                     lambda clean, valid: embed(python_model, config, clean, valid)):
            name = f"poly{mixtures.sources}"
            poly_scores = scores_of(mixtures.features, mixtures.logits)
            poly_value, poly_scored = mean_average_precision(mixtures.labels.numpy(), poly_scores)
            prior = label_prior(train.labels, len(mixtures.labels))
            poly_baseline, _ = mean_average_precision(mixtures.labels.numpy(), prior)
            results.update({f"{name}_mAP": poly_value, f"{name}_baseline_mAP": poly_baseline,
                            f"{name}_mAP_over_baseline": poly_value - poly_baseline,
                            f"{name}_mixtures": len(mixtures.labels), f"{name}_dropped": mixtures.dropped,
                            f"{name}_classes_scored": poly_scored})
            per_class[name] = (mixtures.labels.numpy(), poly_scores)
            log.info("%s %s: %s mAP %.4f, label-prior baseline %.4f (%d mixtures)", exact_uri, protocol, name,
                     poly_value, poly_baseline, len(mixtures.labels))
    model_id = logged_model_id(version)
    run_id = _log_run(client, config, exact_uri, version, train_shards, test_shards, protocol, results, model_id,
                      per_class_table(test.classes, per_class))
    promoted, refused = False, ""
    if version is not None:
        splits = {"eval.train": train_source.name, "eval.test": test_source.name,
                  "eval.splits_disjoint": str(overlap["disjoint"]).lower()}
        _tag_version(client, version, metric, results, run_id, test_shards, cfg.pooling, protocol, splits)
        if promote and not overlap["disjoint"]:
            refused = (f"the probe's train split {train_source.name} and test split {test_source.name} are not "
                       f"disjoint ({overlap}); alias {BEST} not moved")
            log.error("refusing to promote %s: %s", exact_uri, refused)
        elif promote:
            promoted = _promote(client, version, metric, value)
    report = {**results, "metric": metric, "protocol": protocol, "run_id": run_id,
              "model_version": str(version.version) if version is not None else None, "promoted": promoted,
              "train": train_source.name, "test": test_source.name, "overlap": overlap}
    if refused:
        report["promotion_refused"] = refused
    return report


def logged_model_id(version) -> str | None:
    """The id of a version's LoggedModel: its `model_id`, else that of its `models:/m-...` source (the
    registry store does not always keep `model_id`); None without one."""
    if version is None:
        return None
    if getattr(version, "model_id", None):
        return version.model_id
    source = version.source or ""
    if source.startswith("models:/m-") and "/" not in source[len("models:/"):]:
        return source[len("models:/"):]
    return None


def per_class_table(classes: list[dict], per_class: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """CSV: one row per class (index, mid, name), then `<set>_positives` and `<set>_ap` for each scored set
    (mono, poly2, ...); AP empty for a class without a positive."""
    import csv
    import io

    columns = {name: (labels.sum(axis=0), average_precision_per_class(labels, scores))
               for name, (labels, scores) in per_class.items()}
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["index", "mid", "name", *(f"{n}_{c}" for n in columns for c in ("positives", "ap"))])
    for position, entry in enumerate(classes):
        row = [entry.get("index", position), entry.get("mid", ""), entry.get("name", "")]
        for positives, ap in columns.values():
            row += [int(positives[position]), "" if np.isnan(ap[position]) else f"{ap[position]:.6f}"]
        writer.writerow(row)
    return text.getvalue()


def _log_run(client, config: Config, model_uri: str, version, train_shards: str, test_shards: str, protocol: str,
             results: dict[str, Any], model_id: str | None, table: str) -> str:
    """The evaluation run: params, metrics (also on the version's logged model when it has one) and the
    per-class AP table (`PER_CLASS_TABLE`)."""
    from mlflow.entities import Metric, Param

    experiment_id = ensure_experiment(client, config.tracking.experiment)
    tags = {"sslam.job": "evaluate", "model_uri": model_uri, "protocol": protocol}
    tags.update(lineage_tags("jobs.evaluate"))
    name = "eval"
    if version is not None:
        tags.update(model_name=version.name, model_version=str(version.version), model_run_id=version.run_id or "")
        name = f"eval-{version.name}-v{version.version}"
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    params = {f"eval.{k}": v for k, v in dataclasses.asdict(config.eval).items() if k != "polyphonic"}
    params.update({f"eval.polyphonic.{k}": v for k, v in dataclasses.asdict(config.eval.polyphonic).items()})
    params.update({"eval.train_shards": train_shards, "eval.test_shards": test_shards, "model_uri": model_uri})
    now = int(time.time() * 1000)
    client.log_batch(
        run.info.run_id,
        params=[Param(k, param_value(v)) for k, v in params.items()],
        metrics=[Metric(k, float(v), now, 0, model_id=model_id or None) for k, v in results.items()],
    )
    client.log_text(run.info.run_id, table, PER_CLASS_TABLE)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _tag_version(client, version, metric: str, results: dict[str, Any], run_id: str, test_shards: str, pooling: str,
                 protocol: str, splits: dict[str, str]) -> None:
    poly = {f"eval.{key}": f"{value:.6f}" for key, value in results.items()
            if key.startswith("poly") and key.endswith("mAP")}
    tags = {
        **splits,
        **poly,
        f"eval.{metric}": f"{results[metric]:.6f}",
        f"eval.baseline_{metric}": f"{results[f'baseline_{metric}']:.6f}",
        "eval.run_id": run_id,
        "eval.test_shards": test_shards,
        "eval.pooling": pooling,
        "eval.protocol": protocol,
    }
    for key, value in tags.items():
        client.set_model_version_tag(version.name, str(version.version), key, value)


def _promote(client, version, metric: str, value: float) -> bool:
    """Move `best` to `version` when its metric beats the holder's `eval.<metric>` tag (or nothing holds it)."""
    from mlflow.exceptions import MlflowException

    try:
        holder = client.get_model_version_by_alias(version.name, BEST)
    except MlflowException:
        holder = None
    if holder is not None and str(holder.version) != str(version.version):
        try:
            current = float(holder.tags[f"eval.{metric}"])
        except (KeyError, ValueError):
            current = float("-inf")
        if not value > current:
            log.info("alias %s stays on version %s (%s %.4f >= %.4f)", BEST, holder.version, metric, current, value)
            return False
    client.set_registered_model_alias(version.name, BEST, str(version.version))
    log.info("alias %s -> %s version %s (%s %.4f)", BEST, version.name, version.version, metric, value)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sslam evaluate", description="linear evaluation of a registered encoder")
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or another MLflow URI")
    parser.add_argument("--train-shards", help="shard location of the probe's training split (eval.train_shards)")
    parser.add_argument("--test-shards", help="shard location of the test split (eval.test_shards)")
    parser.add_argument("--promote", action="store_true", help="move alias 'best' here when the metric is better")
    add_config_arguments(parser, default="probe")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_from_args(args)
        train_shards = args.train_shards or config.eval.train_shards
        test_shards = args.test_shards or config.eval.test_shards
        if not train_shards or not test_shards:
            raise ConfigError("give the shard locations: --train-shards/--test-shards or eval.train_shards/test_shards")
        results = evaluate(args.model, train_shards, test_shards, config, promote=args.promote)
    except ConfigError as error:
        log.error("config error: %s", error)
        return 2
    except (MlflowException, FileNotFoundError, ValueError) as error:
        print(f"sslam evaluate: {args.model}: {error}", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=2, sort_keys=True))
    if "promotion_refused" in results:
        print(f"sslam evaluate: not promoted: {results['promotion_refused']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
