"""The `sslam` command line: one subcommand per job, each a thin wrapper over its module.

Only subcommands that work are registered; `sslam --help` lists them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jobs.train.config import ConfigError, add_config_arguments, config_from_args


def _make_sample_data(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    from pipeline.synth import make_sample_dataset

    summary = make_sample_dataset(args.out, config.data.synth)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from pipeline.inspect import inspect_set, render_groups

    try:
        report = inspect_set(args.shards)
        print(report.text)
        if args.png:
            print(f"preview: {render_groups(args.shards, args.png, n_groups=args.groups)}")
    except (FileNotFoundError, ValueError) as error:  # missing or damaged shard sets (ValueError: InspectError, ...)
        print(f"sslam inspect: {error}", file=sys.stderr)
        return 1
    for problem in report.problems:
        print(f"sslam inspect: {problem}", file=sys.stderr)
    return 1 if report.problems else 0


def _pretrain(args: argparse.Namespace) -> int:
    return _launch(args, "pretrain")


def _finetune(args: argparse.Namespace) -> int:
    return _launch(args, "finetune")


def _launch(args: argparse.Namespace, job: str) -> int:
    """Run `jobs/<job>.py` (pretrain, finetune): one rank in this process; several ranks through the `deepspeed`
    launcher on this machine, in a session this process owns (jobs.train.launch). Refused before any launch: a run
    folder in use (exit 2, naming the job holding it) and an op-build lock held too long (jobs.train.op_builds)."""
    import importlib
    import os
    import shutil
    import socket
    import uuid

    import torch

    from jobs.train import op_builds, run_lock

    if args.ranks < 1:
        raise ConfigError(f"--ranks must be at least 1, got {args.ranks}")
    config = config_from_args(args)  # fail fast on a bad config, before starting ranks
    try:
        run_lock.check_free(config.train.output_dir)
        op_builds.clear_stale_locks(op_builds.configure())
    except (run_lock.RunFolderBusy, op_builds.OpBuildLocked) as error:
        print(f"sslam {job}: {error}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    job_args = ["--config", args.config, *[f"--set={o}" for o in args.overrides]] + (["--resume"] if args.resume else [])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    if args.ranks == 1:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(port))
        return importlib.import_module(f"jobs.{job}").main(job_args)
    from jobs.train.launch import Launch

    launch_id = uuid.uuid4().hex
    os.environ[run_lock.LAUNCH_ID_ENV] = launch_id
    launcher = shutil.which("deepspeed") or os.path.join(os.path.dirname(sys.executable), "deepspeed")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{job}.py")
    command = [launcher, "--num_gpus", str(args.ranks), "--master_port", str(port), script, *job_args]
    try:
        return Launch(command, config.train.output_dir, launch_id).run()
    finally:
        _remove_shared_memory_buffers(port)


def _remove_shared_memory_buffers(master_port: int) -> None:
    """DeepSpeed's CPU accelerator maps a ~69 MB all-reduce buffer per rank into /dev/shm, named after the master
    port, and never removes it; once the launch is over they are only leaked RAM."""
    import glob
    import os

    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{master_port}_*"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _delegate(module_name: str):
    """Subcommands whose module owns its argument parser (`main(argv)`)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return importlib.import_module(module_name).main(args.arguments)

    return run


def _demo(args: argparse.Namespace) -> int:
    from jobs.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslam", description="SSLAM pre-training pipeline", allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sample = commands.add_parser("make-sample-data", allow_abbrev=False, help="generate the AudioSet-like sample dataset")
    sample.add_argument("out", help="output folder, e.g. data/sample")
    add_config_arguments(sample, default="sample")
    sample.set_defaults(func=_make_sample_data)

    inspect = commands.add_parser("inspect", allow_abbrev=False, help="summarise a shard set and render a PNG of a few groups")
    inspect.add_argument("shards", help="shard folder or URL (with dataset.json)")
    inspect.add_argument("--png", default="", help="write a preview of a few groups to this PNG")
    inspect.add_argument("--groups", type=int, default=2, help="groups in the preview")
    inspect.set_defaults(func=_inspect)

    pretrain = commands.add_parser("pretrain", allow_abbrev=False, help="pre-train on this machine (stage 1 or 2, from the config)")
    add_config_arguments(pretrain)
    pretrain.add_argument("--ranks", type=int, default=1, help="ranks on this machine (GPUs, or CPU processes)")
    pretrain.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    pretrain.set_defaults(func=_pretrain)

    finetune = commands.add_parser("finetune", allow_abbrev=False,
                                   help="fine-tune an encoder with a classifier head on labelled shards (mAP, registry)")
    add_config_arguments(finetune)
    finetune.add_argument("--ranks", type=int, default=1, help="ranks on this machine (GPUs, or CPU processes)")
    finetune.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    finetune.set_defaults(func=_finetune)

    for name, module, summary in [
        ("preprocess", "jobs.preprocess", "audio -> WebDataset shards with mixtures (Ray)"),
        ("register", "jobs.register", "register checkpoints (pending ones, one, or an official EAT/SSLAM file)"),
        ("evaluate", "jobs.evaluate", "linear-probe a registered model on evaluation shards (mAP vs label prior)"),
        ("export", "jobs.export", "export an encoder (registry URI, run, checkpoint, official .pt) as a plain folder"),
        ("infer", "jobs.infer", "embed (or tag) audio files, window by window, with a registered or exported model"),
    ]:
        delegated = commands.add_parser(name, help=summary, add_help=False, prefix_chars="\0")
        delegated.add_argument("arguments", nargs=argparse.REMAINDER)
        delegated.set_defaults(func=_delegate(module))

    demo = commands.add_parser("demo", allow_abbrev=False, help="run the end-to-end demo on generated data")
    add_config_arguments(demo, default="sample")
    demo.add_argument("--ranks", type=int, default=2, help="DeepSpeed ranks for the pre-training steps")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"sslam {args.command}: config error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
