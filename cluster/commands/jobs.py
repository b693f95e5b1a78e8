"""`tunefleet submit | jobs | cluster`: running job files on a Ray cluster."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cluster.local_cluster import ClusterError

_TERMINAL_EXIT = {"SUCCEEDED": 0, "STOPPED": 3}


def register(commands) -> None:
    submit = commands.add_parser("submit", help="submit a job file to a Ray cluster (Ray Jobs API) and follow its logs")
    submit.add_argument("job", help="job file (YAML)")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a job-file value (YAML syntax)")
    submit.add_argument("--address", help="the head's dashboard, http://HEAD:8265 (default: $RAY_ADDRESS, "
                                          "else the cluster `tunefleet cluster up` started)")
    submit.add_argument("--run-id", help="run directory name; an existing run resumes (default: a timestamp)")
    code = submit.add_mutually_exclusive_group()
    code.add_argument("--working-dir", type=Path, help="directory shipped as the code (default: this checkout)")
    code.add_argument("--wheel", action="store_true", help="ship the checkout as a wheel Ray pip-installs on the cluster")
    code.add_argument("--installed", action="store_true", help="the cluster's image has tunefleet; ship only the job")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job")
    submit.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT", help="extra pip package for the job")
    submit.add_argument("--cluster-paths", action="store_true",
                        help="data/model/storage paths exist on the cluster only: do not require them here")
    submit.add_argument("--no-follow", action="store_true", help="print the job id and return")
    submit.set_defaults(handler=_submit)

    jobs = commands.add_parser("jobs", help="list, inspect, follow and stop jobs on a Ray cluster")
    address = argparse.ArgumentParser(add_help=False)
    address.add_argument("--address", help="the head's dashboard (as for submit)")
    actions = jobs.add_subparsers(dest="action", required=True)
    actions.add_parser("list", help="every job, newest first", parents=[address]).set_defaults(handler=_list)
    for name, handler, text in (("status", _status, "a job's status and run directory"),
                                ("logs", _logs, "a job's logs"), ("stop", _stop, "stop a running job")):
        action = actions.add_parser(name, help=text, parents=[address])
        action.add_argument("job_id")
        action.set_defaults(handler=handler)
        if name == "logs":
            action.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
        if name == "stop":
            action.add_argument("--no-wait", action="store_true", help="return without waiting for it to stop")

    cluster = commands.add_parser("cluster", help="start or stop a private local Ray head (to try submission)")
    steps = cluster.add_subparsers(dest="action", required=True)
    up = steps.add_parser("up", help="start a head on 127.0.0.1 with its own temp dir and free ports")
    up.add_argument("--num-cpus", type=int, help="CPUs the head offers (default: all)")
    up.add_argument("--num-gpus", type=int, help="GPUs the head offers (default: detected)")
    up.set_defaults(handler=_up)
    steps.add_parser("down", help="stop the head `cluster up` started (by PID; never `ray stop`)").set_defaults(handler=_down)
    steps.add_parser("status", help="where the local head listens, if it runs").set_defaults(handler=_cluster_status)


def _handle(function):
    """Cluster problems are one line on stderr and exit 1, like job-file problems."""
    def wrapped(args) -> int:
        try:
            return function(args)
        except ClusterError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
    return wrapped


@_handle
def _submit(args) -> int:
    from cluster.cluster_job import prepare_cluster_job
    from cluster.jobs import connect, follow, submit
    from training.run import new_run_id

    env_vars = dict(_key_value(item, "--env") for item in args.env)
    job = prepare_cluster_job(args.job, args.overrides, cluster_paths=args.cluster_paths)
    for note in job.notes:
        print(f"note: {note}", file=sys.stderr)
    client = connect(args.address)
    storage = job.spec.output.storage
    if "://" not in storage and not _is_loopback(client.get_address()):
        print(f"note: output.storage {storage} is a local path: every node of the cluster must see it at that path "
              "(a shared volume); otherwise use s3:// or gs://", file=sys.stderr)
    code = "wheel" if args.wheel else "installed" if args.installed else "source"
    result = submit(client, job, args.run_id or new_run_id(), code, args.working_dir, env_vars, args.pip)
    print(f"submitted {result.job_id} to {result.address}\nrun directory: {result.run_dir}", file=sys.stderr)
    print(result.job_id, flush=True)
    if args.no_follow:
        return 0
    try:
        status = follow(client, result.job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. Stop it with `tunefleet jobs stop {result.job_id}`",
              file=sys.stderr)
        return 130
    print(f"job {result.job_id}: {status}", file=sys.stderr)
    return _TERMINAL_EXIT.get(status, 1)


@_handle
def _list(args) -> int:
    from cluster.jobs import connect, job_rows

    rows = job_rows(connect(args.address))
    print(f"{'ID':<48} {'STATUS':<10} {'STARTED':<19} {'JOB':<20} RUN DIRECTORY")
    for row in rows:
        print(f"{row['id']:<48} {row['status']:<10} {row['started']:<19} {row['job']:<20} {row['run_dir']}")
    return 0


@_handle
def _status(args) -> int:
    from cluster.jobs import connect

    info = _job_info(connect(args.address), args.job_id)
    print(json.dumps({"id": args.job_id, "status": str(info.status), "message": info.message,
                      "entrypoint": info.entrypoint, **(info.metadata or {})}, indent=2))
    return 0


@_handle
def _logs(args) -> int:
    from cluster.jobs import connect, follow

    client = connect(args.address)
    _job_info(client, args.job_id)
    if args.follow:
        follow(client, args.job_id)
    else:
        sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


@_handle
def _stop(args) -> int:
    from cluster.jobs import connect, wait

    client = connect(args.address)
    _job_info(client, args.job_id)
    if not client.stop_job(args.job_id):
        print(f"{args.job_id}: not running ({client.get_job_status(args.job_id)})")
        return 0
    status = "STOPPING" if args.no_wait else wait(client, args.job_id, timeout_s=60)
    print(f"{args.job_id}: {status}")
    return 0


@_handle
def _up(args) -> int:
    from cluster.local_cluster import cluster_up, default_state_file

    state = default_state_file()
    cluster = cluster_up(state, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    print(f"local Ray head up: Jobs API {cluster.dashboard_url}, GCS {cluster.gcs_address}\n"
          f"  submit with: tunefleet submit JOB.yaml        (this head is the default)\n"
          f"  stop with:   tunefleet cluster down           (state: {state})")
    return 0


@_handle
def _down(args) -> int:
    from cluster.local_cluster import cluster_down, default_state_file

    cluster = cluster_down(default_state_file())
    print("no local cluster recorded" if cluster is None else f"stopped the local head at {cluster.dashboard_url}")
    return 0


@_handle
def _cluster_status(args) -> int:
    from cluster.local_cluster import default_state_file, is_running, read_state

    cluster = read_state(default_state_file())
    if cluster is None or not is_running(cluster):
        print("no local cluster running")
        return 1
    print(json.dumps({"dashboard_url": cluster.dashboard_url, "gcs_address": cluster.gcs_address,
                      "temp_dir": cluster.temp_dir}, indent=2))
    return 0


def _job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError:
        raise ClusterError(f"no job {job_id!r} on this cluster; `tunefleet jobs list` shows the jobs") from None


def _is_loopback(address: str) -> bool:
    from urllib.parse import urlsplit

    return (urlsplit(address).hostname or "") in ("127.0.0.1", "localhost", "::1")


def _key_value(item: str, flag: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ClusterError(f"{flag} {item!r}: expected KEY=VALUE")
    return key, value
