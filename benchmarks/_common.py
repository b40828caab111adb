"""The measuring harness the step benchmarks share (train_step, zero_step, vit_reference, precision_check): the
config and sweep arguments, the config and the device, the timing loop with device synchronisation, the peak
memory and the peak FLOP/s that MFU is taken against."""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from typing import Any

import torch

from jobs.train.config import Config, load_config

# Dense bf16 tensor-core peaks (vendor datasheets), matched on the CUDA device name.
PEAK_BF16_FLOPS = (("H200", 989.4e12), ("H100 PCIe", 756.0e12), ("H100", 989.4e12), ("A100", 312.0e12))


def add_config_arguments(
    parser: argparse.ArgumentParser, config_help: str = "job config name or YAML path (default base_stage2)"
) -> None:
    """--config, --tiny and --set: which job config the benchmark loads (load it with `load_benchmark_config`)."""
    parser.add_argument("--config", default="base_stage2", help=config_help)
    parser.add_argument("--tiny", action="store_true", help="use tiny_stage2 (CPU-sized) instead of --config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override a.b=value")


def load_benchmark_config(args: argparse.Namespace, *overrides: str) -> tuple[str, Config]:
    """The config --tiny or --config names, with the --set overrides and then `overrides`; returns its name too."""
    name = "tiny_stage2" if args.tiny else args.config
    return name, load_config(name, [*args.overrides, *overrides])


MODES = ("eager", "compiled")


def int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def mode_list(text: str) -> list[str]:
    modes = [part.strip() for part in text.split(",") if part.strip()]
    if not modes or set(modes) - set(MODES):
        raise argparse.ArgumentTypeError(f"modes are {', '.join(MODES)} (comma-separated), got {text!r}")
    return modes


def add_sweep_arguments(parser: argparse.ArgumentParser, micro_batches_help: str, warmup_help: str) -> None:
    """--micro-batches, --modes, --steps, --warmup and --peak-tflops of a benchmark that prints one line per
    (mode, micro-batch)."""
    parser.add_argument("--micro-batches", type=int_list, default=[12, 24, 48], help=micro_batches_help)
    parser.add_argument("--modes", type=mode_list, default=list(MODES), help="eager,compiled (default both)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per line")
    parser.add_argument("--warmup", type=int, default=3, help=warmup_help)
    parser.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s for MFU (default: by GPU name)")


def default_device() -> torch.device:
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    step: Callable[[Any], Any], inputs: Any, steps: int, warmup: int, device: torch.device
) -> tuple[list[float], Any, float]:
    """Run `warmup` untimed steps, reset the CUDA peak memory, then time `steps` steps one by one.
    Returns the seconds of each timed step, the last timed step's result (None without timed steps) and the
    seconds the warm-up took."""
    warmup_start = time.perf_counter()
    for _ in range(warmup):
        step(inputs)
    synchronize(device)
    warmup_seconds = time.perf_counter() - warmup_start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, result = [], None
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        result = step(inputs)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return times, result, warmup_seconds


def peak_memory(device: torch.device) -> tuple[int, str, str]:
    """(peak bytes, what kind of peak, device name): the CUDA allocator's peak on a GPU, the process's max RSS
    on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated", torch.cuda.get_device_name(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return rss, "process_max_rss", f"cpu ({torch.get_num_threads()} threads)"
