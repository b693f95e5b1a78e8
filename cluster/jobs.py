"""Submitting a job file to a running Ray cluster through the Ray Jobs API.

    tunefleet submit job.yaml --address http://HEAD:8265

The job runs on the cluster as `python -m cluster.cli train <job> --run-id RUN --address auto`
in a runtime environment that carries the job file and the code:

- source (default): a copy of this checkout (or `--working-dir DIR`), minus caches,
  virtual environments and run directories; Ray also honours its .gitignore;
- wheel (`--wheel`): the checkout built into a wheel that Ray pip-installs on the cluster;
- installed (`--installed`): the cluster's image already has tunefleet; only the job travels.

plus environment variables and extra pip packages. The run directory lands under the
job's `output.storage`, which must be reachable from the cluster (see cluster_job.py).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cluster.cluster_job import ClusterJob, dns_label
from cluster.local_cluster import ClusterError, auth_headers, default_state_file, is_running, read_state

JOB_FILE_NAME = "tunefleet-job.yaml"  # at the root of the job's working directory on the cluster
CodeMode = Literal["source", "wheel", "installed"]
# Never shipped with the code: environments, caches, outputs (Ray also honours .gitignore).
_EXCLUDE = (".git", ".venv", "venv", "__pycache__", "*.egg-info", "runs", "mlruns", "build", "dist",
            ".pytest_cache", ".cache", "node_modules", "*.pyc")
MAX_WORKING_DIR_BYTES = 100 * 2**20  # Ray's upload limit is larger; code should be far below this


@dataclass(frozen=True)
class Submission:
    job_id: str
    run_id: str
    run_dir: str
    address: str


def checkout_root() -> Path | None:
    """The source checkout this tunefleet runs from, if it is one (not an installed wheel)."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "training").is_dir() else None


def connect(address: str | None, state_file: Path | None = None):
    """A JobSubmissionClient for --address, $RAY_ADDRESS, or the cluster `tunefleet cluster up` started."""
    from ray.job_submission import JobSubmissionClient

    local = read_state(state_file or default_state_file())
    local = local if local is not None and is_running(local) else None
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address and local is None:
        raise ClusterError("no cluster address: pass --address http://HEAD:8265, set RAY_ADDRESS, "
                           "or start a local cluster with `tunefleet cluster up`")
    address = address or local.dashboard_url
    # The local head's own token; remote clusters use Ray's RAY_AUTH_MODE / RAY_AUTH_TOKEN as usual.
    headers = auth_headers(local) if local is not None and address.rstrip("/") == local.dashboard_url else None
    from ray.exceptions import AuthenticationError

    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        raise ClusterError(f"the cluster at {address} uses Ray token auth: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                           "(on KubeRay, the auth_token of the Secret named after the cluster)") from None
    except (ConnectionError, RuntimeError) as err:
        raise ClusterError(f"cannot reach the Ray Jobs API at {address}: {str(err).rstrip('.')}. Is the head "
                           "running, and is this its dashboard address (port 8265 by default)?") from None


def runtime_env(job: ClusterJob, staging: Path, code: CodeMode, working_dir: Path | None = None,
                env_vars: dict[str, str] | None = None, pip: list[str] = ()) -> dict[str, Any]:
    """Fill `staging` (the job's working directory) and return the runtime environment."""
    if code == "source":
        source = working_dir or checkout_root()
        if source is None:
            raise ClusterError("tunefleet is installed, not run from a checkout: pass --working-dir DIR "
                               "(a directory holding cluster/, training/, serving/), --wheel, or --installed")
        shutil.copytree(source, staging, ignore=shutil.ignore_patterns(*_EXCLUDE), dirs_exist_ok=True)
        size = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file())
        if size > MAX_WORKING_DIR_BYTES:
            raise ClusterError(f"working directory {source} is {size / 2**20:.0f} MiB without caches and runs; "
                               "keep data out of it (put data on shared storage) or use --wheel")
    else:
        staging.mkdir(parents=True, exist_ok=True)
    (staging / JOB_FILE_NAME).write_text(job.yaml())
    environment: dict[str, Any] = {"working_dir": str(staging)}
    if code == "wheel":
        environment["py_modules"] = [str(build_wheel(working_dir or checkout_root(), staging.parent / "wheel"))]
    if env_vars:
        environment["env_vars"] = dict(env_vars)
    if pip:
        environment["pip"] = list(pip)
    return environment


def build_wheel(source: Path | None, out_dir: Path) -> Path:
    if source is None:
        raise ClusterError("--wheel builds the checkout this tunefleet runs from; none found: pass --working-dir DIR")
    out_dir.mkdir(parents=True, exist_ok=True)
    # Built from a copy: setuptools leaves build/ and *.egg-info beside the sources it builds.
    copy = out_dir / "src"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns(*_EXCLUDE))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out_dir), str(copy)], capture_output=True, text=True)
    shutil.rmtree(copy, ignore_errors=True)
    wheels = sorted(out_dir.glob("*.whl"))
    if built.returncode != 0 or not wheels:
        raise ClusterError(f"building a wheel of {source} failed:\n{built.stderr[-2000:]}")
    return wheels[-1]


def entrypoint(run_id: str) -> str:
    return f"python -m cluster.cli train {JOB_FILE_NAME} --run-id {run_id} --address auto"


def submit(client, job: ClusterJob, run_id: str, code: CodeMode = "source", working_dir: Path | None = None,
           env_vars: dict[str, str] | None = None, pip: list[str] = ()) -> Submission:
    """Submit the job; the staging directory is uploaded by Ray during the call, then removed."""
    staging_root = Path(tempfile.mkdtemp(prefix="tunefleet-submit-"))
    try:
        environment = runtime_env(job, staging_root / "job", code, working_dir, env_vars, pip)
        run_dir = job.run_dir(run_id)
        job_id = client.submit_job(
            entrypoint=entrypoint(run_id),
            runtime_env=environment,
            # Unique per submission: resubmitting a run id (to resume it) is a new Ray job.
            submission_id=f"tunefleet-{dns_label(job.spec.name, 40)}-{dns_label(run_id, 30)}-{secrets.token_hex(3)}",
            metadata={"tunefleet_job": job.spec.name, "run_id": run_id, "run_dir": run_dir},
        )
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    return Submission(job_id=job_id, run_id=run_id, run_dir=run_dir, address=client.get_address())


def follow(client, job_id: str, out=None) -> str:
    """Print the job's logs as they come until it ends; return its final status."""
    out = out or sys.stdout
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    return wait(client, job_id, timeout_s=60)


def wait(client, job_id: str, timeout_s: float) -> str:
    """Poll until the job reaches a terminal status (or the timeout); return the status."""
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    return str(status)


def job_rows(client) -> list[dict[str, Any]]:
    """One row per job, newest first: id, status, tunefleet job name, run directory, start time."""
    rows = []
    for details in client.list_jobs():
        metadata = details.metadata or {}
        rows.append({
            "id": details.submission_id or details.job_id,
            "status": str(details.status),
            "job": metadata.get("tunefleet_job", "-"),
            "run_dir": metadata.get("run_dir", "-"),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((details.start_time or 0) / 1000)),
            "start_time": details.start_time or 0,
        })
    return sorted(rows, key=lambda row: row["start_time"], reverse=True)
