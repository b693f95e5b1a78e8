"""Serving a BERT-family encoder: no matmul runs on padding.

A served batch holds texts of different lengths, padded to the longest. On real traffic most of
those positions are padding: random batches of 16 AG News texts (MiniLM's tokenizer, mean 52
tokens) are 58% real tokens, SST-2 sentences 56%. An encoder layer's matmuls (the query, key and
value projections, the attention output, the feed-forward network: all but the attention scores)
work on every position alike, so they spend ~40% of a batch's work on padding, whose results the
attention mask then discards. Here the encoder keeps only the real tokens, as one [tokens, hidden]
matrix, between its layers: each projection and feed-forward network runs on that matrix, and only
the attention itself sees the batch padded again (its keys and values scattered back into place,
the mask unchanged). The scores are the unchanged model's to float rounding (tests check 1e-5).

Why written here: transformers packs sequences only for flash-attention's varlen kernels (CUDA,
decoder models); torch's nested-tensor fast path is for `nn.TransformerEncoderLayer`, which BERT's
layers are not; optimum's BetterTransformer is not in the stack and is deprecated. The seam is the
one training.unread_positions uses: the encoder instance gets a subclass of its own class (the
state dict and parameter names are unchanged) whose forward runs each layer's own submodules and
registered attention function. When the classifier's last layer computes the first position only
(training.unread_positions), the packed encoder does the same: that layer's query is the first
token of each text. It applies to training.unread_positions' architectures, in inference only;
anything else (training, a cache, cross-attention, a batch without padding, output_attentions or
output_hidden_states) runs the encoder's own forward.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from training.unread_positions import ARCHITECTURES, attention_function, FirstTokenLayer

_ATTENTION_PATHS = frozenset({"sdpa", "eager"})


@dataclass(frozen=True)
class _Packing:
    """Where a batch's real tokens sit: `index` into the flattened [batch × length] positions."""

    index: torch.Tensor  # [tokens], ascending
    batch: int
    length: int
    mask: torch.Tensor  # the encoder's 4-D attention mask, as the model built it

    def pad(self, packed: torch.Tensor, head_size: int) -> torch.Tensor:
        """[tokens, heads × head_size] → [batch, heads, length, head_size], zeros at padding."""
        full = packed.new_zeros(self.batch * self.length, packed.shape[-1]).index_copy_(0, self.index, packed)
        return full.view(self.batch, self.length, -1, head_size).transpose(1, 2)

    def firsts(self) -> torch.Tensor:
        """Each text's first position, as rows of the packed matrix."""
        starts = torch.arange(self.batch, device=self.index.device) * self.length
        return torch.searchsorted(self.index, starts)


def _real_positions(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """[batch, length] bool: the positions some query may attend to (a padding mask's real tokens)."""
    if attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[-1] != length:
        return None
    allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    return allowed[:, 0].any(dim=-2).expand(batch, length)


def _layer(layer: nn.Module, hidden: torch.Tensor, packing: _Packing, first_only: bool) -> torch.Tensor:
    """One BERT-family layer on packed hidden states [tokens, hidden] → [tokens, hidden], or
    [batch, hidden] at each text's first position when `first_only`."""
    attention = layer.attention.self
    size = attention.attention_head_size
    key, value = packing.pad(attention.key(hidden), size), packing.pad(attention.value(hidden), size)
    mask = packing.mask
    if first_only:
        residual = hidden.index_select(0, packing.firsts())
        query = attention.query(residual).view(packing.batch, 1, -1, size).transpose(1, 2)
        if mask.shape[-2] == packing.length:
            mask = mask[:, :, :1, :]
    else:
        residual = hidden
        query = packing.pad(attention.query(hidden), size)
    output, _ = attention_function(attention)(attention, query, key, value, mask, dropout=0.0,
                                                scaling=attention.scaling)
    output = output.reshape(packing.batch * query.shape[2], -1)  # [batch × queries, hidden]
    if not first_only:
        output = output.index_select(0, packing.index)
    return layer.feed_forward_chunk(layer.attention.output(output, residual))


class PackedEncoder:
    """Mixed in front of a BERT-family encoder's class: its layers skip the batch's padding."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: Any,
                **kwargs: Any) -> Any:
        batch, length, width = hidden_states.shape
        real = None
        if not (self.training or any(a is not None for a in args)
                or any(kwargs.get(k) is not None for k in ("encoder_hidden_states", "past_key_values"))
                or kwargs.get("output_attentions") or kwargs.get("output_hidden_states")):
            real = _real_positions(attention_mask, batch, length)
        if real is None or bool(real.all()) or not bool(real[:, 0].all()):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        index = real.reshape(-1).nonzero().squeeze(1)
        packing = _Packing(index, batch, length, attention_mask)
        hidden = hidden_states.reshape(batch * length, width).index_select(0, index)
        *inner, last = self.layer
        for layer in inner:
            hidden = _layer(layer, hidden, packing, first_only=False)
        if isinstance(last, FirstTokenLayer):
            output = _layer(last, hidden, packing, first_only=True).view(batch, 1, width)
        else:
            hidden = _layer(last, hidden, packing, first_only=False)
            output = hidden.new_zeros(batch * length, width).index_copy_(0, index, hidden).view(batch, length, width)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=output)


def skip_padding(model: nn.Module) -> dict[str, Any] | None:
    """Make MODEL's BERT-family encoder skip padding in inference; None when MODEL has none (unchanged)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in ARCHITECTURES or config.is_decoder \
            or config._attn_implementation not in _ATTENTION_PATHS:
        return None
    base = getattr(model, model.base_model_prefix, model)
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not layers or not all(hasattr(layer, "feed_forward_chunk") and hasattr(getattr(layer, "attention", None), "self")
                             for layer in layers):
        return None
    if not isinstance(encoder, PackedEncoder):
        encoder.__class__ = type(f"Packed{type(encoder).__name__}", (PackedEncoder, type(encoder)), {})
    return {"model_type": config.model_type, "layers": len(layers)}


@contextmanager
def computing_padding(model: nn.Module) -> Iterator[None]:
    """Inside: MODEL's packed encoders run their own forward, padding computed (for A/B comparisons)."""
    encoders = [(m, type(m)) for m in model.modules() if isinstance(m, PackedEncoder)]
    for encoder, packed in encoders:
        encoder.__class__ = packed.__bases__[1]  # (PackedEncoder, the encoder's own class)
    try:
        yield
    finally:
        for encoder, packed in encoders:
            encoder.__class__ = packed
