"""`tunefleet docs`: the job-file reference, generated from the schema."""

from __future__ import annotations


def register(commands) -> None:
    docs = commands.add_parser("docs", help="print the job-file reference (Markdown), generated from the schema")
    docs.set_defaults(handler=_docs)


def _docs(args) -> int:
    from cluster.docs import job_reference

    print(job_reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
