"""The last step of benchmarks/gpu_check.sh: reads what the earlier steps wrote under one folder and prints the
figures of the pre-training launch as one JSON line, then one summary JSON line of every figure and check.

    python -m benchmarks.gpu_check_summary OUT_DIR [--max-data-wait 0.05]

OUT_DIR holds zero_step.jsonl, vit_reference.jsonl, precision_check.jsonl (one JSON line per figure), and
launch/metrics.jsonl + launch/train.log of the 100-update run (jobs.pretrain's per-update trace and its log,
whose `update N ... data_wait_fraction=F` lines cover one log interval each). Checks: the launch exited 0 and
finished every update, its loss fell (mean of the last ten updates below the first ten), the data wait of every
log interval but the first (loader start, CUDA and DeepSpeed warm-up) is at most --max-data-wait, the bf16 loss is
within the precision check's tolerance, and every benchmark wrote its lines. Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

LOG_LINE = re.compile(r"\bupdate (\d+) .*\bclips_per_s=(\S+) .*\bdata_wait_fraction=(\S+)")


def read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip().startswith("{")]


def launch_figures(launch_dir: Path, expected_updates: int, max_data_wait: float) -> dict:
    trace = read_lines(launch_dir / "metrics.jsonl")
    losses = [record["loss"] for record in trace]
    log = (launch_dir / "train.log").read_text(errors="replace") if (launch_dir / "train.log").is_file() else ""
    windows = [{"update": int(u), "clips_per_s": float(c), "data_wait_fraction": float(w)}
               for u, c, w in LOG_LINE.findall(log)]
    steady = windows[1:]
    exit_code = (launch_dir / "exit_code").read_text().strip() if (launch_dir / "exit_code").is_file() else None
    first, last = losses[:10], losses[-10:]
    record = {
        "benchmark": "launch",
        "exit_code": int(exit_code) if exit_code not in (None, "") else None,
        "updates": len(trace),
        "expected_updates": expected_updates,
        "loss_first10_mean": statistics.fmean(first) if first else None,
        "loss_last10_mean": statistics.fmean(last) if last else None,
        "log_windows": windows,
        "max_data_wait_after_first_window": max((w["data_wait_fraction"] for w in steady), default=None),
        "max_data_wait": max_data_wait,
        "steady_clips_per_s": statistics.median([w["clips_per_s"] for w in steady]) if steady else None,
    }
    record["checks"] = {
        "exit_0": record["exit_code"] == 0,
        "all_updates": record["updates"] == expected_updates,
        "loss_falls": bool(first and last and len(losses) >= 20 and record["loss_last10_mean"] < record["loss_first10_mean"]),
        "data_wait": record["max_data_wait_after_first_window"] is not None
        and record["max_data_wait_after_first_window"] <= max_data_wait,
    }
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--updates", type=int, default=100, help="updates the launch was asked for")
    parser.add_argument("--max-data-wait", type=float, default=0.05, help="largest accepted data-wait fraction")
    args = parser.parse_args(argv)

    zero = read_lines(args.out_dir / "zero_step.jsonl")
    reference = read_lines(args.out_dir / "vit_reference.jsonl")
    precision = read_lines(args.out_dir / "precision_check.jsonl")
    launch = launch_figures(args.out_dir / "launch", args.updates, args.max_data_wait)
    print(json.dumps(launch), flush=True)

    plain = {(r["mode"], r["micro_batch"]): r for r in reference}
    side_by_side = []
    for record in zero:
        ref = plain.get((record["mode"], record["micro_batch"]), {})
        side_by_side.append({
            "mode": record["mode"],
            "micro_batch": record["micro_batch"],
            "sslam_clips_per_s": record["clips_per_s"],
            "sslam_mfu": record["mfu"],
            "sslam_peak_memory_gib": round(record["peak_memory_bytes"] / 2**30, 2),
            "vit_clips_per_s": ref.get("clips_per_s"),
            "vit_mfu": ref.get("mfu"),
            "vit_peak_memory_gib": round(ref["peak_memory_bytes"] / 2**30, 2) if ref else None,
        })
    checks = {
        **{f"launch_{name}": ok for name, ok in launch["checks"].items()},
        "zero_step_lines": bool(zero),
        "vit_reference_lines": bool(reference),
        "bf16_within_tolerance": bool(precision) and all(r["ok"] for r in precision),
    }
    summary = {
        "benchmark": "gpu_check",
        "ok": all(checks.values()),
        "checks": checks,
        "step_vs_plain_vit": side_by_side,
        "precision": precision[0] if precision else None,
        "launch": {k: v for k, v in launch.items() if k != "log_windows"},
        "device": (zero or reference or [{}])[0].get("device"),
    }
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
