"""The guard in front of every route (serving/middleware.py), in-process: auth, body limit,
backpressure, timeout, access log and the OpenAPI it documents. No Ray needed; the real-server
versions of these run in test_hostile.py."""

from __future__ import annotations

import asyncio
import json
import logging
import os

import httpx
import pytest
from fastapi import FastAPI, Request

from serving.auth import TokenSource, bearer_problem
from serving.config import ServeSpec
from serving.errors import install_error_handlers
from serving.metrics import merge_families
from serving.middleware import install_guard

pytestmark = pytest.mark.anyio  # async tests run on asyncio (anyio's pytest plugin)
TOKEN = "s3cret-token"


def _app(spec: ServeSpec, model: str = "m", admission: bool = True) -> FastAPI:
    api = install_error_handlers(FastAPI())
    install_guard(api, spec, model, admission=admission)
    release = asyncio.Event()
    api.state.release = release

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}

    @api.post("/slow")
    async def slow() -> dict[str, str]:
        await release.wait()
        return {"status": "done"}

    return api


def _client(api: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://test")


def _check_error(answer: httpx.Response, status: int, words: str) -> dict:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert set(body) == {"error", "detail"} and words in body["error"], body
    return body


@pytest.fixture()
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")  # a secret file often ends in a newline
    return path


async def test_bearer_auth_from_a_file_and_healthz_open(token_file) -> None:
    async with _client(_app(ServeSpec(auth_token_file=str(token_file)))) as client:
        missing = await client.post("/echo", content=b"x")
        _check_error(missing, 401, "missing bearer token")
        assert missing.headers["www-authenticate"] == 'Bearer realm="tunefleet"'
        wrong = await client.post("/echo", content=b"x", headers={"Authorization": "Bearer nope"})
        _check_error(wrong, 401, "invalid bearer token")
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        _check_error(await client.post("/echo", headers={"Authorization": f"Basic {TOKEN}"}), 401, "must be 'Bearer")
        ok = await client.post("/echo", content=b"xyz", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ok.status_code == 200 and ok.json() == {"bytes": 3}
        assert (await client.get("/healthz")).status_code == 200


def test_token_sources(monkeypatch, token_file) -> None:
    monkeypatch.setenv("TF_TEST_TOKEN", TOKEN)
    assert TokenSource(env_name="TF_TEST_TOKEN").token() == TOKEN.encode()
    monkeypatch.delenv("TF_TEST_TOKEN")
    with pytest.raises(RuntimeError, match="TF_TEST_TOKEN.*unset"):
        TokenSource(env_name="TF_TEST_TOKEN")
    with pytest.raises(RuntimeError, match="cannot be read"):
        TokenSource(file=str(token_file) + ".missing")
    # A rotated secret applies without a restart (the file's mtime is checked every few seconds).
    source = TokenSource(file=str(token_file))
    token_file.write_text("rotated")
    os.utime(token_file, (1, 1))
    source._checked = 0
    assert source.token() == b"rotated"
    assert bearer_problem(b"Bearer rotated", source.token()) is None
    assert bearer_problem(b"bearer  rotated ", source.token()) is None


async def test_body_limit_from_content_length_and_while_streaming() -> None:
    spec = ServeSpec(max_body_bytes=1000, max_image_bytes=1000)
    async with _client(_app(spec)) as client:
        assert (await client.post("/echo", content=b"x" * 1000)).json() == {"bytes": 1000}
        body = _check_error(await client.post("/echo", content=b"x" * 1001), 413, "Content-Length is 1001 bytes")
        assert body["detail"] == {"max_body_bytes": 1000}

        async def chunks():  # no Content-Length: counted as it arrives
            for _ in range(5):
                yield b"y" * 300

        _check_error(await client.post("/echo", content=chunks()), 413, "more than 1000 bytes arrived")


async def test_full_replica_answers_503_with_retry_after_and_recovers() -> None:
    spec = ServeSpec(max_ongoing_requests=2, max_batch_size=1, max_queued_requests=1, retry_after_s=3)
    api = _app(spec)
    async with _client(api) as client:
        held = [asyncio.create_task(client.post("/slow")) for _ in range(3)]  # 2 running, 1 waiting
        await asyncio.sleep(0.2)
        busy = await client.post("/slow")
        body = _check_error(busy, 503, "server busy")
        assert busy.headers["retry-after"] == "3" and body["detail"]["max_queued_requests"] == 1
        api.state.release.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200, 200]
        assert (await client.post("/slow")).status_code == 200


async def test_timeout_answers_504() -> None:
    async with _client(_app(ServeSpec(request_timeout_s=0.3))) as client:
        body = _check_error(await client.post("/slow"), 504, "timed out")
        assert body["detail"] == {"request_timeout_s": 0.3}
        assert (await client.post("/echo", content=b"ok")).status_code == 200


async def test_access_log_is_one_json_line_per_request(caplog) -> None:
    logger = logging.getLogger("tunefleet.access")
    async with _client(_app(ServeSpec(), model="sst2")) as client:
        logger.addHandler(caplog.handler)
        try:
            await client.post("/echo", content=b"abc", headers={"x-request-id": "req-1"})
            await client.get("/nope")
        finally:
            logger.removeHandler(caplog.handler)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tunefleet.access"]
    assert [(x["method"], x["path"], x["status"], x["route"]) for x in lines] == [
        ("POST", "/echo", 200, "/echo"), ("GET", "/nope", 404, "unmatched")]
    assert lines[0]["model"] == "sst2" and lines[0]["request_id"] == "req-1" and lines[0]["latency_ms"] >= 0


async def test_cors_off_unless_configured(token_file) -> None:
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    async with _client(_app(ServeSpec())) as client:
        answer = await client.post("/echo", content=b"x", headers={"Origin": "https://app.example.com"})
        assert "access-control-allow-origin" not in answer.headers
    spec = ServeSpec(cors_origins=("https://app.example.com",), auth_token_file=str(token_file))
    async with _client(_app(spec)) as client:
        answer = await client.options("/echo", headers=preflight)  # a preflight carries no token
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "https://app.example.com"
        denied = await client.post("/echo", headers={"Origin": "https://app.example.com"})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "https://app.example.com"
        other = await client.options("/echo", headers={**preflight, "Origin": "https://evil.example"})
        assert other.status_code == 400


async def test_openapi_documents_the_guards_answers(token_file) -> None:
    spec = ServeSpec(auth_token_file=str(token_file))
    async with _client(_app(spec)) as client:
        schema = (await client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})).json()
    post = schema["paths"]["/echo"]["post"]
    assert {"401", "413", "503", "504"} <= set(post["responses"]) and post["security"] == [{"bearer": []}]
    assert "401" not in schema["paths"]["/healthz"]["get"]["responses"]
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert "ErrorBody" in schema["components"]["schemas"]


def test_merge_families_keeps_tunefleet_families_once() -> None:
    node = ("# HELP ray_tunefleet_requests_total Requests.\n# TYPE ray_tunefleet_requests_total counter\n"
            'ray_tunefleet_requests_total{{model="a",WorkerId="{w}"}} 3.0\n'
            "# HELP ray_other Other.\n# TYPE ray_other gauge\nray_other 1.0\n")
    merged = merge_families([node.format(w=1), node.format(w=2)])
    assert merged.count("# TYPE ray_tunefleet_requests_total counter") == 1
    assert 'WorkerId="1"' in merged and 'WorkerId="2"' in merged and "ray_other" not in merged
