"""The `tunefleet` command. Each command group lives in its own module under cluster/commands."""

from __future__ import annotations

import argparse
import os
import sys

# Quiet library progress bars on the command line; tunefleet prints its own progress.
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

from cluster.commands import docs, job, jobs, k8s, model
from cluster.errors import JobSpecError  # light: the job spec loads only for the commands that read one

COMMAND_GROUPS = [job, model, jobs, k8s, docs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tunefleet", description="Fine-tune on Ray Train, serve on Ray Serve, from one job file.")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(commands)
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except JobSpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
