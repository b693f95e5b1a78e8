"""Command → first optimizer step: tunefleet against bare Ray Train on the same machine, alternated.

    .venv/bin/python benchmarks/first_step_floor.py [--repeats 2]

What the issue's "first step ≤ 15 s on a cold local Ray" is up against. Each configuration is a new
command (its own process, its own private local Ray started with the options tunefleet uses), timed
from just before the process starts to the end of its first optimizer step:

  bare_trivial   a Ray Train V2 TorchTrainer, 1 worker, whose loop takes one step of a 10 × 10 Linear:
                 Ray's start, the Train controller, its helper actors and the worker, and nothing else
  bare_minilm    the same trainer whose loop builds MiniLM for 4 labels (transformers' from_pretrained)
                 and takes one step on a 32 × 128-token batch (AG News' first, longest, batch is that)
  tunefleet      `tunefleet train` of the AG News benchmark job (../shared) with train.max_steps=1:
                 reading and validating the job, tokenizing 6,800 rows, MLflow, the same trainer

Prints the medians and tunefleet / bare_minilm; writes benchmarks/results/first_step_floor.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import scratch_dir  # noqa: E402
from train_text_classification import AG_NEWS, REPO, RESULTS, minilm, split_ag_news, tunefleet_job  # noqa: E402


def bare(mode: str, started: float) -> None:
    """Child process: one bare Ray Train run; prints the seconds from `started` to its first step."""
    for name, value in (("RAY_USAGE_STATS_ENABLED", "0"), ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0"),
                        ("RAY_prestart_worker_first_driver", "0"), ("RAY_worker_niceness", "0")):
        os.environ.setdefault(name, value)  # as cluster/runtime.py starts the local Ray
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config: dict) -> None:
        import time

        import torch

        torch.set_num_threads(2)
        if config["mode"] == "trivial":
            torch.nn.Linear(10, 10)(torch.randn(4, 10)).sum().backward()
        else:
            from transformers import AutoModelForSequenceClassification

            model = AutoModelForSequenceClassification.from_pretrained(config["model"], num_labels=4)
            ids = torch.randint(1000, 2000, (32, 128))
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            torch.nn.functional.cross_entropy(logits, torch.zeros(32, dtype=torch.long)).backward()
        print(f"FIRST_STEP {time.time() - config['started']}", flush=True)

    temp = tempfile.mkdtemp(prefix="tfray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, logging_level="WARNING")
    try:
        TorchTrainer(loop, train_loop_config={"mode": mode, "started": started, "model": minilm()},
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2}),
                     run_config=RunConfig(storage_path=f"{temp}/storage", name="floor")).fit()
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def measure(name: str, job: Path, repeat: int) -> float:
    started = time.time()
    if name == "tunefleet":
        run_id = f"floor{repeat}"
        done = subprocess.run([sys.executable, "-m", "cluster.cli", "train", str(job), "--set", "train.max_steps=1",
                               "--run-id", run_id], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "TUNEFLEET_NO_PROGRESS": "1"})
        if done.returncode:
            sys.exit(f"tunefleet train failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        metrics = job.parent / "runs" / "bench-agnews" / run_id / "metrics.jsonl"
        first = next(r for r in map(json.loads, metrics.open()) if r["event"] == "train")
        return first["time"] - started
    out = subprocess.run([sys.executable, __file__, "--bare", name.removeprefix("bare_"), "--started", str(started)],
                         check=True, cwd=REPO, capture_output=True, text=True)
    # the worker's print reaches the driver's output through Ray's log monitor, prefixed with the actor
    return float(next(line.split()[-1] for line in (out.stdout + out.stderr).splitlines() if "FIRST_STEP" in line))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bare", help=argparse.SUPPRESS)
    parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare(args.bare, args.started)
        return 0
    if not AG_NEWS.exists():
        sys.exit(f"{AG_NEWS} not found: run from a checkout with ../shared beside it")
    names = ["bare_trivial", "bare_minilm", "tunefleet"]
    seconds: dict[str, list[float]] = {name: [] for name in names}
    with scratch_dir("tf-floor-") as directory:  # the split and tunefleet's run directories
        train, validation = split_ag_news(directory)
        job = tunefleet_job(directory, train, validation, 1)
        for repeat in range(args.repeats):
            for name in names if repeat % 2 == 0 else names[::-1]:
                seconds[name].append(measure(name, job, repeat))
                print(f"  {name}: {seconds[name][-1]:.1f} s", flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    result = {"seconds": seconds, "median_seconds": medians,
              "tunefleet_over_bare_minilm": medians["tunefleet"] / medians["bare_minilm"],
              "tunefleet_minus_bare_minilm_seconds": medians["tunefleet"] - medians["bare_minilm"]}
    print(json.dumps(result, indent=2))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "first_step_floor.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
