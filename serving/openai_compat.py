"""OpenAI-compatible routes for causal LMs: `POST /v1/completions` and `POST /v1/chat/completions`.

Request and response bodies follow OpenAI's API, so its clients work with
`base_url="http://127.0.0.1:8000/v1"`; `stream: true` answers server-sent events
(`data: {chunk}` ... `data: [DONE]`). Parameters OpenAI has and these models do not
implement (penalties, logit_bias, logprobs, best_of, echo, n > 1) are accepted at their
neutral value only (0, {}, false, 1 or null: what clients such as LangChain send by
default) and otherwise refused with a 422 naming them; unknown ones are refused, as
OpenAI refuses them. Errors keep tunefleet's `{"error": ..., "detail": ...}` body.

The routes live on the root application (the body names the model); they forward
to the model's own deployment, whose handler prepares, generates and formats
(`openai_prepare` / `openai_format` / `openai_stream`, see handlers/causal_lm.py).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, AsyncIterator, Iterable, Literal, Union

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from serving.errors import ServingError
from serving.schemas import ErrorBody, StopTexts, Text, UnicodeText

COMPLETIONS, CHAT = "completions", "chat"
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (400, 404, 413, 422)}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _neutral_only(*neutral: Any) -> AfterValidator:
    """An OpenAI parameter these models do not implement: null or its neutral value passes, anything else is a 422."""
    said = " or ".join(json.dumps(v) for v in neutral) or "null"

    def check(value: Any) -> Any:
        if value is not None and value not in neutral:
            raise ValueError(f"not supported by this server; send {said}, or leave it out")
        return value

    return AfterValidator(check)


Penalty = Annotated[Union[float, None], _neutral_only(0)]


class StreamOptions(_Body):
    include_usage: StrictBool = Field(False, description="Send a last chunk with token usage before [DONE].")


class _Sampling(_Body):
    model: StrictStr = Field(description="Name of a served causal-LM model (GET /v1/models).")
    temperature: float = Field(1.0, ge=0, le=2, description="0: greedy (deterministic); higher: more random.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling: the smallest token set with this probability.")
    stop: StopTexts = Field(None, description="Up to 4 texts; generation ends before the first one.")
    stream: StrictBool = Field(False, description="Answer server-sent events as tokens are generated.")
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1, le=1, description="Choices per prompt; only 1.")
    user: StrictStr | None = Field(None, description="Accepted and ignored.")
    frequency_penalty: Penalty = Field(None, description="Only 0 (no penalty).")
    presence_penalty: Penalty = Field(None, description="Only 0 (no penalty).")
    logit_bias: Annotated[Union[dict[str, float], None], _neutral_only({})] = Field(None, description="Only {}.")

    def stop_list(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: Union[Text, Annotated[list[Text], Field(min_length=1)]] = Field(description="A text or a list of texts.")
    max_tokens: StrictInt = Field(16, ge=1, description="Tokens generated at most per prompt (OpenAI's default, 16).")
    logprobs: Annotated[Union[StrictInt, None], _neutral_only()] = Field(None, description="Only null.")
    best_of: Annotated[Union[StrictInt, None], _neutral_only(1)] = Field(None, description="Only 1.")
    echo: Annotated[Union[StrictBool, None], _neutral_only(False)] = Field(None, description="Only false.")
    suffix: Annotated[Union[StrictStr, None], _neutral_only("")] = Field(None, description="Only null or empty.")

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class ContentPart(_Body):
    type: Literal["text"]
    text: UnicodeText


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[UnicodeText, list[ContentPart]]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1, description="Tokens generated at most; null: 256, or the server's limit if lower.")
    max_completion_tokens: StrictInt | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens.")
    logprobs: Annotated[Union[StrictBool, None], _neutral_only(False)] = Field(None, description="Only false.")
    top_logprobs: Annotated[Union[StrictInt, None], _neutral_only(0)] = Field(None, description="Only 0.")

    def conversation(self) -> list[dict[str, str]]:
        # "developer" is OpenAI's newer name for the system role; templates know "system".
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def token_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---- responses ------------------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None = Field(description='"stop" (EOS or a stop text) or "length" (max_tokens).')


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None = Field(description='"stop" (EOS or a stop text) or "length" (max_tokens).')


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


async def event_stream(chunks: AsyncIterator[str]) -> StreamingResponse:
    """Server-sent events, once the first has come: limits are checked before it, so a refusal is a 4xx, not a
    stream broken after its 200."""
    first = await chunks.__anext__()

    async def events():
        yield first
        async for chunk in chunks:
            yield chunk

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def documented(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """/docs for a route that answers JSON, or server-sent events when the request says stream: true."""
    stream = {"schema": {"type": "string"}, "example": 'data: {"id": "...", "choices": [...]}\n\ndata: [DONE]\n\n'}
    return {**_ERRORS, 200: {"model": model, "description": "The whole answer; with `stream: true`, server-sent "
                                                            "events of chunks, then `data: [DONE]`.",
                             "content": {"text/event-stream": stream}}}


def _usage(outputs: Iterable[Any]) -> dict[str, int]:
    outputs = list(outputs)
    prompt = sum(o.prompt_tokens for o in outputs)
    completion = sum(o.completion_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _envelope(route: str, model: str, chunk: bool, ident: str | None = None) -> dict[str, Any]:
    kind = {(COMPLETIONS, False): "text_completion", (COMPLETIONS, True): "text_completion",
            (CHAT, False): "chat.completion", (CHAT, True): "chat.completion.chunk"}[(route, chunk)]
    prefix = "cmpl-" if route == COMPLETIONS else "chatcmpl-"
    return {"id": ident or prefix + uuid.uuid4().hex[:24], "object": kind, "created": int(time.time()), "model": model}


def response_body(route: str, request: Any, outputs: list[Any]) -> dict[str, Any]:
    """The whole (non-streamed) answer: one choice per prompt, and token usage."""
    if route == COMPLETIONS:
        choices = [{"index": i, "text": o.text, "logprobs": None, "finish_reason": o.finish_reason}
                   for i, o in enumerate(outputs)]
    else:
        choices = [{"index": i, "message": {"role": "assistant", "content": o.text}, "logprobs": None,
                    "finish_reason": o.finish_reason} for i, o in enumerate(outputs)]
    return {**_envelope(route, request.model, False), "choices": choices, "usage": _usage(outputs)}


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def stream_events(route: str, request: Any, events: Iterable[tuple[int, Any]]) -> Iterable[str]:
    """Server-sent events from (choice index, text delta or final output) pairs, then [DONE]."""
    head = _envelope(route, request.model, True)
    finals = []
    if route == CHAT:
        yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                        "finish_reason": None}]})
    for index, event in events:
        done = not isinstance(event, str)
        if done:
            finals.append(event)
        if route == COMPLETIONS:
            choice = {"index": index, "text": "" if done else event, "logprobs": None,
                      "finish_reason": event.finish_reason if done else None}
        else:
            choice = {"index": index, "delta": {} if done else {"content": event}, "logprobs": None,
                      "finish_reason": event.finish_reason if done else None}
        yield sse({**head, "choices": [choice]})
    if request.stream_options is not None and request.stream_options.include_usage:
        yield sse({**head, "choices": [], "usage": _usage(finals)})
    yield sse("[DONE]")


# ---- routes (root application) --------------------------------------------------------------

def _as_serving_error(exc: BaseException) -> ServingError | None:
    """A ServingError raised in the model's replica arrives wrapped by Ray; unwrap it."""
    cause = exc if isinstance(exc, ServingError) else getattr(exc, "cause", None)
    if isinstance(cause, ServingError):
        return ServingError(cause.status, cause.error, cause.detail)
    return None


def install_openai_routes(api: FastAPI, models: list[Any], generative: set[str]) -> FastAPI:
    """Add the two routes to the root app; `generative` names the models whose handler can generate."""
    tasks = {m.name: m.info.task for m in models}
    handles: dict[str, Any] = {}

    def handle_for(name: str):
        if name not in tasks:
            raise ServingError(404, f"unknown model {name!r}; served models: {', '.join(sorted(tasks))}",
                               {"models": sorted(tasks)})
        if name not in generative:
            raise ServingError(400, f"model {name!r} is a {tasks[name]} model; this route serves text generation "
                               f"models: {', '.join(sorted(generative)) or '(none served)'}", {"task": tasks[name]})
        if name not in handles:
            from ray import serve

            handles[name] = serve.get_app_handle(name)
        return handles[name]

    async def forward(route: str, request: CompletionRequest | ChatCompletionRequest):
        adapters = getattr(api.state, "openai_adapters", None)  # serving/registration.py: adapters over a pool
        if request.model not in tasks and adapters is not None:
            handle, args = await adapters(request.model)
        else:
            handle, args = handle_for(request.model), ()
        try:
            if not request.stream:
                return JSONResponse(await handle.openai.remote(*args, route, request))
            return await event_stream(handle.options(stream=True).openai_stream.remote(*args, route, request))
        except Exception as exc:
            error = _as_serving_error(exc)
            if error is None:
                raise
            raise error from None

    @api.post("/v1/completions", response_model=CompletionResponse, responses=documented(CompletionResponse),
              tags=["openai"])
    async def completions(body: CompletionRequest):
        """OpenAI text completions: a prompt (or several) continued by a causal LM."""
        return await forward(COMPLETIONS, body)

    @api.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses=documented(ChatCompletionResponse), tags=["openai"])
    async def chat_completions(body: ChatCompletionRequest):
        """OpenAI chat completions: messages rendered with the model's chat template, the assistant's reply."""
        return await forward(CHAT, body)

    # On a model's URL, as a TGI endpoint has them: the URL names the model, whatever the body's `model` says.
    # A full model's own app answers these itself (serving/app.py); here they reach adapters served by a pool.
    @api.post("/v1/models/{name}/v1/completions", response_model=CompletionResponse,
              responses=documented(CompletionResponse), tags=["openai"])
    async def model_completions(name: str, body: CompletionRequest):
        """OpenAI text completions by the model (or adapter) the URL names."""
        return await forward(COMPLETIONS, body.model_copy(update={"model": name}))

    @api.post("/v1/models/{name}/v1/chat/completions", response_model=ChatCompletionResponse,
              responses=documented(ChatCompletionResponse), tags=["openai"])
    async def model_chat_completions(name: str, body: ChatCompletionRequest):
        """OpenAI chat completions by the model (or adapter) the URL names."""
        return await forward(CHAT, body.model_copy(update={"model": name}))

    return api
