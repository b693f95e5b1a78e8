"""Failures in the middle of a run: one Ray Train worker process killed mid-epoch (the run recovers from
its last checkpoint and ends where an uninterrupted run ends), and the writer killed while a checkpoint
is being written (the half-written checkpoint never counts: export and resume use the one before)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.integration.scale_jobs import JOB_NAME, TOTAL_STEPS, final_eval, fit, job_data, losses, records
from testdata import remove_killed_ray
from training.checkpoint import IncompleteCheckpointError, read_manifest
from training.run import complete_checkpoints

pytestmark = pytest.mark.integration


def _train(tmp_path: Path, data: dict, run_id: str) -> subprocess.Popen:
    """`tunefleet train` with its own private Ray, in its own process group; output in tmp_path/train.log."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(data))
    env = {**os.environ, "TUNEFLEET_NO_PROGRESS": "1", "DS_ACCELERATOR": "cpu"}
    with (tmp_path / "train.log").open("a") as log:
        return subprocess.Popen([sys.executable, "-m", "cluster.cli", "train", str(job), "--run-id", run_id],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _output(tmp_path: Path) -> str:
    return (tmp_path / "train.log").read_text()[-4000:]


def _train_steps(metrics_file: Path) -> list[int]:
    try:
        return [r["step"] for r in records(metrics_file) if r["event"] == "train"]
    except (FileNotFoundError, ValueError):  # not written yet, or a line being written
        return []


def _is_train_worker(process: psutil.Process) -> bool:
    try:
        return process.cmdline()[:1] != [] and process.cmdline()[0].startswith("ray::RayTrainWorker")
    except psutil.Error:
        return False


def _worker_pids(driver: subprocess.Popen) -> list[int]:
    """Ray Train worker processes of this run only: descendants of its driver (whose Ray it started)."""
    return [p.pid for p in psutil.Process(driver.pid).children(recursive=True) if _is_train_worker(p)]


def test_killed_worker_is_replaced_and_the_run_ends_as_if_uninterrupted(tiny_text_model, sentiment_tsv, reference,
                                                                         tmp_path):
    data = job_data(tiny_text_model, *sentiment_tsv, tmp_path / "runs",
                    **{"scale.max_failures": 1, "train.eval_every_steps": 10})
    run_dir = tmp_path / "runs" / JOB_NAME / "r"
    driver = _train(tmp_path, data, "r")
    try:
        # Past the first checkpoint (step 10) and inside epoch 0 (30 steps of 2 x 8 examples).
        deadline = time.monotonic() + 400
        metrics_file = run_dir / "metrics.jsonl"
        while driver.poll() is None and time.monotonic() < deadline and max(_train_steps(metrics_file), default=0) < 12:
            time.sleep(0.05)
        assert driver.poll() is None, "the run ended before a worker could be killed:\n" + _output(tmp_path)
        workers = _worker_pids(driver)
        assert len(workers) == 2, f"no 2 workers to kill: {workers}"
        killed_at = max(_train_steps(run_dir / "metrics.jsonl"))
        os.kill(workers[-1], signal.SIGKILL)  # one worker process, nothing else
        driver.wait(timeout=500)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, _output(tmp_path)
    assert killed_at < TOTAL_STEPS

    metrics = records(run_dir / "metrics.jsonl")
    starts = [r["step"] for r in metrics if r["event"] == "start"]
    assert len(starts) == 2 and starts[0] == 0 and 10 <= starts[1] <= killed_at, starts
    assert metrics[-1]["event"] == "end" and metrics[-1]["step"] == TOTAL_STEPS
    # Restarted from its checkpoint, the run retraces the uninterrupted one: within noise (here: exactly).
    ours, theirs = losses(metrics), losses(reference)
    assert sorted(ours) == sorted(theirs)
    assert final_eval(metrics)["accuracy"] == final_eval(reference)["accuracy"]
    assert final_eval(metrics)["eval_loss"] == pytest.approx(final_eval(reference)["eval_loss"], rel=1e-3)


def _kill_while_writing(driver: subprocess.Popen, checkpoints: Path, deadline: float) -> Path | None:
    """SIGKILL the run the moment a checkpoint directory (not the first) is seen unfinished: the Ray
    Train workers (they write the shards) and every other process of the run (driver, raylet, GCS), all
    descendants of the driver we started; killing the driver alone lets the workers finish the write."""
    finished: set[Path] = set()
    run_processes: list[psutil.Process] = []
    refreshed = 0.0
    while driver.poll() is None and time.monotonic() < deadline:
        if time.monotonic() - refreshed > 0.5:  # the workers live for the whole run: look them up ahead
            run_processes = psutil.Process(driver.pid).children(recursive=True)
            refreshed = time.monotonic()
        for directory in sorted(checkpoints.glob("checkpoint_*")) if checkpoints.is_dir() else []:
            if directory in finished or not directory.is_dir():  # checkpoint_manager_snapshot.json is Ray's
                continue
            try:
                read_manifest(directory)
                finished.add(directory)
            except (IncompleteCheckpointError, ValueError, OSError):
                if not finished:  # let the first one finish: there must be a checkpoint to fall back to
                    continue
                workers = [p for p in run_processes if _is_train_worker(p)]
                for process in workers + [p for p in run_processes if p not in workers]:
                    try:
                        process.kill()
                    except psutil.Error:
                        pass
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait(timeout=60)
                remove_killed_ray(driver.pid)
                return directory
        time.sleep(0.002)
    return None


def test_interrupted_checkpoint_write_leaves_the_previous_one_in_use(local_ray, deepspeed_ops, tiny_text_model,
                                                                     sentiment_tsv, tmp_path):
    from cluster.spec import validate_job
    from training.run import export_run
    from training.storage import StorageDir

    # ZeRO-1: each rank writes its optimizer partition; a checkpoint every 2 steps gives many chances to interrupt one.
    data = job_data(tiny_text_model, *sentiment_tsv, tmp_path / "runs",
                    **{"scale.deepspeed": {"stage": 1}, "train.eval_every_steps": 2, "output.keep_checkpoints": 30})
    run_dir = tmp_path / "runs" / JOB_NAME / "r"
    checkpoints = run_dir / "checkpoints"
    interrupted = None
    for _attempt in range(3):  # the write may finish between seeing it unfinished and the kill landing
        driver = _train(tmp_path, data, "r")
        try:
            seen = _kill_while_writing(driver, checkpoints, time.monotonic() + 400)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
        assert seen is not None, "the run ended before a checkpoint write could be interrupted:\n" + _output(tmp_path)
        time.sleep(2)  # nothing may finish the write after the kill
        try:
            read_manifest(seen)
        except IncompleteCheckpointError:
            interrupted = seen
            break
    assert interrupted is not None, "no checkpoint write was caught unfinished in 3 attempts"

    complete = complete_checkpoints(checkpoints)
    assert complete, "no finished checkpoint before the interrupted one"
    assert interrupted not in {Path(d.path) for d, _ in complete}
    steps = {m["step"] for _, m in complete}

    spec = validate_job(data)
    export = export_run(StorageDir.local(run_dir), spec)
    exported_from = yaml.safe_load((Path(export.path) / "tunefleet.json").read_text())["checkpoint"]
    assert Path(exported_from).name in {Path(d.path).name for d, _ in complete}

    # Same run id: resumes from a finished checkpoint, not the interrupted one (fewer checkpoints from here on).
    fit({**data, "train": {**data["train"], "eval_every_steps": 20}}, "r")
    metrics = records(run_dir / "metrics.jsonl")
    assert [r["step"] for r in metrics if r["event"] == "resume"][-1] in steps
    assert metrics[-1]["event"] == "end" and metrics[-1]["step"] == TOTAL_STEPS
    assert not interrupted.exists(), "an unfinished checkpoint is removed once the run completes"
