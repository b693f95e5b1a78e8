"""Dropout for training on CPU workers: the same Bernoulli mask, drawn ~6x cheaper than torch draws it.

Why not torch's own: on CPU, `nn.Dropout` and SDPA's attention dropout draw their mask with
`bernoulli_`, ~8 ns per element here (2 cores, torch 2.14; `random_` fills 64-bit words at ~1 ns
per 4 elements). Fine-tuning MiniLM on AG News that was 12% of every step (torch profiler,
docs/performance.md), more than the GELUs, layer norms and softmaxes together.

Here an element is kept when a 16-bit slice of `random_`'s 64-bit words is above a threshold: the
drop rate is p rounded to a multiple of 1/65536 (0.1 → 0.1000061) and the kept values are scaled by
the inverse of that rate, so the expected output is the input, as with torch. A float32 input gets
its mask as float32 scales (0 or 1/(1 - p)), made from the 16-bit slices by vectorized arithmetic,
so forward and backward are one multiply each. torch's CPU kernels do not vectorize bool → float:
on attention probabilities of 32 × 12 × 54 × 54, `native_dropout_backward` (input × bool mask ×
scale) took 4.8 ms, `torch.where(keep, scale, 0)` 1.1 ms, the arithmetic here 0.25 ms and the float
multiply 0.2 ms (2 cores); a MiniLM training step got 2.7% faster (64 steps each, alternated). Other dtypes (bfloat16 under autocast) keep `native_dropout_backward`,
which scales in float32 before rounding, so the kept values are not biased by a rounded scale.
The bits come from torch's seeded CPU generator: runs stay reproducible (activation checkpointing's
RNG replay included), but the random stream differs from torch's dropout; `train.cpu_dropout: torch`
keeps torch's. CUDA's dropout (Philox, fused into the attention kernels) is fast: left alone there.

Two seams, both public transformers/torch API: `nn.Dropout` modules are replaced by `CpuDropout`
(a subclass: `isinstance` checks, e.g. peft's, still hold), and a model on the SDPA attention path
gets the same attention registered under another name (`AttentionInterface`, with SDPA's own mask
function) that computes the probabilities explicitly when it must drop some of them, as SDPA's math
kernel does on CPU, and calls SDPA unchanged otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

ATTENTION = "sdpa_cpu_dropout"  # the registered attention implementation's name
_LANES = 65536  # 16-bit slices


def drop(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of x with drop probability p (0 < p < 1), on CPU."""
    dropped = round(p * _LANES)
    if dropped == 0:
        return x
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)  # every bit random
    lanes = words.view(torch.int16)[:n].view(x.shape)
    threshold, scale = dropped - _LANES // 2, _LANES / (_LANES - dropped)  # keep lanes >= threshold
    if x.dtype == torch.float32:
        # lane - (threshold - 1) is >= 1 where kept and <= 0 where dropped (integers, exact in float32):
        # clamped to [0, 1], times the scale, it is the scaled mask, with no bool tensor in between.
        scales = lanes.to(torch.float32).sub_(threshold - 1).clamp_(0, 1).mul_(scale)
        return _ApplyScales.apply(x, scales)
    return _ApplyMask.apply(x, lanes >= threshold, scale)


class _ApplyScales(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scales):
        ctx.save_for_backward(scales)
        return x * scales

    @staticmethod
    def backward(ctx, grad):
        (scales,) = ctx.saved_tensors
        return grad * scales, None


class _ApplyMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.ops.aten.native_dropout_backward(x, keep, scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return torch.ops.aten.native_dropout_backward(grad, keep, ctx.scale), None, None


class CpuDropout(nn.Dropout):
    """nn.Dropout whose training-mode mask on CPU comes from `drop` above; torch's elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and 0 < self.p < 1 and x.device.type == "cpu":
            return drop(x, self.p)
        return super().forward(x)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None,
              **kwargs):
    """transformers' SDPA attention, with the attention-probability dropout drawn by `drop` on CPU."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    special = any(kwargs.get(k) is not None for k in ("position_bias", "cache", "softcap", "s_aux"))
    if dropout == 0 or query.device.type != "cpu" or special:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    return math_attention(query, repeat_kv(key, groups), repeat_kv(value, groups), attention_mask, dropout,
                          scaling, getattr(module, "is_causal", True) if is_causal is None else is_causal)


def math_attention(query, key, value, attention_mask, p: float, scaling=None, is_causal: bool = False):
    """softmax(q·kᵀ·scale + mask) with dropout p, times v; masks and causality as transformers' SDPA path
    passes them (a boolean mask: True attends; a float mask: added; none: causal if asked, upper-left)."""
    # The scale goes on the query and a boolean mask becomes an additive one: the (batch, heads, q, kv) scores
    # then take one elementwise op forward and none backward (scaling them and masked_fill cost ~15% of this).
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query * scale, key.transpose(-1, -2))
    q_length, kv_length = query.shape[2], key.shape[2]
    if attention_mask is None and is_causal and q_length > 1:
        attention_mask = torch.ones(q_length, kv_length, dtype=torch.bool, device=query.device).tril()
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros(attention_mask.shape, dtype=scores.dtype, device=scores.device).masked_fill_(
            ~attention_mask, torch.finfo(scores.dtype).min)
    if attention_mask is not None:
        scores = scores + attention_mask
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if p > 0:
        probabilities = drop(probabilities, p)
    return torch.matmul(probabilities, value).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def use_cpu_dropout(model: nn.Module) -> dict[str, int]:
    """Swap the model's dropout for CPU training (in place); what was swapped, for the run's log."""
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, CpuDropout(child.p, child.inplace))
                swapped += 1
    attention_models = 0
    from transformers import PreTrainedModel

    top = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if top is not None and top.config._attn_implementation == "sdpa" and top._can_set_attn_implementation():
        _register()
        top.set_attn_implementation(ATTENTION)
        attention_models = int(top.config._attn_implementation == ATTENTION)
    return {"dropout_modules": swapped, "attention": attention_models}
