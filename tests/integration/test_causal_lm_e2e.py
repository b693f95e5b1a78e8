"""Causal LM end to end: job file → a Ray Train worker → perplexity drops → export → text-generation
pipeline → Ray Serve on 127.0.0.1 → /predict, /v1/completions, /v1/chat/completions (JSON and SSE) → 4xx.

Model: a 2-layer, hidden-32 Llama with a small BPE tokenizer trained on the corpus (tests/testdata.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
import yaml

from testdata import LM_VERBS, lm_sentences

pytestmark = pytest.mark.integration

STEPS = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(tmp_path: Path, model: Path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(lm_sentences(4, seed=i)) for i in range(300)))
    job = {
        "name": "tiny-lm",
        "task": "causal-lm",
        "model": str(model),
        "data": {"train": str(corpus), "max_length": 32, "validation_fraction": 0.1},
        "train": {"max_steps": STEPS, "batch_size": 16, "learning_rate": 1.0e-2, "warmup_ratio": 0.0,
                  "eval_every_steps": 20, "log_every_steps": 10, "seed": 5},
        "scale": {"workers": 1, "cpus_per_worker": 1},  # 2-worker DDP: the text-classification e2e
        "output": {"storage": str(tmp_path / "runs")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _sse(response: httpx.Response) -> list:
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.strip()]
    assert all(not line.startswith("data:") for line in events) and events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_train_export_pipeline_serve_openai(tmp_path, tiny_causal_lm, monkeypatch):
    job = _job(tmp_path, tiny_causal_lm)
    env = {key: value for key, value in os.environ.items() if not key.startswith("TUNEFLEET_")}
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "train", str(job), "--run-id", "r1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # Not a terminal: a plain line per logged step instead of a bar, each once on the driver.
    said = (done.stdout + done.stderr).splitlines()
    for step in (1, 10, 20, STEPS):
        assert len([line for line in said if f"tiny-lm: step {step}/{STEPS} " in line]) == 1, said[-40:]
    # Each evaluation once, selection metric first; Ray Train's own per-report lines (a TrainingReport repr
    # per rank) left to its log files.
    evaluated = [line.split(") ", 1)[-1] for line in said if "tiny-lm: evaluation at step" in line]
    assert [line.split(":")[1] for line in evaluated] == [f" evaluation at step {s}/{STEPS}" for s in (20, 40, 60)]
    assert all(line.split(": ")[2].startswith("perplexity ") for line in evaluated), evaluated
    assert not [line for line in said if "Reporting training result" in line or "Checkpoint successfully" in line]
    # Nor the libraries' bars, whose redraws a log keeps as lines (transformers' loading and saving bars).
    assert not [line for line in said if "Loading weights" in line or "Writing model shards" in line], said[-40:]
    run_dir = tmp_path / "runs" / "tiny-lm" / "r1"

    # Perplexity fell from near the vocabulary size (an untrained model) to a few tokens' worth.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    assert [e["step"] for e in evals] == [20, 40, 60]
    assert evals[-1]["perplexity"] < evals[0]["perplexity"] and evals[-1]["perplexity"] < 12, evals
    assert evals[-1]["eval_tokens"] > 0
    report = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert report["metrics"]["perplexity"] == min(e["perplexity"] for e in evals)
    assert len(report["samples"]) == 3 and all(s["completion"] for s in report["samples"])
    assert "Completion:" in (run_dir / "report" / "samples.md").read_text()

    # The export is a plain Hugging Face model: the standard pipeline continues a sentence as trained.
    export = run_dir / "export"
    assert (export / "model.safetensors").is_file() and not list(export.glob("*.bin"))
    from transformers import pipeline

    generate = pipeline("text-generation", model=str(export))
    text = generate("the cat", max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert any(verb in text for verb in LM_VERBS), text

    import ray

    from serving import ServeSpec, start_server

    temp_dir = tempfile.mkdtemp(prefix="tfr-", dir="/tmp")
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False)
    except BaseException:  # e.g. a Ray already runs in this process: not ours to shut down, but the folder is
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    try:
        server = start_server([export], port=_free_port(),
                              settings=ServeSpec(min_replicas=1, max_replicas=1, num_cpus=1, max_input_chars=2000))
        try:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                _check_http(client, monkeypatch)
        finally:
            server.shutdown()
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _check_http(client: httpx.Client, monkeypatch) -> None:
    listing = client.get("/v1/models").json()
    card = listing["models"][0]
    assert card["name"] == "tiny-lm" and card["task"] == "causal-lm"
    # and in OpenAI's shape, which OpenAI clients' models.list() and chat UIs read
    assert listing["object"] == "list"
    assert listing["data"] == [{"id": "tiny-lm", "object": "model", "created": 0, "owned_by": "tunefleet"}]

    predict = client.post("/v1/models/tiny-lm/predict",
                          json={"inputs": ["the cat", "a bird"], "parameters": {"max_new_tokens": 6, "stop": "."}})
    assert predict.status_code == 200, predict.text
    outputs = predict.json()["predictions"]
    assert len(outputs) == 2 and all(any(v in o["generated_text"] for v in LM_VERBS) for o in outputs), outputs
    assert all("." not in o["generated_text"] for o in outputs)  # the text before the stop

    # huggingface_hub's client at the model's URL (the Inference API's shape), with the parameters it sends
    from testdata import inference_client

    hf = inference_client(f"{client.base_url}".rstrip("/") + "/v1/models/tiny-lm", monkeypatch)
    text = hf.text_generation("the cat", max_new_tokens=6, stop=["."], do_sample=False, repetition_penalty=1.0)
    assert text == outputs[0]["generated_text"], (text, outputs[0])
    # ... and its chat_completion, which posts to <model URL>/v1/chat/completions as on a TGI endpoint
    messages = [{"role": "user", "content": "the cat"}]
    root = client.post("/v1/chat/completions", json={"model": "tiny-lm", "messages": messages, "max_tokens": 6,
                                                     "temperature": 0})
    assert root.status_code == 200, root.text
    said = root.json()["choices"][0]["message"]["content"]
    chat = hf.chat_completion(messages, max_tokens=6, temperature=0)
    assert (chat.model, chat.choices[0].message.content) == ("tiny-lm", said)
    chunks = hf.chat_completion(messages, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == said
    assert client.post("/v1/models/tiny-lm/v1/completions", json={"model": "any", "prompt": "x", "max_tokens": 9999}
                       ).status_code == 422  # the model's own limits, before any event
    schema = client.get("/v1/models/tiny-lm/openapi.json")  # /docs describes the model's own routes
    assert schema.status_code == 200, schema.text
    assert {"/", "/predict", "/v1/completions", "/v1/chat/completions"} <= set(schema.json()["paths"])

    # With the neutral values OpenAI clients send by default (LangChain's completions wrapper: no penalties, one choice)
    completion = client.post("/v1/completions", json={"model": "tiny-lm", "prompt": "the dog", "max_tokens": 6,
                                                       "temperature": 0, "top_p": 1, "n": 1, "best_of": 1,
                                                       "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}})
    assert completion.status_code == 200, completion.text
    body = completion.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny-lm"
    assert any(v in body["choices"][0]["text"] for v in LM_VERBS) and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 6 and body["usage"]["total_tokens"] == 6 + body["usage"]["prompt_tokens"]

    streamed = client.post("/v1/completions", json={"model": "tiny-lm", "prompt": "the dog", "max_tokens": 6,
                                                     "temperature": 0, "stream": True})
    chunks = _sse(streamed)
    assert "".join(c["choices"][0]["text"] for c in chunks) == body["choices"][0]["text"]  # same greedy text
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    chat = client.post("/v1/chat/completions", json={
        "model": "tiny-lm", "messages": [{"role": "user", "content": "the king"}], "max_tokens": 5})
    assert chat.status_code == 200, chat.text
    message = chat.json()["choices"][0]["message"]
    assert chat.json()["object"] == "chat.completion" and message["role"] == "assistant"
    chat_stream = _sse(client.post("/v1/chat/completions", json={
        "model": "tiny-lm", "messages": [{"role": "user", "content": "the king"}], "max_tokens": 5, "stream": True,
        "temperature": 0, "stream_options": {"include_usage": True}}))
    assert chat_stream[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chat_stream[-1]["usage"]["completion_tokens"] <= 5 and chat_stream[-1]["choices"] == []
    assert {c["object"] for c in chat_stream} == {"chat.completion.chunk"}

    # Bad requests: 4xx with a JSON body that says what was wrong; never a 500.
    bad = [
        ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "unknown model"),
        ("/v1/completions", {"model": "tiny-lm", "prompt": "x", "max_tokens": 100_000}, 422, "at most"),
        ("/v1/completions", {"model": "tiny-lm", "prompt": "the cat " * 200}, 413, "context"),
        ("/v1/completions", {"model": "tiny-lm", "prompt": "x" * 3000}, 413, "characters"),
        ("/v1/completions", {"model": "tiny-lm", "prompt": "the cat " * 200, "stream": True}, 413, "context"),
        ("/v1/completions", {"model": "tiny-lm", "prompt": "x", "logprobs": 2}, 422, "logprobs"),
        ("/v1/chat/completions", {"model": "tiny-lm", "messages": [{"role": "user", "content": "x"}],
                                  "presence_penalty": 0.5}, 422, "presence_penalty: not supported by this server; send 0"),
        ("/v1/completions", {"model": "tiny-lm"}, 422, "prompt"),
        ("/v1/chat/completions", {"model": "tiny-lm", "messages": [{"role": "robot", "content": "x"}]}, 422, "role"),
        ("/v1/chat/completions", {"model": "tiny-lm", "messages": []}, 422, "messages"),
        ("/v1/models/tiny-lm/predict", {"inputs": "x", "parameters": {"temperature": -1}}, 422, "temperature"),
        ("/v1/models/tiny-lm/predict", {"inputs": "x", "parameters": {"max_new_tokens": 5000}}, 422, "at most"),
    ]
    for path, payload, status, words in bad:
        response = client.post(path, json=payload)
        assert response.status_code == status, (path, payload, response.text)
        assert words in response.json()["error"], response.json()
    malformed = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert malformed.status_code == 400
