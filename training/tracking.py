"""Experiment tracking for one run: MLflow (parameters, metrics, report and export as artifacts)
and TensorBoard event files in the run directory.

One MLflow run per run directory. The driver opens it first (`open_tracker`, which
creates it and logs the job's parameters). Each metrics.jsonl record is then logged by
rank 0, which opens the run again inside the Ray Train worker; or, where the driver reads
the file rank 0 writes (a local run directory on a one-node Ray: the embedded default), by
the driver itself (`MetricsFollower`), which costs the training nothing. A resumed run
directory continues the same MLflow run (its id is kept in tracking.json) and TensorBoard
drops the events past the resumed step, as metrics.jsonl does.

Where MLflow writes: `output.tracking.mlflow_uri`, else $MLFLOW_TRACKING_URI, else a
SQLite store in the run directory (mlflow.db, artifacts in mlartifacts/): `mlflow ui
--backend-store-uri sqlite:///RUN_DIR/mlflow.db` shows it. SQLite needs a local disk;
on a shared volume (NFS) or many runs, point the job at a tracking server. A run
directory on S3 or GCS has no local store: MLflow is then off unless a URI is given, and
TensorBoard's files are written locally and uploaded when the tracker closes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from training.layout import JOB_FILE, METRICS_FILE, MLFLOW_ARTIFACTS_DIR, MLFLOW_DB, TENSORBOARD_DIR, TRACKING_FILE
from training.storage import StorageDir, as_storage

_NOT_METRICS = {"event", "step", "time"}
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value


class TrackingError(RuntimeError):
    """The tracking backend cannot be used; raised before any training starts."""


class ExperimentTracker:
    """Logs to MLflow and TensorBoard from one process; every call is a no-op for a disabled backend."""

    def __init__(self, run: StorageDir, client: Any = None, mlflow_run_id: str | None = None,
                 tensorboard: bool = False, resume_step: int = 0) -> None:
        self.run = run
        self.client, self.mlflow_run_id = client, mlflow_run_id
        self._tensorboard, self._resume_step, self._writer = tensorboard, resume_step, None
        self._tensorboard_dir: Path | None = None
        self._warned = False

    # ---- the four calls ----------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Flattened dotted keys (`train.learning_rate`); long values are cut to MLflow's limit."""
        if self.client is None:
            return
        from mlflow.entities import Param

        flat = [Param(k, _param_text(_redacted(v) if k.endswith("_uri") and isinstance(v, str) else v))
                for k, v in flatten(params).items()]
        for start in range(0, len(flat), 100):  # MLflow takes at most 100 parameters per batch
            self._safely(self.client.log_batch, self.mlflow_run_id, params=flat[start:start + 100])

    def log_metrics(self, metrics: dict[str, Any], step: int, timestamp: float | None = None) -> None:
        """Every int/float value, at this optimizer step."""
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not numeric:
            return
        if self.client is not None:
            from mlflow.entities import Metric

            millis = int((timestamp or time.time()) * 1000)
            batch = [Metric(k, v, millis, step) for k, v in numeric.items()]
            self._safely(self.client.log_batch, self.mlflow_run_id, metrics=batch)
        writer = self._tensorboard_writer()
        if writer is not None:
            for key, value in numeric.items():
                writer.add_scalar(key, value, step, walltime=timestamp)

    def log_artifacts(self, directory: "str | Path | StorageDir", artifact_path: str | None = None) -> None:
        """A file or every file under a directory (local, or a StorageDir), as MLflow artifacts under `artifact_path`."""
        if self.client is None:
            return
        if isinstance(directory, StorageDir) and directory.local_path is None:
            if directory.exists():
                with directory.as_local() as local:
                    self.log_artifacts(local, artifact_path)
            return
        path = directory.local_path if isinstance(directory, StorageDir) else Path(directory)
        if not path.exists():
            return
        upload = self.client.log_artifacts if path.is_dir() else self.client.log_artifact
        self._safely(upload, self.mlflow_run_id, str(path), artifact_path)

    def close(self, status: str | None = None) -> None:
        """Flush TensorBoard (upload it when the run is remote); with a status (FINISHED, FAILED, KILLED)
        also end the MLflow run."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            if self.run.local_path is None and self._tensorboard_dir is not None:
                self.run.upload(self._tensorboard_dir, TENSORBOARD_DIR)
                shutil.rmtree(self._tensorboard_dir.parent, ignore_errors=True)
        if status and self.client is not None:
            self._safely(self.client.set_terminated, self.mlflow_run_id, status)

    # ---- conveniences for the training loop and the driver -----------------
    def resume_at(self, step: int) -> None:
        """Training continues from `step` (a resume within this tracker's life): TensorBoard's next writer
        hides what was logged past it."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._resume_step = step

    def log_record(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl record: `train/loss`, `eval/accuracy`, ... at its step."""
        event = record.get("event", "metrics")
        if event in ("start", "end", "resume"):
            return
        values = {f"{event}/{k}": v for k, v in record.items() if k not in _NOT_METRICS}
        self.log_metrics(values, int(record.get("step", 0)), record.get("time"))

    def finish(self, export_dir: "Path | StorageDir | None", report_dir: "Path | StorageDir | None",
               best_metrics: dict[str, Any], log_export: bool = True) -> None:
        """After export and report: best metrics, metrics.jsonl, the report and export as artifacts, run FINISHED."""
        self.log_metrics({f"best/{k}": v for k, v in best_metrics.items()}, int(best_metrics.get("step", 0)))
        self._log_run_file(METRICS_FILE)
        if report_dir is not None:
            self.log_artifacts(report_dir, "report")
        if export_dir is not None:
            if self.client is not None:
                where = export_dir.uri if isinstance(export_dir, StorageDir) else str(export_dir)
                self._safely(self.client.set_tag, self.mlflow_run_id, "tunefleet.export", where)
            if log_export:
                self.log_artifacts(export_dir, "export")
        self.close("FINISHED")

    # ---- internals ---------------------------------------------------------
    def _log_run_file(self, name: str) -> None:
        if self.client is None or not self.run.exists(name):
            return
        if self.run.local_path is not None:
            self.log_artifacts(self.run.local_path / name)
            return
        with tempfile.TemporaryDirectory(prefix="tunefleet-artifact-") as staging:
            self.log_artifacts(self.run.download(name, Path(staging) / name))

    def _tensorboard_writer(self):
        if not self._tensorboard or self._writer is not None:
            return self._writer
        from torch.utils.tensorboard import SummaryWriter

        if self.run.local_path is not None:
            self._tensorboard_dir = self.run.local_path / TENSORBOARD_DIR
        else:  # written locally, uploaded whole at close (object stores cannot append)
            self._tensorboard_dir = Path(tempfile.mkdtemp(prefix="tunefleet-tb-")) / TENSORBOARD_DIR
            if self.run.exists(TENSORBOARD_DIR):
                self.run.download(TENSORBOARD_DIR, self._tensorboard_dir)
        # A resumed run keeps what was logged up to its checkpoint's step (as metrics.jsonl does);
        # purge_step makes TensorBoard hide an earlier attempt's events from the next step on.
        self._writer = SummaryWriter(log_dir=str(self._tensorboard_dir),
                                     purge_step=self._resume_step + 1 if self._resume_step else None)
        return self._writer

    def _safely(self, call, *args, **kwargs) -> None:
        """A tracking server that goes away mid-run costs a warning, not the training run."""
        try:
            call(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - any backend error
            if not self._warned:
                print(f"WARNING: MLflow logging failed ({type(err).__name__}: {err}); training goes on, "
                      "further tracking errors are not shown")
                self._warned = True


class MetricsFollower:
    """Logs rank 0's metrics.jsonl records to the driver's tracker while Ray Train runs, from a thread.

    Why not rank 0's own tracker there: opening it in the worker (importing MLflow, joining the run,
    importing TensorBoard) took ~3% of a 100-step MiniLM run's CPU on 2 cores, mid-training; the driver
    has the run open already and waits in `fit()`, and it imports TensorBoard while Ray Train starts
    (one core idles then). Only where the driver reads the file rank 0 writes (`training.run`).

    Records are sent once, in order: those written after `since` (rank 0's clock is this machine's);
    a resumed attempt rewrites the file with the records up to its checkpoint (older, not sent again)."""

    def __init__(self, path: Path, tracker: ExperimentTracker, since: float, interval: float = 1.0) -> None:
        self.path, self.tracker, self.interval = path, tracker, interval
        self._since, self._inode, self._offset = since, None, 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="tunefleet-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """The records written so far are sent when this returns."""
        self._stopped.set()
        self._thread.join()
        self._send_new_or_warn()

    def _follow(self) -> None:
        if self.tracker._tensorboard:
            import torch.utils.tensorboard  # noqa: F401 - ~1 s of imports, before the first record

        while not self._stopped.wait(self.interval):
            self._send_new_or_warn()

    def _send_new_or_warn(self) -> None:
        try:
            self._send_new()
        except OSError as err:  # the metrics stay in metrics.jsonl; only the tracker misses them (for now)
            print(f"WARNING: could not read {self.path} for experiment tracking ({err})")

    def _send_new(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return
        if stat.st_ino != self._inode or stat.st_size < self._offset:  # first read, or rewritten by a resume
            self._inode, self._offset = stat.st_ino, 0
        with self.path.open("rb") as handle:
            handle.seek(self._offset)
            chunk = handle.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a line being written waits for the next read
        self._offset += len(complete)
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("time", 0) <= self._since:
                continue
            self._since = record["time"]
            if record.get("event") == "resume":
                self.tracker.resume_at(int(record.get("step", 0)))
            self.tracker.log_record(record)


def open_tracker(spec: Any, run: "StorageDir | str | Path", resume_step: int = 0) -> ExperimentTracker:
    """The run's tracker: creates (first call for this run directory) or rejoins its MLflow run.

    `run` is the run directory (a StorageDir or a local path); `resume_step` is the step a resumed
    training continues from (TensorBoard drops what an earlier attempt logged past it)."""
    run = as_storage(run)
    settings = getattr(spec.output, "tracking", None)
    tensorboard = getattr(settings, "tensorboard", True)
    uri = tracking_uri(settings, run) if getattr(settings, "mlflow", True) else None
    if uri is None:
        return ExperimentTracker(run, tensorboard=tensorboard, resume_step=resume_step)
    client = _client(uri)
    state = json.loads(run.read_text(TRACKING_FILE)) if run.exists(TRACKING_FILE) else {}
    run_id = state.get("mlflow_run_id") if state.get("tracking_uri") == _redacted(uri) else None
    if run_id is not None and _run_exists(client, run_id):
        if client.get_run(run_id).info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return ExperimentTracker(run, client, run_id, tensorboard, resume_step)
    experiment = getattr(settings, "experiment", None) or spec.name
    run_id = _new_run(client, uri, experiment, run)
    tracker = ExperimentTracker(run, client, run_id, tensorboard, resume_step)
    tracker.log_params(spec.dump() if hasattr(spec, "dump") else dict(spec))
    tracker._log_run_file(JOB_FILE)
    run.write_text(TRACKING_FILE, json.dumps({"tracking_uri": _redacted(uri), "mlflow_run_id": run_id,
                                              "experiment": experiment}, indent=2) + "\n")
    return tracker


def tracking_uri(settings: Any, run: StorageDir) -> str | None:
    """The job's URI, else $MLFLOW_TRACKING_URI, else SQLite in a local run directory; None: no MLflow."""
    import os

    uri = getattr(settings, "mlflow_uri", None) or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if run.local_path is None:
        print(f"note: MLflow is off for this run: its directory {run.uri} is not on a local disk, so there is no "
              "default store; set output.tracking.mlflow_uri (or MLFLOW_TRACKING_URI) to a tracking server")
        return None
    run.local_path.mkdir(parents=True, exist_ok=True)
    database = run.local_path / MLFLOW_DB
    if not database.exists():
        _seed_sqlite_store(database)
    return f"sqlite:///{database}"


def _seed_sqlite_store(database: Path) -> None:
    """A new run directory's SQLite store, copied from an empty one MLflow built once per machine and
    MLflow version (~/.cache/tunefleet). Why not let MLflow create it: it builds a new store by running
    every schema migration since its first release, 2.4 s of CPU in the driver on the way to the first
    step (docs/performance.md); copying the same empty, migrated store takes milliseconds, and MLflow
    checks its schema version on opening it as on any store. Anything in the way (no writable cache,
    a failed copy): MLflow creates the store itself, as it would have."""
    import os

    import mlflow  # imported for the client next anyway
    from mlflow.tracking import MlflowClient

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tunefleet"
    try:
        template = cache / f"mlflow-{mlflow.__version__}-empty.db"
        if not template.exists():
            cache.mkdir(parents=True, exist_ok=True)
            building = Path(tempfile.mkstemp(dir=cache, prefix=".mlflow-", suffix=".db")[1])
            building.unlink()  # MLflow creates it
            try:
                MlflowClient(tracking_uri=f"sqlite:///{building}").search_experiments()
                os.replace(building, template)  # whole or absent, if two runs build it at once
            finally:
                building.unlink(missing_ok=True)
        shutil.copyfile(template, database)
        import sqlite3

        # MLflow's Default experiment (unused by tunefleet) points where MLflow would have put it: ./mlruns
        with sqlite3.connect(database) as db:
            db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                       (str(Path.cwd() / "mlruns" / "0"),))
    except Exception:  # noqa: BLE001 - an optimisation only: MLflow builds the store instead
        database.unlink(missing_ok=True)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= _MAX_PARAM_CHARS else text[:_MAX_PARAM_CHARS - 3] + "..."


def _client(uri: str):
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri=uri)
    except Exception as err:  # noqa: BLE001 - the backend's own error, made actionable
        raise TrackingError(f"MLflow tracking URI {_redacted(uri)!r} cannot be used: {err}") from None


def _check_server(uri: str) -> None:
    """Fail in seconds, before training, rather than after MLflow's minutes of retries."""
    import httpx

    try:
        httpx.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
    except httpx.HTTPError as err:
        raise TrackingError(f"the MLflow tracking server at {_redacted(uri)} does not answer ({err}); start it, fix "
                            "output.tracking.mlflow_uri / MLFLOW_TRACKING_URI, or set output.tracking.mlflow: false") from None


def _new_run(client, uri: str, experiment: str, run: StorageDir) -> str:
    found = client.get_experiment_by_name(experiment)
    if found is not None and found.lifecycle_stage == "deleted":
        raise TrackingError(f"MLflow experiment {experiment!r} is deleted; restore it or set output.tracking.experiment")
    if found is not None:
        experiment_id = found.experiment_id
    else:
        # The default SQLite store keeps its artifacts in the run directory; a server chooses its own store.
        local = uri.startswith("sqlite:") and run.local_path is not None
        experiment_id = client.create_experiment(
            experiment, artifact_location=(run.local_path / MLFLOW_ARTIFACTS_DIR).as_uri() if local else None)
    job = run.uri.rstrip("/").rsplit("/", 2)[-2] if run.uri.count("/") >= 2 else ""
    created = client.create_run(experiment_id, run_name=run.name, tags={"tunefleet.run_dir": run.uri, "tunefleet.job": job})
    return created.info.run_id


def _run_exists(client, run_id: str) -> bool:
    try:
        return client.get_run(run_id).info.lifecycle_stage == "active"
    except Exception:  # noqa: BLE001 - unknown run id on this backend
        return False


def _redacted(uri: str) -> str:
    """The URI without a password (tracking.json is readable by everyone who reads the run)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
