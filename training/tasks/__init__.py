"""Task families. Each module registers itself; importing this package registers them all."""

from training.tasks import text_classification  # noqa: F401  (registers)
from training.tasks.base import PreparedData, TaskDefinition
from training.tasks.registry import TASKS

__all__ = ["TASKS", "PreparedData", "TaskDefinition"]
