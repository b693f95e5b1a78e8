"""`tunefleet cluster up` → `tunefleet submit` (Ray Jobs API) → the run directory appears in storage → `jobs stop` → `cluster down`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest
import yaml

from cluster.cli import main

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_cluster(tmp_path_factory):
    from cluster.local_cluster import cluster_down, cluster_up

    state = tmp_path_factory.mktemp("cluster") / "cluster.json"
    cluster = cluster_up(state, num_cpus=2)
    yield state, cluster
    cluster_down(state)
    survivors = [pid for pid, created in cluster.processes if _alive(pid, created)]
    assert not survivors, f"cluster down left processes running: {survivors}"
    assert not Path(cluster.temp_dir).exists()


def _alive(pid: int, created: float) -> bool:
    try:
        return abs(psutil.Process(pid).create_time() - created) < 0.01
    except psutil.NoSuchProcess:
        return False


def _job(tmp_path: Path, model: Path, train: Path, dev: Path, name: str, steps: int) -> Path:
    job = {
        "name": name, "task": "text-classification", "model": str(model),
        "data": {"train": str(train), "validation": str(dev), "columns": {"text": "sentence", "label": "label"},
                 "max_length": 32},
        "train": {"max_steps": steps, "batch_size": 8, "learning_rate": 3.0e-3, "warmup_ratio": 0.0,
                  "eval_every_steps": 15, "log_every_steps": 5},
        "scale": {"workers": 1, "cpus_per_worker": 1},
        "output": {"storage": str(tmp_path / "runs")},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _submitted_id(err: str) -> str:
    line = next(line for line in err.splitlines() if line.startswith("submitted "))
    return line.split()[1]


def test_submit_trains_and_stop_stops(tmp_path, monkeypatch, capsys, local_cluster, tiny_text_model, sentiment_tsv):
    state, cluster = local_cluster
    monkeypatch.setenv("TUNEFLEET_CLUSTER_STATE", str(state))  # the default address: the head `cluster up` started
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    env = ["--env", "TUNEFLEET_NO_PROGRESS=1"]

    # A long job, not followed: it will be stopped. Both fit on the head's 2 CPUs at once.
    long_job = _job(tmp_path, tiny_text_model, *sentiment_tsv, "endless", steps=100_000)
    assert main(["submit", str(long_job), "--run-id", "long", "--no-follow", *env]) == 0
    long_id = _submitted_id(capsys.readouterr().err)

    # A short job, followed to the end: it trains, exports and reports into storage.
    short_job = _job(tmp_path, tiny_text_model, *sentiment_tsv, "tiny-sentiment", steps=30)
    code = main(["submit", str(short_job), "--run-id", "r1", *env])
    out, err = capsys.readouterr()
    assert code == 0, out + err
    short_id = _submitted_id(err)
    assert f"job {short_id}: SUCCEEDED" in err and '"run_dir"' in out  # the job's own output, followed
    run_dir = tmp_path / "runs" / "tiny-sentiment" / "r1"
    info = json.loads((run_dir / "export" / "tunefleet.json").read_text())
    assert info["labels"] == ["negative", "positive"] and (run_dir / "export" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "end" and records[-1]["step"] == 30
    assert yaml.safe_load((run_dir / "job.yaml").read_text())["name"] == "tiny-sentiment"

    # The long job is training by now (its metrics appear); stop it.
    metrics = tmp_path / "runs" / "endless" / "long" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and '"event": "train"' not in (metrics.read_text() if metrics.exists() else ""):
        time.sleep(0.5)
    assert '"event": "train"' in metrics.read_text(), "the long job never started training"
    assert main(["jobs", "list"]) == 0
    listing = capsys.readouterr().out
    assert any(short_id in line and "SUCCEEDED" in line for line in listing.splitlines())
    assert any(long_id in line and "RUNNING" in line for line in listing.splitlines())

    assert main(["jobs", "stop", long_id]) == 0
    assert f"{long_id}: STOPPED" in capsys.readouterr().out
    assert main(["jobs", "status", long_id]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["status"] == "STOPPED" and status["run_dir"].endswith("/runs/endless/long")
    size = metrics.stat().st_size
    time.sleep(3)
    assert metrics.stat().st_size == size, "the stopped job's workers kept training"
    assert not (metrics.parent / "export").exists()

    # Unknown ids are one clear line, not a traceback.
    assert main(["jobs", "status", "no-such-job"]) == 1
    assert "no job 'no-such-job'" in capsys.readouterr().err
    # Without the head's token (another user of this machine) the Jobs API refuses.
    stranger = cluster.dashboard_url.replace("127.0.0.1", "localhost")
    assert main(["jobs", "list", "--address", stranger]) == 1
    assert "uses Ray token auth" in capsys.readouterr().err
