"""Ray Serve applications: one per model, plus a small root application.

Built for speed on few cores (see ENVIRONMENT.md, "Ray Serve"): each model's
ingress deployment is its FastAPI app *and* holds the model, so a request makes
no hop between deployments; a `Batcher` (serving/batching.py) gathers inputs from
concurrent requests into one forward pass, closing a batch only when the model is
free; `max_ongoing_requests` exceeds the batch size so batches can fill.

    /                      root app: /healthz, /v1/models, 404 JSON for unknown models
    /v1/models/{name}      one app per model: GET / (its card), POST /predict, and POST / (the
                           same request answered in the Hugging Face Inference API's shape; serving/hf_compat.py)
    /v1/completions        root app → the named causal LM's app (OpenAI-compatible; serving/openai_compat.py)
    /v1/chat/completions
    /v1/models/{name}/v1/completions, .../v1/chat/completions
                           the same on a causal LM's own app, whatever the body's `model` says: a
                           TGI-style endpoint URL (InferenceClient(model=URL).chat_completion, OpenAI's
                           base_url=".../v1/models/{name}/v1")
"""

import asyncio
import re
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from ray import serve
from ray.serve import Application

from serving.auth import token_source
from serving.batching import Batcher
from serving.catalog import ServedModel
from serving.config import ServeSpec
from serving.errors import UPLOAD_ROUTE_KEY, ServingError, install_error_handlers
from serving.handlers import HANDLERS, load_handler, parse_request
from serving.hf_compat import HF_OPENAPI, HF_RESPONSE, hf_request, is_json
from serving.metrics import CONTENT_TYPE, gather_metrics, model_metrics
from serving.middleware import install_guard
from serving.openai_compat import (CHAT, COMPLETIONS, ChatCompletionRequest, ChatCompletionResponse,
                                    CompletionRequest, CompletionResponse, documented, event_stream,
                                    install_openai_routes)
from serving.schemas import ErrorBody, Health, ModelCard, ModelList
from serving.uploads import UPLOAD_OPENAPI, read_upload

UPLOAD_PATH = "/predict/upload"  # a model's upload route, beside /predict; a 415 on /predict names it

ROOT_APP_NAME = "_root"  # model names start with a letter or digit, so never clash
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")  # as serving/catalog.py checks served names
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (400, 404, 413, 422)}
_UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {**_ERRORS, 415: {"model": ErrorBody}}


def _autoscaling(spec: ServeSpec) -> dict[str, Any]:
    return {
        "min_replicas": spec.min_replicas,
        "initial_replicas": max(spec.min_replicas, 1),
        "max_replicas": spec.max_replicas,
        "target_ongoing_requests": spec.target_ongoing_requests,
        "upscale_delay_s": spec.upscale_delay_s,
        "downscale_delay_s": spec.downscale_delay_s,
    }


class _ModelURL:
    """ASGI: the model's URL itself (`/v1/models/{name}`, no trailing slash) is its app's "/" route. Starlette
    would answer it with a 307 to ".../", and clients (Hugging Face's among them) do not send a POST body again
    after a redirect."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("root_path") and scope["path"] == scope["root_path"]:
            scope = {**scope, "path": scope["path"] + "/"}
        await self.app(scope, receive, send)


def build_model_app(model: ServedModel, spec: ServeSpec, env_vars: dict[str, str] | None = None) -> Application:
    """The model's application: FastAPI ingress, model and dynamic batching in one deployment."""
    handler_cls = HANDLERS.get(model.info.task)
    request_model = handler_cls.request_model
    uploads = hasattr(handler_cls, "prepare_upload")  # tasks that take files: multipart or a raw body too
    api = install_error_handlers(
        FastAPI(title=f"tunefleet model {model.name}", description=f"{model.info.task} · {model.info.base_model}")
    )
    install_guard(api, spec, model.name)  # auth, backpressure, body limit, timeout, metrics, access log
    api.add_middleware(_ModelURL)

    @serve.ingress(api)
    class ModelServer:
        def __init__(self, model: ServedModel, spec: ServeSpec) -> None:
            self.name = model.name
            self.card_json = model.card().model_dump()
            self.handler = load_handler(model.export_dir, spec)
            token_source(spec)  # an unreadable auth token fails the replica's start, not each request
            self.metrics = model_metrics(model.name)
            self.batcher = Batcher(self.handler.run_batch, spec.max_batch_size, spec.batch_wait_ms / 1000,
                                   observe=self.metrics.batch_size)

        async def run_batch(self, item: Any) -> Any:
            return await self.batcher.submit(item)

        @api.get("/", response_model=ModelCard)
        async def card(self) -> dict[str, Any]:
            return self.card_json

        async def _predictions(self, items: list[Any], body: Any) -> list[Any]:
            outputs = await asyncio.gather(*(self.run_batch(item) for item in items))
            return [self.handler.format(output, body) for output in outputs]

        @api.post("/predict", response_model=handler_cls.response_model, responses=_ERRORS,
                  openapi_extra={UPLOAD_ROUTE_KEY: UPLOAD_PATH} if uploads else None)
        async def predict(self, body: request_model) -> JSONResponse:  # type: ignore[valid-type]
            predictions = await self._predictions(self.handler.prepare(body), body)
            return JSONResponse({"model": self.name, "predictions": predictions})

        @api.post("/", responses={**(_UPLOAD_ERRORS if uploads else _ERRORS), **HF_RESPONSE}, openapi_extra=HF_OPENAPI,
                  summary="Predict, answered in the Hugging Face Inference API's shape")
        async def predict_hf(self, request: Request) -> JSONResponse:
            """The body `/predict` takes; the answer is the pipeline's output itself, with no envelope, as
            `huggingface_hub.InferenceClient(model=<this URL>)` reads it (serving/hf_compat.py)."""
            if uploads and not is_json(request):  # the image itself: what the client sends without parameters
                files, parameters = await read_upload(request, spec.max_image_bytes, spec.max_inputs_per_request,
                                                      untyped_is_raw=True)
                items, body = self.handler.prepare_upload(files, parameters)
                single = len(files) == 1
            else:
                payload, single = hf_request(await request.body())
                body = parse_request(self.handler, payload)
                items = self.handler.prepare(body)
            return JSONResponse(self.handler.hf_format(await self._predictions(items, body), body, single))

        if uploads:  # serving/uploads.py

            @api.post(UPLOAD_PATH, response_model=handler_cls.response_model, responses=_UPLOAD_ERRORS,
                      openapi_extra=UPLOAD_OPENAPI)
            async def predict_upload(self, request: Request) -> JSONResponse:
                files, parameters = await read_upload(request, spec.max_image_bytes, spec.max_inputs_per_request)
                items, body = self.handler.prepare_upload(files, parameters)
                return JSONResponse({"model": self.name, "predictions": await self._predictions(items, body)})

        if hasattr(handler_cls, "openai_prepare"):  # text generation: the root app's OpenAI routes call these

            async def openai(self, route: str, request: Any) -> dict[str, Any]:
                items = self.handler.openai_prepare(route, request)
                outputs = await asyncio.gather(*(self.run_batch(item) for item in items))
                return self.handler.openai_format(route, request, outputs)

            async def openai_stream(self, route: str, request: Any):
                events = self.handler.openai_stream(route, request)  # server-sent events, one string each
                while (event := await asyncio.to_thread(next, events, None)) is not None:
                    yield event

            # The OpenAI routes on the model's own URL, as a TGI endpoint has them: the URL names the model.
            async def _own_openai(self, route: str, request: Any) -> Any:
                request = request.model_copy(update={"model": self.name})
                if not request.stream:
                    return JSONResponse(await self.openai(route, request))
                return await event_stream(self.openai_stream(route, request))

            @api.post("/v1/completions", response_model=CompletionResponse, responses=documented(CompletionResponse),
                      tags=["openai"])
            async def own_completions(self, body: CompletionRequest):
                """OpenAI text completions by this model, whatever the body's `model` names."""
                return await self._own_openai(COMPLETIONS, body)

            @api.post("/v1/chat/completions", response_model=ChatCompletionResponse,
                      responses=documented(ChatCompletionResponse), tags=["openai"])
            async def own_chat_completions(self, body: ChatCompletionRequest):
                """OpenAI chat completions by this model, whatever the body's `model` names."""
                return await self._own_openai(CHAT, body)

    # Tokenizers' own thread pool fights torch's threads for the replica's few cores: tokenize
    # serially (a batch of 16 takes ~1 ms) and leave the cores to the model.
    runtime_env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", **(env_vars or {})}}
    deployment = serve.deployment(
        name=handler_cls.__name__,
        # Serve lets in twice what the guard (serving/middleware.py) admits, so the overflow reaches the guard
        # and gets its JSON 503; Serve's own queue limit is only the backstop (a plain-text 503).
        max_ongoing_requests=2 * (spec.max_ongoing_requests + spec.max_queued_requests),
        max_queued_requests=spec.max_queued_requests,
        backpressure_config={"retry_after_s": spec.retry_after_s},
        autoscaling_config=_autoscaling(spec),
        graceful_shutdown_timeout_s=spec.graceful_shutdown_timeout_s,
        health_check_period_s=spec.health_check_period_s,
        ray_actor_options={"num_cpus": spec.num_cpus, "num_gpus": spec.num_gpus, "runtime_env": runtime_env},
    )(ModelServer)
    return deployment.bind(model, spec)


def build_root_app(
    models: list[ServedModel], env_vars: dict[str, str] | None = None, settings: ServeSpec | None = None,
    extra_routes: Callable[[FastAPI], Any] | None = None,
) -> Application:
    """`/healthz`, `/v1/models` (the models given here), `/metrics` and a 404 JSON for any other model.

    `settings` gives the server-wide auth, CORS, body limit, timeout and access log (default: none of them).
    """
    settings = settings or ServeSpec()
    api = install_error_handlers(FastAPI(title="tunefleet", description="Models served by this tunefleet server."))
    install_guard(api, settings, "", admission=False)  # answers from memory: no queue of its own
    generative = HANDLERS.generative_tasks()
    cards = ModelList.of([m.card() for m in models], generative).model_dump()
    names = sorted(m.name for m in models)
    routed = {m.name: m for m in models if m.route}  # on a route of their own: /v1/models/<name> is not theirs
    # POST /v1/completions and /v1/chat/completions, forwarded to the named model's app.
    install_openai_routes(api, models, {m.name for m in models if m.info.task in generative})
    if extra_routes is not None:  # adapters and registrations (serving/registration.py); first match wins
        extra_routes(api)

    @serve.ingress(api)
    class Root:
        def __init__(self) -> None:
            token_source(settings)  # an unreadable auth token fails the start, not each request

        @api.get("/healthz", response_model=Health)
        async def healthz(self) -> dict[str, str]:
            return {"status": "ok"}

        @api.get("/v1/models", response_model=ModelList)
        async def list_models(self) -> dict[str, Any]:
            return cards

        # A catch-all that only answers 400/404: kept out of /docs, where the served routes describe themselves.
        @api.api_route("/v1/models/{name}", methods=["GET", "POST"], include_in_schema=False)
        @api.api_route("/v1/models/{name}/{rest:path}", methods=["GET", "POST"], include_in_schema=False)
        async def unknown_model(self, name: str) -> None:
            if not MODEL_NAME.match(name):  # e.g. "..", "%2e%2e", a 10 kB name: say what a name is, echo little
                raise ServingError(400, f"invalid model name {name[:64]!r}: a name is 1-100 letters, digits, "
                                        "'.', '_' or '-', starting with a letter or digit", {"models": names})
            if name in routed:
                raise routed[name].served_elsewhere()
            raise ServingError(404, f"unknown model {name!r}; served models: {', '.join(names)}", {"models": names})

        @api.get("/metrics", response_class=PlainTextResponse, responses={503: {"model": ErrorBody}})
        async def metrics(self) -> PlainTextResponse:
            """Prometheus text: every model's request, error, latency and batch-size metrics, from every node."""
            try:
                return PlainTextResponse(await gather_metrics(), media_type=CONTENT_TYPE)
            except RuntimeError as exc:
                raise ServingError(503, f"metrics unavailable: {exc}") from None

    runtime_env = {"env_vars": env_vars} if env_vars else {}
    deployment = serve.deployment(
        name="Root",
        num_replicas=1,
        max_ongoing_requests=256,  # answers from memory; never the bottleneck
        max_queued_requests=1024,  # Serve's backstop; the root has no queue of its own
        ray_actor_options={"num_cpus": 0, "runtime_env": runtime_env},
    )(Root)
    return deployment.bind()
