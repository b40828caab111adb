"""The `sslam` command line: one subcommand per job, each a thin wrapper over its module.

Only subcommands that work are registered; `sslam --help` lists them.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jobs.config import ConfigError, add_config_arguments, config_from_args


def _make_sample_data(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    from pipeline.synth import make_sample_dataset

    summary = make_sample_dataset(args.out, config.data.synth)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from jobs.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslam", description="SSLAM pre-training pipeline")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sample = commands.add_parser("make-sample-data", help="generate the AudioSet-like sample dataset")
    sample.add_argument("out", help="output folder, e.g. data/sample")
    add_config_arguments(sample, default="sample")
    sample.set_defaults(func=_make_sample_data)

    demo = commands.add_parser("demo", help="run the end-to-end demo on generated data")
    add_config_arguments(demo, default="sample")
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
