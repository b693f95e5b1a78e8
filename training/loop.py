"""The training loop each Ray Train worker runs: setup, train, evaluate, checkpoint.

One explicit loop for every task: AdamW with a warmup schedule, gradient
accumulation, autocast on GPU, evaluation every epoch or every N steps,
early stopping, and a checkpoint shard per rank at each evaluation. The model
is wrapped once: DDP, or with `scale.deepspeed` a DeepSpeed ZeRO engine
(training/deepspeed_engine.py) that owns backward, clipping and the optimizer step.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from training import deepspeed_engine
from training.batching import batches_per_epoch, epoch_batches, evaluation_batches
from training.checkpoint import (
    TrainState, load_model_weights, newest_complete, plan_resume, restore, save_shard,
)
from training.layout import CHECKPOINTS_DIR, METRICS_FILE, read_metrics_log
from training.losses import class_weights_for, count_targets
from training.methods import METHODS, count_parameters
from training.cpu_dropout import use_cpu_dropout
from training.feature_cache import cached_features
from training.model_builder import build_training_model
from training.optim import build_optimizer, lr_schedule, parameter_groups
from training.progress import progress, quiet_library_bars, quiet_ray_report_lines
from training.storage import StorageDir, write_whole
from training.streaming import stream_epoch
from training.tasks import TASKS, selection_metric
from training.tracking import ExperimentTracker, TrackingError, open_tracker
from training.unread_positions import skip_unread_positions


def train_loop_per_worker(config: dict[str, Any]) -> None:
    spec = config["spec"]
    prepared = config["data"]
    storage: StorageDir = config["storage"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    task = TASKS.get(spec.task)
    method = METHODS.get(spec.method.name)
    zero = spec.scale.deepspeed  # None: plain DDP
    zero_stage = deepspeed_engine.zero_stage(zero) if zero is not None else None

    # ---- setup -------------------------------------------------------------
    if config.get("progress", "bar") != "bar":  # a log: no library bars (a Ray cluster's workers lack the driver's env)
        quiet_library_bars()
    # Ray sets OMP_NUM_THREADS to the worker's CPUs (1 unless asked): use what the worker reserved.
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    torch.manual_seed(spec.train.seed)
    device = ray.train.torch.get_device()
    model = build_training_model(spec, prepared.labels, on_cuda=device.type == "cuda")
    # torch's CPU dropout mask costs ~12% of a step (training/cpu_dropout.py); None: torch's dropout
    cpu_dropout = use_cpu_dropout(model) if device.type == "cpu" and spec.train.cpu_dropout == "fast" else None
    # a BERT-family classifier's last layer: only the position its head reads (training/unread_positions.py)
    skipped = skip_unread_positions(model) if spec.train.unread_positions == "skip" else None
    trainable, total = count_parameters(model)
    if trainable == 0:
        print(f"WARNING: method {spec.method.name} leaves no trainable parameters; the model will not change")
    processor = task.build_processor(spec)
    collate, collate_eval = task.build_collator(processor, True), task.build_collator(processor, False)
    train_rows, validation_rows = _rows(prepared.train), _rows(prepared.validation)
    stream = ray.train.get_dataset_shard("train") if spec.data.streaming else None  # rows stay in Ray Data
    train_lengths = prepared.train.column(task.length_column).to_pylist()
    validation_lengths = prepared.validation.column(task.length_column).to_pylist()

    t = spec.train
    accumulation = t.gradient_accumulation_steps
    per_epoch = -(-batches_per_epoch(len(train_rows), t.batch_size, world) // accumulation)
    total_steps = t.max_steps or t.epochs * per_epoch
    options = spec.method_options()
    optimizer, optimizer_name = build_optimizer(  # torch AdamW, or bitsandbytes' 8-bit / paged (train.optimizer)
        t.optimizer,
        parameter_groups(model, t.learning_rate, t.weight_decay, t.layer_lr_decay, include_frozen=method.schedule is not None),
        t.learning_rate, device,
    )

    def make_scheduler(optimizer):
        return lr_schedule(t.scheduler, optimizer, int(t.warmup_ratio * total_steps), total_steps)

    weights = class_weights_for(t.class_weights, prepared.label_counts)
    loss_fn = task.build_loss(weights, t.label_smoothing, device)
    amp_dtype = _autocast_dtype(t.precision, device)
    metric_name, higher_is_better = selection_metric(spec)

    # Resume: weights go in before DDP / DeepSpeed wraps (and ZeRO-3 partitions) the model, unless
    # DeepSpeed restores its own partitions; then optimizer, schedule, RNG and data position.
    state, engine, input_dtype, plan = TrainState(), None, None, None
    with _resume_directory(ray.train.get_checkpoint(), storage.child(CHECKPOINTS_DIR)) as resume_dir:
        if resume_dir is not None:
            plan = plan_resume(Path(resume_dir), world, zero_stage)
            if plan.weights_first:
                load_model_weights(plan.directory, model)
        if zero is not None:
            engine = deepspeed_engine.initialize(
                model.to(device), optimizer, make_scheduler,
                deepspeed_engine.build_config(zero, t, amp_dtype, on_cuda=device.type == "cuda"))
            model, optimizer, scheduler = engine, engine.optimizer, engine.lr_scheduler
            amp_dtype, input_dtype = None, deepspeed_engine.input_dtype(engine)  # DeepSpeed casts the model itself
        else:
            model = ray.train.torch.prepare_model(model) if world > 1 else model.to(device)
            scheduler = make_scheduler(optimizer)
        if plan is not None:
            state = restore(plan, rank, world, optimizer, scheduler, engine)
            print(f"[rank {rank}] resumed at step {state.step} (epoch {state.epoch}, batch {state.batch_in_epoch}); "
                  f"optimizer {plan.optimizer}: {plan.reason}")
            if not t.max_steps and plan.manifest["world_size"] != world:  # epochs are counted in new-sized steps
                batches = batches_per_epoch(len(train_rows), t.batch_size, world)
                total_steps = (state.step + -(-(batches - state.batch_in_epoch) // accumulation)
                               + (t.epochs - state.epoch - 1) * per_epoch)
    bare = model.module if hasattr(model, "module") else model
    features = cached_features(spec, bare)  # head + cache_features: the backbone runs once per example
    scaler = torch.amp.GradScaler(enabled=amp_dtype == torch.float16)
    # Opening the tracker (importing MLflow, joining the driver's run: ~2.4 s of CPU here) starts once the
    # first step is done: on a small machine it would slow that step (the user's first sign of progress)
    # as much as it takes. Records written meanwhile wait for it (_MetricsLog). Where the driver reads
    # metrics.jsonl as it is written, it logs them itself (training.tracking.MetricsFollower): no tracker here.
    start_step = state.step
    tracker_here = rank == 0 and not config.get("tracker_on_driver")
    open_tracker_later = (lambda: _in_background(_rank0_tracker, spec, storage, config.get("mlflow_tracking_uri"),
                                                 start_step)) if tracker_here else None
    log = _MetricsLog(storage, rank == 0, keep_until_step=state.step, open_tracker=open_tracker_later)
    if plan is not None and rank == 0:
        log.write({"event": "resume", "step": state.step, "from_world_size": plan.manifest["world_size"],
                   "world_size": world, "optimizer": plan.optimizer, "reason": plan.reason})
    if rank == 0:
        log.write({"event": "start", "step": state.step, "trainable_parameters": trainable, "optimizer": optimizer_name,
                   "total_parameters": total, "world_size": world, "total_steps": total_steps,
                   "deepspeed": None if zero is None else {"stage": zero_stage}, "cpu_dropout": cpu_dropout,
                   "unread_positions_skipped": skipped})

    def forward(batch: dict, examples: list[int] | None = None) -> torch.Tensor:
        """examples: the training batch's example indices (the feature cache keys); None in evaluation."""
        cache = features.serving(examples, batch) if features is not None and examples is not None else nullcontext()
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None), cache:
            return _logits(model(**batch))

    def evaluate_and_checkpoint() -> bool:
        """Evaluate on every rank's share, checkpoint, and say whether to stop early."""
        metrics = _evaluate(model, forward, validation_rows, validation_lengths, collate_eval, loss_fn, task,
                            prepared.labels, t.batch_size * 2, world, rank, device, input_dtype,
                            lockstep=zero_stage == 3)
        improved, best = judge(metrics[metric_name], state.best_metric, higher_is_better)
        if improved:
            state.best_metric, state.evals_without_improvement = metrics[metric_name], 0
        else:
            state.evals_without_improvement += 1
        scalar = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        reported = {**scalar, "step": state.step, "epoch": state.epoch}
        log.write({"event": "eval", **reported})
        shown.evaluated(scalar, metric_name, best)
        log.flush()
        with tempfile.TemporaryDirectory(prefix="tunefleet-ckpt-") as directory:
            details = {k: v for k, v in metrics.items() if k not in scalar}
            save_shard(Path(directory), rank, world, bare, optimizer, scheduler, state, reported,
                       extra={"labels": prepared.labels, "details": details}, engine=engine, zero_stage=zero_stage)
            ray.train.report(reported, checkpoint=ray.train.Checkpoint.from_directory(directory))
        patience = t.early_stopping_patience
        return patience is not None and state.evals_without_improvement >= patience

    def follow_schedule() -> None:
        """Gradual unfreezing: DDP registers only trainable parameters, so it is rebuilt on a change."""
        nonlocal model
        if method.schedule and method.schedule(bare, options, state.step, state.epoch):
            trainable_now, _ = count_parameters(bare)
            log.write({"event": "unfreeze", "step": state.step, "epoch": state.epoch, "trainable_parameters": trainable_now})
            if world > 1 and engine is None:
                model = ray.train.torch.prepare_model(bare)

    # ---- train -------------------------------------------------------------
    follow_schedule()
    quiet_ray_report_lines()
    shown = progress(rank, total_steps, state.step, spec.name, config.get("progress", "bar"))
    model.train()
    stop = state.step >= total_steps
    window_loss, window_samples, window_start = 0.0, 0, time.perf_counter()
    last_eval_step = state.step if plan is not None else -1
    # max_steps: as many epochs as the steps take (a resume on another worker count shifts epochs).
    while not stop and (t.max_steps is not None or state.epoch < t.epochs):
        batches, epoch_length = _epoch(state, stream, train_rows, train_lengths, spec, task, world, rank)
        exhausted = False
        for index, examples, rows in batches:
            batch = _to_device(collate(rows), device, input_dtype)
            labels = batch.pop("labels")
            boundary = (index + 1) % accumulation == 0 or index + 1 == epoch_length
            if engine is not None:
                engine.set_gradient_accumulation_boundary(boundary)
                loss = loss_fn(forward(batch, examples).float(), labels)
                engine.backward(loss)  # scaled by 1/accumulation; reduced across ranks at the boundary
                engine.step()  # at the boundary: clip, AdamW and LR schedule; else nothing
            else:
                with _no_sync(model) if not boundary else nullcontext():
                    loss = loss_fn(forward(batch, examples), labels)
                    scaler.scale(loss / accumulation).backward()
            window_loss += loss.item() * len(labels)
            window_samples += len(labels)
            state.batch_in_epoch = index + 1
            if not boundary:
                continue
            if engine is None:
                if t.max_grad_norm:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(bare.parameters(), t.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.step += 1
            follow_schedule()
            shown.advance()
            if state.step % t.log_every_steps == 0 or state.step == 1:
                elapsed = time.perf_counter() - window_start
                mean_loss, samples = _mean_across_ranks(window_loss, window_samples, world)
                log.write({"event": "train", "step": state.step, "epoch": state.epoch, "loss": mean_loss,
                           "learning_rate": scheduler.get_last_lr()[0], "samples_per_second": samples / max(elapsed, 1e-9)})
                shown.logged(mean_loss)
                window_loss, window_samples, window_start = 0.0, 0, time.perf_counter()
            log.open_tracker()  # after the first step (see above); once
            if t.eval_every_steps and state.step % t.eval_every_steps == 0:
                last_eval_step = state.step
                stop = evaluate_and_checkpoint()
            if state.step >= total_steps:
                stop = True
            if stop:
                break
        else:
            exhausted = True
        if epoch_length is not None:  # stopped at the epoch's last batch: the epoch is done too
            exhausted = state.batch_in_epoch >= epoch_length
        if not stop or exhausted:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            follow_schedule()
        if t.eval_every_steps is None and last_eval_step != state.step:
            last_eval_step = state.step
            stop = evaluate_and_checkpoint() or stop
    if last_eval_step != state.step:
        evaluate_and_checkpoint()
    shown.close()
    if rank == 0:
        log.write({"event": "end", "step": state.step})
    log.close()


def judge(value: float, best_before: float | None, higher_is_better: bool) -> tuple[bool, bool]:
    """(improved, best so far) of an evaluation's selection metric, against the best of the evaluations before it.

    `improved` (strictly better) resets early stopping's patience, as transformers' EarlyStoppingCallback counts.
    `best so far` takes a tie too: of equal checkpoints the later is exported (run.best_checkpoint; Ray, keeping
    the top k, also drops the earlier of equals), so the evaluation the progress marks last is the one exported.
    """
    if best_before is None:
        return True, True
    improved = value > best_before if higher_is_better else value < best_before
    return improved, improved or value == best_before


def _epoch(state, stream, rows, lengths, spec, task, world, rank):
    """(batches of this epoch from the resume position on, as (index, example ids or None, rows);
    the epoch's length in batches, None for a stream)."""
    t = spec.train
    if stream is not None:
        streamed = stream_epoch(stream, batch_size=t.batch_size, accumulation=t.gradient_accumulation_steps,
                                seed=t.seed, epoch=state.epoch, group_by_length=t.group_by_length,
                                window=spec.data.streaming_window, length_column=task.length_column,
                                skip=state.batch_in_epoch)
        return ((i, None, batch) for i, batch in enumerate(streamed, start=state.batch_in_epoch)), None
    plan = epoch_batches(lengths, t.batch_size, world, rank, t.seed, state.epoch, t.group_by_length)
    return ((i, plan[i], [rows[j] for j in plan[i]]) for i in range(state.batch_in_epoch, len(plan))), len(plan)


@contextmanager
def _resume_directory(checkpoint, checkpoints: StorageDir) -> Iterator[Path | None]:
    """The checkpoint to continue from, on local disk: Ray's latest registered one; if Ray has none, the
    newest complete one on the run's storage (workers that died right after saving, before Ray's
    controller registered the report, or a run directory whose Ray state was lost)."""
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            yield Path(directory)
        return
    newest = newest_complete(checkpoints)
    if newest is None:
        yield None
        return
    print(f"resuming from {newest[0].uri}: the newest complete checkpoint on storage")
    with newest[0].as_local() as directory:
        yield directory


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


def _to_device(batch: dict, device: torch.device, floating: torch.dtype | None = None) -> dict:
    """Tensors to the device; floating inputs (pixel values) to the model's dtype under bf16/fp16 DeepSpeed."""
    return {k: v.to(device, dtype=floating if floating is not None and v.is_floating_point() else None,
                    non_blocking=True) for k, v in batch.items()}


def _no_sync(model):
    return model.no_sync() if hasattr(model, "no_sync") else nullcontext()


def _mean_across_ranks(loss_sum: float, count: int, world: int) -> tuple[float, int]:
    if world > 1:
        totals = torch.tensor([loss_sum, float(count)], dtype=torch.float64)
        dist.all_reduce(totals)
        loss_sum, count = totals[0].item(), int(totals[1].item())
    return loss_sum / max(count, 1), count


def _logits(outputs) -> torch.Tensor:
    """Hugging Face models return an output object; plain torch modules (torchvision) a tensor."""
    return outputs.logits if hasattr(outputs, "logits") else outputs


@torch.no_grad()  # not inference_mode: ZeRO-3 gathers parameters that training later reuses
def _evaluate(model, forward, rows, lengths, collate, loss_fn, task, labels, batch_size, world, rank, device,
              input_dtype, lockstep=False):
    """Every rank evaluates its share; all ranks then hold the same metrics (so they stop together).

    lockstep (ZeRO-3): every forward gathers parameters from all ranks, so a rank with one batch
    fewer runs a last forward whose outputs it discards."""
    model.eval()
    predictions, references, loss_sum, targets = [], [], 0.0, 0
    mine = evaluation_batches(lengths, batch_size, world, rank)
    most = -(-(-(-len(rows) // world)) // batch_size)
    padding = [mine[-1] if mine else [0]] * (most - len(mine)) if lockstep else []
    for number, indices in enumerate(mine + padding):
        batch = _to_device(collate([rows[i] for i in indices]), device, input_dtype)
        gold = batch.pop("labels")
        logits = forward(batch).float()
        if number >= len(mine):
            continue
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


def _in_background(fn, *args) -> Future:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunefleet-tracker")
    future = executor.submit(fn, *args)
    executor.shutdown(wait=False)
    return future


def _rank0_tracker(spec: Any, storage: StorageDir, driver_uri: str | None, step: int) -> ExperimentTracker | None:
    """The driver's MLflow run, rejoined (tracking.json); TensorBoard drops an earlier attempt's events past `step`."""
    if driver_uri:  # the driver's $MLFLOW_TRACKING_URI: this worker may run on a node without it
        os.environ["MLFLOW_TRACKING_URI"] = driver_uri
    try:
        return open_tracker(spec, storage, resume_step=step)
    except TrackingError as err:  # the driver checked it; a server gone since costs the metrics, not the run
        print(f"WARNING: experiment tracking is off for this worker: {err}")
        return None


class _MetricsLog:
    """metrics.jsonl on rank 0, each record also sent to the experiment tracker; a resumed run drops
    lines past its checkpoint so the curve joins.

    Written on local disk (the run directory itself when storage is local) and uploaded whole at
    every checkpoint and at the end: object stores cannot append."""

    def __init__(self, storage: StorageDir, enabled: bool, keep_until_step: int,
                 open_tracker: Callable[[], Future] | None = None) -> None:
        """open_tracker: starts opening the tracker in the background (called by `open_tracker()`, or at the
        latest by `close()`); None: no tracker on this rank."""
        self.storage, self.enabled, self._open = storage, enabled, open_tracker
        self._opening: Future | None = None
        self._unsent: list[dict[str, Any]] = []  # records written while the tracker was still opening
        if not enabled:
            return
        self.staging = storage.local_path or Path(tempfile.mkdtemp(prefix="tunefleet-metrics-"))
        self.staging.mkdir(parents=True, exist_ok=True)
        self.path = self.staging / METRICS_FILE
        if storage.local_path is None and storage.exists(METRICS_FILE):
            storage.download(METRICS_FILE, self.path)
        if self.path.exists():
            kept = [record for record in read_metrics_log(self.path) if record.get("step", 0) <= keep_until_step]
            write_whole(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def open_tracker(self) -> None:
        if self._open is not None and self._opening is None:
            self._opening = self._open()

    def _send(self, record: dict[str, Any] | None, wait: bool = False) -> None:
        """Records go to the tracker in order; until it is open they wait here (none is lost)."""
        if self._open is None:
            return
        if record is not None:
            self._unsent.append(record)
        if wait:
            self.open_tracker()
        if self._opening is None or not (wait or self._opening.done()):
            return
        tracker = self._opening.result()
        if tracker is not None:
            for queued in self._unsent:
                tracker.log_record(queued)
        self._unsent.clear()

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {**record, "time": time.time()}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        self._send(record)

    def flush(self) -> None:
        if self.enabled and self.storage.local_path is None:
            self.storage.upload(self.path, METRICS_FILE)

    def close(self) -> None:
        self.flush()
        self._send(None, wait=True)
        tracker = self._opening.result() if self._opening is not None else None
        if tracker is not None:
            tracker.close()  # the driver ends the MLflow run after export and report
        if self.enabled and self.storage.local_path is None:
            shutil.rmtree(self.staging, ignore_errors=True)
