"""A real Serve on 127.0.0.1 fed hostile requests: every one answers a 4xx with a JSON body that names
the problem, and the server still answers good requests afterwards. Also what the guard adds to a real
server: bearer auth, the body limit while streaming, JSON access-log lines, Prometheus metrics."""

from __future__ import annotations

import base64
import http.client
import io
import json
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

pytestmark = pytest.mark.integration

TEXT_MODEL, IMAGE_MODEL = "tiny-sentiment", "vit"
TEXT = f"/v1/models/{TEXT_MODEL}/predict"
IMAGE = f"/v1/models/{IMAGE_MODEL}/predict"
UPLOAD = f"/v1/models/{IMAGE_MODEL}/predict/upload"
TEXT_HF, IMAGE_HF = f"/v1/models/{TEXT_MODEL}", f"/v1/models/{IMAGE_MODEL}"  # the Inference API's shape
TOKEN = "hostile-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json", **AUTH}
MAX_BODY = 2 * 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(size: tuple[int, int] = (32, 32)) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def vit_export(tiny_vit: Path, tmp_path_factory) -> Path:
    from training.layout import ExportInfo, write_export_info

    directory = tmp_path_factory.mktemp("hostile-vit") / "export"
    shutil.copytree(tiny_vit, directory)
    write_export_info(directory, ExportInfo(name=IMAGE_MODEL, task="image-classification", labels=["0", "1", "2"],
                                            base_model="tiny-vit", method="full"))
    return directory


def _wait_with_token(url: str, models: list, timeout_s: float) -> None:
    """Every model's card answers 200 to a request with the token."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=url, timeout=5, headers=AUTH) as client:
        for path in ["/healthz", *(f"{m.route_prefix}/" for m in models)]:
            while True:
                try:
                    if client.get(path).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url}{path} did not answer within {timeout_s:.0f} s")
                time.sleep(0.2)


@pytest.fixture(scope="module")
def server(local_ray, tiny_export: Path, vit_export: Path, tmp_path_factory) -> Iterator:
    import serving.server
    from serving import ServeSpec, start_server

    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    settings = ServeSpec(min_replicas=1, max_replicas=1, num_cpus=0.5, max_inputs_per_request=8,
                         max_input_chars=2000, max_image_bytes=MAX_BODY // 2, max_body_bytes=MAX_BODY,
                         request_timeout_s=30, auth_token_file=str(token_file))
    # start_server's readiness probe sends no token, and a model's card needs one here.
    with pytest.MonkeyPatch.context() as patch:
        if getattr(serving.server, "_wait_until_answering", None) is not None:
            patch.setattr(serving.server, "_wait_until_answering", _wait_with_token)
        running = start_server([tiny_export, vit_export], port=_free_port(), settings=settings)
    try:
        yield running
    finally:
        running.shutdown()


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _raw(url: str, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None):
    """A request whose target goes out byte for byte (httpx would resolve `..` before sending)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        connection.request(method, target, body=body or None, headers={**JSON, **(headers or {})})
        answer = connection.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()
    finally:
        connection.close()


def _nested(depth: int) -> bytes:
    return b'{"inputs": ' + b"[" * depth + b'"a"' + b"]" * depth + b"}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _chunks(total: int, size: int = 256 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b"a" * min(size, total - sent)
        sent += size


TEN_MB_TEXT = json.dumps({"inputs": "word " * (2 * 1024 * 1024)}).encode()  # 10 MB of text
# (name, method, path or raw target, request kwargs, status, words the error must contain)
CORPUS: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    # malformed or mistyped JSON
    ("truncated JSON", "POST", TEXT, {"content": b'{"inputs": '}, 400, "malformed JSON"),
    ("trailing garbage", "POST", TEXT, {"content": b'{"inputs": "a"} }'}, 400, "malformed JSON"),
    ("single quotes", "POST", TEXT, {"content": b"{'inputs': 'a'}"}, 400, "malformed JSON"),
    ("invalid UTF-8", "POST", TEXT, {"content": b'{"inputs": "\xff\xfe\xfa"}'}, 400, "UTF-8"),
    ("NUL bytes", "POST", TEXT, {"content": b"\x00" * 64}, 400, "malformed JSON"),
    ("empty body", "POST", TEXT, {"content": b""}, 422, "a JSON body is required"),
    ("JSON null", "POST", TEXT, {"content": b"null"}, 422, "body"),
    ("JSON string", "POST", TEXT, {"content": b'"just a text"'}, 422, "body"),
    ("JSON array", "POST", TEXT, {"content": b'["a", "b"]'}, 422, "body"),
    ("inputs missing", "POST", TEXT, {"json": {"input": "a"}}, 422, "inputs: Field required"),
    ("inputs a number", "POST", TEXT, {"json": {"inputs": 5}}, 422, "inputs must be a text"),
    ("inputs a bool", "POST", TEXT, {"json": {"inputs": True}}, 422, "inputs must be a text"),
    ("inputs NaN", "POST", TEXT, {"content": b'{"inputs": NaN}'}, 422, "inputs must be a text"),
    ("inputs an object", "POST", TEXT, {"json": {"inputs": {"a": {"b": 1}}}}, 422, "inputs"),
    ("list of nulls", "POST", TEXT, {"json": {"inputs": [None, None]}}, 422, "inputs[0]"),
    ("duplicate key, last wins", "POST", TEXT, {"content": b'{"inputs": "a", "inputs": 7}'}, 422, "inputs"),
    ("unknown field", "POST", TEXT, {"json": {"inputs": "a", "stream": True}}, 422, "stream"),
    ("parameters a list", "POST", TEXT, {"json": {"inputs": "a", "parameters": [1]}}, 422, "parameters"),
    ("top_k NaN", "POST", TEXT, {"content": b'{"inputs": "a", "parameters": {"top_k": NaN}}'}, 422, "top_k"),
    ("top_k Infinity", "POST", TEXT, {"content": b'{"inputs": "a", "parameters": {"top_k": 1e400}}'}, 422, "top_k"),
    ("top_k negative", "POST", TEXT, {"json": {"inputs": "a", "parameters": {"top_k": -3}}}, 422, "top_k"),
    ("top_k a text", "POST", TEXT, {"json": {"inputs": "a", "parameters": {"top_k": "all"}}}, 422, "top_k"),
    ("deep nesting (parser)", "POST", TEXT, {"content": _nested(100_000)}, 400, "nested too deeply"),
    ("deep nesting (schema)", "POST", TEXT, {"content": _nested(200)}, 422, "inputs[0]"),
    # empty and huge inputs
    ("empty text", "POST", TEXT, {"json": {"inputs": ""}}, 422, "non-empty"),
    ("blank text", "POST", TEXT, {"json": {"inputs": " \n\t "}}, 422, "non-empty"),
    ("empty list", "POST", TEXT, {"json": {"inputs": []}}, 422, "at least one input"),
    ("lone surrogate", "POST", TEXT, {"content": b'{"inputs": "bad \\ud800 text"}'}, 422, "surrogate"),
    ("text over max_input_chars", "POST", TEXT, {"json": {"inputs": "a" * 2001}}, 413, "too long"),
    ("1 MB text", "POST", TEXT, {"json": {"inputs": "b" * 1_000_000}}, 413, "too long"),
    ("10 MB text", "POST", TEXT, {"content": TEN_MB_TEXT}, 413, "request body too large"),
    ("10 MB chunked, no Content-Length", "POST", TEXT, {"content": "chunks"}, 413, "more than"),
    ("too many inputs", "POST", TEXT, {"json": {"inputs": ["a"] * 9}}, 413, "too many inputs"),
    ("10,000 inputs", "POST", TEXT, {"json": {"inputs": ["a"] * 10_000}}, 413, "too many inputs"),
    ("object missing text", "POST", TEXT, {"json": {"inputs": [{"text_pair": "b"}]}}, 422,
     "inputs[0].text: Field required"),
    # wrong content types and methods
    ("text/plain body", "POST", TEXT, {"content": b"classify me", "headers": {"content-type": "text/plain"}},
     415, "unsupported content type 'text/plain'"),
    ("XML body", "POST", TEXT, {"content": b"<inputs>a</inputs>", "headers": {"content-type": "application/xml"}},
     415, "unsupported content type"),
    ("form body", "POST", TEXT, {"data": {"inputs": "a"}}, 415, "unsupported content type"),
    ("GET on predict", "GET", TEXT, {}, 405, "not allowed"),
    ("PUT on predict", "PUT", TEXT, {"json": {"inputs": "a"}}, 405, "not allowed"),
    ("unknown route", "POST", f"/v1/models/{TEXT_MODEL}/explain", {"json": {"inputs": "a"}}, 404, "no route"),
    # image model: non-image bytes, bad base64, wrong content type, a text model fed an image
    ("non-image bytes, base64", "POST", IMAGE, {"json": {"inputs": _b64(b"%PDF-1.4 not an image" * 20)}},
     415, "inputs[0] is not an image"),
    ("invalid base64", "POST", IMAGE, {"json": {"inputs": "***not base64***"}}, 422, "base64"),
    ("an image URL", "POST", IMAGE, {"json": {"inputs": ["http://127.0.0.1:9/ant.jpg"]}}, 422, "does not fetch URLs"),
    ("the image file as the body", "POST", IMAGE, {"content": _png(), "headers": {"content-type": "image/png"}},
     415, f"or POST the files themselves to {UPLOAD}"),
    ("image as a number", "POST", IMAGE, {"json": {"inputs": 12}}, 422, "inputs"),
    ("upload: non-image bytes", "POST", UPLOAD, {"content": b"GIF89a" + b"\x00" * 100,
                                                  "headers": {"content-type": "image/gif"}}, 415, "not an image"),
    ("upload: text/plain", "POST", UPLOAD, {"content": b"hello", "headers": {"content-type": "text/plain"}},
     415, "unsupported content type"),
    ("upload: image over max_image_bytes", "POST", UPLOAD,
     {"content": b"\x89PNG" + b"\x00" * (MAX_BODY // 2 + 10), "headers": {"content-type": "image/png"}},
     413, "too large"),
    ("text model fed an image", "POST", TEXT, {"json": {"inputs": {"image": _b64(_png())}}}, 422, "inputs"),
    # the Hugging Face Inference API's route: its envelope, then the task's own checks
    ("HF route: truncated JSON", "POST", TEXT_HF, {"content": b'{"inputs": '}, 400, "malformed JSON"),
    ("HF route: JSON array", "POST", TEXT_HF, {"content": b'["a"]'}, 422, "a JSON object is required"),
    ("HF route: stream true", "POST", TEXT_HF, {"json": {"inputs": "a", "stream": True}}, 422,
     "stream: not offered on this route"),
    ("HF route: details", "POST", TEXT_HF, {"json": {"inputs": "a", "details": True}}, 422, "details"),
    ("HF route: options mistyped", "POST", TEXT_HF, {"json": {"inputs": "a", "options": {"use_cache": "no"}}}, 422,
     "options.use_cache"),
    ("HF route: empty text", "POST", TEXT_HF, {"json": {"inputs": ""}}, 422, "non-empty"),
    ("HF route: too many inputs", "POST", TEXT_HF, {"json": {"inputs": ["a"] * 9}}, 413, "too many inputs"),
    ("HF route: PUT", "PUT", TEXT_HF, {"json": {"inputs": "a"}}, 405, "not allowed"),
    ("HF route: non-image body", "POST", IMAGE_HF, {"content": b"GIF89a" + b"\x00" * 100,
                                                    "headers": {"content-type": "image/gif"}}, 415, "not an image"),
    ("HF route: no token", "POST", TEXT_HF, {"json": {"inputs": "a"}, "headers": {"Authorization": ""}}, 401,
     "missing bearer"),
    ("HF route: unknown model", "POST", "/v1/models/nope", {"json": {"inputs": "a"}}, 404, "unknown model 'nope'"),
    # unknown and path-like model names
    ("unknown model", "POST", "/v1/models/nope/predict", {"json": {"inputs": "a"}}, 404, "unknown model 'nope'"),
    ("dot-dot name", "POST", "raw:/v1/models/../predict", {}, 400, "invalid model name"),
    ("dot-dot escape", "POST", "raw:/v1/models/../../etc/passwd", {}, 400, "invalid model name '..'"),
    ("encoded dot-dot", "POST", "raw:/v1/models/%2e%2e/predict", {}, 400, "invalid model name"),
    ("encoded slash", "POST", "raw:/v1/models/..%2F..%2Fetc%2Fpasswd/predict", {}, 400, "invalid model name"),
    ("a/b name", "POST", "/v1/models/a/b/predict", {"json": {"inputs": "a"}}, 404, "unknown model 'a'"),
    ("NUL in name", "POST", "raw:/v1/models/%00/predict", {}, 400, "invalid model name"),
    ("300-char name", "POST", "/v1/models/" + "n" * 300 + "/predict", {"json": {"inputs": "a"}},
     400, "invalid model name"),
    ("OpenAI route on a classifier", "POST", "/v1/completions", {"json": {"model": TEXT_MODEL, "prompt": "hi"}},
     400, "text-classification model"),
    ("OpenAI route, path-like model", "POST", "/v1/completions", {"json": {"model": "../x", "prompt": "hi"}},
     400, "invalid model name '../x'"),  # as on /v1/models/{name}: a name is never looked up in the registry
    ("OpenAI route, unknown model", "POST", "/v1/chat/completions",
     {"json": {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}}, 404, "unknown model 'nope'"),
    # missing or wrong auth
    ("no token", "POST", TEXT, {"json": {"inputs": "a"}, "headers": {"Authorization": ""}}, 401, "missing bearer"),
    ("wrong token", "POST", TEXT, {"json": {"inputs": "a"}, "headers": {"Authorization": "Bearer guess"}},
     401, "invalid bearer token"),
    ("token prefix", "POST", TEXT, {"json": {"inputs": "a"}, "headers": {"Authorization": f"Bearer {TOKEN[:-1]}"}},
     401, "invalid bearer token"),
    ("Basic scheme", "POST", TEXT, {"json": {"inputs": "a"}, "headers": {"Authorization": f"Basic {TOKEN}"}},
     401, "Bearer <token>"),
    ("no token on the card", "GET", f"/v1/models/{TEXT_MODEL}/", {"headers": {"Authorization": ""}},
     401, "missing bearer"),
]


def _send(client: httpx.Client, url: str, method: str, path: str, kwargs: dict[str, Any]):
    """(status, headers, body bytes) of one corpus request; auth and a JSON content type unless it says."""
    kwargs = dict(kwargs)
    headers = {**JSON, **kwargs.pop("headers", {})}
    headers = {k: v for k, v in headers.items() if v}
    if kwargs.get("content") == "chunks":
        kwargs["content"] = _chunks(10 * 1024 * 1024)
    if "json" in kwargs or "data" in kwargs:
        headers.pop("content-type", None)
    if path.startswith("raw:"):
        return _raw(url, method, path.removeprefix("raw:"), json.dumps({"inputs": "a"}).encode(), headers)
    answer = client.request(method, path, headers=headers, **kwargs)
    return answer.status_code, answer.headers, answer.content


def test_corpus_is_big_enough() -> None:
    assert len(CORPUS) >= 40 and len({case[0] for case in CORPUS}) == len(CORPUS)


@pytest.mark.parametrize(("case", "method", "path", "kwargs", "status", "words"), CORPUS, ids=[c[0] for c in CORPUS])
def test_hostile_request_gets_4xx_json(server, client, case, method, path, kwargs, status, words) -> None:
    got, headers, content = _send(client, server.url, method, path, kwargs)
    assert got == status, (got, content[:500])
    assert headers.get("content-type", "").startswith("application/json"), headers
    body = json.loads(content)
    assert set(body) == {"error", "detail"} and words in body["error"], body
    if got == 401:
        assert headers["www-authenticate"].startswith("Bearer")


def test_good_requests_still_answered_after_the_corpus(client) -> None:
    text = client.post(TEXT, json={"inputs": ["still fine", "and this"]}, headers=AUTH)
    assert text.status_code == 200, text.text
    assert len(text.json()["predictions"]) == 2
    image = client.post(IMAGE, json={"inputs": _b64(_png())}, headers=AUTH)
    assert image.status_code == 200, image.text
    upload = client.post(UPLOAD, content=_png(), headers={"content-type": "image/png", **AUTH})
    assert upload.status_code == 200, upload.text
    assert client.get("/healthz").json() == {"status": "ok"}  # open without a token


def _access_lines(request_id: str) -> list[dict]:
    """Access-log lines with this request id, from the Ray workers' stderr files (where Ray keeps a replica's)."""
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    found = []
    for path in logs.glob("worker-*.err"):
        for line in path.read_text(errors="replace").splitlines():
            if request_id in line and line.startswith("{"):
                found.append(json.loads(line))
    return found


def test_hugging_face_inference_client_reads_a_models_url(server, client, monkeypatch) -> None:
    """huggingface_hub's InferenceClient pointed at a model's URL, as at an Inference Endpoint: the text
    classifier's labels, and an image sent as raw bytes (no parameters) and as base64 JSON (with them)."""
    from testdata import inference_client

    text = inference_client(f"{server.url}{TEXT_HF}", monkeypatch, token=TOKEN)
    want = client.post(TEXT, json={"inputs": "still fine", "parameters": {"top_k": 2}}, headers=AUTH).json()
    got = text.text_classification("still fine", top_k=2)
    assert [(e.label, e.score) for e in got] == [(p["label"], pytest.approx(p["score"], abs=1e-6))
                                                 for p in want["predictions"][0]]
    image = inference_client(f"{server.url}{IMAGE_HF}", monkeypatch, token=TOKEN)
    want = client.post(IMAGE, json={"inputs": _b64(_png()), "parameters": {"top_k": 3}}, headers=AUTH).json()
    ranked = [(p["label"], pytest.approx(p["score"], abs=1e-6)) for p in want["predictions"][0]]
    assert [(e.label, e.score) for e in image.image_classification(_png(), top_k=3)] == ranked
    assert [(e.label, e.score) for e in image.image_classification(_png())] == ranked[:1]  # the raw body
    raw = client.post(IMAGE_HF, content=_png(), headers={"content-type": "image/png", **AUTH})  # by hand, typed
    assert raw.status_code == 200 and [p["label"] for p in raw.json()] == [ranked[0][0]], raw.text


def test_access_log_has_one_json_line_per_request(client) -> None:
    request_id = f"hostile-{time.time_ns()}"
    answer = client.post(TEXT, json={"inputs": "log me"}, headers={**AUTH, "x-request-id": request_id})
    assert answer.status_code == 200 and answer.headers["x-request-id"] == request_id
    deadline, lines = time.monotonic() + 20, []
    while time.monotonic() < deadline and not lines:
        lines = _access_lines(request_id)
        time.sleep(0.5)
    assert len(lines) == 1, lines
    line = lines[0]
    assert (line["method"], line["path"], line["model"], line["status"], line["route"]) == (
        "POST", TEXT, TEXT_MODEL, 200, "/predict")
    assert line["latency_ms"] > 0


def test_metrics_count_requests_errors_and_batches_per_model(client) -> None:
    """GET /metrics: Prometheus text from Ray's metrics of every replica (Ray forwards them every few seconds)."""
    from prometheus_client.parser import text_string_to_metric_families

    assert client.post(TEXT, json={"inputs": ["x", "y", "z"]}, headers=AUTH).status_code == 200
    assert client.post(TEXT, json={"inputs": "x"}).status_code == 401
    assert client.post(TEXT, json={"inputs": "x" * 2001}, headers=AUTH).status_code == 413
    assert client.post(TEXT, json={"inputs": 3}, headers=AUTH).status_code == 422
    wanted = {"ray_tunefleet_requests", "ray_tunefleet_errors", "ray_tunefleet_request_duration_seconds",
              "ray_tunefleet_batch_size"}

    def ours(families: dict, family: str) -> list:
        return [s for s in families[family].samples if s.labels.get("model") == TEXT_MODEL] if family in families else []

    def counted(families: dict) -> tuple[set, set, float]:
        """(status codes of requests, status codes of errors, forward passes) seen for the text model."""
        return ({s.labels["code"] for s in ours(families, "ray_tunefleet_requests")},
                {s.labels["code"] for s in ours(families, "ray_tunefleet_errors")},
                sum(s.value for s in ours(families, "ray_tunefleet_batch_size") if s.name.endswith("_count")))

    # Ray forwards each metric of a replica on its own schedule: wait until every one asserted below is in.
    deadline, families = time.monotonic() + 45, {}
    while time.monotonic() < deadline:
        answer = client.get("/metrics", headers=AUTH)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(answer.text)}
        requests, errors, passes = counted(families)
        if wanted <= set(families) and {"200", "401", "413", "422"} <= requests and {"401", "413", "422"} <= errors \
                and passes >= 1:
            break
        time.sleep(2)
    assert wanted <= set(families), sorted(families)
    requests, errors, passes = counted(families)
    assert {"200", "401", "413", "422"} <= requests, requests
    assert {"401", "413", "422"} <= errors, errors
    assert passes >= 1  # the 200's three inputs went through the model in at least one batch
    routes = {s.labels.get("route") for s in families["ray_tunefleet_request_duration_seconds"].samples}
    assert "/predict" in routes and not any(r and "nope" in r for r in routes)  # templates, never raw paths


def test_openapi_describes_every_route(client) -> None:
    gaps = []
    for prefix in ("", f"/v1/models/{TEXT_MODEL}", f"/v1/models/{IMAGE_MODEL}"):
        schema = client.get(f"{prefix}/openapi.json", headers=AUTH).json()
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                where, answers = f"{method.upper()} {prefix}{path}", operation["responses"]
                ok = [r for code, r in answers.items() if code.startswith("2")]
                if "204" not in answers and not any(m.get("schema") for r in ok for m in r.get("content", {}).values()):
                    gaps.append(f"{where}: response body undocumented")
                if method == "post" and "requestBody" not in operation:
                    gaps.append(f"{where}: request body undocumented")
                if method == "post" and not {"413", "422"} <= set(answers):
                    gaps.append(f"{where}: 413/422 undocumented")
                if path != "/healthz" and not ("401" in answers and operation.get("security")):
                    gaps.append(f"{where}: bearer auth undocumented")
        assert client.get(f"{prefix}/docs", headers=AUTH).status_code == 200
    assert not gaps, "\n".join(gaps)
