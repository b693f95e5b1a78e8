"""training/cpu_dropout.py: the mask's statistics and gradient, the attention path against SDPA, and a
swapped model that still trains, saves a plain config and keeps its eval outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.cpu_dropout import ATTENTION, CpuDropout, drop, math_attention, use_cpu_dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate_and_expectation_match_torch_dropout(p):
    torch.manual_seed(0)
    x = torch.ones(2_000_000, requires_grad=True)
    y = drop(x, p)
    dropped = (y == 0).double().mean().item()
    assert abs(dropped - p) < 0.002  # ~6 standard deviations
    assert abs(y.double().mean().item() - 1.0) < 0.005  # kept values scaled by the inverse keep rate
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0)  # the gradient passes exactly where the value did
    assert torch.allclose(x.grad[y != 0], y[y != 0])


def test_float32_scales_and_bfloat16_mask_drop_the_same_elements_and_scale_kept_ones_exactly():
    x = torch.randn(6, 7, 33, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x, 0.1)  # float32: a float mask of scales
    torch.manual_seed(3)
    y16 = drop(x.detach().bfloat16(), 0.1)  # other dtypes: a bool mask and native_dropout_backward
    assert y16.dtype == torch.bfloat16 and torch.equal(y == 0, y16 == 0)
    scale = torch.tensor(65536 / (65536 - round(0.1 * 65536)), dtype=torch.float32)
    kept = y != 0
    assert torch.equal(y[kept], x.detach()[kept] * scale)  # one rounding, as torch's dropout
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(grad, torch.where(kept, scale, 0.0))


def test_drop_is_seeded_and_shaped():
    x = torch.randn(3, 5, 7)
    torch.manual_seed(1)
    a = drop(x, 0.3)
    torch.manual_seed(1)
    b = drop(x, 0.3)
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, drop(x, 0.3))  # the generator moves on
    masks = torch.stack([drop(torch.ones(4, 1000), 0.5) != 0 for _ in range(3)])
    assert 0.4 < masks[:, 0].float().mean() < 0.6 and 0.4 < masks[:, 3].float().mean() < 0.6  # every lane random


def test_cpu_dropout_module_is_identity_in_eval_and_a_dropout_for_isinstance():
    module = CpuDropout(0.2)
    assert isinstance(module, nn.Dropout)
    x = torch.randn(10, 10)
    assert torch.equal(module.eval()(x), x)
    assert (module.train()(torch.ones(1000)) == 0).any()


@pytest.mark.parametrize("mask_kind", ["bool", "float", "none", "causal"])
def test_math_attention_matches_sdpa_without_dropout(mask_kind):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8) for _ in range(3))
    causal = mask_kind == "causal"
    mask = None
    if mask_kind in ("bool", "float"):
        keep = torch.ones(2, 1, 6, 6, dtype=torch.bool)
        keep[0, :, :, 4:] = False  # padding in the first sequence
        mask = keep if mask_kind == "bool" else torch.zeros(2, 1, 6, 6).masked_fill(~keep, -1e9)
    ours, _ = math_attention(q, k, v, mask, 0.0, None, causal)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(ours, expected.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_swapped_bert_keeps_eval_outputs_trains_and_saves_a_plain_config(tiny_text_model, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_text_model)
    batch = tokenizer(["a good film", "a dull and long film with a plot"], padding=True, return_tensors="pt")
    reference = AutoModelForSequenceClassification.from_pretrained(tiny_text_model).eval()
    model = AutoModelForSequenceClassification.from_pretrained(tiny_text_model)
    swapped = use_cpu_dropout(model)
    assert swapped == {"dropout_modules": sum(isinstance(m, CpuDropout) for m in model.modules()), "attention": 1}
    assert swapped["dropout_modules"] >= 6 and not any(type(m) is nn.Dropout for m in model.modules())
    assert model.config._attn_implementation == ATTENTION
    with torch.no_grad():  # eval: no dropout, the attention is SDPA's
        torch.testing.assert_close(model.eval()(**batch).logits, reference(**batch).logits)

    model.train()
    torch.manual_seed(0)
    first = model(**batch).logits
    assert not torch.allclose(first, model(**batch).logits)  # dropout is on in training
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    labels = torch.tensor([1, 0])
    losses = []
    for _ in range(30):
        loss = nn.functional.cross_entropy(model(**batch).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5

    model.save_pretrained(tmp_path)
    assert ATTENTION not in (tmp_path / "config.json").read_text()
    assert AutoConfig.from_pretrained(tmp_path)._attn_implementation in (None, "sdpa")


def test_models_without_attention_dropout_or_interface_keep_theirs(tiny_causal_lm):
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(tiny_causal_lm)
    result = use_cpu_dropout(lm)  # Llama: no dropout modules; its attention dropout (0) goes to SDPA anyway
    assert result["dropout_modules"] == 0
    lm.train()
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(lm(input_ids=ids, labels=ids).loss)
    plain = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    assert use_cpu_dropout(plain) == {"dropout_modules": 1, "attention": 0}
