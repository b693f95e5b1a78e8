"""serving/packed.py: an encoder that skips padding gives the unchanged model's outputs, for every listed
architecture and attention path, alone and with the first-token last layer; anything it does not pack
runs the encoder's own forward."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

import serving.packed as packed
from serving.packed import skip_padding
from training.unread_positions import ARCHITECTURES, skip_unread_positions

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, num_labels=3)


def tiny(model_type: str, attention: str = "sdpa", head=AutoModelForSequenceClassification):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY, **({"embedding_size": 16} if model_type == "electra" else {}))
    return head.from_config(config, attn_implementation=attention).eval()


def padded_batch(lengths=(11, 7, 2, 4)) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(5, 120, (len(lengths), max(lengths)))
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


@pytest.fixture
def packed_layers(monkeypatch) -> list[bool]:
    """One entry per layer the packed path ran (True: that layer computed the first positions only)."""
    calls: list[bool] = []
    layer = packed._layer

    def counted(*args, first_only):
        calls.append(first_only)
        return layer(*args, first_only=first_only)

    monkeypatch.setattr(packed, "_layer", counted)
    return calls


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("first_token", [False, True], ids=["every-position", "first-token-last-layer"])
def test_sequence_classifier_scores_unchanged(model_type, attention, first_token, packed_layers):
    whole = tiny(model_type, attention)
    fast = copy.deepcopy(whole)
    if first_token:
        skip_unread_positions(fast)
    assert skip_padding(fast) == {"model_type": model_type, "layers": 3}
    with torch.inference_mode():
        expected, got = whole(**padded_batch()).logits, fast(**padded_batch()).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert packed_layers == [False, False, first_token]  # every layer ran packed
    assert fast.state_dict().keys() == whole.state_dict().keys()


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_token_classifier_scores_unchanged_at_real_tokens(model_type, packed_layers):
    whole = tiny(model_type, head=AutoModelForTokenClassification)
    fast = copy.deepcopy(whole)
    skip_padding(fast)
    batch = padded_batch()
    with torch.inference_mode():
        expected, got = whole(**batch).logits, fast(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert got.shape == expected.shape and len(packed_layers) == 3


@pytest.mark.parametrize("case", ["no-padding", "training", "left-padding", "output_hidden_states"])
def test_what_it_does_not_pack_runs_the_encoders_own_forward(case, packed_layers):
    whole = tiny("bert")
    fast = copy.deepcopy(whole)
    skip_padding(fast)
    batch = padded_batch((6, 6, 6) if case == "no-padding" else (11, 7, 2, 4))
    if case == "left-padding":  # the head reads position 0, padding there: nothing packs to give it
        batch = {k: v.flip(-1) for k, v in batch.items()}
    kwargs = {"output_hidden_states": True} if case == "output_hidden_states" else {}
    for model in (whole, fast):
        model.train(case == "training")
    torch.manual_seed(2)
    expected = whole(**batch, **kwargs)
    torch.manual_seed(2)
    got = fast(**batch, **kwargs)
    torch.testing.assert_close(got.logits, expected.logits)
    if kwargs:
        assert len(got.hidden_states) == len(expected.hidden_states) == 4
    assert packed_layers == []


def test_models_it_does_not_know_are_left_alone():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    before = type(model.transformer)
    assert skip_padding(model) is None
    assert type(model.transformer) is before
