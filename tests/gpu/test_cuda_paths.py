"""The CUDA paths CI cannot take: bf16 autocast, NCCL under DeepSpeed ZeRO, bitsandbytes 4-bit on the GPU.

Run on a GPU machine with `pytest -m gpu tests/gpu`; skipped without CUDA (tests/conftest.py).
Same tiny models and data as the CPU tests; what they assert is what a user sees: the run used the
GPU, the loss fell, the export loads and answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.scale_jobs import fit, job_data, records
from testdata import lm_sentences

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


def _train_losses(metrics_file: Path) -> list[float]:
    return [r["loss"] for r in records(metrics_file) if r["event"] == "train"]


def _fell(losses: list[float]) -> bool:
    head, tail = losses[: max(1, len(losses) // 4)], losses[-max(1, len(losses) // 4):]
    return sum(tail) / len(tail) < 0.8 * sum(head) / len(head)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_text_classification_trains_on_cuda_with_autocast(local_ray, tiny_text_model, sentiment_tsv, tmp_path, precision):
    import torch
    from transformers import pipeline

    data = job_data(tiny_text_model, *sentiment_tsv, tmp_path)
    data["scale"] = {"workers": 1, "use_gpu": True}
    data["train"]["precision"] = precision
    result = fit(data, f"cuda-{precision}")
    assert _fell(_train_losses(Path(result.run_dir) / "metrics.jsonl"))
    assert result.metrics["accuracy"] > 0.8
    classify = pipeline("text-classification", model=result.export_dir, device=0)
    assert classify("a wonderful, moving film")[0]["label"] in {"negative", "positive"}
    assert torch.cuda.is_available()


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_on_nccl(local_ray, tiny_text_model, sentiment_tsv, tmp_path, stage):
    """ZeRO over NCCL with as many GPU workers as the machine has (up to 2); bf16; export consolidates."""
    import torch
    from transformers import AutoModelForSequenceClassification

    workers = min(2, torch.cuda.device_count())
    data = job_data(tiny_text_model, *sentiment_tsv, tmp_path, **{"scale.deepspeed": {"stage": stage}})
    data["scale"].update({"workers": workers, "use_gpu": True})
    data["scale"].pop("cpus_per_worker", None)
    data["train"]["precision"] = "bf16"
    result = fit(data, f"zero{stage}")
    assert _fell(_train_losses(Path(result.run_dir) / "metrics.jsonl"))
    manifest = json.loads(next(Path(result.run_dir, "checkpoints").glob("checkpoint_*/manifest.json")).read_text())
    assert len(manifest["shards"]) == workers
    model = AutoModelForSequenceClassification.from_pretrained(result.export_dir)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_qlora_4bit_on_cuda_trains_a_nonempty_adapter(local_ray, tiny_causal_lm, tmp_path):
    import yaml  # noqa: F401  (the job is data; fit validates it as a file would be)
    from safetensors.torch import load_file

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(lm_sentences(4, seed=i)) for i in range(200)))
    data = {
        "name": "qlora-cuda", "task": "causal-lm", "model": str(tiny_causal_lm),
        "data": {"train": str(corpus), "max_length": 32, "validation_fraction": 0.1},
        "method": {"name": "qlora", "r": 8, "alpha": 16, "compute_dtype": "bf16"},
        "train": {"max_steps": 40, "batch_size": 16, "learning_rate": 5.0e-3, "warmup_ratio": 0.0,
                  "eval_every_steps": 20, "log_every_steps": 5, "seed": 5, "precision": "bf16"},
        "scale": {"workers": 1, "use_gpu": True},
        "output": {"storage": str(tmp_path / "runs")},
    }
    result = fit(data, "qlora")
    assert _fell(_train_losses(Path(result.run_dir) / "metrics.jsonl"))
    adapter = load_file(str(Path(result.export_dir) / "adapter_model.safetensors"))
    assert adapter and any(t.abs().sum() > 0 for name, t in adapter.items() if "lora_B" in name)
