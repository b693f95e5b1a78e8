"""NER end to end: CoNLL file → 2 Ray Train workers → entity F1 → export → HF pipeline → HTTP entities with offsets."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = pytest.mark.integration

FIRST = ["Peter", "Anna", "Boris", "Clara", "Ximena", "Thorvald", "Marisol", "Dmitri"]
LAST = ["Blackburn", "Quenwick", "Okafor", "Kowalczyk", "Oyelaran", "Lindqvist", "Moreau", "Tanaka"]
PLACES = ["Valdoria", "Brussels", "Strasbourg", "Lisbon", "Zermatt", "Odessa"]
FILLER = ["the", "council", "said", "on", "Tuesday", "that", "talks", "will", "resume", "soon", "yesterday", "a",
          "report", "was", "published", "and", "officials", "met"]


def ner_sentences(n: int, seed: int) -> list[list[tuple[str, str]]]:
    """"Mr <first> <last>" is a person, "in <place>" a location; a tiny model learns both in ~150 steps."""
    rng = random.Random(seed)
    sentences = []
    for _ in range(n):
        words = [(w, "O") for w in rng.sample(FILLER, rng.randint(1, 4))]
        person = [("Mr", "O"), (rng.choice(FIRST), "B-PER"), (rng.choice(LAST), "I-PER")]
        place = [("in", "O"), (rng.choice(PLACES), "B-LOC")]
        parts = [person, place] if rng.random() < 0.5 else [place, person]
        for part in parts[: rng.randint(1, 2)]:
            words[rng.randint(0, len(words)):0] = part
        sentences.append(words + [(".", "O")])
    return sentences


def write_conll(path: Path, sentences: list[list[tuple[str, str]]]) -> Path:
    """Tab-separated with a POS-like middle column and a -DOCSTART- line, as real files come."""
    lines = ["-DOCSTART-\t-X-\tO", ""]
    for words in sentences:
        lines += [f"{w}\tX\t{t}" for w, t in words] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


def _job(tmp_path: Path, model: Path) -> Path:
    job = {
        "name": "tiny-ner",
        "task": "token-classification",
        "model": str(model),
        "data": {"train": str(write_conll(tmp_path / "train.conll", ner_sentences(400, 1))),
                 "validation": str(write_conll(tmp_path / "dev.conll", ner_sentences(80, 2))), "max_length": 32},
        "train": {"max_steps": 80, "batch_size": 8, "learning_rate": 5.0e-3, "warmup_ratio": 0.0,
                  "eval_every_steps": 40, "log_every_steps": 20, "seed": 3},
        "scale": {"workers": 2, "cpus_per_worker": 1},
        "output": {"storage": str(tmp_path / "runs"), "keep_checkpoints": 1},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_train_export_pipeline_serve(tmp_path, tiny_text_model, monkeypatch):
    job = _job(tmp_path, tiny_text_model)
    env = {**os.environ, "TUNEFLEET_NO_PROGRESS": "1"}
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "train", str(job), "--run-id", "r1"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    run_dir = tmp_path / "runs" / "tiny-ner" / "r1"
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["event"] == "eval"]
    assert evals[-1]["f1"] >= 0.9, evals

    # Report: per-type scores in metrics.json and as a table.
    report = json.loads((run_dir / "report" / "metrics.json").read_text())
    assert set(report["per_type"]) == {"PER", "LOC"} and report["per_type"]["PER"]["support"] > 0
    table = (run_dir / "report" / "entities.md").read_text()
    assert "| PER |" in table and "| LOC |" in table and "**overall**" in table

    # The export is a plain Hugging Face token classifier.
    export = run_dir / "export"
    info = json.loads((export / "tunefleet.json").read_text())
    assert info["task"] == "token-classification" and info["labels"] == ["O", "B-LOC", "B-PER", "I-PER"]
    from transformers import pipeline

    ner = pipeline("token-classification", model=str(export), aggregation_strategy="simple")
    text = "Yesterday Mr Peter Blackburn met officials in Brussels ."
    found = {(e["entity_group"], text[e["start"]:e["end"]]) for e in ner(text)}
    assert ("PER", "Peter Blackburn") in found and ("LOC", "Brussels") in found, found

    # Served over HTTP: entities with character offsets into the input; bad input → 4xx JSON.
    from cluster.runtime import ray_session
    from serving import ServeSpec, start_server

    settings = ServeSpec(min_replicas=1, max_replicas=1, max_inputs_per_request=4, max_input_chars=500)
    with ray_session(num_cpus=2):
        server = start_server([export], port=_free_port(), settings=settings)
        try:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                url = "/v1/models/tiny-ner/predict"
                answer = client.post(url, json={"inputs": [text, "the report was published ."]})
                assert answer.status_code == 200, answer.text
                entities, none = answer.json()["predictions"]
                assert none == []
                person = next(e for e in entities if e["entity"] == "PER")
                assert (person["word"], person["start"], person["end"]) == ("Peter Blackburn", 13, 28)
                assert 0.5 < person["score"] <= 1.0
                assert any(e == {**e, "entity": "LOC", "word": "Brussels", "start": 46, "end": 54} for e in entities)

                # What Hugging Face clients send: the pipeline's parameter names.
                hf = client.post(url, json={"inputs": text, "parameters": {"aggregation_strategy": "first",
                                                                           "ignore_labels": ["O", "LOC"]}})
                assert hf.status_code == 200, hf.text
                assert {(e["entity"], e["word"]) for e in hf.json()["predictions"][0]} == {("PER", "Peter Blackburn")}
                from testdata import inference_client  # and huggingface_hub's client, at the model's URL

                found = inference_client(server.url + "/v1/models/tiny-ner", monkeypatch).token_classification(
                    text, aggregation_strategy="simple")
                assert {(e.entity_group, e.word, e.start, e.end) for e in found} == {
                    (e["entity"], e["word"], e["start"], e["end"]) for e in entities}

                words = client.post(url, json={"inputs": {"tokens": ["Mr", "Anna", "Okafor", "said", "."]}})
                assert words.status_code == 200, words.text
                [[entity]] = words.json()["predictions"]
                assert entity == {**entity, "entity": "PER", "word": "Anna Okafor", "start": 3, "end": 14,
                                  "token_start": 1, "token_end": 3}

                for body, status in (({"inputs": ""}, 422), ({"inputs": 5}, 422), ({"text": "x"}, 422),
                                     ({"inputs": [["Mr", "X"]]}, 422), ({"inputs": ["a"] * 5}, 413),
                                     ({"inputs": "word " * 200}, 413),
                                     ({"inputs": "x", "parameters": {"aggregation": "longest"}}, 422)):
                    bad = client.post(url, json=body)
                    assert bad.status_code == status, (body, bad.status_code, bad.text)
                    assert bad.json()["error"]
                malformed = client.post(url, content=b"{not json", headers={"content-type": "application/json"})
                assert malformed.status_code == 400 and malformed.json()["error"]
        finally:
            server.shutdown()
