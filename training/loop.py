"""The training loop each Ray Train worker runs: setup, train, evaluate, checkpoint.

One explicit loop for every task: AdamW with a warmup schedule, gradient
accumulation, autocast on GPU, evaluation every epoch or every N steps,
early stopping, and a checkpoint shard per rank at each evaluation.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from transformers import get_scheduler

from training.batching import batches_per_epoch, epoch_batches, evaluation_batches
from training.checkpoint import TrainState, load_shard, save_shard
from training.layout import METRICS_FILE
from training.losses import class_weights_for, count_targets
from training.methods import METHODS, count_parameters
from training.model_builder import build_training_model
from training.optim import parameter_groups
from training.tasks import TASKS, selection_metric


def train_loop_per_worker(config: dict[str, Any]) -> None:
    spec = config["spec"]
    prepared = config["data"]
    run_dir = Path(config["run_dir"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    task = TASKS.get(spec.task)
    method = METHODS.get(spec.method.name)

    # ---- setup -------------------------------------------------------------
    # Ray sets OMP_NUM_THREADS to the worker's CPUs (1 unless asked): use what the worker reserved.
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    torch.manual_seed(spec.train.seed)
    device = ray.train.torch.get_device()
    model = build_training_model(spec, prepared.labels, on_cuda=device.type == "cuda")
    trainable, total = count_parameters(model)
    if trainable == 0:
        print(f"WARNING: method {spec.method.name} leaves no trainable parameters; the model will not change")
    model = ray.train.torch.prepare_model(model) if world > 1 else model.to(device)
    bare = model.module if hasattr(model, "module") else model
    processor = task.build_processor(spec)
    collate, collate_eval = task.build_collator(processor, True), task.build_collator(processor, False)
    train_rows, validation_rows = _rows(prepared.train), _rows(prepared.validation)
    train_lengths = prepared.train.column(task.length_column).to_pylist()
    validation_lengths = prepared.validation.column(task.length_column).to_pylist()

    t = spec.train
    accumulation = t.gradient_accumulation_steps
    per_epoch = -(-batches_per_epoch(len(train_rows), t.batch_size, world) // accumulation)
    total_steps = t.max_steps or t.epochs * per_epoch
    epochs = -(-total_steps // per_epoch)
    options = spec.method_options()
    optimizer = torch.optim.AdamW(
        parameter_groups(bare, t.learning_rate, t.weight_decay, t.layer_lr_decay, include_frozen=method.schedule is not None),
        lr=t.learning_rate,
    )
    scheduler = get_scheduler(t.scheduler, optimizer, num_warmup_steps=int(t.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    weights = class_weights_for(t.class_weights, prepared.label_counts)
    loss_fn = task.build_loss(weights, t.label_smoothing, device)
    amp_dtype = _autocast_dtype(t.precision, device)
    scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
    metric_name, higher_is_better = selection_metric(spec)

    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_shard(Path(directory), rank, world, bare, optimizer, scheduler)
        print(f"[rank {rank}] resumed at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch})")
    log = _MetricsLog(run_dir / METRICS_FILE, rank == 0, keep_until_step=state.step)
    if rank == 0:
        log.write({"event": "start", "step": state.step, "trainable_parameters": trainable,
                   "total_parameters": total, "world_size": world, "total_steps": total_steps})

    def evaluate_and_checkpoint() -> bool:
        """Evaluate on every rank's share, checkpoint, and say whether to stop early."""
        metrics = _evaluate(model, validation_rows, validation_lengths, collate_eval, loss_fn, task, prepared.labels,
                            t.batch_size * 2, world, rank, device, amp_dtype)
        value = metrics[metric_name]
        improved = state.best_metric is None or (value > state.best_metric if higher_is_better else value < state.best_metric)
        if improved:
            state.best_metric, state.evals_without_improvement = value, 0
        else:
            state.evals_without_improvement += 1
        scalar = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        reported = {**scalar, "step": state.step, "epoch": state.epoch}
        log.write({"event": "eval", **reported})
        with tempfile.TemporaryDirectory(prefix="tunefleet-ckpt-") as directory:
            details = {k: v for k, v in metrics.items() if k not in scalar}
            save_shard(Path(directory), rank, world, bare, optimizer, scheduler, state, reported,
                       extra={"labels": prepared.labels, "details": details})
            ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(directory))
        patience = t.early_stopping_patience
        return patience is not None and state.evals_without_improvement >= patience

    def follow_schedule() -> None:
        """Gradual unfreezing: DDP registers only trainable parameters, so it is rebuilt on a change."""
        nonlocal model
        if method.schedule and method.schedule(bare, options, state.step, state.epoch):
            trainable_now, _ = count_parameters(bare)
            log.write({"event": "unfreeze", "step": state.step, "epoch": state.epoch, "trainable_parameters": trainable_now})
            if world > 1:
                model = ray.train.torch.prepare_model(bare)

    # ---- train -------------------------------------------------------------
    follow_schedule()
    progress = _progress(rank, total_steps, state.step, spec.name)
    model.train()
    stop = state.step >= total_steps
    window_loss, window_samples, window_start = 0.0, 0, time.perf_counter()
    last_eval_step = state.step if checkpoint is not None else -1
    while not stop and state.epoch < epochs:
        plan = epoch_batches(train_lengths, t.batch_size, world, rank, t.seed, state.epoch, t.group_by_length)
        for index in range(state.batch_in_epoch, len(plan)):
            batch = _to_device(collate([train_rows[i] for i in plan[index]]), device)
            labels = batch.pop("labels")
            boundary = (index + 1) % accumulation == 0 or index + 1 == len(plan)
            sync = _no_sync(model) if not boundary else _nullcontext()
            with sync, torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                loss = loss_fn(_logits(model(**batch)), labels)
            scaler.scale(loss / accumulation).backward()
            window_loss += loss.item() * len(labels)
            window_samples += len(labels)
            state.batch_in_epoch = index + 1
            if not boundary:
                continue
            if t.max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(bare.parameters(), t.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            follow_schedule()
            progress.update(1)
            if state.step % t.log_every_steps == 0 or state.step == 1:
                elapsed = time.perf_counter() - window_start
                mean_loss, samples = _mean_across_ranks(window_loss, window_samples, world)
                log.write({"event": "train", "step": state.step, "epoch": state.epoch, "loss": mean_loss,
                           "learning_rate": scheduler.get_last_lr()[0], "samples_per_second": samples / max(elapsed, 1e-9)})
                progress.set_description(f"{spec.name} loss {mean_loss:.4f}")
                window_loss, window_samples, window_start = 0.0, 0, time.perf_counter()
            if t.eval_every_steps and state.step % t.eval_every_steps == 0:
                last_eval_step = state.step
                stop = evaluate_and_checkpoint()
            if state.step >= total_steps:
                stop = True
            if stop:
                break
        if not stop or state.batch_in_epoch >= len(plan):
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            follow_schedule()
        if t.eval_every_steps is None and last_eval_step != state.step:
            last_eval_step = state.step
            stop = evaluate_and_checkpoint() or stop
    if last_eval_step != state.step:
        evaluate_and_checkpoint()
    progress.close()
    if rank == 0:
        log.write({"event": "end", "step": state.step})


def _rows(table) -> list[dict]:
    columns = {name: table.column(name).to_pylist() for name in table.column_names}
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _no_sync(model):
    return model.no_sync() if hasattr(model, "no_sync") else _nullcontext()


def _mean_across_ranks(loss_sum: float, count: int, world: int) -> tuple[float, int]:
    if world > 1:
        totals = torch.tensor([loss_sum, float(count)], dtype=torch.float64)
        dist.all_reduce(totals)
        loss_sum, count = totals[0].item(), int(totals[1].item())
    return loss_sum / max(count, 1), count


def _logits(outputs) -> torch.Tensor:
    """Hugging Face models return an output object; plain torch modules (torchvision) a tensor."""
    return outputs.logits if hasattr(outputs, "logits") else outputs


@torch.inference_mode()
def _evaluate(model, rows, lengths, collate, loss_fn, task, labels, batch_size, world, rank, device, amp_dtype):
    """Every rank evaluates its share; all ranks then hold the same metrics (so they stop together)."""
    model.eval()
    predictions, references, loss_sum, targets = [], [], 0.0, 0
    for indices in evaluation_batches(lengths, batch_size, world, rank):
        batch = _to_device(collate([rows[i] for i in indices]), device)
        gold = batch.pop("labels")
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = _logits(model(**batch)).float()
        count = count_targets(gold)
        loss_sum += loss_fn(logits, gold).item() * count
        targets += count
        batch_predictions, batch_references = task.eval_outputs(logits.cpu(), gold.cpu())
        predictions += batch_predictions
        references += batch_references
    gathered = [(predictions, references, loss_sum, targets)]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, (predictions, references, loss_sum, targets))
    model.train()
    all_predictions = [p for g in gathered for p in g[0]]
    all_references = [r for g in gathered for r in g[1]]
    eval_loss = sum(g[2] for g in gathered) / max(sum(g[3] for g in gathered), 1)
    return {**task.compute_metrics(all_predictions, all_references, labels, eval_loss), "eval_loss": eval_loss}


class _MetricsLog:
    """metrics.jsonl on rank 0; a resumed run drops lines past its checkpoint so the curve joins."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int) -> None:
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= keep_until_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {**record, "time": time.time()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


def _progress(rank: int, total: int, initial: int, name: str):
    """A Ray-aware progress bar on rank 0 (tqdm_ray keeps bars intact across workers)."""
    if rank != 0 or os.environ.get("TUNEFLEET_NO_PROGRESS"):
        return _NoProgress()
    from ray.experimental.tqdm_ray import tqdm

    bar = tqdm(total=total, desc=name, unit="step")
    bar.update(initial)
    return bar


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass
