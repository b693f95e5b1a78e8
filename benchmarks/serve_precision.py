"""What `serve.dtype: auto` costs in quality and gives in speed: float32 vs bfloat16 vs int8 on one trained export.

    python benchmarks/serve_precision.py [EXPORT_DIR] [--limit 800]

Without EXPORT_DIR it fine-tunes MiniLM on the seeded AG News split of
benchmarks/train_text_classification.py (`tunefleet train`, 187 steps) and uses that export.
Each dtype (`--dtypes`; `auto` is what this machine's default picks) runs the serving handler
(serving.load_handler, 2 torch threads) over the same validation rows in batches of 16: accuracy,
how often it agrees with float32 on the label, the largest score difference, and sequences/s; and
how often the first `--alone` texts, each sent alone, get the label their batch of 16 gave them
(1.0 unless the dtype's arithmetic depends on the batch: int8's activation scales do).
Results print and go to benchmarks/results/serve_precision.json.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import train_text_classification as train_bench  # noqa: E402
from common import scratch_dir  # noqa: E402

BATCH = 16


def trained_export(directory: Path) -> tuple[Path, Path]:
    """A tunefleet export of MiniLM fine-tuned on the AG News split, and the validation file."""
    train, validation = train_bench.split_ag_news(directory)
    job = train_bench.tunefleet_job(directory, train, validation, 187)
    env = {**os.environ, "TUNEFLEET_NO_PROGRESS": "1"}
    subprocess.run([sys.executable, "-m", "cluster.cli", "train", str(job), "--run-id", "precision"], check=True,
                   env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    return directory / "runs" / "bench-agnews" / "precision" / "export", validation


def measure(export: Path, rows: list[tuple[str, str]], dtype: str, alone_count: int) -> dict:
    from serving import ServeSpec, load_handler
    from serving.handlers import parse_request

    handler = load_handler(export, ServeSpec(num_cpus=2, dtype=dtype))
    every_label = parse_request(handler, {"inputs": "x", "parameters": {"top_k": None}})

    def ranked(batch: list) -> list[list[tuple[str, float]]]:
        """(label, score) pairs per item, best first, as the server ranks them."""
        return [[(p["label"], p["score"]) for p in handler.format(o, every_label)] for o in handler.run_batch(batch)]

    items = [(text, None) for text, _ in rows]
    ranked(items[:BATCH])  # warm-up
    start = time.perf_counter()
    outputs = []
    for i in range(0, len(items), BATCH):
        outputs.extend(ranked(items[i:i + BATCH]))
    seconds = time.perf_counter() - start
    alone = [ranked([item])[0] for item in items[:alone_count]]
    quantized = any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in handler.model.modules())
    weights = "int8" if quantized else str(next(handler.model.parameters()).dtype)
    return {"outputs": outputs, "alone": alone, "seq_per_s": len(items) / seconds, "weights_dtype": weights}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir", nargs="?")
    parser.add_argument("--validation", help="with EXPORT_DIR: AG News-style CSV (label, title, description)")
    parser.add_argument("--limit", type=int, default=800)
    parser.add_argument("--alone", type=int, default=200, help="texts also sent one at a time (batch dependence)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8", "auto"],
                        help="serve.dtype values to compare (float32 is always measured: the reference)")
    parser.add_argument("--out", default=str(REPO / "benchmarks/results/serve_precision.json"))
    args = parser.parse_args()
    args.dtypes = ["float32", *(d for d in dict.fromkeys(args.dtypes) if d != "float32")]

    with contextlib.ExitStack() as stack:
        if args.export_dir:
            export, validation = Path(args.export_dir), Path(args.validation or "")
        else:  # trained here, in a folder removed at the end (~90 MB and a run directory)
            export, validation = trained_export(stack.enter_context(scratch_dir("tf-precision-")))
        labels = [line.strip() for line in (train_bench.AG_NEWS / "classes.txt").open() if line.strip()]
        rows = [(f"{title} {body}", labels[int(label) - 1])
                for label, title, body in list(csv.reader(validation.open(encoding="utf-8")))[: args.limit]]
        runs = {dtype: measure(export, rows, dtype, args.alone) for dtype in args.dtypes}
    gold = [label for _, label in rows]
    exact = runs["float32"]["outputs"]
    results = {}
    for dtype, run in runs.items():
        predicted = [output[0][0] for output in run["outputs"]]
        results[dtype] = {
            "accuracy": sum(p == g for p, g in zip(predicted, gold)) / len(gold),
            "seq_per_s": round(run["seq_per_s"], 1), "weights": run["weights_dtype"],
            "label_agreement_with_float32": sum(a[0][0] == b[0][0] for a, b in zip(exact, run["outputs"])) / len(exact),
            "max_score_difference": round(max(abs(dict(a)[label] - dict(b)[label])
                                              for a, b in zip(exact, run["outputs"]) for label, _ in a), 4),
            "label_agreement_batch16_vs_alone": (sum(a[0][0] == b[0][0] for a, b in zip(run["outputs"], run["alone"]))
                                                 / max(1, len(run["alone"]))),
        }
        results[dtype]["accuracy_difference_points"] = round(100 * (results[dtype]["accuracy"]
                                                                    - results["float32"]["accuracy"]), 2)
        results[dtype]["speedup_over_float32"] = round(results[dtype]["seq_per_s"] / results["float32"]["seq_per_s"], 2)
    summary = {"rows": len(rows), "batch": BATCH, "export": args.export_dir or "trained by this run (removed)",
               "results": results}
    for dtype, r in results.items():
        print(f"{dtype:9s} accuracy {r['accuracy']:.4f} ({r['accuracy_difference_points']:+.2f} pt)  "
              f"{r['seq_per_s']:7.1f} seq/s ({r['speedup_over_float32']:.2f}x)  "
              f"agree {r['label_agreement_with_float32']:.4f}  max score diff {r['max_score_difference']:.4f}  "
              f"batch vs alone {r['label_agreement_batch16_vs_alone']:.3f}  ({r['weights']})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
