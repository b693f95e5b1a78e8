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

from testdata import (  # noqa: F401  (re-exported for fixtures below)
    REPO,
    SHARED,
    SHARED_DATASETS,
    minilm_path,
    shared_file,
    POSITIVE,
    NEGATIVE,
    FILLER,
    sentiment_rows,
    LM_SUBJECTS,
    LM_VERBS,
    LM_OBJECTS,
    lm_sentences,
    build_tiny_lm_tokenizer,
    COLOURS,
    colour_images,
)


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


@pytest.fixture(scope="session")
def sentiment_tsv(tmp_path_factory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("sentiment")
    paths = []
    for name, n, seed in (("train.tsv", 480, 1), ("dev.tsv", 96, 2)):
        path = directory / name
        path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in sentiment_rows(n, seed)))
        paths.append(path)
    return paths[0], paths[1]


# ---- causal LM: a tiny Llama with a small byte-level BPE tokenizer -----------------------------
# The tokenizer is trained here, in well under a second, on the same generated sentences the tests
# train on: no package or download needed, GPT-2's tokenizer type (byte-level BPE, an
# <|endoftext|> EOS and no chat template of its own), and a small vocabulary keeps the model tiny.

@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 Llama (128 positions) and its small BPE tokenizer, as a Hugging Face directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_lm_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ---- image classification: coloured squares a tiny model tells apart, and a tiny ViT ------------

@pytest.fixture(scope="session")
def tiny_vit(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 ViT for 32-px images and its image processor, as a Hugging Face directory."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    directory = tmp_path_factory.mktemp("tiny-vit")
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=37, num_labels=3)
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def local_ray():
    """One private Ray in this process for every test that needs one (its own temp dir; stops with the
    session). Ray allows one `ray.init` per process, so tests share this rather than start their own."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # inherited by the Ray workers started below
    from cluster.runtime import ray_session

    with ray_session(num_cpus=2):
        yield


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where CUDA is (they are the paths CI, CPU-only, cannot take)."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (pytest -m gpu on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
