"""Predictions without a server (`tunefleet predict EXPORT_DIR "text"...`), through the same handler code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serving.config import ServeSpec
from serving.handlers import HANDLERS, load_handler, parse_request
from training.layout import read_export_info, resolve_export_dir


_DEFAULT: Any = object()  # top_k not given: the task's own default (token classification has no top_k)


def predict_local(
    export_dir: str | Path,
    inputs: Any,
    top_k: int | None = _DEFAULT,
    parameters: dict[str, Any] | None = None,
    spec: ServeSpec | None = None,
) -> list[Any]:
    """One prediction per input, exactly as `POST /v1/models/{name}/predict` returns them.

    `inputs` takes the HTTP body's forms ("a text", ["t1", "t2"],
    [{"text": ..., "text_pair": ...}]); `top_k=None` returns every label, and leaving it out
    keeps the task's default (1 for classification; tasks without labels to rank take none).
    Bad input raises `ServingError` (its `.status` and message match the HTTP answer).
    """
    export = resolve_export_dir(export_dir)
    given = {} if top_k is _DEFAULT else {"top_k": top_k}
    # Bad input is refused before the model loads (seconds for a large one), as the HTTP route does.
    request = parse_request(HANDLERS.get(read_export_info(export).task),
                            {"inputs": inputs, "parameters": {**given, **(parameters or {})}})
    return load_handler(export, spec).predict(request)
