"""DeepSpeed ZeRO 0-3 (and CPU offload) inside 2 Ray Train workers on a ~110M-parameter BERT, side by side.

    nice -n 5 .venv/bin/python benchmarks/train_zero.py [--steps 3] [--batch 4] [--seq 64] [--configs zero0,zero3]

A BERT-base-sized model (12 layers, hidden 768, 30,522-token vocabulary: 109.5M parameters) is
built from a config with random weights. For each configuration a fresh pair of Ray Train workers
(1 CPU each) runs tunefleet's DeepSpeed seam (training/deepspeed_engine.py: torch AdamW handed to
deepspeed.initialize, fp32) for a warmup step and `--steps` timed steps on synthetic batches, then
saves a checkpoint with training/checkpoint.save_shard (every rank writes its ZeRO files) and
restores it (plan_resume + restore). Per worker it records:

- state_bytes: every live torch tensor in the worker (model, gradients, optimizer moments,
  DeepSpeed's flat buffers), deduplicated by storage, the larger of after-backward and after-step:
  model + gradient + optimizer state;
- rss_mb after a step and peak_rss_mb (ru_maxrss) of the worker process (includes ~1 GB of
  Python / torch / transformers / DeepSpeed code);
- samples/s across both workers; checkpoint save and restore seconds; bytes written per rank.

Writes benchmarks/results/train_zero.json. On a CPU machine "offload" cannot lower memory (the
state is in CPU memory either way); it is measured to show its cost.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"

CONFIGS = {
    "zero0": {"stage": 0},
    "zero1": {"stage": 1},
    "zero2": {"stage": 2},
    "zero3": {"stage": 3},
    "zero2+offload_optimizer": {"stage": 2, "offload_optimizer": True},
    "zero3+offload_optimizer+params": {"stage": 3, "offload_optimizer": True, "offload_params": True},
}


def build_model(directory: Path) -> int:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512, num_labels=2)
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    model.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _live_tensor_bytes() -> int:
    import torch

    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen and storage.nbytes() > 0:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except Exception:  # tensors without storage (meta, ZeRO-3 released parameters)
            continue
    return total


def worker(config: dict) -> None:
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import BertForSequenceClassification, get_scheduler

    from training import deepspeed_engine
    from training.checkpoint import TrainState, plan_resume, restore, save_shard
    from training.optim import build_optimizer, parameter_groups

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(rank)
    baseline_rss = _rss_mb()
    model = BertForSequenceClassification.from_pretrained(config["model_dir"])
    options = SimpleNamespace(**{"config": None, "offload_optimizer": False, "offload_params": False, **config["zero"]})
    train = SimpleNamespace(batch_size=config["batch"], gradient_accumulation_steps=1, max_grad_norm=1.0)
    optimizer, _ = build_optimizer("adamw", parameter_groups(model, 1e-4, 0.01), 1e-4, torch.device("cpu"))
    engine = deepspeed_engine.initialize(model, optimizer, lambda o: get_scheduler("constant", o),
                                         deepspeed_engine.build_config(options, train, None, on_cuda=False))
    generator = torch.Generator().manual_seed(rank)

    def step(measure: bool = False) -> int:
        batch = torch.randint(1000, 30000, (config["batch"], config["seq"]), generator=generator)
        labels = torch.randint(0, 2, (config["batch"],), generator=generator)
        engine.set_gradient_accumulation_boundary(True)
        loss = torch.nn.functional.cross_entropy(engine(input_ids=batch).logits.float(), labels)
        engine.backward(loss)
        with_gradients = _live_tensor_bytes() if measure else 0  # gradients (or their partitions) alive
        engine.step()
        return with_gradients

    step()  # warmup: optimizer state is allocated at the first step
    # Model + gradients + optimizer state: the larger of "after backward" and "after the step".
    state_bytes = max(step(measure=True), _live_tensor_bytes())
    rss_after_step = _rss_mb()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(config["steps"]):
        step()
    dist.barrier()
    seconds = time.perf_counter() - start

    # As in a run: each rank saves into its own directory, then the directories are merged (Ray Train
    # does that on storage) and every rank restores from the merged checkpoint.
    own_dir, directory = Path(config["checkpoint_dir"]) / f"rank{rank}", Path(config["checkpoint_dir"]) / "merged"
    start = time.perf_counter()
    save_shard(own_dir, rank, world, engine.module, engine.optimizer, engine.lr_scheduler,
               TrainState(step=config["steps"] + 1), {}, engine=engine, zero_stage=options.stage)
    dist.barrier()
    save_seconds = time.perf_counter() - start
    shutil.copytree(own_dir, directory, dirs_exist_ok=True)
    dist.barrier()
    manifest = json.loads((directory / "manifest.json").read_text())
    own = {f"rank_{rank:05d}/", f"zero_pp_rank_{rank}_"}
    own_bytes = sum(size for path, size in manifest["files"].items() if any(tag in path for tag in own))
    if rank == 0:  # what rank 0 writes once for all: replicated model states, schedule, DeepSpeed's scripts
        own_bytes += sum(size for path, size in manifest["files"].items()
                         if not any(f"rank_{r:05d}/" in path or f"zero_pp_rank_{r}_" in path for r in range(world)))
    start = time.perf_counter()
    restore(plan_resume(directory, world, options.stage), rank, world, engine.optimizer, engine.lr_scheduler, engine)
    dist.barrier()
    restore_seconds = time.perf_counter() - start

    mine = {"rank": rank, "state_bytes": state_bytes, "baseline_rss_mb": round(baseline_rss),
            "rss_after_step_mb": round(rss_after_step),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "checkpoint_bytes": own_bytes, "save_seconds": round(save_seconds, 2),
            "restore_seconds": round(restore_seconds, 2)}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        samples_per_second = world * config["batch"] * config["steps"] / seconds
        Path(config["out"]).write_text(json.dumps({"samples_per_second": round(samples_per_second, 2),
                                                   "workers": everyone}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.runtime import ray_session

    work = Path(tempfile.mkdtemp(prefix="tunefleet-bench-zero-"))
    results = {"model": "BERT-base shape from a config (random weights), fp32, CPU", "workers": 2,
               "cpus_per_worker": 1, "batch_per_worker": args.batch, "sequence_length": args.seq,
               "timed_steps": args.steps, "configs": {}}
    try:
        results["parameters"] = build_model(work / "model")
        print(f"model: {results['parameters'] / 1e6:.1f}M parameters")
        with ray_session(num_cpus=2):
            for name in args.configs.split(","):
                out, checkpoint = work / f"{name}.json", work / f"ckpt-{name}"
                config = {"model_dir": str(work / "model"), "zero": CONFIGS[name], "batch": args.batch,
                          "seq": args.seq, "steps": args.steps, "out": str(out), "checkpoint_dir": str(checkpoint)}
                started = time.perf_counter()
                TorchTrainer(worker, train_loop_config=config,
                             scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                             run_config=RunConfig(name=f"bench-{name}", storage_path=str(work / "ray"))).fit()
                results["configs"][name] = {**CONFIGS[name], **json.loads(out.read_text()),
                                            "wall_seconds": round(time.perf_counter() - started, 1)}
                shutil.rmtree(checkpoint, ignore_errors=True)
                row = results["configs"][name]
                print(f"{name:32s} {row['samples_per_second']:6.2f} samples/s  state/worker "
                      f"{[round(w['state_bytes'] / 2**20) for w in row['workers']]} MiB  peak RSS "
                      f"{[w['peak_rss_mb'] for w in row['workers']]} MiB  ckpt save "
                      f"{row['workers'][0]['save_seconds']} s restore {row['workers'][0]['restore_seconds']} s  "
                      f"bytes/rank {[round(w['checkpoint_bytes'] / 2**20) for w in row['workers']]} MiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    zero0 = results["configs"].get("zero0")
    if zero0:
        base = max(w["state_bytes"] for w in zero0["workers"])
        for row in results["configs"].values():
            row["state_vs_zero0"] = round(max(w["state_bytes"] for w in row["workers"]) / base, 3)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_zero.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS / 'train_zero.json'}")


if __name__ == "__main__":
    main()
