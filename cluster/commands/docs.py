"""`tunefleet docs`: the job-file reference, generated from the schema."""

from __future__ import annotations

import sys


def register(commands) -> None:
    docs = commands.add_parser("docs", help="print the job-file reference (Markdown), generated from the schema")
    docs.set_defaults(handler=_docs)


def _docs(args) -> int:
    from cluster.docs import job_reference

    # Written as is (it ends in a newline), so `tunefleet docs > docs/job-reference.md` is byte-exact.
    sys.stdout.write(job_reference())
    return 0
