"""`sslam register`: register encoders in the MLflow registry from the command line (jobs.mlops.registry).

`sslam register RUN_DIR` retries a run's pending registrations; `--checkpoint TAG_DIR` exports and registers one
checkpoint folder now; `--official FILE --name NAME [--class-labels CSV]` registers an official EAT / SSLAM
checkpoint. Exit status 1 when something could not be registered (pending ones stay on disk).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mlflow.exceptions import MlflowException

from jobs.mlops.registration import pending_folders, registrations_dir
from jobs.mlops.registry import register_checkpoint, register_official, register_pending
from model.checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> int:
    """`sslam register RUN_DIR` | `--checkpoint TAG_DIR` | `--official FILE --name NAME [--class-labels CSV]`."""
    parser = argparse.ArgumentParser(prog="sslam register", description="register encoders in the MLflow registry")
    parser.add_argument("run_dir", nargs="?", help="a training output folder: register its pending registrations")
    parser.add_argument("--checkpoint", help="a checkpoint folder (…/checkpoints/update_XXXXXXXX) to register now")
    parser.add_argument("--official", help="an official EAT / SSLAM checkpoint file (.pt) to register")
    parser.add_argument("--name", help="registered model name (--official; default: the checkpoint's config)")
    parser.add_argument("--class-labels", help="class_labels_indices.csv naming a fine-tuned head's classes")
    parser.add_argument("--experiment", default="sslam", help="experiment of the logged model (--official)")
    parser.add_argument(
        "--alias", dest="aliases", action="append", default=None, metavar="ALIAS",
        help="alias to move to the new version (repeatable; --checkpoint: default its run's tracking.aliases, "
        "--official: default none); 'latest' and 'best' are refused",
    )
    parser.add_argument(
        "--trusted", action="store_true",
        help="you vouch for the input: unpickle an official file without the allow-list; read a checkpoint without "
        "student.safetensors through DeepSpeed's pickles; complete RUN_DIR's pending folders without their signed "
        "export record",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if sum(x is not None for x in (args.run_dir, args.checkpoint, args.official)) != 1:
        parser.error("give exactly one of RUN_DIR, --checkpoint and --official")
    if args.official and not args.name:
        parser.error("--official needs --name")
    if args.run_dir and args.aliases is not None:
        parser.error("--alias goes with --checkpoint or --official (a pending registration keeps its own aliases)")
    try:
        if args.official:
            version = register_official(args.official, args.name, class_labels_csv=args.class_labels,
                                        experiment=args.experiment, trusted=args.trusted, aliases=args.aliases)
        elif args.checkpoint:
            version = register_checkpoint(args.checkpoint, model_name=args.name, trusted=args.trusted,
                                          aliases=args.aliases)
        else:
            version = None
    except (CheckpointError, FileNotFoundError, MlflowException, ValueError) as error:  # RegistrationRefused too
        print(f"sslam register: {error}", file=sys.stderr)
        return 1
    if version is not None:
        print(f"registered {version.name} version {version.version}")
        return 0
    if not Path(args.run_dir).is_dir():
        parser.error(f"no run folder {args.run_dir}")
    versions = register_pending(args.run_dir, trusted=args.trusted)
    for version in versions:
        print(f"registered {version.name} version {version.version} (update {version.tags.get('update')})")
    left = pending_folders(args.run_dir)
    if left:
        print(f"{len(left)} registrations are still pending under {registrations_dir(args.run_dir)}", file=sys.stderr)
        return 1
    return 0
