"""`tunefleet cluster up | down`: a private Ray head on this machine, for trying job submission.

The head gets its own temp directory and free ports, binds its dashboard (the Jobs
API) to 127.0.0.1, and its processes are recorded in a state file. `down` stops
exactly those processes (and their descendants: workers, job drivers) by PID.
It never runs `ray stop`, which ends every Ray on the machine, other users' too.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import psutil

STATE_ENV = "TUNEFLEET_CLUSTER_STATE"


def default_state_file() -> Path:
    """One local cluster per user by default; TUNEFLEET_CLUSTER_STATE picks another file."""
    if os.environ.get(STATE_ENV):
        return Path(os.environ[STATE_ENV])
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "tunefleet" / "cluster.json"


@dataclass(frozen=True)
class LocalCluster:
    dashboard_url: str  # the Jobs API address: `tunefleet submit --address` takes it
    gcs_address: str  # for `ray.init(address=...)` / `tunefleet train --address`
    temp_dir: str
    token_file: str  # the head's own token (Ray token auth): only its holder may submit jobs
    pgid: int
    processes: list[tuple[int, float]] = field(default_factory=list)  # (pid, create_time): PIDs are reused


class ClusterError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_state(state_file: Path) -> LocalCluster | None:
    if not state_file.is_file():
        return None
    data = json.loads(state_file.read_text())
    return LocalCluster(**{**data, "processes": [tuple(p) for p in data["processes"]]})


def is_running(cluster: LocalCluster) -> bool:
    return any(_alive(pid, created) for pid, created in cluster.processes)


def cluster_up(state_file: Path, num_cpus: int | None = None, num_gpus: int | None = None,
               timeout_s: float = 180, attempts: int = 2) -> LocalCluster:
    """Start a head node and wait until its Jobs API answers; nothing is left running if it cannot."""
    existing = read_state(state_file)
    if existing is not None and is_running(existing):
        raise ClusterError(f"a local cluster is already running at {existing.dashboard_url} "
                           f"(state {state_file}); stop it first with `tunefleet cluster down`")
    if existing is not None:  # a head that died without `down`: clear its leftovers
        cluster_down(state_file)
    for attempt in range(1, attempts + 1):
        try:
            return _start_head(state_file, num_cpus, num_gpus, timeout_s)
        except ClusterError:
            cluster_down(state_file)
            # A free port can be taken between choosing it and Ray binding it: try again with new ones.
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def _start_head(state_file: Path, num_cpus: int | None, num_gpus: int | None, timeout_s: float) -> LocalCluster:
    # Short path: Ray's unix sockets live under the temp dir and their path length is limited.
    temp_dir = tempfile.mkdtemp(prefix="tfclu-", dir="/tmp")
    token_file = Path(temp_dir) / "auth_token"
    token_file.touch(mode=0o600)
    token_file.write_text(secrets.token_hex(32))
    port, dashboard_port = free_port(), free_port()
    ports = {"--port": port, "--dashboard-port": dashboard_port, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--node-manager-port": free_port(), "--object-manager-port": free_port()}
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--temp-dir", temp_dir,
               "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1", "--include-dashboard", "true",
               "--disable-usage-stats", *[str(x) for pair in ports.items() for x in pair]]
    if num_cpus is not None:
        command += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        command += ["--num-gpus", str(num_gpus)]
    # Its own session: every daemon `ray start` spawns inherits this process group.
    starter = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env=_head_env(token_file))
    cluster = LocalCluster(dashboard_url=f"http://127.0.0.1:{dashboard_port}", gcs_address=f"127.0.0.1:{port}",
                           temp_dir=temp_dir, token_file=str(token_file), pgid=starter.pid)
    _record(state_file, cluster)  # recorded first: whatever happens next, `down` can stop it
    try:
        output, _ = starter.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise ClusterError(f"`ray start` did not finish within {timeout_s:.0f} s") from None
    cluster = replace(cluster, processes=[(p.pid, p.create_time()) for p in _group_members(starter.pid)])
    _record(state_file, cluster)
    if starter.returncode != 0:
        raise ClusterError(f"`ray start` failed (exit {starter.returncode}):\n{output[-3000:]}")
    _wait_for_jobs_api(cluster, timeout_s)
    return cluster


def _record(state_file: Path, cluster: LocalCluster) -> None:
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(asdict(cluster), indent=2) + "\n")


def cluster_down(state_file: Path, timeout_s: float = 10) -> LocalCluster | None:
    """Stop the recorded head's processes and their descendants; remove its temp dir and state."""
    cluster = read_state(state_file)
    if cluster is None:
        return None
    _stop_group(cluster.pgid, cluster.processes, timeout_s)
    shutil.rmtree(cluster.temp_dir, ignore_errors=True)
    state_file.unlink(missing_ok=True)
    return cluster


def auth_headers(cluster: LocalCluster) -> dict[str, str]:
    return {"Authorization": f"Bearer {Path(cluster.token_file).read_text().strip()}"}


def _head_env(token_file: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_"))}
    # Token auth with this head's own token (not the user-wide ~/.ray/auth_token): the dashboard
    # answers 401 without it, and job drivers started by the head inherit it to connect back.
    # Job entrypoints run `python ...`: this environment's interpreter comes first on PATH.
    path = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, "PATH": path, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_file)}


def _alive(pid: int, created: float) -> psutil.Process | None:
    try:
        process = psutil.Process(pid)
        return process if abs(process.create_time() - created) < 0.01 and process.is_running() else None
    except psutil.Error:
        return None


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid:
                members.append(process)
        except (ProcessLookupError, psutil.Error, PermissionError):
            continue
    return members


def _stop_group(pgid: int, recorded: list[tuple[int, float]], timeout_s: float = 30) -> None:
    """SIGTERM the recorded processes, their descendants and the head's process group; SIGKILL stragglers."""
    targets: dict[int, psutil.Process] = {}
    roots = [p for p in (_alive(pid, created) for pid, created in recorded) if p is not None]
    # The group id is ours only while one of our processes lives in it (ids are reused afterwards);
    # with nothing recorded yet, `ray start` itself just started it.
    members = _group_members(pgid) if roots or not recorded else []
    for process in [*roots, *members]:
        try:
            for member in [process, *process.children(recursive=True)]:
                targets[member.pid] = member
        except psutil.Error:
            continue
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in targets.values():
            try:
                process.send_signal(sig)
            except psutil.Error:
                pass
        _, targets_left = psutil.wait_procs(list(targets.values()), timeout=timeout_s if sig == signal.SIGTERM else 5)
        targets = {p.pid: p for p in targets_left}
        if not targets:
            return


def _wait_for_jobs_api(cluster: LocalCluster, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(f"{cluster.dashboard_url}/api/version", headers=auth_headers(cluster), timeout=5)
            if answer.status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise ClusterError(f"the head started but its Jobs API at {cluster.dashboard_url} did not answer "
                       f"within {timeout_s:.0f} s; logs: {cluster.temp_dir}/session_latest/logs")
