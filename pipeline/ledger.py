"""The ledger and the reports of a preprocessing run: the quarantine table (its schema and stages), the
ledger check (every manifest clip written as a primary exactly once or quarantined, per mixture epoch), the
class coverage before and after quarantine, the contents of dataset.json and the operator's summary text.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import plan
from pipeline.config import DataConfig
from pipeline.manifest import QUARANTINE_SCHEMA as MANIFEST_QUARANTINE_SCHEMA
from pipeline.manifest import manifest_classes
from pipeline.preprocess_errors import LedgerError
from pipeline.shardset import FORMAT_VERSION, feature_parameters

MANIFEST_STAGE = "manifest"
DECODE_STAGE = "decode"
FEATURES_STAGE = "features"
# How many class names one line of the class coverage names.
PROBLEMS_NAMED = 10

QUARANTINE_SCHEMA = pa.schema(
    list(MANIFEST_QUARANTINE_SCHEMA) + [pa.field("epoch", pa.int32()), pa.field("shard", pa.string())]
)


def quarantine_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=QUARANTINE_SCHEMA)


def check_ledger(manifest: pa.Table, index: pa.Table, quarantine: pa.Table, mixture_epochs: int) -> dict:
    """Per split and mixture epoch: manifest rows = primaries written + clips quarantined, each exactly once.

    Returns {split: {epoch: {"manifest", "primaries", "fillers", "quarantined"}}}; raises LedgerError naming
    every difference (missing keys, keys counted twice, keys not in the manifest).
    """
    manifest_keys: dict[str, Counter] = {}
    mix_of: dict[str, bool] = {}
    for key, split, mix in zip(
        manifest.column("key").to_pylist(), manifest.column("split").to_pylist(), manifest.column("mix").to_pylist()
    ):
        manifest_keys.setdefault(split, Counter())[key] += 1
        mix_of[split] = mix
    written: dict[tuple[str, int], Counter] = {}
    fillers: Counter = Counter()
    for split, epoch, clips, filler in zip(
        index.column("split").to_pylist(),
        index.column("epoch").to_pylist(),
        index.column("clips").to_pylist(),
        index.column("filler").to_pylist(),
    ):
        for key, is_filler in zip(clips, filler):
            if is_filler:
                fillers[(split, epoch)] += 1
            else:
                written.setdefault((split, epoch), Counter())[key] += 1
    quarantined: dict[tuple[str, int], Counter] = {}
    for key, split, stage, epoch in zip(
        quarantine.column("key").to_pylist(),
        quarantine.column("split").to_pylist(),
        quarantine.column("stage").to_pylist(),
        quarantine.column("epoch").to_pylist(),
    ):
        if stage != MANIFEST_STAGE:
            quarantined.setdefault((split, epoch), Counter())[key] += 1

    report: dict[str, dict[str, dict[str, int]]] = {}
    problems: list[str] = []
    unexpected_splits = {split for split, _ in list(written) + list(quarantined)} - set(manifest_keys)
    for split in sorted(unexpected_splits):
        problems.append(f"split {split!r} is written or quarantined but not in the manifest")
    for split, expected in sorted(manifest_keys.items()):
        epochs = range(mixture_epochs) if mix_of[split] else range(1)
        report[split] = {}
        for epoch in epochs:
            primaries = written.get((split, epoch), Counter())
            failed = quarantined.get((split, epoch), Counter())
            accounted = primaries + failed
            report[split][str(epoch)] = {
                "manifest": sum(expected.values()),
                "primaries": sum(primaries.values()),
                "fillers": fillers[(split, epoch)],
                "quarantined": sum(failed.values()),
            }
            missing = sorted(set(expected) - set(accounted))
            extra = sorted(set(accounted) - set(expected))
            twice = sorted(key for key, count in accounted.items() if key in expected and count > expected[key])
            where = f"{split} mixture epoch {epoch}" if mix_of[split] else split
            for label, keys in (("missing", missing), ("not in the manifest", extra), ("counted twice", twice)):
                if keys:
                    shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
                    problems.append(f"{where}: {len(keys)} clips {label}: {shown}")
    if problems:
        raise LedgerError("ledger mismatch: " + "; ".join(problems))
    return report


def _class_list(manifest: pa.Table) -> list[dict]:
    return [{"index": c.index, "mid": c.mid, "name": c.display_name} for c in manifest_classes(manifest)]


def dataset_info(
    *,
    data: DataConfig,
    patch_size: int,
    resolved_config: dict,
    manifest: pa.Table,
    plan_table: pa.Table,
    fingerprint: str,
    inputs: dict[str, Any],
    rows: int,
    names: list[str],
    records: dict[str, dict],
    ledger: dict,
    coverage: dict,
) -> dict:
    """The contents of dataset.json (no timestamps: equal inputs give equal files).

    Per split: `mix`, `shards_per_epoch` {"0": [names], ...}, `samples_per_epoch`, `samples` (the smallest
    epoch's count: dropped groups can make epochs differ), `clips` (manifest rows), `ledger`, `bytes`.
    """
    splits: dict[str, dict] = {}
    mix_of = dict(zip(manifest.column("split").to_pylist(), manifest.column("mix").to_pylist()))
    for name in names:
        split, epoch, _ = plan.parse_shard_name(name)
        entry = splits.setdefault(split, {"mix": bool(mix_of[split]), "shards_per_epoch": {}, "samples_per_epoch": {}})
        entry["shards_per_epoch"].setdefault(str(epoch), []).append(name)
        per_epoch = entry["samples_per_epoch"]
        per_epoch[str(epoch)] = per_epoch.get(str(epoch), 0) + records[name]["index"].num_rows
    for split, entry in splits.items():
        entry["samples"] = min(entry["samples_per_epoch"].values())
        entry["clips"] = ledger[split]["0"]["manifest"]
        entry["ledger"] = ledger[split]
        entry["bytes"] = sum(records[name]["bytes"] for names_ in entry["shards_per_epoch"].values() for name in names_)
    moments = np.zeros(3)
    mix_splits = {split for split, entry in splits.items() if entry["mix"]} or set(splits)
    for name in names:
        split, epoch, _ = plan.parse_shard_name(name)
        if split in mix_splits and epoch == 0:
            moments += np.asarray(records[name]["feature_moments"], dtype=np.float64)
    total, total_sq, count = moments
    mean = total / count if count else 0.0
    std = float(np.sqrt(max(total_sq / count - mean * mean, 0.0))) if count else 0.0
    return {
        "format": FORMAT_VERSION,
        "name": resolved_config.get("name", ""),
        "fingerprint": fingerprint,
        "fingerprint_inputs": inputs,
        "plan_fingerprint": plan.plan_fingerprint(plan_table),
        "sample_rate": data.audio.sample_rate,
        "mel_bins": data.audio.mel_bins,
        "target_length": data.audio.target_length,
        "frame_shift_ms": data.audio.frame_shift_ms,
        "frame_length_ms": data.audio.frame_length_ms,
        "patch_size": patch_size,
        "time_patches": data.audio.target_length // patch_size,
        "group_size": data.mixing.group_size,
        "r": rows,
        "mixture_epochs": data.mixing.mixture_epochs,
        "materialize_mixtures": data.mixing.materialize_mixtures,
        "domain": data.mixing.domain,
        "waveform_gain": data.mixing.waveform_gain,
        "mix_padding": data.mixing.mix_padding,
        "seed": data.shards.seed,
        "features": feature_parameters(data.audio, patch_size),
        "feature_stats": {
            "mean": mean,
            "std": std,
            "values": int(count),
            "over": "every T x F value of the primary clips of mixture epoch 0 (mix splits), padding included",
        },
        "classes": _class_list(manifest),
        "class_coverage": coverage,
        "splits": dict(sorted(splits.items())),
        "checksums": {name: records[name]["sha256"] for name in names},
        "bytes": sum(records[name]["bytes"] for name in names),
        "plan": plan.plan_metadata(plan_table),
        "config": resolved_config,
    }


def quarantine_summary(quarantine: pa.Table) -> dict[str, dict[str, int]]:
    """Manifest-stage rows per reason, and distinct quarantined clips per reason for the later stages."""
    seen: dict[tuple[str, str], set] = {}
    rows: Counter = Counter()
    for key, split, path, stage, reason in zip(
        *(quarantine.column(name).to_pylist() for name in ("key", "split", "path", "stage", "reason"))
    ):
        rows[(stage, reason)] += 1
        seen.setdefault((stage, reason), set()).add((split, key, path))
    summary: dict[str, dict[str, int]] = {}
    for (stage, reason), count in sorted(rows.items()):
        summary.setdefault(stage, {})[reason] = count if stage == MANIFEST_STAGE else len(seen[(stage, reason)])
    return summary


def class_coverage(manifest: pa.Table, quarantine: pa.Table, max_loss_share: float) -> dict:
    """Clips per class before and after quarantine, per split, and a warning for every class that loses more
    than `max_loss_share` of them.

    "before" counts the split's clips carrying the class: its manifest clips and the clips the manifest stage
    quarantined with their CSV labels (a missing file, an unknown label, ...; not a duplicate_key row, whose
    key is kept or counted by its other row). "after" counts those of the manifest clips that no later stage
    (decode, features) quarantined in any mixture epoch; "lost" the lost clips per quarantine reason. Classes of
    the class list without a clip in any split, before quarantine, are listed under "absent".
    """
    classes = manifest_classes(manifest)
    lookup = {label.display_name: label.index for label in classes} | {label.mid: label.index for label in classes}
    failed: dict[tuple[str, str], str] = {}
    labelled: dict[tuple[str, str], tuple[str, list[int]]] = {}  # manifest-stage losses with known labels
    # quarantine.parquet of an earlier version has no labels column.
    labels_column = quarantine.column("labels").to_pylist() if "labels" in quarantine.column_names else None
    for key, split, stage, reason, labels in zip(
        *(quarantine.column(name).to_pylist() for name in ("key", "split", "stage", "reason")),
        labels_column or [None] * quarantine.num_rows,
    ):
        if stage != MANIFEST_STAGE:
            failed.setdefault((split, key), reason)
        elif labels and split is not None and key is not None and reason != "duplicate_key":
            indices = list(dict.fromkeys(lookup[label] for label in labels if label in lookup))
            labelled.setdefault((split, key), (reason, indices))
    counts: dict[str, dict[int, dict]] = {}

    def count(split: str, indices: list[int], reason: str | None) -> None:
        for index in indices:
            entry = counts.setdefault(split, {}).setdefault(index, {"before": 0, "after": 0, "lost": Counter()})
            entry["before"] += 1
            if reason is None:
                entry["after"] += 1
            else:
                entry["lost"][reason] += 1

    for key, split, indices in zip(*(manifest.column(name).to_pylist() for name in ("key", "split", "label_indices"))):
        count(split, indices, failed.get((split, key)))
    for (split, _), (reason, indices) in labelled.items():
        count(split, indices, reason)
    splits: dict[str, list[dict]] = {}
    warnings: list[str] = []
    for split in sorted(counts):
        rows = splits.setdefault(split, [])
        for index, entry in sorted(counts[split].items()):
            lost = dict(sorted(entry["lost"].items()))
            rows.append({"index": index, "name": classes[index].display_name, "before": entry["before"],
                         "after": entry["after"], "lost": lost})
            share = 1.0 - entry["after"] / entry["before"]
            if share > max_loss_share:
                reasons = ", ".join(f"{reason} {n}" for reason, n in lost.items())
                warnings.append(
                    f"class {classes[index].display_name!r} of split {split!r} lost {entry['before'] - entry['after']} "
                    f"of its {entry['before']} clips ({share:.0%}) to quarantine: {reasons}"
                )
    present = {index for per_split in counts.values() for index in per_split}
    absent = [label.display_name for label in classes if label.index not in present]
    return {"warn_loss_share": max_loss_share, "splits": splits, "warnings": warnings, "absent": absent}


def _named(names: list[str]) -> str:
    return ", ".join(names[:PROBLEMS_NAMED]) + (", ..." if len(names) > PROBLEMS_NAMED else "")


def coverage_lines(coverage: dict, width: int = 14) -> list[str]:
    """Text lines of a `class_coverage` record (the summary and `sslam inspect` print them, their line titles
    `width` wide); at most PROBLEMS_NAMED names or warnings a line kind, the rest are in dataset.json."""
    classes, warning = "classes".ljust(width), "WARNING".ljust(width)
    lines = []
    for split, rows in coverage["splits"].items():
        before, after = sum(row["before"] for row in rows), sum(row["after"] for row in rows)
        emptied = [row["name"] for row in rows if row["after"] == 0]
        lines.append(
            f"{classes}{split}: {len(rows)} classes, {before} -> {after} clips per class (summed) after "
            f"quarantine, {len(emptied)} classes left without clips{': ' + _named(emptied) if emptied else ''}"
        )
        losing = sorted((row for row in rows if row["after"] < row["before"]),
                        key=lambda row: (row["after"] / row["before"], row["index"]))
        if losing:
            lines.append("  most lost: " + _named([f"{row['name']} {row['before']}->{row['after']}" for row in losing]))
    if coverage["absent"]:
        names = coverage["absent"]
        lines.append(f"{classes}{len(names)} classes of the class list have no clip in any split: {_named(names)}")
    share, warnings = coverage["warn_loss_share"], coverage["warnings"]
    lines += [f"{warning}{text} (more than {share:.0%})" for text in warnings[:PROBLEMS_NAMED]]
    if len(warnings) > PROBLEMS_NAMED:
        more = len(warnings) - PROBLEMS_NAMED
        lines.append(f"{warning}... and {more} more classes (dataset.json class_coverage)")
    return lines


def format_summary(summary: dict) -> str:
    """The operator's end-of-run summary, a few lines of text."""
    lines = [
        f"output        {summary['output']}",
        f"fingerprint   {summary['fingerprint']}",
    ]
    if summary.get("nothing_to_do"):
        lines.append("nothing to do: every shard is published with this fingerprint, dataset.json is up to date")
    shards_line = summary["shards"]
    lines += [
        f"shards        {shards_line['total']} ({shards_line['written']} written now, {shards_line['skipped']} kept, "
        f"{shards_line.get('changed_sources', 0)} rebuilt for changed source files)",
        f"clips         {summary['clips']} in the manifest, {summary['primaries']} primaries written "
        f"over all mixture epochs, {summary['fillers']} filler slots",
        f"samples       {summary['samples']} ({summary['bytes'] / 2**20:.1f} MiB)",
        f"throughput    {summary['clips_per_s']:.1f} clips/s decoded "
        f"({summary['clips_decoded']} clips in {summary['task_seconds']:.1f} s, {summary['cpus']:g} CPUs, "
        f"{summary['nodes']} nodes ran tasks)",
    ]
    for stage, reasons in summary["quarantined"].items():
        detail = ", ".join(f"{reason}: {count}" for reason, count in reasons.items())
        lines.append(f"quarantined   {stage}: {detail}")
    for split, epochs in summary["ledger"].items():
        for epoch, counts in epochs.items():
            lines.append(
                f"ledger        {split} e{int(epoch):02d}: {counts['manifest']} = {counts['primaries']} written "
                f"+ {counts['quarantined']} quarantined ({counts['fillers']} fillers)"
            )
    if "class_coverage" in summary:
        lines += coverage_lines(summary["class_coverage"])
    return "\n".join(lines)
