"""`tunefleet validate | train | export`: the job file's lifecycle."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor

from cluster.errors import JobSpecError, Problem


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
    export.add_argument("--merge", action="store_true",
                        help="fold a LoRA or IA3 adapter into its base: a plain model that pipeline() loads without peft")
    export.set_defaults(handler=_export)


def _data_problems(err, source: str) -> JobSpecError:
    return JobSpecError([Problem(path=p, message=m, value=v) for p, m, v in err.problems], source)


def _validate(args) -> int:
    from cluster.spec import load_job

    spec = load_job(args.job, args.overrides)
    print(f"{args.job}: ok ({spec.task}, method {spec.method.name}, {spec.scale.workers} worker(s))")
    return 0


def _storage(uri: str, source: str):
    from cluster.storage import StorageError, check_writable, resolve_storage

    try:
        storage = resolve_storage(uri)
        check_writable(storage)
    except StorageError as err:
        raise JobSpecError([Problem(path="output.storage", message=str(err).removeprefix("output.storage: "), value=uri)],
                           source) from None
    return storage


def _train(args) -> int:
    from cluster.runtime import ray_session

    # Ray starts here (ray.init belongs on the main thread) while a thread imports the job spec, reads
    # and validates the job, and begins tokenizing: each takes seconds, and one after the other they
    # were most of the wait for the first step. A job with problems still stops before any worker
    # starts, with the same message; the Ray started for it stops with it.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunefleet-job") as pool:
        begun = pool.submit(_begin, args)
        with ray_session(args.address):
            spec, run_id, storage, start = begun.result()
            result = _run(args, spec, run_id, storage, start)
    print(json.dumps({"run_dir": result.run_dir, "export": result.export_dir,
                      "best_checkpoint": result.best_checkpoint, "metrics": result.metrics}, indent=2))
    return _register(spec, result.export_dir)


def _begin(args):
    """The job validated, its run directory written, tokenizing and the tracker begun (training.run)."""
    from cluster.spec import load_job
    from training.run import begin_run, new_run_id

    spec = load_job(args.job, args.overrides)
    storage = _storage(spec.output.storage, args.job)
    run_id = args.run_id or new_run_id()
    if args.run_id:
        _refuse_a_changed_resume(spec, storage, run_id, args.job)
    return spec, run_id, storage, begin_run(spec, run_id, storage)


# What a run's checkpoints are made of: a resume with one of these changed cannot load them (it failed in
# the workers, after the cluster's start, with a traceback). Steps, learning rate, workers may change, and
# so may `model`: the same weights may sit at another path on another cluster.
_FIXED_ON_RESUME = {"task": lambda v: v, "method": lambda v: v.get("name")}


def _refuse_a_changed_resume(spec, storage, run_id: str, source: str) -> None:
    import yaml

    from training.checkpoint import complete_checkpoints
    from training.layout import CHECKPOINTS_DIR, JOB_FILE

    run = storage.child(spec.name, run_id)
    if not run.exists(JOB_FILE) or not complete_checkpoints(run.child(CHECKPOINTS_DIR)):
        return
    saved, now = yaml.safe_load(run.read_text(JOB_FILE)) or {}, spec.dump()
    problems = []
    for key, brief in _FIXED_ON_RESUME.items():
        if key in saved and saved[key] != now[key]:
            before, after = brief(saved[key]), brief(now[key])
            said = f"{before!r}" if before != after else f"{before!r} with other options"
            problems.append(Problem(path=key, value=after if before != after else None, message=(
                f"run {run_id} has checkpoints of {key} {said}, and a run resumes with what it began with: "
                f"restore {key}, or train a new run (another --run-id)")))
    if problems:
        raise JobSpecError(problems, source)


def _run(args, spec, run_id: str, storage, start):
    from training.data.tables import DataError
    from training.run import run_training
    from training.tracking import TrackingError

    try:
        return run_training(spec, run_id, storage, start)
    except DataError as err:
        raise _data_problems(err, args.job) from None
    except TrackingError as err:  # raised before any worker starts
        raise JobSpecError([Problem(path="output.tracking", message=str(err))], args.job) from None


def _register(spec, export_dir: str) -> int:
    """The job's `serve.register_with`: the new export joins a running endpoint (serve add)."""
    if not spec.serve.register_with:
        return 0
    import os

    from serving.client import RegistrationError, register_export

    token = os.environ.get(spec.serve.register_token_env) if spec.serve.register_token_env else None
    try:
        answer = register_export(spec.serve.register_with, export_dir, None, token)
    except RegistrationError as err:
        print(f"error: trained and exported to {export_dir}, but serve.register_with failed: {err}; "
              f"retry with `tunefleet serve add {export_dir} --endpoint {spec.serve.register_with}`", file=sys.stderr)
        return 1
    print(f"registered with {spec.serve.register_with}: {json.dumps(answer)}")
    return 0


def _export(args) -> int:
    """RUN_DIR: a local run directory or its storage URI (s3://bucket/prefix/<job>/<run id>)."""
    import yaml

    from cluster.spec import validate_job
    from cluster.storage import StorageError, resolve_storage
    from training.checkpoint import IncompleteCheckpointError
    from training.layout import JOB_FILE
    from training.run import export_run

    try:
        run = resolve_storage(args.run_dir)
        if not run.exists(JOB_FILE):
            raise StorageError(f"{run.uri}: no {JOB_FILE}; pass a run directory (<storage>/<job name>/<run id>)")
        data = yaml.safe_load(run.read_text(JOB_FILE))
    except (StorageError, OSError) as err:
        raise JobSpecError([Problem(path="run_dir", message=str(err), value=args.run_dir)], "export") from None
    spec = validate_job(data, source=f"{run.uri}/{JOB_FILE}", check_data=False)
    try:
        print(export_run(run, spec, merge=args.merge).uri)
    except ValueError as err:  # --merge for a method that has nothing to fold in (prompt tuning, full)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except IncompleteCheckpointError as err:  # a run stopped before its first checkpoint
        print(f"error: {err}; train the run first (`tunefleet train JOB --run-id {run.name}` resumes it)",
              file=sys.stderr)
        return 2
    return 0
