"""The task registry: `TASKS.register(name, TaskDefinition(...))` in each task's module."""

from training.registry import Registry
from training.tasks.base import TaskDefinition

TASKS: Registry[TaskDefinition] = Registry("task")


def selection_metric(spec) -> tuple[str, bool]:
    """(metric name, higher is better) that picks the best checkpoint and drives early stopping."""
    task = TASKS.get(spec.task)
    if spec.train.metric == "auto":
        return task.default_metric, task.greater_is_better
    name = spec.train.metric
    return name, not (name.endswith("loss") or name in ("perplexity",))
