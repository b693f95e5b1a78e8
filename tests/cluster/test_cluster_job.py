"""Shipping a job file to a cluster: validation here, paths that live on the cluster, the runtime environment."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cluster.cluster_job import dns_label, prepare_cluster_job
from cluster.jobs import JOB_FILE_NAME, checkout_root, entrypoint, runtime_env
from cluster.spec import JobSpecError


def _write(tmp_path, **changes):
    job = {"name": "tiny", "task": "text-classification", "model": "bert-base-uncased",
           "data": {"train": "/mnt/shared/data/train.tsv", "columns": {"text": "sentence", "label": "label"}},
           "output": {"storage": "/mnt/shared/runs"}, **changes}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_local_validation_requires_the_files(tmp_path):
    with pytest.raises(JobSpecError, match="data.train: no such file or directory"):
        prepare_cluster_job(str(_write(tmp_path)))


def test_cluster_paths_become_notes_and_ship_as_written(tmp_path):
    job = prepare_cluster_job(str(_write(tmp_path)), ["train.learning_rate=3e-5"], cluster_paths=True)
    assert job.notes == ["data.train: /mnt/shared/data/train.tsv is not on this machine; it must exist on the cluster"]
    shipped = yaml.safe_load(job.yaml())
    assert shipped["data"]["train"] == "/mnt/shared/data/train.tsv" and shipped["train"]["learning_rate"] == 3e-5
    assert job.run_dir("r1") == "/mnt/shared/runs/tiny/r1"


def test_cluster_paths_still_report_every_other_problem(tmp_path):
    with pytest.raises(JobSpecError) as caught:
        prepare_cluster_job(str(_write(tmp_path, train={"learning_rate": 0})), cluster_paths=True)
    message = str(caught.value)
    assert "train.learning_rate" in message and "data.train" not in message


def test_relative_paths_are_flagged_for_the_cluster(tmp_path):
    job = prepare_cluster_job(str(_write(tmp_path, output={"storage": "./runs"})), cluster_paths=True)
    assert any(note.startswith("output.storage: relative path './runs'") for note in job.notes)


def test_full_validation_ships_absolute_paths(tmp_path, sentiment_tsv):
    train, dev = sentiment_tsv
    path = _write(tmp_path, data={"train": str(train), "validation": str(dev),
                                  "columns": {"text": "sentence", "label": "label"}}, output={"storage": "runs"})
    job = prepare_cluster_job(str(path))
    assert job.notes == [] and job.spec.output.storage == str(Path.cwd() / "runs")
    assert job.data["data"]["train"] == str(train)


def test_runtime_env_carries_job_code_env_and_pip(tmp_path):
    job = prepare_cluster_job(str(_write(tmp_path)), cluster_paths=True)
    source = tmp_path / "project"
    for name in ("cluster", "training", "serving", ".venv/lib", "runs/old", "cluster/__pycache__"):
        (source / name).mkdir(parents=True, exist_ok=True)
    (source / "cluster" / "cli.py").write_text("# code\n")
    (source / "cluster" / "__pycache__" / "cli.pyc").write_bytes(b"0")
    (source / ".venv" / "lib" / "big.so").write_bytes(b"0" * 100)
    staging = tmp_path / "staging"
    env = runtime_env(job, staging, "source", source, {"HF_TOKEN": "x"}, ["peft==0.21.2"])
    assert env == {"working_dir": str(staging), "env_vars": {"HF_TOKEN": "x"}, "pip": ["peft==0.21.2"]}
    assert (staging / "cluster" / "cli.py").is_file()
    assert not (staging / ".venv").exists() and not (staging / "runs").exists()
    assert not (staging / "cluster" / "__pycache__").exists()
    assert yaml.safe_load((staging / JOB_FILE_NAME).read_text())["name"] == "tiny"
    assert entrypoint("r1") == f"python -m cluster.cli train {JOB_FILE_NAME} --run-id r1 --address auto"

    installed = runtime_env(job, tmp_path / "only-job", "installed")
    assert installed == {"working_dir": str(tmp_path / "only-job")}
    assert [p.name for p in (tmp_path / "only-job").iterdir()] == [JOB_FILE_NAME]


def test_this_checkout_is_found():
    root = checkout_root()
    assert root is not None and (root / "cluster" / "jobs.py").is_file()


def test_no_cluster_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from cluster.cli import main

    monkeypatch.setenv("TUNEFLEET_CLUSTER_STATE", str(tmp_path / "none.json"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert main(["jobs", "list"]) == 1
    assert "no cluster address: pass --address http://HEAD:8265" in capsys.readouterr().err
    assert main(["submit", str(_write(tmp_path)), "--cluster-paths", "--env", "NOEQUALS"]) == 1
    assert "--env 'NOEQUALS': expected KEY=VALUE" in capsys.readouterr().err


def test_dns_labels():
    assert dns_label("Tiny_Sentiment.v2") == "tiny-sentiment-v2"
    assert len(dns_label("x" * 100, 40)) == 40
