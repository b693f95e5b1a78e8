"""The Hugging Face Inference API's shape: `POST /v1/models/{name}` (the model's URL itself).

Hugging Face clients post `{"inputs": ..., "parameters": {...}}` to a model's URL and read the
pipeline's output back as it is, with no envelope: `huggingface_hub.InferenceClient(model=
"http://127.0.0.1:8000/v1/models/NAME")` then works as with an Inference Endpoint:

    client.text_classification("a lovely film")          → [{"label": ..., "score": ...}, ...]
    client.token_classification("Peter flew to Paris")   → [{"entity_group": "PER", "word": ..., ...}]
    client.text_generation("Once upon a time")           → "…"
    client.image_classification("ant.jpg")               → [{"label": ..., "score": ...}, ...]

The request is the task's own `/predict` request (same parameters, same 4xx); only the answer's
shape differs, and each task handler gives it (`hf_format`). Beside `inputs` and `parameters`
the body may carry what those clients add: `stream: false`, and the hosted API's `options`
(`wait_for_model`, `use_cache`: about its cold starts and cache, nothing to do here). An image
model also takes the image itself as the body, as the client sends it when there are no
parameters.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError, field_validator
from starlette.requests import Request

from serving.errors import ServingError, describe_validation_errors, is_json_type, json_body


class HFOptions(BaseModel):
    """The hosted Inference API's options: accepted, and without an effect here."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    wait_for_model: StrictBool = False
    use_cache: StrictBool = True


class HFBody(BaseModel):
    """The envelope; `inputs` and `parameters` go on to the task's request model, which checks them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: Any
    parameters: Any = None
    stream: StrictBool = False
    options: HFOptions | None = None

    @field_validator("stream")
    @classmethod
    def _not_streamed(cls, value: bool) -> bool:
        if value:
            raise ValueError("not offered on this route: a causal LM streams from POST /v1/completions or "
                             "/v1/chat/completions with stream: true; send stream: false, or leave it out")
        return value


def hf_request(raw: bytes) -> tuple[dict[str, Any], bool]:
    """A JSON body → (the task request's payload, whether `inputs` was one input rather than a list)."""
    body = json_body(raw)
    if not isinstance(body, dict):
        raise ServingError(422, 'invalid request: body: a JSON object is required, e.g. {"inputs": "a text"}')
    try:
        envelope = HFBody.model_validate(body)
    except ValidationError as exc:
        line, detail = describe_validation_errors([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()])
        raise ServingError(422, f"invalid request: {line}", detail) from None
    payload = {"inputs": envelope.inputs}
    if envelope.parameters is not None:
        payload["parameters"] = envelope.parameters
    return payload, not isinstance(envelope.inputs, list)


def is_json(request: Request) -> bool:
    return is_json_type(request.headers.get("content-type", ""))


# The answer's shape depends on the task; every task's is a JSON array.
HF_RESPONSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "The pipeline's output: per input its labels, entities or generations; one input's alone "
                   "when `inputs` was not a list (text classification nests even then, as the Inference API does).",
    "content": {"application/json": {"schema": {"type": "array", "items": {}}}},
}}

# The route reads the request itself, so FastAPI cannot infer its body: /docs gets it from here.
HF_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "The body POST .../predict takes (an image model also takes the image itself as the body).",
        "content": {"application/json": {"schema": {
            "type": "object", "required": ["inputs"],
            "properties": {
                "inputs": {"description": "As /predict takes them."},
                "parameters": {"type": "object", "description": "As /predict takes them."},
                "stream": {"type": "boolean", "enum": [False]},
                "options": {"type": "object", "description": "The hosted API's wait_for_model and use_cache: "
                                                             "accepted, without an effect here."},
            }}}},
    },
}
