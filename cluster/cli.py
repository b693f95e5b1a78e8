"""The `tunefleet` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cluster.spec import JobSpecError, load_job


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except JobSpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunefleet", description="Fine-tune on Ray Train, serve on Ray Serve, from one job file.")
    commands = parser.add_subparsers(dest="command", required=True)

    def job_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("job", help="job file (YAML)")
        sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                         help="override a job-file value (YAML syntax), e.g. --set train.learning_rate=3e-5")
        return sub

    validate = job_command("validate", "check a job file and its data columns; print every problem at once")
    validate.set_defaults(handler=_validate)

    train = job_command("train", "train, export and report")
    train.add_argument("--run-id", help="run directory name; an existing run with checkpoints resumes (default: a timestamp)")
    train.add_argument("--address", help="Ray cluster address (default: a private local Ray started in-process)")
    train.set_defaults(handler=_train)

    export = commands.add_parser("export", help="re-export a run's best checkpoint to RUN_DIR/export")
    export.add_argument("run_dir")
    export.set_defaults(handler=_export)

    predict = commands.add_parser("predict", help="predict with an export, without a server; prints JSON")
    predict.add_argument("export_dir", help="export directory (or a run directory holding export/)")
    predict.add_argument("inputs", nargs="+", help="texts; 'first ||| second' gives a sentence pair")
    predict.add_argument("--top-k", type=int, default=1)
    predict.set_defaults(handler=_predict)

    serve = commands.add_parser("serve", help="serve exports over HTTP with Ray Serve until SIGINT/SIGTERM")
    serve.add_argument("exports", nargs="+", help="export directories (or run directories)")
    serve.add_argument("--name", action="append", default=None, help="model name per export (default: the job name)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--address", help="Ray cluster address (default: a private local Ray)")
    serve.set_defaults(handler=_serve)

    docs = commands.add_parser("docs", help="print the job-file reference (Markdown), generated from the schema")
    docs.set_defaults(handler=_docs)
    return parser


def _validate(args) -> int:
    from training.data.tables import DataError
    from training.tasks import TASKS

    spec = load_job(args.job, args.overrides)
    try:
        problems = TASKS.get(spec.task).check_data(spec)
    except DataError as err:
        problems = err.problems
    if problems:
        from cluster.spec import Problem

        raise JobSpecError([Problem(path=p, message=m, value=v) for p, m, v in problems], args.job)
    print(f"{args.job}: ok ({spec.task}, method {spec.method.name}, {spec.scale.workers} worker(s))")
    return 0


def _train(args) -> int:
    from cluster.runtime import ray_session
    from training.data.tables import DataError
    from training.run import new_run_id, run_training

    spec = load_job(args.job, args.overrides)
    run_id = args.run_id or new_run_id()
    try:
        with ray_session(args.address):
            result = run_training(spec, run_id)
    except DataError as err:
        from cluster.spec import Problem

        raise JobSpecError([Problem(path=p, message=m, value=v) for p, m, v in err.problems], args.job) from None
    print(json.dumps({"run_dir": str(result.run_dir), "export": str(result.export_dir),
                      "best_checkpoint": result.best_checkpoint.name, "metrics": result.metrics}, indent=2))
    return 0


def _export(args) -> int:
    from training.export import export_checkpoint
    from training.layout import CHECKPOINTS_DIR, EXPORT_DIR, JOB_FILE
    from training.run import best_checkpoint
    from training.tasks import selection_metric

    run_dir = Path(args.run_dir)
    spec = load_job(run_dir / JOB_FILE)
    best = best_checkpoint(run_dir / CHECKPOINTS_DIR, *selection_metric(spec))
    print(export_checkpoint(best, spec, run_dir / EXPORT_DIR, source_run=str(run_dir)))
    return 0


def _predict(args) -> int:
    from serving import predict_local

    inputs = [{"text": t.split("|||")[0].strip(), "text_pair": t.split("|||")[1].strip()} if "|||" in t else t for t in args.inputs]
    print(json.dumps(predict_local(args.export_dir, inputs, top_k=args.top_k), indent=2))
    return 0


def _serve(args) -> int:
    from cluster.runtime import ray_session
    from serving import serve_exports

    with ray_session(args.address):
        serve_exports(args.exports, names=args.name, host=args.host, port=args.port, block=True)
    return 0


def _docs(args) -> int:
    from cluster.docs import job_reference

    print(job_reference())
    return 0


if __name__ == "__main__":
    sys.exit(main())
