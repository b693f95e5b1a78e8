"""Where a replica's model runs: its device, its dtype and its torch threads.

`serve.dtype: auto` (the default) serves in bfloat16 wherever the hardware multiplies
bfloat16 natively: CUDA GPUs that support it, and CPUs with AVX512-BF16 or AMX. Measured
on this project's 2-core AMD EPYC (AVX512-BF16): a dense matmul runs at 917 GFLOP/s in
bfloat16 against 206 in float32, and MiniLM classifies 3.2x as many 46-token texts a second
in batches of 16 (benchmarks/serve_text_classification.py reports it beside float32).
Elsewhere float32. A task whose answers bfloat16 changes too often keeps float32 under auto
(its handler's `auto_bfloat16`): measured here, bfloat16 against float32 gave the same label
for 800 of 800 AG News texts (MiniLM classifier), the same tag for 99.9% of 8,291 CoNLL
words (MiniLM NER), the same 32 greedy tokens for 7 of 8 prompts (SmolLM2-135M), but the
same top-1 class for only 95.6% of 160 images (MobileNetV2, ImageNet head): image
classification keeps float32 unless the serve spec asks for bfloat16.

`serve.dtype: int8` (asked for, never picked by auto) runs every nn.Linear with int8 weights:
torch's dynamic quantization (activations quantized per batch, fbgemm's int8 GEMM), CPU only. On a
CPU without native bfloat16 (AVX2, measured on a 2-core AMD EPYC), where bfloat16 runs ~7x slower
than float32, it classifies ~1.4x as many texts a second as float32 (MiniLM, batches of 16). It is
not the default because its answers move: on MiniLM fine-tuned on AG News it gave float32's label
for 98.4% of 800 texts (accuracy -0.12 point), and because an activation's int8 scale is taken over
the whole batch, the same text's label differed between a batch of 16 and alone for 1.5% of texts.

transformers' own `dtype="auto"` only reads the dtype the checkpoint was saved in (exports
are float32), and torch has no public "fastest dtype here" query, hence this module. Weights
are cast once at load; outputs (logits) go back to float32 before softmax, so scores are
float32 numbers computed from a bfloat16 forward pass.
"""

from __future__ import annotations

import warnings

import torch

from serving.config import ServeSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def replica_device(spec: ServeSpec) -> torch.device:
    """The replica's device (its GPU when it reserves one and CUDA is there), with torch's threads set."""
    torch.set_num_threads(spec.torch_threads)
    return torch.device("cuda" if spec.num_gpus > 0 and torch.cuda.is_available() else "cpu")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX on this CPU (torch's own checks; private, so absent means no)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def serving_dtype(spec: ServeSpec, device: torch.device, auto_bfloat16: bool = True) -> torch.dtype:
    """The dtype the model's weights and activations use on this replica (see module doc); int8 keeps
    float32 for everything dynamic quantization leaves alone (embeddings, layer norms, activations)."""
    if spec.dtype == "int8":
        return torch.float32
    if spec.dtype != "auto":
        return DTYPES[spec.dtype]
    if not auto_bfloat16:
        return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else torch.float32


def quantize_linear_layers(model: torch.nn.Module) -> torch.nn.Module:
    """MODEL (on the CPU, in eval mode) with every nn.Linear replaced by torch's dynamically quantized
    int8 Linear, in place.

    torch.ao.quantization.quantize_dynamic is torch's own int8 path for CPU inference. torch marks
    it (and its quantized tensors) deprecated in favour of torchao, which is not part of this stack;
    the pinned torch (2.14.1) still ships and runs it, so its deprecation warnings are silenced here,
    and tests/serving/test_local.py fails if a torch upgrade takes it away.
    """
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"(?s).*deprecated", category=UserWarning)
        return quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)


def place(model: torch.nn.Module, spec: ServeSpec, device: torch.device, auto_bfloat16: bool = True) -> torch.nn.Module:
    """The model on the replica's device, in its serving dtype (int8 Linear layers for dtype int8), in eval mode."""
    model = model.to(device=device, dtype=serving_dtype(spec, device, auto_bfloat16)).eval()
    if spec.dtype == "int8":  # ServeSpec allows it only without GPUs, so the device is the CPU
        model = quantize_linear_layers(model)
    return model
