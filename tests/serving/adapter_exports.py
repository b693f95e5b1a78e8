"""Adapter exports over one tiny base, built directly with PEFT (and tunefleet's bottleneck module).

Each adapter's weights are drawn from its own seed, so two adapters over the same base answer
differently; `reference_logits` computes what an adapter alone (no multiplexing) answers.
"""

from __future__ import annotations

from pathlib import Path

LABELS = ["negative", "positive"]


def build_lora_export(base_dir: Path, export_dir: Path, name: str, seed: int, r: int = 4) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from training.layout import ExportInfo, write_export_info

    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=len(LABELS))
    model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=r, lora_alpha=2 * r,
                                            modules_to_save=["classifier"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_" in parameter_name or "modules_to_save" in parameter_name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(export_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(export_dir)
    write_export_info(export_dir, ExportInfo(name=name, task="text-classification", labels=LABELS,
                                             base_model=str(base_dir), method="lora", adapter=True, max_length=64))
    return export_dir


def build_bottleneck_export(base_dir: Path, export_dir: Path, name: str, seed: int) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from training import bottleneck
    from training.layout import ExportInfo, write_export_info

    model = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=len(LABELS))
    config = {"placement": "pfeiffer", "reduction_factor": 4, "activation": "relu", "targets": []}
    config["targets"] = bottleneck.attach(model, config)
    generator = torch.Generator().manual_seed(seed)
    for parameter_name, parameter in model.named_parameters():
        trained = ".down." in parameter_name or ".up." in parameter_name or parameter_name.startswith("classifier")
        parameter.requires_grad_(trained)
        if trained:
            with torch.no_grad():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    export_dir.mkdir(parents=True, exist_ok=True)
    bottleneck.save_bottleneck(model, {**config, "base_model_name_or_path": str(base_dir)}, export_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(export_dir)
    write_export_info(export_dir, ExportInfo(name=name, task="text-classification", labels=LABELS,
                                             base_model=str(base_dir), method="adapter", adapter=True, max_length=64))
    return export_dir


def reference_probs(base_dir: Path, export_dir: Path, texts: list[str]) -> list[list[float]]:
    """Softmax over the labels, loading the adapter alone the way a user would (no tunefleet serving code)."""
    import json

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=len(LABELS))
    if json.loads((export_dir / "adapter_config.json").read_text()).get("peft_type") == "TUNEFLEET_BOTTLENECK":
        from training import bottleneck

        model = bottleneck.load_bottleneck_export(export_dir, base)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(export_dir))
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    with torch.no_grad():
        logits = model.eval()(**tokenizer(texts, padding=True, truncation=True, max_length=64,
                                          return_tensors="pt")).logits
    return logits.softmax(-1).tolist()
