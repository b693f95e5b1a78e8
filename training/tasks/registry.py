"""The task registry: `TASKS.register(name, TaskDefinition(...))` in each task's module."""

from training.registry import Registry
from training.tasks.base import TaskDefinition

TASKS: Registry[TaskDefinition] = Registry("task")
