"""Look at a preprocessed shard set (`sslam inspect SHARDS`): a text summary and a PNG of a few mixture groups.

`summarize` reads `dataset.json`, `index.parquet` and `quarantine.parquet` (and checks that the listed shards
exist), and flags every listed shard that another plan wrote: index rows, or a resume record (`_records/`),
with another fingerprint than dataset.json, or a record whose sha256 is not the checksum dataset.json lists
(the shard was rewritten after dataset.json), and prints the class coverage dataset.json records (clips per class
before and after quarantine, warnings). `render_groups` draws the clips and mixtures of the first groups of the
first mix split, with each mixture's no-mix windows outlined (where only the primary is present), on one colour
scale, padding hatched, time in seconds and class names in the titles. Mixtures that were not materialised
are formed here exactly as the loader forms them (the `pipeline.mixers` mixer of dataset.json's domain).
Rendering uses matplotlib's Agg canvas directly, without touching the global backend.

A damaged or missing shard, or a sample that does not decode, is skipped with a warning (and counted in the
preview's title), so the preview comes from the next good samples. Errors: those of `pipeline.shardset.read_dataset_info`
(`FileNotFoundError` without dataset.json, `ValueError` when it cannot be parsed), and `InspectError` (a
ValueError) when no sample of the previewed shards decodes (it names those shards).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline import shards, storage
from pipeline.ledger import MANIFEST_STAGE, coverage_lines
from pipeline.mixers import DEFAULT_DOMAIN, mixer
from pipeline.mixers.base import MixSettings, assemble_group
from pipeline.shardset import FINGERPRINT_RECORD, INDEX_TABLE, QUARANTINE_TABLE, RECORDS_DIR, read_dataset_info
from pipeline.spectrogram_plot import draw_spectrogram

logger = logging.getLogger(__name__)

WINDOW_COLOUR = "#00e5ff"
HATCH_COLOUR = "0.3"
# gids of the preview's patches, so a test (or a viewer of the SVG) can tell them apart.
PADDING_GID = "padding"
WINDOW_GID = "nomix-window"
# How many shards or skipped samples an InspectError names.
PROBLEMS_SHOWN = 5
# How many mismatching shards the summary lists.
MISMATCHES_SHOWN = 10
MISMATCH = "MISMATCH"
RECORD_READERS = 16


class InspectError(ValueError):
    """A shard set that cannot be described or previewed (the message names the file or shards)."""


def listed_shards(info: dict) -> list[str]:
    """Every shard name dataset.json lists, split by split, epoch by epoch."""
    return [name for entry in info["splits"].values() for names in entry["shards_per_epoch"].values() for name in names]


def _table(shards_dir: str, location: storage.Location, name: str) -> pa.Table | None:
    if not location.exists(name):
        return None
    return location.read_table(name)


@dataclass
class SetReport:
    """What `sslam inspect` prints, and the problems among it (missing shards, shards of another plan): the
    command exits 1 when there are any."""

    text: str
    problems: list[str]


def summarize(shards_dir: str) -> str:
    """A few lines describing the shard set: features, groups, splits, counts, quarantine, missing shards."""
    return inspect_set(shards_dir).text


def inspect_set(shards_dir: str) -> SetReport:
    """The summary of `summarize` with its problems named."""
    location = storage.locate(shards_dir)
    info = read_dataset_info(shards_dir)
    index = _table(shards_dir, location, INDEX_TABLE)
    quarantine = _table(shards_dir, location, QUARANTINE_TABLE)
    classes = {c["index"]: c["name"] for c in info.get("classes", [])}
    lines = [
        f"shard set      {shards_dir} ({info.get('name', '')})",
        f"fingerprint    {info['fingerprint']}",
        f"features       raw log-mel {info['target_length']} x {info['mel_bins']} at {info['sample_rate']} Hz, "
        f"patch {info['patch_size']} ({info['target_length'] // info['patch_size']} time patches)",
        f"mixtures       groups of {info['group_size']}, r = {info['r']} rows per no-mix window, "
        f"{info['mixture_epochs']} mixture epochs, domain {info.get('domain', 'logmel_max')}, "
        f"{'materialised' if info['materialize_mixtures'] else 'formed by the loader'}, "
        f"padding {info.get('mix_padding', 'zero')}",
        f"classes        {len(classes)}",
    ]
    stats = info.get("feature_stats")
    if stats and stats.get("values"):
        lines.append(f"feature stats  mean {stats['mean']:.3f}, std {stats['std']:.3f} over {stats['values']} values")
    listed = listed_shards(info)
    missing = [name for name in listed if not location.exists(name)]
    lines.append(f"shards         {len(listed)} listed, {info.get('bytes', 0) / 2**20:.1f} MiB, {len(missing)} missing")
    problems = [f"{len(missing)} listed shards missing: {_first_few(missing)}"] if missing else []
    if missing:
        lines.append(f"  missing: {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}")
    fingerprint_lines, mismatched = _fingerprint_lines(location, info, index, listed)
    problems += [line.removeprefix(MISMATCH).strip() for line in fingerprint_lines if line.startswith(MISMATCH)]
    if mismatched:
        problems.append(f"shards of another plan: {_first_few(sorted(mismatched))}")
    lines += fingerprint_lines
    for split, entry in info["splits"].items():
        per_epoch = entry["shards_per_epoch"]
        samples = entry.get("samples_per_epoch", {})
        lines.append(
            f"split {split:<8} {'mix' if entry['mix'] else 'eval'}, {entry.get('clips', '?')} clips, "
            f"{len(per_epoch)} epochs x {len(next(iter(per_epoch.values()), []))} shards, "
            f"samples per epoch {[samples.get(epoch) for epoch in sorted(per_epoch, key=int)]}"
        )
        for epoch, counts in sorted(entry.get("ledger", {}).items(), key=lambda item: int(item[0])):
            lines.append(
                f"  e{int(epoch):02d}: {counts['primaries']} primaries + {counts['quarantined']} quarantined "
                f"= {counts['manifest']} manifest clips, {counts['fillers']} filler slots"
            )
        if index is not None:
            lines.append(f"  top labels: {_top_labels(index, split, classes)}")
    if "class_coverage" in info:
        lines += coverage_lines(info["class_coverage"], width=15)
    else:
        lines.append("classes        coverage not recorded (dataset.json of an earlier version)")
    if quarantine is not None and quarantine.num_rows:
        lines.append("quarantine")
        rows = quarantine.to_pylist()
        for (stage, reason), group in _by_stage_reason(rows).items():
            keys = {(row["split"], row["key"]) for row in group}
            count = len(group) if stage == MANIFEST_STAGE else len(keys)
            example = group[0]
            lines.append(f"  {stage:<9} {reason:<20} {count:>5}  e.g. {example['key']}: {example['detail']}")
    return SetReport("\n".join(lines), problems)


def _read_json(location: storage.Location, name: str) -> dict | None:
    try:
        value = json.loads(location.read(name))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def fingerprint_mismatches(location: storage.Location, info: dict, index: pa.Table | None, listed: list[str]) -> dict:
    """{shard: why} of every listed shard that another plan than dataset.json's wrote, as far as can be told."""
    expected = info.get("fingerprint")
    found: dict[str, list[str]] = {}
    if index is not None and "fingerprint" in index.column_names:
        per_shard: dict[str, set] = {}
        for name, fingerprint in zip(index.column("shard").to_pylist(), index.column("fingerprint").to_pylist()):
            per_shard.setdefault(name, set()).add(fingerprint)
        for name in listed:
            other = sorted(str(f)[:12] for f in per_shard.get(name, set()) - {expected})
            if other:
                found.setdefault(name, []).append(f"index rows of fingerprint {', '.join(other)}")
    records = location.child(RECORDS_DIR)
    with ThreadPoolExecutor(max_workers=RECORD_READERS) as pool:
        read = dict(zip(listed, pool.map(lambda name: _read_json(records, f"{name}.json"), listed)))
    checksums = info.get("checksums", {})
    for name, record in read.items():
        if record is None:
            continue
        if record.get("fingerprint") != expected:
            found.setdefault(name, []).append(f"record of fingerprint {str(record.get('fingerprint'))[:12]}")
        elif name in checksums and record.get("sha256") != checksums[name]:
            found.setdefault(name, []).append("rewritten after dataset.json (record sha256 is not its checksum)")
    return {name: "; ".join(reasons) for name, reasons in found.items()}


def _fingerprint_lines(
    location: storage.Location, info: dict, index: pa.Table | None, listed: list[str]
) -> tuple[list[str], dict[str, str]]:
    """The summary's fingerprint lines and {shard: why} of the listed shards another plan wrote."""
    expected = str(info.get("fingerprint"))
    lines = []
    held = _read_json(location, FINGERPRINT_RECORD)
    if held is not None and held.get("fingerprint") != info.get("fingerprint"):
        lines.append(
            f"{MISMATCH}       {FINGERPRINT_RECORD} holds fingerprint {str(held.get('fingerprint'))[:12]}, dataset.json "
            f"{expected[:12]}: a run of another plan started here after this set was finished"
        )
    mismatched = fingerprint_mismatches(location, info, index, listed)
    if mismatched:
        lines.append(
            f"{MISMATCH}       {len(mismatched)} of {len(listed)} shards were written by another plan than dataset.json "
            f"({expected[:12]}); the loader refuses those with foreign index rows. Rebuild: "
            "sslam preprocess --overwrite"
        )
        lines += [f"  {name}: {why}" for name, why in sorted(mismatched.items())[:MISMATCHES_SHOWN]]
        if len(mismatched) > MISMATCHES_SHOWN:
            lines.append(f"  ... and {len(mismatched) - MISMATCHES_SHOWN} more")
    elif index is not None and "fingerprint" in index.column_names and index.column("fingerprint").null_count == 0:
        lines.append(
            f"fingerprints   index rows and records of the {len(listed)} listed shards agree with dataset.json"
        )
    else:
        lines.append("fingerprints   index.parquet carries none (an older or hand-made set): shards not checked")
    return lines, mismatched


def _by_stage_reason(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    grouped: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        grouped.setdefault((row["stage"], row["reason"]), []).append(row)
    return dict(sorted(grouped.items()))


def _top_labels(index: pa.Table, split: str, classes: dict[int, str], count: int = 5) -> str:
    """The most frequent labels of the split's primaries in mixture epoch 0."""
    labels: Counter = Counter()
    for row_split, epoch, row_labels, filler in zip(
        *(index.column(name).to_pylist() for name in ("split", "epoch", "labels", "filler"))
    ):
        if row_split != split or epoch != 0:
            continue
        for clip_labels, is_filler in zip(row_labels, filler):
            if not is_filler:
                labels.update(clip_labels)
    return ", ".join(f"{classes.get(label, label)} ({n})" for label, n in labels.most_common(count)) or "none"


def _shard_path(shards_dir: str, name: str) -> str:
    return f"{shards_dir.rstrip('/')}/{name}" if "://" in shards_dir else os.path.join(shards_dir, name)


@dataclass
class _Skipped:
    """What the preview passed over: {shard name: reason} and {"shard/key": reason}."""

    shards: dict[str, str] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return f"skipped {len(self.shards)} unreadable shards, {len(self.samples)} bad samples"


def _first_samples(
    shards_dir: str, names: list[str], count: int, info: dict, mix: bool
) -> tuple[list[dict], _Skipped]:
    """The first `count` samples of `names` that decode (checked as the loader checks them), and what was skipped."""
    expected_shape = (int(info["target_length"]), int(info["mel_bins"]))
    time_patches = expected_shape[0] // int(info["patch_size"])
    group_size = info.get("group_size") if mix else None
    decoded: list[dict] = []
    skipped = _Skipped()
    for name in names:
        try:
            samples = shards.read_shard_samples(_shard_path(shards_dir, name))
        except (shards.ShardFormatError, OSError) as error:
            logger.warning("preview: shard %s skipped: %s", name, error)
            skipped.shards[name] = str(error)
            continue
        for key, members in samples:
            try:
                sample = shards.decode_sample(
                    members, expected_shape=expected_shape, group_size=group_size, time_patches=time_patches
                )
                if mix and "mixtures" not in sample["meta"]:
                    raise shards.ShardFormatError("a mix split sample must be a mixture group")
            except shards.ShardFormatError as error:
                logger.warning("preview: sample %s of shard %s skipped: %s", key, name, error)
                skipped.samples[f"{name}/{key}"] = str(error)
                continue
            decoded.append(sample)
            if len(decoded) == count:
                return decoded, skipped
    return decoded, skipped


def _first_few(items: list[str], separator: str = ", ") -> str:
    return separator.join(items[:PROBLEMS_SHOWN]) + (f"{separator}..." if len(items) > PROBLEMS_SHOWN else "")


def render_groups(shards_dir: str, out_png: str | os.PathLike, n_groups: int = 2) -> str:
    """Draw the first `n_groups` samples of the first mix split (clips above, mixtures below) as a PNG; returns
    the path. The drawing is `preview_figure`'s."""
    figure = preview_figure(shards_dir, n_groups)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)
    return str(out)


def preview_figure(shards_dir: str, n_groups: int = 2):
    """The preview of the first `n_groups` samples of the first mix split (clips above, mixtures below), a
    matplotlib Figure on an Agg canvas.

    Every panel shares one colour scale (the range of the unpadded frames of all panels, shown by one colour bar);
    padding is masked grey and covered by a hatched patch (gid "padding"); time is in seconds (frame shift of
    dataset.json); titles carry the clip's class names. Each mixture panel outlines its two no-mix windows.
    Without a mix split, the first evaluation clips are drawn. Unreadable shards and bad samples are skipped
    (logged, and counted in the title); InspectError when none is left.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    info = read_dataset_info(shards_dir)
    mix_splits = sorted(split for split, entry in info["splits"].items() if entry["mix"])
    split = mix_splits[0] if mix_splits else sorted(info["splits"])[0]
    names = info["splits"][split]["shards_per_epoch"]["0"]
    samples, skipped = _first_samples(shards_dir, names, max(1, n_groups), info, bool(mix_splits))
    if not samples:
        problems = [f"{where} ({reason})" for where, reason in {**skipped.shards, **skipped.samples}.items()]
        raise InspectError(
            f"{shards_dir}: split {split!r} has no sample to draw in its epoch-0 shards {_first_few(names)}"
            + (f"; {skipped.describe()}: {_first_few(problems, '; ')}" if problems else "")
        )
    class_names = {c["index"]: c["name"] for c in info.get("classes", [])}
    panels = _panels(samples, info, bool(mix_splits), class_names)
    unpadded = [panel.values[~panel.padded] for panel in panels if not panel.padded.all()]
    low = min((float(values.min()) for values in unpadded), default=0.0)
    high = max((float(values.max()) for values in unpadded), default=1.0)
    norm = Normalize(vmin=low, vmax=high if high > low else low + 1.0)
    shift_s = float(info.get("frame_shift_ms", 10.0)) / 1000.0
    patch_s = int(info["patch_size"]) * shift_s

    columns = max(len(sample["clips"]) for sample in samples)
    rows_per_sample = 2 if mix_splits else 1
    figure = Figure(figsize=(3.2 * columns + 0.8, 2.4 * rows_per_sample * len(samples)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows_per_sample * len(samples), columns, squeeze=False)
    for axis in axes.flat:
        axis.set_visible(False)
    image = None
    for panel in panels:
        axis = axes[rows_per_sample * panel.sample + panel.row, panel.column]
        axis.set_visible(True)
        image = draw_spectrogram(axis, panel.values, panel.title, frame_s=shift_s, padded=panel.padded, norm=norm)
        for start, end in _runs(panel.padded):
            axis.add_patch(Rectangle(
                (start * shift_s, 0), (end - start) * shift_s, panel.values.shape[1], facecolor="none",
                edgecolor=HATCH_COLOUR, hatch="//", linewidth=0, gid=PADDING_GID,
            ))
        for start, end in panel.nomix:
            axis.add_patch(Rectangle(
                (start * patch_s, 0), (end - start) * patch_s, panel.values.shape[1], fill=False,
                edgecolor=WINDOW_COLOUR, linewidth=1.5, gid=WINDOW_GID,
            ))
    figure.colorbar(image, ax=axes.ravel().tolist(), label="raw log-mel (one scale for every panel)", shrink=0.8)
    skips = f"; {skipped.describe()}" if skipped.shards or skipped.samples else ""
    figure.suptitle(
        f"{shards_dir}: {split}, first {len(samples)} good samples (no-mix windows outlined, padding hatched){skips}",
        fontsize=9,
    )
    return figure


@dataclass
class _Panel:
    """One spectrogram of the preview: where it goes, its values (T, F), which frames are padding, its windows."""

    sample: int
    row: int  # 0: clips, 1: mixtures
    column: int
    values: np.ndarray
    padded: np.ndarray  # (T,) bool
    title: str
    nomix: list = field(default_factory=list)


def _panels(samples: list[dict], info: dict, mix: bool, class_names: dict[int, str]) -> list[_Panel]:
    panels = []
    for position, sample in enumerate(samples):
        meta = sample["meta"]
        clips = [np.asarray(clip, dtype=np.float32) for clip in sample["clips"]]
        fillers = meta.get("filler", [False] * len(clips))
        declared = meta.get("valid_frames", meta.get("frames"))
        valid = [_valid_frames(clip, declared[i] if isinstance(declared, list) and i < len(declared) else None)
                 for i, clip in enumerate(clips)]
        for i, clip in enumerate(clips):
            names = ", ".join(class_names.get(label, str(label)) for label in meta["labels"][i]) or "no label"
            role = "filler" if fillers[i] else "primary"
            title = f"c{i} {meta['clips'][i]} ({role})\n{names}"
            padded = np.arange(clip.shape[0]) >= valid[i]
            panels.append(_Panel(position, 0, i, clip, padded, title))
        if not mix:
            continue
        mixtures = sample["mixtures"] or _loader_mixtures(sample, info)
        formed = "" if sample["mixtures"] else " [loader]"
        for i, mixture in enumerate(mixtures):
            spec = meta["mixtures"][i]
            values = np.asarray(mixture, dtype=np.float32)
            # Past both clips' frames a mixture is padding; so is a frame that is exactly zero in every bin (a
            # padded primary inside its no-mix windows; with mix_padding "zero", a clip's padding winning the max).
            present = max(valid[spec["primary"]], valid[spec["partner"]])
            padded = (np.arange(values.shape[0]) >= present) | ~np.any(values != 0, axis=1)
            title = f"m{i} = c{i} + c{spec['partner']} ({spec['domain']}){formed}"
            panels.append(_Panel(position, 1, i, values, padded, title, [tuple(w) for w in spec["nomix"]]))
    return panels


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of every run of True in a 1-D bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[False], flags, [False]]).astype(np.int8)))
    return [(int(start), int(end)) for start, end in zip(edges[::2], edges[1::2])]


def _valid_frames(clip: np.ndarray, declared) -> int:
    """A clip's unpadded frame count: the sample json's count when it is a valid one, else the reference padding
    rule (padding in raw log-mel is trailing frames that are exactly zero in every mel bin)."""
    frames = clip.shape[0]
    if isinstance(declared, int) and not isinstance(declared, bool) and 0 < declared <= frames:
        return declared
    nonzero = np.flatnonzero(np.any(clip != 0, axis=1))
    return int(nonzero[-1]) + 1 if nonzero.size else 0


def _loader_mixtures(sample: dict, info: dict) -> list[np.ndarray]:
    """Mixtures of a sample whose mixtures were not materialised, formed as the loader forms them."""
    meta = sample["meta"]
    patch = int(info["patch_size"])
    clean = torch.from_numpy(np.stack(sample["clips"]).astype(np.float32))
    group = assemble_group(meta["mixtures"], clean, patch, meta.get("frames"))
    settings = MixSettings(patch, info.get("mix_padding", "zero"))
    mixed = mixer(info.get("domain", DEFAULT_DOMAIN)).mix([group], settings)[0]
    return [mixture.numpy() for mixture in mixed]
