"""`head` with `cache_features` through the real loop (2 Ray Train workers, DDP): the same loss curve, evaluation
and export as the uncached run with the backbone in eval mode; the export is the full model with its trained head."""

from __future__ import annotations

import pytest
import torch

from tests.integration.scale_jobs import final_eval, fit, job_data, losses, records

pytestmark = pytest.mark.integration


def test_cached_head_trains_and_exports_as_uncached(local_ray, tiny_text_model, sentiment_tsv, tmp_path):
    runs = {}
    for name, method in (("uncached", {"name": "head", "backbone_dropout": False}),
                         ("cached", {"name": "head", "cache_features": True})):
        data = job_data(tiny_text_model, *sentiment_tsv, tmp_path / name, **{
            "method": method, "train.max_steps": None, "train.epochs": 3, "train.eval_every_steps": None,
            "train.log_every_steps": 1, "train.learning_rate": 1e-2, "data.limit": {"train": 96}})
        result = fit(data, "r1")
        runs[name] = (records(tmp_path / name / "scale" / "r1" / "metrics.jsonl"), result.export_dir)

    uncached, cached = losses(runs["uncached"][0]), losses(runs["cached"][0])
    assert sorted(cached) == list(range(1, 3 * 96 // 16 + 1))  # 2 ranks x batch 8: 6 steps an epoch
    torch.testing.assert_close(torch.tensor(list(cached.values())), torch.tensor(list(uncached.values())),
                               rtol=1e-4, atol=1e-5)
    assert final_eval(runs["cached"][0])["accuracy"] == final_eval(runs["uncached"][0])["accuracy"]
    assert len([r for r in runs["cached"][0] if r["event"] == "eval"]) == 3  # one evaluation an epoch

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_text_model)
    batch = tokenizer(["a wonderful film", "an awful plot"], return_tensors="pt", padding=True)
    outputs = {}
    for name, (_, export) in runs.items():
        model = AutoModelForSequenceClassification.from_pretrained(export).eval()  # the full model, not a head alone
        with torch.no_grad():
            outputs[name] = model(**batch).logits
    torch.testing.assert_close(outputs["cached"], outputs["uncached"], rtol=1e-4, atol=1e-5)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_text_model)
    exported = AutoModelForSequenceClassification.from_pretrained(runs["cached"][1])
    assert torch.equal(exported.bert.encoder.layer[0].output.dense.weight, base.bert.encoder.layer[0].output.dense.weight)
    assert not torch.equal(exported.classifier.weight, base.classifier.weight)
