"""An adapter export loaded on its own (`tunefleet predict`, a model application): its base is built with the
export's labels, the adapter goes over it, and it answers what the adapter answers under PEFT."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving import ServeSpec, predict_local
from serving.handlers import load_handler
from training.layout import ExportInfo, write_export_info

EXACT = ServeSpec(dtype="float32")  # auto may pick bfloat16 on a CPU that has it
LABELS = ["O", "B-PER", "I-PER"]


def _peft_export(base_dir: Path, export_dir: Path, auto_class, task: str, labels: list[str], config, processor):
    """A PEFT adapter over the base, with random trained weights: the in-memory model is the reference."""
    from peft import get_peft_model

    base = auto_class.from_pretrained(base_dir, num_labels=len(labels), ignore_mismatched_sizes=True)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(export_dir)
    processor.save_pretrained(export_dir)
    method = str(config.peft_type.value).lower().replace("_", "-")
    write_export_info(export_dir, ExportInfo(name="a", task=task, labels=labels, base_model=str(base_dir),
                                             method=method, adapter=True, max_length=64))
    return model.eval()


@pytest.mark.parametrize("method", ["lora", "prompt-tuning"])
def test_text_adapter_with_three_labels_predicts_as_under_peft(tiny_text_model, tmp_path, method):
    # Before: the base came up with transformers' default two labels, and the 3-label head did not load.
    from peft import LoraConfig, PromptTuningConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_text_model)
    config = (LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8) if method == "lora"
              else PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4))
    labels = ["sports", "world", "business"]
    reference = _peft_export(tiny_text_model, tmp_path, AutoModelForSequenceClassification, "text-classification",
                             labels, config, tokenizer)
    texts = ["a close match in the final", "markets fell"]
    with torch.no_grad():
        expected = reference(**tokenizer(texts, padding=True, return_tensors="pt")).logits.softmax(-1)
    got = predict_local(tmp_path, texts, top_k=None, spec=EXACT)
    for scores, row in zip(got, expected):
        assert {p["label"]: p["score"] for p in scores} == pytest.approx(dict(zip(labels, row.tolist())), abs=1e-5)


def test_token_adapter_loads_with_its_tag_set(tiny_text_model, tmp_path):
    # The WNUT17 LoRA export (13 tags) failed `tunefleet predict` with a size mismatch.
    from peft import LoraConfig
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_text_model)
    reference = _peft_export(tiny_text_model, tmp_path, AutoModelForTokenClassification, "token-classification",
                             LABELS, LoraConfig(task_type="TOKEN_CLS", r=4, lora_alpha=8), tokenizer)
    handler = load_handler(tmp_path, EXACT)
    assert handler.labels == LABELS
    inputs = tokenizer(["Ada Lovelace wrote it"], return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(handler.model(**inputs).logits, reference(**inputs).logits, atol=1e-5)
    entities = predict_local(tmp_path, ["Ada Lovelace wrote it"], spec=EXACT)[0]
    assert all(e["entity"] == "PER" for e in entities)  # whole entities: B-/I- joined


def test_bottleneck_adapter_predicts_as_its_reference(tiny_export, tmp_path):
    # Before: KeyError 'TUNEFLEET_BOTTLENECK' (transformers handed the folder to PEFT).
    from tests.serving.adapter_exports import build_bottleneck_export, reference_probs

    export = build_bottleneck_export(tiny_export, tmp_path / "bn", "bn", seed=5)
    texts = ["good film", "dull"]
    got = predict_local(export, texts, top_k=None, spec=EXACT)
    for scores, row in zip(got, reference_probs(tiny_export, export, texts)):
        assert [s["score"] for s in sorted(scores, key=lambda s: s["label"])] == pytest.approx(row, abs=1e-5)


def test_image_adapter_is_served_as_a_model_of_its_own(tiny_vit, tmp_path):
    """No adapter pool serves image classification: the export gets its own application, merged at load."""
    from peft import LoraConfig
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from serving.server import plan_exports

    labels = ["red", "green"]
    reference = _peft_export(tiny_vit, tmp_path, AutoModelForImageClassification, "image-classification", labels,
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                        modules_to_save=["classifier"]),
                             AutoImageProcessor.from_pretrained(tiny_vit))
    plan = plan_exports([tmp_path])
    assert [m.name for m in plan.full_models] == ["a"] and not plan.adapters
    handler = load_handler(tmp_path, EXACT)
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(handler.model(pixel_values=pixels).logits, reference(pixel_values=pixels).logits,
                              atol=1e-5)
