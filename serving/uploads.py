"""File uploads for tasks that take files (image classification): `POST .../predict/upload`.

    curl -F "file=@ant.jpg" -F "file=@bee.png" -F top_k=2 http://127.0.0.1:8000/v1/models/NAME/predict/upload
    curl --data-binary @ant.jpg -H "Content-Type: image/jpeg" "http://127.0.0.1:8000/v1/models/NAME/predict/upload?top_k=2"

Every file part of a multipart form is one input, in order (any field name). Parameters come
as query parameters (`?top_k=2`) and, in a form, as fields too (`top_k=2`, or `parameters={"top_k": 2}`
as JSON; a field wins over the query). A handler opts in by defining `prepare_upload(files, parameters)`.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import UploadFile
from starlette.requests import Request

from serving.errors import ServingError

RAW_TYPES = ("image/", "application/octet-stream")

# The route reads the request itself, so FastAPI cannot infer its body: /docs gets it from here.
UPLOAD_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "Image files as a multipart form (each file part one input, in order; parameters as "
                       "form fields such as top_k=2, or in the query), or one image as the raw body with "
                       "parameters in the query.",
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "properties": {
                "file": {"type": "array", "items": {"type": "string", "format": "binary"}},
                "top_k": {"type": "integer", "minimum": 1},
                "parameters": {"type": "string", "description": 'JSON object, e.g. {"top_k": 2}'},
            }}},
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


def _parameter_value(text: str) -> Any:
    """Form and query values are texts: `2` → 2, `null` → None; anything else is kept as text (the schema judges)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _parameters(fields: list[tuple[str, str]]) -> dict[str, Any]:
    parameters: dict[str, Any] = {}
    for key, text in fields:
        if key == "parameters":
            value = _parameter_value(text)
            if not isinstance(value, dict):
                raise ServingError(422, 'invalid request: parameters: must be a JSON object, e.g. {"top_k": 2}')
            parameters.update(value)
        else:
            parameters[key] = _parameter_value(text)
    return parameters


async def read_upload(request: Request, max_bytes: int, max_files: int,
                      untyped_is_raw: bool = False) -> tuple[list[bytes], dict[str, Any]]:
    """(file contents in order, parameters) of a multipart form or a raw image body; 413 past max_bytes per file.
    `untyped_is_raw`: a body without a Content-Type is a raw image too (what Hugging Face's client sends)."""
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        form = await request.form(max_files=max_files + 1, max_fields=32)
        files, fields = [], []
        try:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if value.size is not None and value.size > max_bytes:
                        raise ServingError(413, f"file {value.filename or len(files)} is too large: {value.size} bytes, "
                                                f"at most {max_bytes}", {"max_image_bytes": max_bytes})
                    files.append(await value.read())
                else:
                    fields.append((key, value))
        finally:
            await form.close()
        # The query counts here too: `curl -F file=@a.jpg "...upload?top_k=2"` is how clients write it.
        return files, _parameters([*request.query_params.multi_items(), *fields])
    if content_type.startswith(RAW_TYPES) or (untyped_is_raw and not content_type):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise ServingError(413, f"the image is too large: {declared} bytes, at most {max_bytes}",
                               {"max_image_bytes": max_bytes})
        body = await request.body()
        return ([body] if body else []), _parameters(list(request.query_params.multi_items()))
    raise ServingError(415, f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data with "
                            "image files, or one image as the body (Content-Type: image/jpeg, image/png, ...)")
