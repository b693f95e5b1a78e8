"""Run files across a crash: a metrics.jsonl line cut by a kill mid-write does not stop the resumed run or its
report, the resumed run keeps the records up to its checkpoint's step, and run files are replaced whole."""

from __future__ import annotations

import json

from training.layout import read_metrics_log
from training.loop import _MetricsLog
from training.storage import StorageDir


def test_a_resumed_run_keeps_records_to_its_checkpoint_and_drops_a_line_cut_by_the_crash(tmp_path):
    log_file = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"event": "train", "step": step, "loss": 1.0 / step}) for step in (1, 2, 3, 4)]
    log_file.write_text("\n".join(lines) + "\n" + lines[-1][:17])  # killed while writing step 5's line
    assert [r["step"] for r in read_metrics_log(log_file)] == [1, 2, 3, 4]

    log = _MetricsLog(StorageDir.local(tmp_path), enabled=True, keep_until_step=3)  # resumed at step 3
    log.write({"event": "resume", "step": 3})
    log.write({"event": "train", "step": 4, "loss": 0.2})
    log.close()

    records = [json.loads(line) for line in log_file.read_text().splitlines()]  # every line parses again
    assert [(r["event"], r["step"]) for r in records] == [
        ("train", 1), ("train", 2), ("train", 3), ("resume", 3), ("train", 4)]
    assert records[-1]["loss"] == 0.2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_run_files_are_replaced_whole_on_a_local_disk(tmp_path):
    run = StorageDir.local(tmp_path).child("job", "r1")
    run.write_text("tracking.json", json.dumps({"mlflow_run_id": "a" * 32}))
    run.write_text("tracking.json", json.dumps({"mlflow_run_id": "b"}))  # shorter: no tail of the old text left
    assert json.loads(run.read_text("tracking.json")) == {"mlflow_run_id": "b"}
    assert sorted(p.name for p in (tmp_path / "job" / "r1").iterdir()) == ["tracking.json"]
