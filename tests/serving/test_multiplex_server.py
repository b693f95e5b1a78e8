"""Many models behind one endpoint, from a serve file: a full model on its own route and LoRA adapters
multiplexed over one base (2 replicas); `tunefleet serve add` of a new adapter, answered at once by every replica."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import yaml

from adapter_exports import LABELS, build_lora_export, reference_probs

pytestmark = pytest.mark.integration

TEXTS = ["a good film", "a terrible waste of time"]
TOKEN_ENV, TOKEN = "TF_TEST_SERVE_TOKEN", "multiplex-test-token"  # auth on: registration must be protected too
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapters(tiny_text_model: Path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: build_lora_export(tiny_text_model, root / name, name, seed)
            for name, seed in (("alpha", 1), ("beta", 2), ("gamma", 3), ("delta", 4))}


@pytest.fixture(scope="module")
def server(local_ray, tiny_export: Path, tiny_text_model: Path, adapters: dict[str, Path],
           tmp_path_factory) -> Iterator:
    from serving import start_server
    from serving.servefile import load_serve_file

    # float32: answers are compared with a float32 reference at 1e-4 (test_local covers the bfloat16 default).
    small = {"num_cpus": 0.5, "max_batch_size": 4, "max_ongoing_requests": 8, "graceful_shutdown_timeout_s": 2,
             "dtype": "float32"}
    serve_file = tmp_path_factory.mktemp("servefile") / "serve.yaml"
    serve_file.write_text(yaml.safe_dump({
        "endpoint": "test-multiplex",
        "defaults": {**small, "min_replicas": 1, "max_replicas": 1, "auth_token_env": TOKEN_ENV},
        "models": [{"export": str(tiny_export), "route": "/sentiment"},
                   {"export": str(adapters["alpha"])}, {"export": str(adapters["beta"])}],
        "adapter_pools": [{"base_model": str(tiny_text_model), "task": "text-classification", "num_labels": 2,
                           "max_models_per_replica": 1, "affinity": False,
                           "serve": {**small, "min_replicas": 2, "max_replicas": 2}}],
    }))
    # affinity: false spreads requests over both pool replicas by load alone (Serve's router would otherwise
    # keep an adapter's requests on the replica that loaded it): each replica must load a newly added adapter
    # and answer for it (test_serve_add_answers_at_once_on_every_replica), and batches mix adapters. An LRU
    # of one adapter per replica makes every switch an eviction and a reload.
    running = start_server(port=_free_port(), plan=load_serve_file(serve_file), env_vars={TOKEN_ENV: TOKEN})
    try:
        yield running
    finally:
        running.shutdown()


@pytest.fixture(scope="module")
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as c:
        yield c


def _probs(answer: httpx.Response) -> list[list[float]]:
    assert answer.status_code == 200, answer.text
    return [[dict((p["label"], p["score"]) for p in ranked)[label] for label in LABELS]
            for ranked in answer.json()["predictions"]]


def _close(got: list[list[float]], want: list[list[float]]) -> bool:
    return [x for row in got for x in row] == pytest.approx([x for row in want for x in row], abs=1e-4)


def _predict(client: httpx.Client, name: str) -> httpx.Response:
    return client.post(f"/v1/models/{name}/predict", json={"inputs": TEXTS, "parameters": {"top_k": None}})


def test_one_endpoint_lists_and_serves_every_model(client: httpx.Client, tiny_text_model: Path,
                                                   adapters: dict[str, Path]) -> None:
    cards = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(cards) == {"tiny-sentiment", "alpha", "beta"}
    assert cards["alpha"]["base_model"] == str(tiny_text_model) and cards["alpha"]["labels"] == LABELS
    assert client.get("/v1/models/beta").json() == cards["beta"]

    full = client.post("/sentiment/predict", json={"inputs": TEXTS})
    assert full.status_code == 200 and full.json()["model"] == "tiny-sentiment"
    for moved in (client.post("/v1/models/tiny-sentiment/predict", json={"inputs": "x"}),  # its own route says where
                  client.post("/v1/models/tiny-sentiment/predict/upload", json={"inputs": "x"}),
                  client.get("/v1/models/tiny-sentiment/")):
        assert moved.status_code == 404 and moved.json() == {
            "error": "model 'tiny-sentiment' is served at /sentiment: POST /sentiment/predict",
            "detail": {"route": "/sentiment"}}, moved.text

    answers = {}
    for name in ("alpha", "beta", "alpha"):  # back and forth over the same base replicas
        answer = _predict(client, name)
        assert answer.json()["model"] == name
        answers[name] = _probs(answer)
        assert _close(answers[name], reference_probs(tiny_text_model, adapters[name], TEXTS))
    assert abs(answers["alpha"][0][0] - answers["beta"][0][0]) > 1e-3, "two adapters answered alike"

    # The Hugging Face Inference API's shape (the model's URL itself): an adapter's, and a full model's own route.
    hf = client.post("/v1/models/beta", json={"inputs": TEXTS, "parameters": {"top_k": None}, "stream": False})
    assert hf.status_code == 200, hf.text
    assert _close([[dict((p["label"], p["score"]) for p in ranked)[label] for label in LABELS] for ranked in hf.json()],
                  answers["beta"])
    one = client.post("/sentiment", json={"inputs": "x"})
    assert one.status_code == 200 and [len(r) for r in one.json()] == [1], one.text
    assert client.post("/v1/models/beta", json={"inputs": "x", "stream": True}).status_code == 422
    other = client.post("/v1/models/beta/explain", json={"inputs": "x"})  # a served adapter, not "unknown"
    assert other.status_code == 404 and "an adapter answers POST /v1/models/beta/predict" in other.json()["error"]


def test_concurrent_requests_for_two_adapters_each_get_their_own_answer(server, tiny_text_model: Path,
                                                                        adapters: dict[str, Path]) -> None:
    """Batches mix adapters (one forward pass, each row through its own); with one adapter per replica's LRU,
    loading one evicts the other while its requests wait: each must still answer as its own adapter."""
    expected = {name: reference_probs(tiny_text_model, adapters[name], TEXTS) for name in ("alpha", "beta")}
    answers: list[tuple[str, httpx.Response]] = []

    def ask(name: str) -> None:
        with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as own:
            for _ in range(2):
                answers.append((name, _predict(own, name)))

    threads = [threading.Thread(target=ask, args=(("alpha", "beta")[i % 2],)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 32
    for name, answer in answers:
        assert answer.json()["model"] == name
        assert _close(_probs(answer), expected[name]), name


def test_unknown_adapter_and_bad_bodies_get_4xx_json(client: httpx.Client) -> None:
    cases = [
        (client.post("/v1/models/nope/predict", json={"inputs": "a"}), 404, "unknown model 'nope'"),
        (client.get("/v1/models/nope"), 404, "unknown model"),
        (client.post("/v1/models/alpha/predict", content=b'{"inputs": ',
                     headers={"content-type": "application/json"}), 400, "malformed JSON"),
        (client.post("/v1/models/alpha/predict"), 422, "a JSON body is required"),
        (client.post("/v1/models/alpha/predict", json={"inputs": 5}), 422, "inputs must be a text"),
        (client.post("/v1/models/alpha/predict", json={"inputs": ["a"] * 300}), 413, "too many inputs"),
    ]
    for answer, status, message in cases:
        assert answer.status_code == status, answer.text
        assert message in answer.json()["error"], answer.json()


def test_registration_refuses_what_it_cannot_serve(client: httpx.Client, tiny_export: Path, tmp_path: Path,
                                                   adapters: dict[str, Path]) -> None:
    cases = [
        ({"export": str(tiny_export), "name": "full"}, 409, "full model"),
        ({"export": str(tmp_path)}, 422, "cannot read the export"),
        ({"export": str(adapters["gamma"]), "name": "alpha"}, 409, "deployed with this endpoint"),
        ({"export": str(adapters["gamma"]), "name": "../x"}, 422, "must be letters"),
        ({"exports": "typo"}, 422, "export"),
    ]
    for body, status, message in cases:
        answer = client.post("/v1/registrations", json=body)
        assert answer.status_code == status, answer.text
        assert message in answer.json()["error"], answer.json()
    assert _predict(client, "gamma").status_code == 404  # nothing was registered on the way


def test_serve_add_answers_at_once_on_every_replica(server, client: httpx.Client, tiny_text_model: Path,
                                                    adapters: dict[str, Path], monkeypatch) -> None:
    from cluster.cli import main

    anonymous = httpx.post(f"{server.url}/v1/registrations", json={"export": str(adapters["gamma"])})
    assert anonymous.status_code == 401, anonymous.text
    assert main(["serve", "add", str(adapters["gamma"]), "--endpoint", server.url]) == 1  # no token: refused
    monkeypatch.setenv("TUNEFLEET_TOKEN", TOKEN)
    assert main(["serve", "add", str(adapters["gamma"]), "--endpoint", server.url]) == 0
    expected = reference_probs(tiny_text_model, adapters["gamma"], TEXTS)
    # At once, from many clients: requests spread over both pool replicas, each loads gamma on first use.
    answers: list[httpx.Response] = []

    def ask() -> None:
        with httpx.Client(base_url=server.url, timeout=60, headers=AUTH) as own:
            for _ in range(3):
                answers.append(_predict(own, "gamma"))

    threads = [threading.Thread(target=ask) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 36
    for answer in answers:
        assert _close(_probs(answer), expected)
    replicas = {a.headers["x-tunefleet-replica"] for a in answers}
    assert len(replicas) == 2, f"every answer came from one pool replica: {replicas}"
    assert "gamma" in {m["name"] for m in client.get("/v1/models").json()["models"]}

    # Replaced under the same name: the new export answers; removed: 404.
    replaced = client.post("/v1/registrations", json={"export": str(adapters["delta"]), "name": "gamma"})
    assert replaced.status_code == 201, replaced.text
    assert _close(_probs(_predict(client, "gamma")), reference_probs(tiny_text_model, adapters["delta"], TEXTS))
    assert client.delete("/v1/registrations/gamma").status_code == 200
    assert _predict(client, "gamma").status_code == 404
    assert _predict(client, "alpha").status_code == 200  # the pool still serves the others


def test_a_job_with_serve_register_with_registers_its_export(server, client: httpx.Client, tiny_text_model: Path,
                                                             adapters: dict[str, Path], monkeypatch, capsys,
                                                             tmp_path: Path) -> None:
    """`tunefleet train`'s last step for a job whose serve section names an endpoint (cluster/commands/job.py)."""
    from cluster.commands.job import _register
    from cluster.spec import validate_job

    (tmp_path / "train.tsv").write_text("t\tl\na\tb\n")

    def job(endpoint: str) -> dict:
        return {"name": "epsilon", "task": "text-classification", "model": str(tiny_text_model),
                "data": {"train": str(tmp_path / "train.tsv"), "columns": {"text": "t", "label": "l"}},
                "serve": {"register_with": endpoint, "register_token_env": TOKEN_ENV}}

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert _register(validate_job(job(server.url), check_data=False), str(adapters["delta"])) == 0
    assert _close(_probs(_predict(client, "delta")), reference_probs(tiny_text_model, adapters["delta"], TEXTS))
    # An endpoint that does not answer: exit 1, and the message says how to register by hand.
    dead = f"http://127.0.0.1:{_free_port()}"
    assert _register(validate_job(job(dead), check_data=False), str(adapters["delta"])) == 1
    assert "tunefleet serve add" in capsys.readouterr().err
