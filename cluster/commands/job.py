"""`tunefleet validate | train | export`: the job file's lifecycle."""

from __future__ import annotations

import json
from pathlib import Path

from cluster.spec import JobSpecError, Problem, load_job


def add_job_arguments(sub) -> None:
    sub.add_argument("job", help="job file (YAML)")
    sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                     help="override a job-file value (YAML syntax), e.g. --set train.learning_rate=3e-5")


def register(commands) -> None:
    validate = commands.add_parser("validate", help="check a job file and its data columns; print every problem at once")
    add_job_arguments(validate)
    validate.set_defaults(handler=_validate)

    train = commands.add_parser("train", help="train, export and report")
    add_job_arguments(train)
    train.add_argument("--run-id", help="run directory name; an existing run with checkpoints resumes (default: a timestamp)")
    train.add_argument("--address", help="Ray cluster address (default: a private local Ray started in-process)")
    train.set_defaults(handler=_train)

    export = commands.add_parser("export", help="re-export a run's best checkpoint to RUN_DIR/export")
    export.add_argument("run_dir")
    export.set_defaults(handler=_export)


def _data_problems(err, source: str) -> JobSpecError:
    return JobSpecError([Problem(path=p, message=m, value=v) for p, m, v in err.problems], source)


def _validate(args) -> int:
    spec = load_job(args.job, args.overrides)
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
        raise _data_problems(err, args.job) from None
    print(json.dumps({"run_dir": str(result.run_dir), "export": str(result.export_dir),
                      "best_checkpoint": result.best_checkpoint.name, "metrics": result.metrics}, indent=2))
    return 0


def _export(args) -> int:
    from training.export import export_checkpoint
    from training.layout import CHECKPOINTS_DIR, EXPORT_DIR, JOB_FILE
    from training.run import best_checkpoint
    from training.tasks import selection_metric

    run_dir = Path(args.run_dir)
    spec = load_job(run_dir / JOB_FILE, check_data=False)
    best = best_checkpoint(run_dir / CHECKPOINTS_DIR, *selection_metric(spec))
    print(export_checkpoint(best, spec, run_dir / EXPORT_DIR, source_run=str(run_dir)))
    return 0
