"""training/unread_positions.py: a sequence classifier whose last layer computes the first position only
gives the same logits and the same gradients as the unchanged model, for every listed architecture and
attention path; models it does not know are left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification, BertConfig,
)

from training.cpu_dropout import use_cpu_dropout
from training.unread_positions import ARCHITECTURES, skip_unread_positions

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, num_labels=3)


def tiny(model_type: str, attention: str = "sdpa"):
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **TINY, **({"embedding_size": 16} if model_type == "electra" else {}))
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attention)


def batch():
    torch.manual_seed(1)
    ids = torch.randint(5, 120, (4, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding
    mask[3, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 2])}


def logits_and_grads(model):
    model.zero_grad()
    out = model(**batch())
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_same_logits_and_gradients_as_the_whole_layer(model_type, attention):
    whole = tiny(model_type, attention).eval()  # eval: no dropout, so both compute the same function
    first_only = copy.deepcopy(whole)
    changed = skip_unread_positions(first_only)
    assert changed == {"model_type": model_type, "layer": 1}
    expected_logits, expected_grads = logits_and_grads(whole)
    logits, grads = logits_and_grads(first_only)
    torch.testing.assert_close(logits, expected_logits, atol=1e-6, rtol=1e-5)
    assert grads.keys() == expected_grads.keys()  # every parameter still gets its gradient
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    assert first_only.state_dict().keys() == whole.state_dict().keys()  # checkpoints and export unchanged


def test_trains_with_dropout_and_tunefleet_cpu_dropout():
    model = tiny("bert")
    use_cpu_dropout(model)
    skip_unread_positions(model)
    reference = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(15):
        loss = model(**batch()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 2
    model.eval()
    with torch.no_grad():  # the trained layer's weights load into the unchanged class: the same model
        plain = tiny("bert")
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(model(**batch()).logits, plain.eval()(**batch()).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(reference(**batch()).logits, plain(**batch()).logits)


def test_peft_wrapped_classifier_is_found():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("roberta").eval(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    expected = model(**batch()).logits
    assert skip_unread_positions(model) == {"model_type": "roberta", "layer": 1}
    torch.testing.assert_close(model(**batch()).logits, expected, atol=1e-6, rtol=1e-5)


def test_models_whose_head_reads_every_position_are_left_alone():
    token_classifier = AutoModelForTokenClassification.from_config(BertConfig(**TINY))
    assert skip_unread_positions(token_classifier) is None
    assert type(token_classifier.bert.encoder.layer[-1]).__name__ == "BertLayer"
    distilbert = AutoModelForSequenceClassification.from_config(
        AutoConfig.for_model("distilbert", vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=64))
    assert skip_unread_positions(distilbert) is None


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_prompt_methods_keep_their_logits(kind):
    """Prefix tuning hands every layer virtual keys and values (a cache): the last layer runs its own forward.
    Prompt tuning puts virtual tokens in front: position 0 is still what the head reads."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    config = (PrefixTuningConfig if kind == "prefix" else PromptTuningConfig)(task_type="SEQ_CLS", num_virtual_tokens=3)
    model = get_peft_model(tiny("bert").eval(), config)
    inputs = {k: v for k, v in batch().items() if k != "labels"}
    expected = model(**inputs).logits
    assert skip_unread_positions(model) is not None
    torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-6, rtol=1e-5)
