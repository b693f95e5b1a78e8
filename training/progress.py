"""What rank 0 shows while training: the step, the loss and the last evaluation.

The driver picks the style (training.run.progress_style) and the workers follow it: a Ray-aware
bar on a terminal (tqdm_ray keeps bars intact across workers), one line per logged step and per
evaluation in a log (CI, nohup, a Ray job's or a pod's log), or nothing.
"""

from __future__ import annotations

import logging
import os
import time

# Ray Train's own console lines for each `ray.train.report`, from every rank:
#   "Checkpoint successfully created at: Checkpoint(filesystem=local, path=...)"
#   "Reporting training result 3: TrainingReport(checkpoint=..., metrics={...}, validation=False) from rank 0"
# Rank 0's evaluation line says what they say, once, in a form a person reads. Ray's log files keep them.
RAY_REPORT_LINES = ("Checkpoint successfully created at", "Reporting training result")


class _RayReportLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(RAY_REPORT_LINES)


def quiet_ray_report_lines() -> None:
    """Drop Ray Train's per-report lines from this worker's console; its log files are left whole.

    Ray Train's public `LoggingConfig(log_level=...)` cannot do it: it would also hide the worker
    group's start (which node, which resources), and the "Reporting training result" logger is named
    after its file, outside the `ray.train` hierarchy that setting governs. So the filter sits on the
    console handlers (StreamHandlers; Ray's file handlers are not) of the two loggers that carry them.
    """
    for logger in (logging.getLogger(), logging.getLogger("ray.train")):
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not any(
                    isinstance(f, _RayReportLines) for f in handler.filters):
                handler.addFilter(_RayReportLines())


# The libraries' own bars (transformers' "Loading weights" and "Writing model shards", datasets' "Map", the
# hub's downloads): each variable is read when its library is imported, and an explicit value is the user's.
LIBRARY_BAR_SWITCHES = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


def quiet_library_bars() -> None:
    """Turn the libraries' progress bars off in this process (and in processes it starts), for a log.

    A bar redrawn into a file is stored as one line per redraw, twice per model load and again per
    save. The libraries' documented switches do it; where a library is already imported, its switch
    is called too. A variable the user set is left as it is. Not reached: transformers' GGUF
    conversion bar, which calls tqdm directly, with no switch.
    """
    import sys

    chosen = {variable for variable in LIBRARY_BAR_SWITCHES if variable in os.environ}
    for variable in LIBRARY_BAR_SWITCHES:
        os.environ.setdefault(variable, "1")
    if "HF_HUB_DISABLE_PROGRESS_BARS" not in chosen:  # transformers follows the hub's switch at import
        if "huggingface_hub" in sys.modules:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    if "HF_DATASETS_DISABLE_PROGRESS_BARS" not in chosen and "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()


def progress(rank: int, total: int, initial: int, name: str, style: str = "bar"):
    """Rank 0's progress in the driver's style ("bar", "lines" or "off"); other ranks show nothing."""
    if rank != 0 or style == "off":
        return _Progress(total, initial, name)
    if style == "lines":
        return _LineProgress(total, initial, name)
    return _BarProgress(total, initial, name)


def _metrics_text(metrics: dict[str, float], first: str) -> str:
    """`accuracy 0.9150, macro_f1 0.9148, eval_loss 0.2335`: the selection metric first; counts as counts."""
    names = [first] + [k for k in metrics if k != first]
    return ", ".join(f"{k} {metrics[k]}" if isinstance(metrics[k], int) else f"{k} {metrics[k]:.4f}"
                     for k in names if k in metrics)


class _Progress:
    """Shows nothing (other ranks, or progress off); the others say what this one only counts."""

    def __init__(self, total: int, initial: int, name: str) -> None:
        self.total, self.step, self.name = total, initial, name
        self.loss: float | None = None
        self.metric: str | None = None  # "accuracy 0.9150" after an evaluation

    def advance(self, n: int = 1) -> None:
        self.step += n

    def logged(self, loss: float) -> None:
        self.loss = loss

    def evaluated(self, metrics: dict[str, float], metric_name: str, best: bool) -> None:
        if metric_name in metrics:
            self.metric = _metrics_text({metric_name: metrics[metric_name]}, metric_name)

    def close(self) -> None:
        pass

    def summary(self) -> str:
        return ", ".join(part for part in (None if self.loss is None else f"loss {self.loss:.4f}", self.metric) if part)


class _BarProgress(_Progress):
    """`name loss 0.2773, accuracy 0.9150 |████    | 40/96`: the last loss and the last evaluation's metric."""

    def __init__(self, total: int, initial: int, name: str) -> None:
        super().__init__(total, initial, name)
        from ray.experimental.tqdm_ray import tqdm

        self.bar = tqdm(total=total, desc=name, unit="step")
        self.bar.update(initial)

    def advance(self, n: int = 1) -> None:
        super().advance(n)
        self.bar.update(n)

    def logged(self, loss: float) -> None:
        super().logged(loss)
        self.bar.set_description(f"{self.name} {self.summary()}")

    def evaluated(self, metrics: dict[str, float], metric_name: str, best: bool) -> None:
        super().evaluated(metrics, metric_name, best)
        self.bar.set_description(f"{self.name} {self.summary()}")

    def close(self) -> None:
        self.bar.close()


class _LineProgress(_Progress):
    """For logs, not terminals:
    `name: step 10/63 (16%), loss 0.6896, 1.40 steps/s` once per logged step, and
    `name: evaluation at step 16/96: accuracy 0.9020, macro_f1 0.9011, eval_loss 0.3287 (best so far)`."""

    def __init__(self, total: int, initial: int, name: str) -> None:
        super().__init__(total, initial, name)
        self.since, self.since_step = time.perf_counter(), initial

    def logged(self, loss: float) -> None:
        super().logged(loss)
        now = time.perf_counter()
        rate = (self.step - self.since_step) / max(now - self.since, 1e-9)
        print(f"{self.name}: step {self.step}/{self.total} ({100 * self.step // max(self.total, 1)}%), "
              f"loss {loss:.4f}, {rate:.2f} steps/s", flush=True)
        self.since, self.since_step = now, self.step

    def evaluated(self, metrics: dict[str, float], metric_name: str, best: bool) -> None:
        super().evaluated(metrics, metric_name, best)
        print(f"{self.name}: evaluation at step {self.step}/{self.total}: {_metrics_text(metrics, metric_name)}"
              + (" (best so far)" if best else ""), flush=True)
        # The evaluation's time is not the training's rate.
        self.since, self.since_step = time.perf_counter(), self.step
