"""The model a run trains and exports: the task's pretrained model, loaded and shaped by the method."""

from __future__ import annotations

from typing import Any

from training.methods import METHODS
from training.tasks import TASKS


def build_training_model(spec: Any, labels: list[str], on_cuda: bool = False):
    """task.build_model (with the method's load kwargs, e.g. 4-bit quantisation), then method.apply."""
    task, method = TASKS.get(spec.task), METHODS.get(spec.method.name)
    options = spec.method_options()
    load_kwargs = method.load_kwargs(options, on_cuda) if method.load_kwargs else {}
    model = task.build_model(spec, labels, **load_kwargs)
    return method.apply(model, options, spec.task)
