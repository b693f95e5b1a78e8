"""A real local Ray and Serve on 127.0.0.1: the HTTP API a client sees, errors included, and drain on shutdown."""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import Iterator

import httpx
import pytest

pytestmark = pytest.mark.integration

LABELS = {"negative", "positive"}  # the tiny export's labels (conftest.py)
MODEL = "tiny-sentiment"
PREDICT = f"/v1/models/{MODEL}/predict"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVE_SAID: list[str] = []  # what Serve's logger said in this process while the server started


@pytest.fixture(scope="module")
def server(local_ray, tiny_export: Path, minilm_export: Path) -> Iterator:
    from serving import ServeSpec, start_server

    settings = ServeSpec(min_replicas=1, max_replicas=1, num_cpus=1, max_inputs_per_request=8,
                         max_input_chars=2000, graceful_shutdown_timeout_s=30)
    listener = logging.Handler()
    listener.emit = lambda record: SERVE_SAID.append(record.getMessage())
    logging.getLogger("ray.serve").addHandler(listener)
    try:
        # Two model apps behind one port; MiniLM is slow enough on a CPU to keep requests in flight.
        running = start_server([tiny_export, minilm_export], port=_free_port(), settings=settings)
    finally:
        logging.getLogger("ray.serve").removeHandler(listener)
    try:
        yield running
    finally:
        running.shutdown()


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _check_predictions(predictions: list, n_inputs: int, k: int) -> None:
    assert len(predictions) == n_inputs
    for ranked in predictions:
        assert len(ranked) == k
        assert {p["label"] for p in ranked} <= LABELS
        scores = [p["score"] for p in ranked]
        assert scores == sorted(scores, reverse=True) and 0 <= sum(scores) <= 1 + 1e-6


def test_start_does_not_say_its_own_options_were_ignored(server) -> None:
    """Serve started with this call's host and port: nothing should tell the user they "will not be applied"."""
    assert any("Started Serve" in line for line in SERVE_SAID), SERVE_SAID  # the listener heard Serve
    assert not [line for line in SERVE_SAID if "will not be applied" in line], SERVE_SAID


def test_health_and_model_list(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    listing = client.get("/v1/models").json()
    models = {m["name"]: m for m in listing["models"]}
    assert set(models) == {MODEL, "minilm"}
    assert listing["object"] == "list" and listing["data"] == []  # OpenAI's list: classifiers answer no OpenAI route
    card = models[MODEL]
    assert card["task"] == "text-classification" and set(card["labels"]) == LABELS
    assert card["base_model"] == "tiny-bert" and len(card["version"]) == 12
    assert client.get(f"/v1/models/{MODEL}/").json() == card


def test_predict_single_batch_pairs_and_top_k(client: httpx.Client) -> None:
    single = client.post(PREDICT, json={"inputs": "what a lovely film"})
    assert single.status_code == 200, single.text
    assert single.json()["model"] == MODEL
    _check_predictions(single.json()["predictions"], 1, 1)

    batch = client.post(PREDICT, json={"inputs": ["good", "bad", "fine"], "parameters": {"top_k": 2}}).json()
    _check_predictions(batch["predictions"], 3, 2)

    pairs = client.post(PREDICT, json={"inputs": [{"text": "a man eats", "text_pair": "someone eats"}, "solo"],
                                       "parameters": {"top_k": None}}).json()
    _check_predictions(pairs["predictions"], 2, 2)
    one_pair = client.post(PREDICT, json={"inputs": {"text": "a man eats", "text_pair": "someone eats"},
                                          "parameters": {"top_k": None}})
    assert one_pair.status_code == 200, one_pair.text
    (alone,), (in_list, _) = one_pair.json()["predictions"], pairs["predictions"]
    assert [p["label"] for p in alone] == [p["label"] for p in in_list]
    assert [p["score"] for p in alone] == pytest.approx([p["score"] for p in in_list], abs=1e-5)
    assert sum(p["score"] for p in pairs["predictions"][0]) == pytest.approx(1, abs=1e-5)
    assert len(client.post(PREDICT, json={"inputs": "x", "parameters": {"top_k": 9}}).json()["predictions"][0]) == 2

    other = client.post("/v1/models/minilm/predict", json={"inputs": "what a lovely film"}).json()
    assert other["model"] == "minilm"
    _check_predictions(other["predictions"], 1, 1)


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(client: httpx.Client) -> None:
    texts = [f"review number {i} " + "good " * (i % 7) for i in range(24)]
    expected = {t: client.post(PREDICT, json={"inputs": t, "parameters": {"top_k": None}}).json() for t in texts}
    answers: dict[str, dict] = {}

    def ask(text: str) -> None:
        answers[text] = client.post(PREDICT, json={"inputs": text, "parameters": {"top_k": None}}).json()

    threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for text in texts:
        got, want = answers[text]["predictions"][0], expected[text]["predictions"][0]
        assert [p["label"] for p in got] == [p["label"] for p in want]
        assert [p["score"] for p in got] == pytest.approx([p["score"] for p in want], abs=1e-4)


BAD_REQUESTS = [
    ("malformed JSON", "POST", PREDICT, {"content": b'{"inputs": ', "headers": {"content-type": "application/json"}},
     400, "malformed JSON"),
    ("no body", "POST", PREDICT, {}, 422, "a JSON body is required"),
    ("inputs missing", "POST", PREDICT, {"json": {"text": "hi"}}, 422, "inputs: Field required"),
    ("wrong type", "POST", PREDICT, {"json": {"inputs": 5}}, 422, "inputs must be a text"),
    ("list of numbers", "POST", PREDICT, {"json": {"inputs": [1, 2]}}, 422, "inputs[0]"),
    ("empty string", "POST", PREDICT, {"json": {"inputs": ""}}, 422, "non-empty"),
    ("empty list", "POST", PREDICT, {"json": {"inputs": []}}, 422, "at least one input"),
    ("non-dict pair", "POST", PREDICT, {"json": {"inputs": [["a", "b"]]}}, 422, "inputs[0]"),
    ("object missing text", "POST", PREDICT, {"json": {"inputs": [{"text_pair": "b"}]}}, 422,
     "inputs[0].text: Field required"),
    ("top_k zero", "POST", PREDICT, {"json": {"inputs": "a", "parameters": {"top_k": 0}}}, 422, "top_k"),
    ("top_k text", "POST", PREDICT, {"json": {"inputs": "a", "parameters": {"top_k": "2"}}}, 422, "top_k"),
    ("unknown parameter", "POST", PREDICT, {"json": {"inputs": "a", "parameters": {"temp": 1}}}, 422, "temp"),
    ("too many inputs", "POST", PREDICT, {"json": {"inputs": ["a"] * 9}}, 413, "too many inputs"),
    ("text too long", "POST", PREDICT, {"json": {"inputs": "a" * 2001}}, 413, "too long"),
    ("unknown model", "POST", "/v1/models/nope/predict", {"json": {"inputs": "a"}}, 404, "unknown model 'nope'"),
    ("unknown model card", "GET", "/v1/models/nope", {}, 404, "unknown model"),
    ("unknown route", "GET", "/v2/whatever", {}, 404, "no route"),
    ("unknown model route", "POST", f"/v1/models/{MODEL}/explain", {"json": {"inputs": "a"}}, 404, "no route"),
    ("wrong method", "GET", PREDICT, {}, 405, "not allowed"),
]


@pytest.mark.parametrize(("case", "method", "path", "kwargs", "status", "message"), BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_4xx_json(client: httpx.Client, case, method, path, kwargs, status, message) -> None:
    answer = client.request(method, path, **kwargs)
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert set(body) == {"error", "detail"} and message in body["error"], body


def test_good_request_still_works_after_bad_ones(client: httpx.Client) -> None:
    answer = client.post(PREDICT, json={"inputs": ["still fine", "and this"]})
    assert answer.status_code == 200
    _check_predictions(answer.json()["predictions"], 2, 1)


def test_shutdown_lets_in_flight_requests_finish(server) -> None:
    """Runs last in this module: it stops the server while MiniLM is still answering requests."""
    body = {"inputs": ["a fairly long sentence for the model to classify " * 16] * 8}
    statuses: list[int | str] = []
    go = threading.Barrier(17)

    def ask() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as own:
            go.wait()
            try:
                statuses.append(own.post("/v1/models/minilm/predict", json=body).status_code)
            except httpx.HTTPError as exc:
                statuses.append(type(exc).__name__)

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for t in threads:
        t.start()
    go.wait()
    threading.Event().wait(0.5)  # all 16 are on the replica: 128 sequences of 128 tokens take seconds
    answered_before_stop = len(statuses)
    server.shutdown()
    for t in threads:
        t.join()
    assert answered_before_stop < 16, "every request finished before shutdown began; nothing was in flight"
    assert statuses == [200] * 16
