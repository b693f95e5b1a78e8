"""Predictions without a server (`tunefleet predict EXPORT_DIR "text"...`), through the same handler code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from serving.config import ServeSpec
from serving.handlers import load_handler, parse_request


def predict_local(
    export_dir: str | Path,
    inputs: Any,
    top_k: int | None = 1,
    parameters: dict[str, Any] | None = None,
    spec: ServeSpec | None = None,
) -> list[Any]:
    """One prediction per input, exactly as `POST /v1/models/{name}/predict` returns them.

    `inputs` takes the HTTP body's forms ("a text", ["t1", "t2"],
    [{"text": ..., "text_pair": ...}]); `top_k=None` returns every label.
    Bad input raises `ServingError` (its `.status` and message match the HTTP answer).
    """
    handler = load_handler(export_dir, spec)
    request = parse_request(handler, {"inputs": inputs, "parameters": {"top_k": top_k, **(parameters or {})}})
    return handler.predict(request)
