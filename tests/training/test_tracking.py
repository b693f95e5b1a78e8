"""Experiment tracking: a real MLflow store (local SQLite, and a real `mlflow server` on 127.0.0.1) and TensorBoard files."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.spec import JobSpec
from training.tracking import MetricsFollower, TrackingError, open_tracker

mlflow = pytest.importorskip("mlflow")


def _spec(**tracking) -> JobSpec:
    return JobSpec.model_validate({
        "name": "tiny-sentiment", "task": "text-classification", "model": "bert-base-uncased",
        "data": {"train": "hub/dataset"}, "train": {"learning_rate": 3.0e-3, "max_steps": 20},
        "output": {"tracking": tracking},
    })


def _train_a_little(tracker, steps) -> None:
    for step in steps:
        tracker.log_record({"event": "train", "step": step, "epoch": 0, "loss": 1.0 / step, "learning_rate": 1e-3,
                            "time": time.time()})
    tracker.log_record({"event": "eval", "step": steps[-1], "epoch": 0, "accuracy": 0.75, "eval_loss": 0.5})


def _outputs(tmp_path: Path) -> tuple[Path, Path]:
    report, export = tmp_path / "report", tmp_path / "export"
    report.mkdir()
    export.mkdir()
    (report / "loss_curve.png").write_bytes(b"\x89PNG fake plot")
    (export / "tunefleet.json").write_text("{}")
    return report, export


def test_new_local_stores_are_copies_of_one_migrated_by_mlflow(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    ids = []
    for name in ("r1", "r2"):
        run_dir = tmp_path / "runs" / "tiny-sentiment" / name
        run_dir.mkdir(parents=True)
        (run_dir / "job.yaml").write_text("name: tiny-sentiment\n")
        tracker = open_tracker(_spec(), run_dir)
        _train_a_little(tracker, [1, 2])
        tracker.close()
        ids.append(tracker.mlflow_run_id)
    assert [p.name for p in (tmp_path / "cache" / "tunefleet").iterdir()] == [f"mlflow-{mlflow.__version__}-empty.db"]
    for name, run_id in zip(("r1", "r2"), ids):  # each store holds its own run only, with its metrics
        client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'tiny-sentiment' / name / 'mlflow.db'}")
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert [r.info.run_id for r in runs] == [run_id] and runs[0].data.metrics["eval/accuracy"] == 0.75
        default = client.get_experiment("0")
        assert default.artifact_location == str(tmp_path / "mlruns" / "0")  # as MLflow would have set it


def test_local_store_in_run_dir_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "runs" / "tiny-sentiment" / "r1"
    run_dir.mkdir(parents=True)
    (run_dir / "job.yaml").write_text("name: tiny-sentiment\n")
    driver = open_tracker(_spec(), run_dir)
    worker = open_tracker(_spec(), run_dir)  # rank 0 joins the driver's MLflow run
    assert worker.mlflow_run_id == driver.mlflow_run_id
    _train_a_little(worker, [1, 2, 3])
    worker.close()
    report, export = _outputs(tmp_path)
    driver.finish(export, report, {"accuracy": 0.75, "step": 3})

    client = mlflow.tracking.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(driver.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params["train.learning_rate"] == "0.003" and run.data.params["task"] == "text-classification"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2, 3]
    assert run.data.metrics["eval/accuracy"] == 0.75 and run.data.metrics["best/accuracy"] == 0.75
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"job.yaml", "report", "export"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "report")] == ["report/loss_curve.png"]
    assert (run_dir / "mlartifacts").is_dir()  # artifacts stay inside the run directory

    # A resumed run directory continues the same MLflow run.
    again = open_tracker(_spec(), run_dir, resume_step=3)
    assert again.mlflow_run_id == driver.mlflow_run_id
    assert client.get_run(driver.mlflow_run_id).info.status == "RUNNING"
    again.close("FINISHED")


def test_tensorboard_events_and_resume_purge(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    first = open_tracker(_spec(mlflow=False), run_dir)
    _train_a_little(first, list(range(1, 11)))
    first.close()
    time.sleep(1.1)  # TensorBoard names event files by the second, then a per-process counter (9 sorts after 10)
    resumed = open_tracker(_spec(mlflow=False), run_dir, resume_step=5)  # the checkpoint was at step 5
    _train_a_little(resumed, [6, 7])
    resumed.close()
    assert not (run_dir / "mlflow.db").exists()

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6, 7]  # steps 6-10 of the first attempt were dropped: the curve joins
    assert events.Scalars("eval/accuracy")[-1].value == 0.75


def test_driver_follows_rank0_metrics_once_in_order_across_a_resume(tmp_path):
    """MetricsFollower: records written after it started, each once; a cut line waits for its end; a resume
    rewrites the file (records up to its checkpoint), and TensorBoard then hides the first attempt past it."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.storage import write_whole

    run_dir = tmp_path / "run"
    tracker = open_tracker(_spec(), run_dir)  # a local MLflow store in the run directory, and TensorBoard
    metrics = run_dir / "metrics.jsonl"

    def line(event, step, **values):
        return json.dumps({"event": event, "step": step, "time": time.time(), **values}) + "\n"

    metrics.write_text(line("train", 99, loss=9.0))  # an earlier command's record: not this run's to send
    follower = MetricsFollower(metrics, tracker, since=time.time(), interval=0.05)
    with metrics.open("a") as handle:
        handle.write(line("start", 0) + "".join(line("train", step, loss=1.0 / step) for step in (1, 2, 3, 4)))
        cut = line("eval", 4, accuracy=0.5)
        handle.write(cut[:10])
        handle.flush()
        time.sleep(0.5)
        handle.write(cut[10:])
    time.sleep(1.1)  # a new second for TensorBoard's next event file (see above)
    kept = [json.loads(x) for x in metrics.read_text().splitlines() if json.loads(x)["step"] <= 2]
    write_whole(metrics, "".join(json.dumps(r) + "\n" for r in kept)  # rank 0 resumed at step 2
                + line("resume", 2) + "".join(line("train", step, loss=0.1 / step) for step in (3, 4, 5)))
    follower.stop()
    tracker.close("FINISHED")

    client = mlflow.tracking.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"]
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")]
    assert history == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25), (3, 0.1 / 3), (4, 0.025), (5, 0.02)]
    assert [m.value for m in client.get_metric_history(run_id, "eval/accuracy")] == [0.5]  # the cut line, once
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("train/loss")] == [
        (1, 1.0), (2, 0.5), (3, 0.0333), (4, 0.025), (5, 0.02)]  # the curve joins at the resumed step


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    pytest.importorskip("flask", reason="`mlflow server` needs the server extras (pip install -e .[test])")
    import httpx

    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert server.poll() is None, (root / "server.log").read_text()
        time.sleep(0.5)
    else:
        os.killpg(server.pid, signal.SIGKILL)
        pytest.fail("mlflow server did not answer within 180 s:\n" + (root / "server.log").read_text()[-3000:])
    yield url, root
    os.killpg(server.pid, signal.SIGTERM)  # its own process group: the server and its workers, nothing else
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_tracking_server_from_environment(tmp_path, monkeypatch, mlflow_server):
    url, root = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    run_dir = tmp_path / "run-on-server"
    run_dir.mkdir()
    (run_dir / "job.yaml").write_text("name: tiny-sentiment\n")
    tracker = open_tracker(_spec(experiment="platform-runs"), run_dir)
    _train_a_little(tracker, [1, 2])
    report, export = _outputs(tmp_path)
    tracker.finish(export, report, {"accuracy": 0.75, "step": 2})
    assert not (run_dir / "mlflow.db").exists()

    client = mlflow.tracking.MlflowClient(url)
    experiment = client.get_experiment_by_name("platform-runs")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["name"] == "tiny-sentiment"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1.0, 0.5]
    assert {"job.yaml", "report", "export"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    stored = list((root / "artifacts").rglob("loss_curve.png"))  # uploaded through the server to its store
    assert len(stored) == 1 and stored[0].read_bytes() == b"\x89PNG fake plot"


def test_job_uri_wins_and_unreachable_server_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    dead = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(TrackingError, match=f"tracking server at {dead} does not answer.*mlflow: false"):
        open_tracker(_spec(mlflow_uri=dead), tmp_path)
    assert time.monotonic() - started < 15


def test_remote_run_directory_uploads_tensorboard(tmp_path, monkeypatch, capsys):
    """A run directory on a non-local pyarrow filesystem (as S3 or GCS): no default MLflow store, TensorBoard uploaded."""
    import pyarrow.fs as pafs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from training.storage import StorageDir

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    run = StorageDir(pafs.SubTreeFileSystem(str(bucket), pafs.LocalFileSystem()), "runs/tiny/r1", "object://bucket/runs/tiny/r1")
    assert run.local_path is None
    first = open_tracker(_spec(), run)
    assert first.client is None and "MLflow is off for this run" in capsys.readouterr().out
    _train_a_little(first, [1, 2, 3, 4])
    first.close()
    time.sleep(1.1)  # TensorBoard names event files by the second, then a per-process counter (9 sorts after 10)
    resumed = open_tracker(_spec(), run, resume_step=2)
    _train_a_little(resumed, [3])
    resumed.close()

    events = EventAccumulator(str(bucket / "runs/tiny/r1/tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]


@pytest.mark.integration
def test_training_run_logs_to_the_server(tmp_path, mlflow_server, tiny_text_model, sentiment_tsv):
    """`tunefleet train` with MLFLOW_TRACKING_URI: parameters, every metric, report and export on the server."""
    import json

    import yaml

    url, root = mlflow_server
    train, dev = sentiment_tsv
    job = {"name": "tracked", "task": "text-classification", "model": str(tiny_text_model),
           "data": {"train": str(train), "validation": str(dev), "columns": {"text": "sentence", "label": "label"},
                    "max_length": 32},
           "train": {"max_steps": 60, "batch_size": 8, "learning_rate": 3.0e-3, "warmup_ratio": 0.0,
                     "eval_every_steps": 30, "log_every_steps": 5, "seed": 7},
           "scale": {"workers": 1, "cpus_per_worker": 1}, "output": {"storage": str(tmp_path / "runs")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "TUNEFLEET_NO_PROGRESS": "1"}
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "train", str(tmp_path / "job.yaml"), "--run-id", "t1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tracked" / "t1"
    run_id = json.loads((run_dir / "tracking.json").read_text())["mlflow_run_id"]

    client = mlflow.tracking.MlflowClient(url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "60"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in logged if r["event"] == "train"]
    losses = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in losses] == train_steps  # every metric, at its step
    assert [m.value for m in losses] == pytest.approx([r["loss"] for r in logged if r["event"] == "train"])
    assert losses[-1].value < losses[0].value  # the run trained, and the server saw it
    accuracy = client.get_metric_history(run_id, "eval/accuracy")
    assert len(accuracy) == len([r for r in logged if r["event"] == "eval"]) == 2
    assert accuracy[-1].value > accuracy[0].value and run.data.metrics["best/accuracy"] == accuracy[-1].value
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"job.yaml", "metrics.jsonl", "report", "export"} <= artifacts
    assert "export/model.safetensors" in {a.path for a in client.list_artifacts(run_id, "export")}
    assert "report/loss_curve.png" in {a.path for a in client.list_artifacts(run_id, "report")}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == train_steps
    assert not (run_dir / "mlflow.db").exists()  # the server, not the local default store


@pytest.mark.integration
def test_training_with_unreachable_server_stops_before_workers(tmp_path, tiny_text_model, sentiment_tsv):
    """`tunefleet train` against a dead tracking server: one error naming the fix, exit 2, no checkpoint."""
    import yaml

    train, dev = sentiment_tsv
    dead = f"http://127.0.0.1:{_free_port()}"
    job = {"name": "untracked", "task": "text-classification", "model": str(tiny_text_model),
           "data": {"train": str(train), "validation": str(dev), "columns": {"text": "sentence", "label": "label"}},
           "train": {"max_steps": 2}, "scale": {"workers": 1, "cpus_per_worker": 1},
           "output": {"storage": str(tmp_path / "runs"), "tracking": {"mlflow_uri": dead}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "train", str(tmp_path / "job.yaml"), "--run-id", "t1"],
                          capture_output=True, text=True, env={**os.environ, "TUNEFLEET_NO_PROGRESS": "1"}, timeout=300)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"output.tracking: the MLflow tracking server at {dead} does not answer" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs" / "untracked" / "t1" / "checkpoints").exists()
