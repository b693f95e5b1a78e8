"""GGUF checkpoints (llama.cpp's format) as ordinary float Hugging Face models.

transformers dequantises a GGUF file to float tensors when it loads one
(`from_pretrained(folder, gguf_file=name)`), but still marks the model as
quantised, and `save_pretrained` then refuses it. The weights are plain float
tensors at that point, so dropping the mark gives a model that trains, saves as
safetensors and reloads without the GGUF file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def as_plain_model(model: Any) -> Any:
    """The same model without the GGUF quantisation mark (its weights are already float)."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        delattr(config, "quantization_config")
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    return model


def load_gguf_causal_lm(folder: str | Path, gguf_file: str, revision: str | None = None, **kwargs: Any) -> Any:
    """AutoModelForCausalLM from a GGUF file, dequantised to float32 (~50 s for 135M parameters on 2 cores)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, revision=revision,
                                                 dtype=torch.float32, **kwargs)
    return as_plain_model(model)


def convert_gguf(folder: str | Path, gguf_file: str, out: str | Path) -> Path:
    """Write a safetensors Hugging Face directory (model + tokenizer) from a GGUF file; reloads in seconds."""
    from transformers import AutoTokenizer

    out = Path(out).expanduser()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
    model = load_gguf_causal_lm(folder, gguf_file)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
