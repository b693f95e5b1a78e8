"""Turn a validated job spec into a Ray Train run, then export and report the best checkpoint.

The caller (cluster) connects to or starts Ray first and resolves `output.storage`
into a StorageDir (local path, shared volume, s3://, gs://). Data is prepared here,
on the driver, before any worker starts: a missing column costs no cluster time; so
is the experiment tracker opened (an unreachable tracking server stops the run here).
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import yaml
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from training import streaming
from training.checkpoint import IncompleteCheckpointError, complete_checkpoints
from training.data.tables import DataError
from training.export import export_checkpoint
from training.layout import BEST_CHECKPOINT_FILE, CHECKPOINTS_DIR, EXPORT_DIR, JOB_FILE, METRICS_FILE, REPORT_DIR
from training.progress import quiet_library_bars
from training.entry import train_worker
from training.report import write_report
from training.storage import StorageDir, as_storage
from training.tasks import TASKS, PreparedData, selection_metric
from training.tracking import ExperimentTracker, MetricsFollower, open_tracker


@dataclass(frozen=True)
class RunResult:
    run_dir: str  # a local path or a storage URI
    export_dir: str
    best_checkpoint: str  # its directory name under checkpoints/
    metrics: dict[str, Any]


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def run_dir_for(spec: Any, run_id: str) -> Path:
    return Path(spec.output.storage) / spec.name / run_id


@dataclass(frozen=True)
class RunStart:
    """What a run needs before Ray Train, begun on threads so it overlaps starting Ray (which mostly
    waits on processes): tokenizing the data, and opening the MLflow run (a new SQLite store takes
    seconds to create). `.result()` of each gives its value or raises its error (DataError,
    TrackingError), still before any worker starts."""

    run: StorageDir
    prepared: "Future[PreparedData] | None"  # None for a stream: Ray Data needs Ray first
    tracker: Future


def begin_run(spec: Any, run_id: str, storage: StorageDir | None = None) -> RunStart:
    if progress_style() != "bar":  # a log: the libraries' bars off, here and in the Ray this process starts
        quiet_library_bars()
    run = (storage or StorageDir.local(spec.output.storage)).child(spec.name, run_id)
    run.write_text(JOB_FILE, yaml.safe_dump(spec.dump(), sort_keys=False))
    executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tunefleet-start")
    prepared = None if spec.data.streaming else executor.submit(TASKS.get(spec.task).prepare, spec)
    tracker = executor.submit(open_tracker, spec, run)  # logs the job's parameters
    executor.shutdown(wait=False)
    return RunStart(run, prepared, tracker)


def run_training(spec: Any, run_id: str, storage: StorageDir | None = None, start: RunStart | None = None) -> RunResult:
    """Train (resuming when the run directory already holds checkpoints), export, report.

    `storage` is where `output.storage` points (cluster/storage.py resolves URIs); None: a local path.
    `start`: `begin_run`'s work under way (the CLI begins it before starting Ray); None: begun here."""
    start = start or begin_run(spec, run_id, storage)
    run = start.run
    try:
        prepared = start.prepared.result() if start.prepared is not None else TASKS.get(spec.task).prepare(spec)
    except BaseException:
        if start.tracker.exception() is None:
            start.tracker.result().close("FAILED")
        raise
    print(f"data: {json.dumps(prepared.summary())}")
    tracker = start.tracker.result()  # TrackingError here: before any worker starts
    try:
        result = _train_export_report(spec, run, prepared, tracker)
    except BaseException as err:
        tracker.close("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    tracker.finish(run.child(EXPORT_DIR), run.child(REPORT_DIR), result.metrics,
                   log_export=spec.output.tracking.log_export)
    return result


def progress_style() -> str:
    """How rank 0 shows its steps: TUNEFLEET_PROGRESS (bar | lines | off) if set, off with
    TUNEFLEET_NO_PROGRESS; else a bar where this command writes to a terminal, and a plain line each
    `train.log_every_steps` where it writes to a file or a pipe (CI, `nohup`, a Ray job's log), where
    a bar's redraws would be stored as hundreds of half-lines."""
    chosen = os.environ.get("TUNEFLEET_PROGRESS", "").strip().lower()
    if chosen in ("bar", "lines", "off"):
        return chosen
    if os.environ.get("TUNEFLEET_NO_PROGRESS"):
        return "off"
    return "bar" if sys.stdout.isatty() else "lines"


def _train_export_report(spec: Any, run: StorageDir, prepared: Any, tracker: ExperimentTracker) -> RunResult:
    use_gpu = _use_gpu(spec.scale.use_gpu, spec.scale.workers)
    # The driver logs rank 0's metrics to the tracker where it can read them as they are written.
    tracker_on_driver = run.local_path is not None and _one_node_here()
    cpus = spec.scale.cpus_per_worker or _cpus_per_worker(spec, prepared)
    if _ray_started_here():  # its resources are this machine's and never grow: a group too big never starts
        resources = ray.cluster_resources()
        problems = local_capacity_problems(spec.scale.workers, cpus, use_gpu, resources.get("CPU", 0),
                                           resources.get("GPU", 0))
        if problems:
            raise DataError(problems)
    metric, higher_is_better = selection_metric(spec)
    streamed = {} if prepared.train_stream is None else {
        "datasets": {"train": prepared.train_stream}, "dataset_config": streaming.ingest_options()}
    payload = ray.put({"spec": spec, "data": prepared.without_stream(), "storage": run, "cpus_per_worker": cpus,
                       # rank 0 joins the driver's MLflow run (workers on a remote cluster lack the driver's env)
                       "mlflow_tracking_uri": os.environ.get("MLFLOW_TRACKING_URI"),
                       "tracker_on_driver": tracker_on_driver, "progress": progress_style()})
    # Ray Train V2 sends a worker's print() both to the worker's stdout and, as a log record, to the
    # driver, because Ray 2.60 wraps the worker's stdout (ray._private.utils.Unbuffered) and its patched
    # print then tees: every line would show twice. Ray Train passes this variable on to its workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    trainer = (OwnRayTrainer if _ray_started_here() else TorchTrainer)(
        train_worker,  # light to import: the controller passes the payload on unread (training/entry.py)
        **streamed,  # data.streaming: Ray Train hands each worker its share of the stream
        train_loop_config={"payload": payload},
        scaling_config=ScalingConfig(
            num_workers=spec.scale.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            # Ray Train keeps its checkpoints in <storage_path>/<name>/: the run's checkpoints/ directory.
            name=CHECKPOINTS_DIR,
            storage_path=run.path,
            storage_filesystem=None if run.local_path is not None else run.filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.output.keep_checkpoints,
                checkpoint_score_attribute=metric,
                checkpoint_score_order="max" if higher_is_better else "min",
            ),
            failure_config=FailureConfig(max_failures=spec.scale.max_failures),
        ),
    )
    follower = MetricsFollower(run.local_path / METRICS_FILE, tracker, since=time.time()) if tracker_on_driver else None
    try:
        result = trainer.fit()
    finally:  # the records written so far are logged before the tracker is closed, on failure too
        if follower is not None:
            follower.stop()
    checkpoints = run.child(CHECKPOINTS_DIR)
    remove_leftover_checkpoints(checkpoints, result)
    del result
    best, manifest = best_checkpoint(checkpoints, metric, higher_is_better)
    export = export_and_report(run, best, manifest, spec)
    best_record = {"checkpoint": best.name, metric: manifest["metrics"][metric]}
    checkpoints.write_text(BEST_CHECKPOINT_FILE, json.dumps(best_record) + "\n")
    return RunResult(run_dir=run.uri, export_dir=export.uri, best_checkpoint=best.name, metrics=manifest["metrics"])


def export_and_report(run: StorageDir, best: StorageDir, manifest: dict[str, Any], spec: Any) -> StorageDir:
    """export/ and report/ from the best checkpoint, written on local disk and uploaded to the run's storage."""
    task = TASKS.get(spec.task)
    with run.staging() as staging, best.as_local() as checkpoint:
        export_dir = export_checkpoint(checkpoint, spec, staging / EXPORT_DIR, source_run=run.uri, checkpoint_uri=best.uri)
        if run.local_path is None and run.exists(METRICS_FILE):
            run.download(METRICS_FILE, staging / METRICS_FILE)
        report_dir = staging / REPORT_DIR
        report_dir.mkdir(parents=True, exist_ok=True)
        extras = task.report_extras(spec, export_dir, report_dir, manifest) if task.report_extras else {}
        write_report(staging, report_dir, manifest, best.uri, extras)
        run.upload(export_dir, EXPORT_DIR)
        run.upload(report_dir, REPORT_DIR)
    return run.child(EXPORT_DIR)


def export_run(run: StorageDir, spec: Any, merge: bool = False) -> StorageDir:
    """Re-export a run's best complete checkpoint to its export/ (the run may live on S3 or GCS);
    `merge`: an adapter folded into its base (export_checkpoint)."""
    best, _ = best_checkpoint(run.child(CHECKPOINTS_DIR), *selection_metric(spec))
    with run.staging() as staging, best.as_local() as checkpoint:
        export_dir = export_checkpoint(checkpoint, spec, staging / EXPORT_DIR, source_run=run.uri, checkpoint_uri=best.uri,
                                       merge=merge)
        run.upload(export_dir, EXPORT_DIR)
    return run.child(EXPORT_DIR)


def remove_leftover_checkpoints(checkpoints: StorageDir, result) -> None:
    """Ray deletes what it registered beyond the best k (it keeps the latest too). Left over from an
    interrupted attempt: unfinished writes, and writes that workers outliving a killed driver finished
    (complete, but never registered: not resumed from, not deleted by Ray)."""
    registered = [c for c, _ in (result.best_checkpoints or [])] + ([result.checkpoint] if result.checkpoint else [])
    kept = {c.path.rstrip("/").rsplit("/", 1)[-1] for c in registered}
    leftovers = incomplete_checkpoints(checkpoints)
    if kept:
        leftovers += [d for d, _ in complete_checkpoints(checkpoints) if d.name not in kept]
    for directory in leftovers:
        print(f"removing checkpoint {directory.uri}: left over from an interrupted attempt")
        directory.delete()


def incomplete_checkpoints(checkpoints_dir: "Path | StorageDir") -> list[StorageDir]:
    complete = {d.path for d, _ in complete_checkpoints(checkpoints_dir)}
    return [d for d in as_storage(checkpoints_dir).list_dirs()
            if d.name.startswith("checkpoint_") and d.path not in complete]


def best_checkpoint(checkpoints_dir: "Path | StorageDir", metric: str, higher_is_better: bool) -> tuple[StorageDir, dict]:
    """(checkpoint directory, manifest) of the best complete checkpoint."""
    candidates = complete_checkpoints(checkpoints_dir)
    if not candidates:
        raise IncompleteCheckpointError(f"{as_storage(checkpoints_dir).uri}: no complete checkpoint to export")
    sign = 1 if higher_is_better else -1
    # Best metric; among equals the later step wins.
    return max(candidates, key=lambda item: (sign * item[1]["metrics"][metric], item[1]["step"]))


class OwnRayTrainer(TorchTrainer):
    """TorchTrainer on a Ray this process started, which stops when the command ends: without Ray Train's
    cluster housekeeping that has nothing to do there.

    Ray Train adds, to every run, a placement-group cleaner (a detached actor that removes the run's
    placement group should the controller die; it asks Ray's state API every second whether the
    controller lives, and that API is down without the dashboard) and Prometheus metrics callbacks in
    the controller and each worker (exported through a metrics agent nobody scrapes on a private Ray).
    Ray Train has no switch for the cleaner, so this filters its default callbacks (Ray 2.60's; a test
    fails if they change). Measured on 2 cores, `tunefleet train` of the AG News benchmark job for 100
    steps, alternated with the stock trainer in two sets (4 and 3 runs each): 1.5-2.2% more samples/s,
    the first step 0.5-0.9 s sooner, the whole command 2.8-3.4 s shorter (docs/performance.md).
    """

    def _create_default_callbacks(self) -> list:
        from ray.train.v2._internal.callbacks.metrics import ControllerMetricsCallback, WorkerMetricsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

        housekeeping = (PlacementGroupCleanerCallback, ControllerMetricsCallback, WorkerMetricsCallback)
        return [c for c in super()._create_default_callbacks() if not isinstance(c, housekeeping)]


def _ray_started_here() -> bool:
    """This process started the Ray it is connected to (cluster.runtime's private local Ray)."""
    node = getattr(ray._private.worker.global_worker, "node", None)
    return bool(getattr(node, "head", False))


def local_capacity_problems(workers: int, cpus: float, use_gpu: bool, total_cpus: float,
                            total_gpus: float) -> list[tuple[str, str, Any]]:
    """A worker group that the local Ray this command started can never hold. Ray Train would wait for it
    without end ("Requesting resources", retried every minute): on a cluster an autoscaler may add nodes,
    here nothing will."""
    problems = []
    if workers * cpus > total_cpus:
        each = f"{cpus:g} CPU{'' if cpus == 1 else 's'} each"
        problems.append(("scale.workers", f"{workers} workers x {each} need {workers * cpus:g} CPUs, and the "
                         f"local Ray this command started has {total_cpus:g} (this machine's): lower scale.workers, "
                         f"set scale.cpus_per_worker: {total_cpus / workers:g} to share them, or run on a cluster "
                         "(--address)", workers))
    if use_gpu and workers > total_gpus:
        problems.append(("scale.use_gpu", f"{workers} workers need a GPU each, and this machine has {total_gpus:g}: "
                         "lower scale.workers, set scale.use_gpu: auto (or false), or run on a cluster (--address)",
                         True))
    return problems


def _cpus_per_worker(spec: Any, prepared: Any) -> float:
    """The cluster's CPUs shared by the workers; a stream keeps room for Ray Data's read and tokenize tasks."""
    total = ray.cluster_resources().get("CPU", 1)
    if prepared.train_stream is None:
        return max(1, int(total) // spec.scale.workers)
    return max(0.5, (total - 2 * streaming.DATA_CPUS) / spec.scale.workers)


def _one_node_here() -> bool:
    """Ray has one live node and this driver is on it: the workers write this machine's files."""
    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    return nodes == [ray.get_runtime_context().get_node_id()]


def _use_gpu(setting: str | bool, workers: int) -> bool:
    if setting == "auto":
        return ray.cluster_resources().get("GPU", 0) >= workers
    return bool(setting)
