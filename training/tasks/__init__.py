"""Task families. Each module registers itself; importing this package registers them all."""

from training.tasks import image_classification  # noqa: F401  (registers)
from training.tasks import causal_lm  # noqa: F401  (registers)
from training.tasks import text_classification  # noqa: F401  (registers)
from training.tasks import token_classification  # noqa: F401  (registers)
from training.tasks.base import PreparedData, TaskDefinition
from training.tasks.registry import TASKS, selection_metric

__all__ = ["TASKS", "selection_metric", "PreparedData", "TaskDefinition"]
