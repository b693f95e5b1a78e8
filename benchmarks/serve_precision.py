"""What `serve.dtype: auto` costs in quality and gives in speed: float32 vs bfloat16 on one trained export.

    python benchmarks/serve_precision.py [EXPORT_DIR] [--limit 800]

Without EXPORT_DIR it fine-tunes MiniLM on the seeded AG News split of
benchmarks/train_text_classification.py (`tunefleet train`, 187 steps) and uses that export.
Both dtypes run the serving handler (serving.load_handler, 2 torch threads) over the same
validation rows in batches of 16: accuracy of each, how often the two agree on the label,
the largest score difference, and sequences/s. Results print and go to
benchmarks/results/serve_precision.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import train_text_classification as train_bench  # noqa: E402

BATCH = 16


def trained_export(directory: Path) -> tuple[Path, Path]:
    """A tunefleet export of MiniLM fine-tuned on the AG News split, and the validation file."""
    train, validation = train_bench.split_ag_news(directory)
    job = train_bench.tunefleet_job(directory, train, validation, 187)
    env = {**os.environ, "TUNEFLEET_NO_PROGRESS": "1"}
    subprocess.run([sys.executable, "-m", "cluster.cli", "train", str(job), "--run-id", "precision"], check=True,
                   env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    return directory / "runs" / "bench-agnews" / "precision" / "export", validation


def measure(export: Path, rows: list[tuple[str, str]], dtype: str) -> dict:
    from serving import ServeSpec, load_handler

    handler = load_handler(export, ServeSpec(num_cpus=2, dtype=dtype))
    items = [(text, None) for text, _ in rows]
    handler.run_batch(items[:BATCH])  # warm-up
    start = time.perf_counter()
    outputs = []
    for i in range(0, len(items), BATCH):
        outputs.extend(handler.run_batch(items[i:i + BATCH]))
    seconds = time.perf_counter() - start
    return {"outputs": outputs, "seq_per_s": len(items) / seconds,
            "weights_dtype": str(next(handler.model.parameters()).dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", nargs="?")
    parser.add_argument("--validation", help="with EXPORT_DIR: AG News-style CSV (label, title, description)")
    parser.add_argument("--limit", type=int, default=800)
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/serve_precision.json"))
    args = parser.parse_args()

    if args.export_dir:
        export, validation = Path(args.export_dir), Path(args.validation or "")
    else:
        export, validation = trained_export(Path(tempfile.mkdtemp(prefix="tf-precision-")))
    labels = [line.strip() for line in (train_bench.AG_NEWS / "classes.txt").open() if line.strip()]
    rows = [(f"{title} {body}", labels[int(label) - 1])
            for label, title, body in list(csv.reader(validation.open(encoding="utf-8")))[: args.limit]]

    runs = {dtype: measure(export, rows, dtype) for dtype in ("float32", "bfloat16")}
    gold = [label for _, label in rows]
    results = {}
    for dtype, run in runs.items():
        predicted = [output[0][0] for output in run["outputs"]]
        results[dtype] = {"accuracy": sum(p == g for p, g in zip(predicted, gold)) / len(gold),
                          "seq_per_s": round(run["seq_per_s"], 1), "weights_dtype": run["weights_dtype"]}
    fp32, bf16 = runs["float32"]["outputs"], runs["bfloat16"]["outputs"]
    agree = sum(a[0][0] == b[0][0] for a, b in zip(fp32, bf16)) / len(fp32)
    score_diff = max(abs(dict(a)[label] - dict(b)[label]) for a, b in zip(fp32, bf16) for label, _ in a)
    summary = {"rows": len(rows), "batch": BATCH, "export": str(export), "results": results,
               "label_agreement": agree, "max_score_difference": round(score_diff, 4),
               "accuracy_difference_points": round(100 * (results["bfloat16"]["accuracy"]
                                                          - results["float32"]["accuracy"]), 2),
               "speedup_bf16": round(results["bfloat16"]["seq_per_s"] / results["float32"]["seq_per_s"], 2)}
    for dtype, r in results.items():
        print(f"{dtype:9s} accuracy {r['accuracy']:.4f}  {r['seq_per_s']:7.1f} seq/s  ({r['weights_dtype']})")
    print(f"label agreement {agree:.4f}, largest score difference {score_diff:.4f}, "
          f"bf16 speed-up {summary['speedup_bf16']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
