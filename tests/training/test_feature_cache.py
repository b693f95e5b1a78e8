"""`head` with `cache_features`: the same training as without the cache, the backbone runs once per example,
only what each architecture's head reads is stored, and the combinations that cannot be cached are refused."""

from __future__ import annotations

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification,
                          RobertaConfig, RobertaForSequenceClassification, ViTConfig, ViTForImageClassification)

from cluster.spec import JobSpecError, validate_job
from training.batching import epoch_batches
from training.feature_cache import FeatureCache, cached_features
from training.loop import _rows
from training.model_builder import build_training_model
from training.optim import parameter_groups
from training.tasks import TASKS
from training.tasks.torchvision_models import TorchvisionClassifier

EPOCHS, BATCH = 3, 16


def _spec(model, train, dev, tmp_path, method: dict, **extra):
    return validate_job({
        "name": "cache", "task": "text-classification", "model": str(model),
        "data": {"train": str(train), "validation": str(dev), "columns": {"text": "sentence"}, "limit": {"train": 96},
                 "max_length": 32},
        "method": method, "train": {"learning_rate": 1e-2, "seed": 3}, "output": {"storage": str(tmp_path)}, **extra,
    })


def _train(spec, calls: list[int]) -> list[float]:
    """The training loop's steps (training/loop.py) over EPOCHS epochs; per-step losses. `calls` gets the
    number of backbone forwards of each epoch."""
    task = TASKS.get(spec.task)
    prepared = task.prepare(spec)
    torch.manual_seed(spec.train.seed)
    model = build_training_model(spec, prepared.labels)
    cache = cached_features(spec, model)
    counter = [0]
    model.bert.embeddings.register_forward_hook(lambda *args: counter.__setitem__(0, counter[0] + 1))
    collate = task.build_collator(task.build_processor(spec), True)
    rows, lengths = _rows(prepared.train), prepared.train.column("length").to_pylist()
    optimizer = torch.optim.AdamW(parameter_groups(model, spec.train.learning_rate, 0.01), lr=spec.train.learning_rate)
    losses = []
    model.train()
    for epoch in range(EPOCHS):
        counter[0] = 0
        for indices in epoch_batches(lengths, BATCH, 1, 0, spec.train.seed, epoch):
            batch = collate([rows[i] for i in indices])
            labels = batch.pop("labels")
            with cache.serving(indices, batch) if cache else _nothing():
                logits = model(**batch).logits
            loss = torch.nn.functional.cross_entropy(logits, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        calls.append(counter[0])
    return losses


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_cached_training_follows_the_uncached_loss_curve(tiny_text_model, sentiment_tsv, tmp_path):
    # The head's own dropout (BERT's, outside the backbone) stays on in both runs; the backbone runs in eval mode.
    uncached_calls, cached_calls = [], []
    uncached = _train(_spec(tiny_text_model, *sentiment_tsv, tmp_path, {"name": "head", "backbone_dropout": False}),
                      uncached_calls)
    cached = _train(_spec(tiny_text_model, *sentiment_tsv, tmp_path, {"name": "head", "cache_features": True}),
                    cached_calls)
    assert len(cached) == EPOCHS * 96 // BATCH
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(uncached), rtol=1e-4, atol=1e-5)
    assert cached[-1] < cached[0], "the head should learn"
    batches = 96 // BATCH
    assert uncached_calls == [batches] * EPOCHS
    # The first epoch runs the backbone once per batch (the probe adds one); later epochs never call it.
    assert cached_calls == [batches + 1, 0, 0]


def _bert():
    return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=37, num_labels=3))


def _roberta():
    return RobertaForSequenceClassification(RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=37, num_labels=3,
                                                          pad_token_id=1))


def _llama():
    return LlamaForSequenceClassification(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                                      num_labels=3, pad_token_id=0))


def _vit():
    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                               num_attention_heads=2, intermediate_size=37, num_labels=3))


def _mobilenet():
    return TorchvisionClassifier("mobilenet_v2", ["a", "b", "c"])


def _text_batches(pad_left: bool = False):
    """Padded batches of the same 8 examples grouped two different ways (so padding lengths differ)."""
    generator = torch.Generator().manual_seed(0)
    lengths = [3, 9, 5, 12, 4, 7, 10, 6]
    examples = [torch.randint(2, 100, (n,), generator=generator) for n in lengths]

    def batch(indices):
        longest = max(lengths[i] for i in indices)
        ids = torch.zeros(len(indices), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(indices):
            span = slice(longest - lengths[i], longest) if pad_left else slice(0, lengths[i])
            ids[row, span], mask[row, span] = examples[i], 1
        return {"input_ids": ids, "attention_mask": mask}

    first = [[0, 1, 2, 3], [4, 5, 6, 7]]
    second = [[3, 6], [0, 2, 4], [1, 5, 7]]
    return [(i, batch(i)) for i in first], [(i, batch(i)) for i in second]


def _image_batches(size: int):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(6, 3, size, size, generator=generator)
    first = [[0, 1, 2], [3, 4, 5]]
    second = [[5, 0], [1, 2, 3, 4]]
    return ([(i, {"pixel_values": pixels[i]}) for i in first], [(i, {"pixel_values": pixels[i]}) for i in second])


@pytest.mark.parametrize("build, batches, reads", [
    (_bert, lambda: _text_batches(), {"pooler_output": "whole"}),  # BERT's head: the pooler output alone
    (_roberta, lambda: _text_batches(), {"last_hidden_state": "first"}),  # RoBERTa's: the first token
    (_llama, lambda: _text_batches(pad_left=True), {"last_hidden_state": "whole"}),  # Llama's: the last real token
    (_vit, lambda: _image_batches(16), {"last_hidden_state": "first"}),
    (_mobilenet, lambda: _image_batches(32), {"<tensor>": "whole"}),  # torchvision: the pooled features
], ids=["bert", "roberta", "llama", "vit", "torchvision"])
def test_stored_features_give_the_live_logits(build, batches, reads):
    torch.manual_seed(0)
    model = build().eval()
    for parameter in getattr(model, model.base_model_prefix).parameters():
        parameter.requires_grad_(False)
    cache = FeatureCache(model)
    calls = []
    next(cache.backbone.children()).register_forward_hook(lambda *args: calls.append(1))  # the backbone computing
    first, second = batches()

    def logits(batch):
        out = model(**batch)
        return out.logits if hasattr(out, "logits") else out

    with torch.no_grad():
        for indices, batch in first:  # fills the cache
            with cache.serving(indices, batch):
                logits(batch)
        filled = len(calls)
        for indices, batch in second:  # other groupings, other padding: served from the cache
            with cache.serving(indices, batch):
                cached = logits(batch)
            torch.testing.assert_close(cached, logits(batch), rtol=1e-4, atol=1e-5)
    assert len(calls) - filled == len(second), "the backbone ran for cached examples"
    assert {f.name: f.mode for f in cache.fields if f.mode != "unused"} == reads


def _image_spec(tmp_path, method: dict, data: dict | None = None, **extra):
    from testdata import colour_images

    images = colour_images(tmp_path / "images", per_class=2)
    return validate_job({"name": "img", "task": "image-classification", "model": "torchvision://mobilenet_v2",
                         "data": {"train": str(images), **(data or {})}, "method": method,
                         "output": {"storage": str(tmp_path)}, **extra}, check_data=False)


def test_combinations_that_cannot_be_cached_are_refused(tiny_text_model, sentiment_tsv, tmp_path):
    with pytest.raises(JobSpecError) as err:
        _image_spec(tmp_path, {"name": "head", "cache_features": True})
    assert "data.augment: must be false with method.cache_features" in str(err.value)
    assert _image_spec(tmp_path, {"name": "head", "cache_features": True}, {"augment": False}).data.augment is False

    with pytest.raises(JobSpecError) as err:
        _spec(tiny_text_model, *sentiment_tsv, tmp_path, {"name": "head", "cache_features": True,
                                                          "backbone_dropout": True},
              scale={"deepspeed": {"stage": 1}})
    message = str(err.value)
    assert "method.backbone_dropout: cannot be true with method.cache_features" in message
    assert "method.cache_features: not with scale.deepspeed" in message
