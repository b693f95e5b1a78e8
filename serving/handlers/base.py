"""What every task handler does, in the order a request meets it.

    request = parse_request(handler, payload)   # schema: 422 on a bad shape
    items = handler.prepare(request)            # limits: 413 on too much
    outputs = handler.run_batch(items)          # the model, one batch of items
    [handler.format(o, request) for o in outputs]

The Serve deployment and `predict_local` both run exactly these steps; only the
batching between `prepare` and `run_batch` differs (Serve gathers items from many
requests into one batch, `predict` runs one request's items).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import BaseModel, ValidationError

from serving.config import ServeSpec
from serving.errors import ServingError, describe_validation_errors
from serving.handlers.registry import HANDLERS
from training.layout import ExportInfo, read_export_info, resolve_export_dir


class TaskHandler(ABC):
    task: ClassVar[str]  # set by register_handler
    request_model: ClassVar[type[BaseModel]]
    response_model: ClassVar[type[BaseModel]]
    auto_bfloat16: ClassVar[bool] = True  # serve.dtype auto may pick bfloat16 (serving/placement.py)

    def __init__(self, info: ExportInfo, spec: ServeSpec) -> None:
        self.info = info
        self.spec = spec

    def exclusive(self, fn: Callable[[], Any]) -> Any:
        """`fn()` with the model to itself. Work outside `run_batch` (a streamed generation) goes through
        this: an adapter pool (serving/multiplex.py) makes it activate the adapter and hold the base model."""
        return fn()

    def between_steps(self) -> None:
        """Called by work run through `exclusive` between two of its steps (a generated token): an adapter
        pool lets batches of other adapters waiting for the base run here. Nothing to do otherwise."""

    @classmethod
    @abstractmethod
    def load(cls, export_dir: Path, info: ExportInfo, spec: ServeSpec) -> TaskHandler:
        """Read the model from the export directory, ready for `run_batch`."""

    @abstractmethod
    def prepare(self, request: Any) -> list[Any]:
        """A validated request → the items to batch (one per input); ServingError past a limit."""

    @abstractmethod
    def run_batch(self, items: list[Any]) -> list[Any]:
        """Items (possibly from many requests) → one raw output per item."""

    @abstractmethod
    def format(self, output: Any, request: Any) -> Any:
        """One raw output → the JSON-ready prediction for its request's parameters."""

    def hf_format(self, predictions: list[Any], request: Any, single: bool) -> Any:
        """`format`'s predictions → the body the Hugging Face Inference API answers (serving/hf_compat.py):
        the pipeline's output, for one input alone when `single` (its `inputs` was not a list)."""
        return predictions[0] if single else predictions

    def predict(self, request: Any) -> list[Any]:
        """One request, in-process, in batches of `max_batch_size` items."""
        items = self.prepare(request)
        size = self.spec.max_batch_size
        outputs: list[Any] = []
        for start in range(0, len(items), size):
            outputs.extend(self.run_batch(items[start : start + size]))
        return [self.format(output, request) for output in outputs]


def input_window(info: ExportInfo, tokenizer, model) -> int:
    """Tokens one sequence may have: the export's max_length, else the tokenizer's, capped at the model's positions."""
    limits = [info.max_length, getattr(model.config, "max_position_embeddings", None)]
    if (tokenizer.model_max_length or 0) < 1_000_000:  # transformers' "no limit" is a huge int
        limits.append(tokenizer.model_max_length)
    return min(n for n in limits if n) if any(limits) else 512


def load_model(auto_class: Any, export_dir: Path, info: ExportInfo) -> tuple[Any, bool]:
    """The export's model for `auto_class` (an `AutoModelFor...`), and whether it is a plain Hugging Face model.

    A full or merged export is a model folder. An adapter export holds the adapter alone: its base
    (`info.base_model`) is built with the export's labels and the adapter loaded over it; LoRA and
    IA3 are merged into the base (a plain model, as fast as a full one), the prompt-learning methods
    stay a `PeftModel` (not plain: the handlers' encoder rewrites, serving/packed.py, do not apply).
    Written here because transformers' own adapter loading (`from_pretrained` on the adapter folder)
    builds the base with its default two labels, so any other head size fails to load, and does not
    know tunefleet's bottleneck adapters. An adapter pool (serving/adapters.py) loads its base itself.
    """
    if not info.adapter:
        return auto_class.from_pretrained(export_dir, local_files_only=True), True
    from serving.model_store import fetch_model
    from training import bottleneck

    heads: dict[str, Any] = {}
    if info.labels:  # the base's own head (another label set, ImageNet's classes) is replaced
        heads = {"num_labels": len(info.labels), "id2label": dict(enumerate(info.labels)),
                 "label2id": {label: i for i, label in enumerate(info.labels)}, "ignore_mismatched_sizes": True}
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report ("classifier MISSING ... train it") is false here
    try:
        base = auto_class.from_pretrained(fetch_model(info.base_model), **heads)
    finally:
        hf_logging.set_verbosity(verbosity)
    if bottleneck.is_bottleneck_export(export_dir):
        return bottleneck.load_bottleneck_export(export_dir, base), True
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(export_dir))
    if model.active_peft_config.is_prompt_learning:
        return model, False
    return model.merge_and_unload(), True


def ranked(labels: list[str], logits: list[float], function: str, top_k: int | None) -> list[dict[str, Any]]:
    """One input's logits → its `top_k` labels, best first, scored by `function` (softmax, sigmoid or none).

    Per input in `format`, not per batch in `run_batch`: requests batched together may each ask for a
    different function; on a few labels this is microseconds.
    """
    if function == "softmax":
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        total = sum(exps)
        scores = [e / total for e in exps]
    elif function == "sigmoid":
        scores = [1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x)) for x in logits]
    else:
        scores = list(logits)
    best = sorted(range(len(scores)), key=scores.__getitem__, reverse=True)[:top_k]
    return [{"label": labels[i], "score": scores[i]} for i in best]


def parse_request(handler: TaskHandler | type[TaskHandler], payload: Any) -> Any:
    """A JSON-like payload → the handler's request model, or a 422 ServingError saying what is wrong."""
    try:
        return handler.request_model.model_validate(payload)
    except ValidationError as exc:
        line, detail = describe_validation_errors([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])
        raise ServingError(422, f"invalid request: {line}", detail) from None


def load_handler(export_dir: str | Path, spec: ServeSpec | None = None) -> TaskHandler:
    """The handler registered for the export's task, with its model loaded."""
    path = resolve_export_dir(export_dir)
    info = read_export_info(path)
    return HANDLERS.get(info.task).load(path, info, spec or ServeSpec())
