"""Images end to end: ImageFolder → Ray Train → export → plain torchvision / HF pipeline → HTTP
(base64 JSON, multipart and raw uploads) → non-image bytes get 415, bad base64 422.

Two small models learn red vs blue squares: torchvision's resnet18 at 32 px (its weights read
from a .pth file, as a user's pretrained file would be) and a 2-layer, hidden-32 ViT from a config.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from testdata import colour_images

pytestmark = pytest.mark.integration


def _start_training(tmp_path: Path, name: str, model: dict, train: Path, val: Path, **data) -> subprocess.Popen:
    job = {
        "name": name, "task": "image-classification", "model": model,
        "data": {"train": str(train), "validation": str(val), **data},
        "train": {"max_steps": 24, "eval_every_steps": 12, "batch_size": 8, "learning_rate": 2.0e-3,
                  "warmup_ratio": 0.0, "log_every_steps": 4, "seed": 5},
        "scale": {"workers": 1, "cpus_per_worker": 1},
        "output": {"storage": str(tmp_path / "runs")},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    env = {**os.environ, "TUNEFLEET_NO_PROGRESS": "1"}
    with (tmp_path / f"{name}.log").open("w") as log:  # a file, not a pipe: neither job waits on the other's reader
        return subprocess.Popen([sys.executable, "-m", "cluster.cli", "train", str(path), "--run-id", "r1"],
                                stdout=log, stderr=subprocess.STDOUT, text=True, env=env)


def _finished_export(tmp_path: Path, name: str, process: subprocess.Popen) -> Path:
    process.wait(timeout=400)
    output = (tmp_path / f"{name}.log").read_text()
    assert process.returncode == 0, output[-6000:]
    assert '"skipped_images": 1' in output, output[-2000:]  # broken.jpg: skipped, counted
    run_dir = tmp_path / "runs" / name / "r1"
    evals = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["event"] == "eval"]
    assert evals[-1]["accuracy"] >= 0.9, evals
    return run_dir / "export"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_train_export_load_serve(tmp_path, tiny_vit):
    import torch
    import torchvision

    train, val = colour_images(tmp_path / "train", 20, seed=1), colour_images(tmp_path / "val", 8, seed=2)
    (train / "red" / "broken.jpg").write_bytes(b"not an image at all")
    weights = tmp_path / "resnet18-random.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), weights)

    # Both jobs at once (each its own local Ray): their start-up costs overlap.
    jobs = {"squares-cnn": _start_training(tmp_path, "squares-cnn", {"path": "torchvision://resnet18", "weights": str(weights)},
                                           train, val, image_size=32),  # 32-px crops (resize 37), not ImageNet's 224
            "squares-vit": _start_training(tmp_path, "squares-vit", {"path": str(tiny_vit)}, train, val)}
    try:
        cnn, vit = (_finished_export(tmp_path, name, process) for name, process in jobs.items())
    finally:
        for process in jobs.values():
            if process.poll() is None:
                process.kill()

    # The torchvision export loads with torchvision and safetensors alone (the README's recipe).
    from PIL import Image
    from safetensors.torch import load_file
    from torchvision import transforms as T

    config = json.loads((cnn / "torchvision.json").read_text())
    model = torchvision.models.get_model(config["architecture"], num_classes=config["num_classes"])
    model.load_state_dict(load_file(cnn / "model.safetensors"))
    model.eval()
    pre = config["preprocessing"]
    transform = T.Compose([T.Resize(pre["resize_size"]), T.CenterCrop(pre["crop_size"]), T.ToTensor(),
                           T.Normalize(pre["mean"], pre["std"])])
    files = sorted(val.rglob("*.png"))
    with torch.no_grad():
        logits = model(torch.stack([transform(Image.open(f).convert("RGB")) for f in files]))
    predicted = [config["labels"][i] for i in logits.argmax(-1).tolist()]
    assert sum(p == f.parent.name for p, f in zip(predicted, files)) >= 0.9 * len(files)

    # The Hugging Face export loads in the standard pipeline.
    from transformers import pipeline

    classify = pipeline("image-classification", model=str(vit))
    assert classify(str(val / "red" / "000.png"))[0]["label"] == "red"
    assert classify(str(val / "blue" / "000.png"))[0]["label"] == "blue"

    from cluster.runtime import ray_session
    from serving import ServeSpec, start_server

    settings = ServeSpec(min_replicas=1, max_replicas=1, max_batch_size=8, max_image_bytes=200_000)
    red, blue = val / "red" / "001.png", val / "blue" / "001.png"
    with ray_session(num_cpus=2):
        server = start_server([cnn, vit], port=_free_port(), settings=settings)
        try:
            with httpx.Client(base_url=server.url, timeout=60) as client:
                for name in ("squares-cnn", "squares-vit"):
                    url = f"/v1/models/{name}/predict"
                    answer = client.post(url, json={"inputs": [_b64(red), "data:image/png;base64," + _b64(blue)],
                                                    "parameters": {"top_k": 2}})
                    assert answer.status_code == 200, answer.text
                    ranked = answer.json()["predictions"]
                    assert [r[0]["label"] for r in ranked] == ["red", "blue"] and len(ranked[0]) == 2

                    upload = client.post(url + "/upload", data={"top_k": "1"},
                                         files=[("file", ("b.png", blue.read_bytes(), "image/png")),
                                                ("file", ("r.png", red.read_bytes(), "image/png"))])
                    assert upload.status_code == 200, upload.text
                    assert [r[0]["label"] for r in upload.json()["predictions"]] == ["blue", "red"]

                raw = client.post("/v1/models/squares-cnn/predict/upload", content=red.read_bytes(),
                                  headers={"content-type": "image/png"})
                assert raw.status_code == 200 and raw.json()["predictions"][0][0]["label"] == "red", raw.text
                query = client.post("/v1/models/squares-cnn/predict/upload?top_k=2",  # a form's parameters in the query
                                    files={"file": ("r.png", red.read_bytes(), "image/png")})
                assert query.status_code == 200 and len(query.json()["predictions"][0]) == 2, query.text

                url = "/v1/models/squares-cnn/predict"
                not_image = client.post(url, json={"inputs": base64.b64encode(b"%PDF-1.4 not an image").decode()})
                assert not_image.status_code == 415 and "not an image" in not_image.json()["error"]
                not_base64 = client.post(url, json={"inputs": "this is not base64 !"})
                assert not_base64.status_code == 422 and "base64" in not_base64.json()["error"]
                text_file = client.post(url + "/upload", files={"file": ("notes.txt", b"hello", "text/plain")})
                assert text_file.status_code == 415 and "inputs[0] is not an image" in text_file.json()["error"]
                too_big = client.post(url + "/upload", files={"file": ("big.png", b"\x89PNG" + b"0" * 300_000)})
                assert too_big.status_code == 413 and "at most 200000" in too_big.json()["error"]
                empty = client.post(url + "/upload", data={"top_k": "1"})
                assert empty.status_code in (415, 422), empty.text
        finally:
            server.shutdown()
