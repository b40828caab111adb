"""The preprocessing job: `python -m jobs.preprocess --config C [--set k=v] [--address A]` (pipeline.preprocess).

On a cluster: `ray job submit --working-dir . -- python -m jobs.preprocess --config C` (Ray sets RAY_ADDRESS
for the job's driver; paths in the config must then be absolute or URLs). With neither RAY_ADDRESS nor
`--address` it starts a new local Ray (`ray.init(address="local")`; `--address auto` attaches to one that
`ray start` runs on this machine). Exit codes: 0 done (also when there was nothing to do),
1 shards failed or the ledger does not hold, 2 config or input error (also: the output holds the shard set
of another plan and `--overwrite` was not given), 3 another run holds the output's lock.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import ray

from jobs.train.config import Config, ConfigError, add_config_arguments, config_from_args, to_dict
from pipeline.locking import OutputLockedError
from pipeline.ledger import format_summary
from pipeline.preprocess import check_config, run_pipeline
from pipeline.preprocess_errors import LedgerError, PreprocessConfigError, PreprocessError

logger = logging.getLogger("sslam.preprocess")


LOCKED_EXIT_CODE = 3


def run_preprocess(
    config: Config, *, progress: bool = True, max_in_flight: int | None = None, overwrite: bool = False
) -> dict:
    """Preprocess `config.data` into shards on the connected Ray cluster (local ray.init() when none)."""
    return run_pipeline(
        config.data,
        config.model.patch_size,
        to_dict(config),
        progress=progress,
        max_in_flight=max_in_flight,
        overwrite=overwrite,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The job's options besides `--config` / `--set` (see jobs.train.config.add_config_arguments)."""
    parser.add_argument(
        "--address", default=None, help="Ray cluster address, 'auto' for a cluster started on this machine "
        "(default: RAY_ADDRESS, else a new local Ray)"
    )
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (ignored with an address)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--summary-json", default=None, metavar="PATH", help="also write the summary as JSON here")
    parser.add_argument(
        "--overwrite", action="store_true", help="remove the shard set the output holds (any plan) and build this one"
    )


def _connect(args: argparse.Namespace) -> bool:
    """Connect to (or start) Ray; True when this call did it (and must shut it down)."""
    if ray.is_initialized():
        return False
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # "local": always a fresh instance; never attach to whatever `ray start` left on this machine.
        ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False)
    return True


def run_from_args(args: argparse.Namespace) -> int:
    """Run the job from parsed arguments (`sslam preprocess` and `python -m jobs.preprocess`); an exit code."""
    try:
        config = config_from_args(args)
        check_config(config.data, config.model.patch_size)
    except (ConfigError, PreprocessConfigError) as error:
        print(f"preprocess: config error: {error}", file=sys.stderr)
        return 2
    started_ray = _connect(args)
    try:
        summary = run_preprocess(config, progress=not args.no_progress, overwrite=args.overwrite)
    except OutputLockedError as error:
        print(f"preprocess: {error}", file=sys.stderr)
        return LOCKED_EXIT_CODE
    except PreprocessConfigError as error:
        print(f"preprocess: config error: {error}", file=sys.stderr)
        return 2
    except LedgerError as error:
        print(f"preprocess: {error}", file=sys.stderr)
        return 1
    except PreprocessError as error:
        print(f"preprocess: {error}", file=sys.stderr)
        return 1
    finally:
        if started_ray:
            ray.shutdown()
    print(format_summary(summary), flush=True)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sslam preprocess", description=__doc__.splitlines()[0], allow_abbrev=False)
    add_config_arguments(parser, default="sample")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
