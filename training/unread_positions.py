"""Training a sequence classifier: the last encoder layer computes only the position the head reads.

A BERT-family sequence classifier reads one position of the encoder's output: the first token
(BERT's pooler and the RoBERTa/ELECTRA heads take `hidden_states[:, 0]`). Every other position of
the last layer — its query projection, attention output, residual, layer norm and feed-forward
network, ~10/12 of the layer's matmuls — is computed and then never read: for a 6-layer encoder
(MiniLM) that is ~14% of every step's forward and backward work. Here the last layer computes
its keys and values for every position (the first token attends to all of them) and everything
else for the first token only: the logits are the same, and so is every gradient (the positions
dropped had none). Measured: MiniLM, batch 32 × 64 tokens, forward + backward 1.18× faster.

No library offers this: transformers' models compute every position of every layer, and the HF
Trainer runs them so. The seam is the layer's own class: the last layer's instance gets a subclass
of its class (`isinstance` checks hold, parameter names and the state dict are unchanged, so
checkpoints and the export are the same model's) whose forward runs the layer's own submodules
(query/key/value projections, the registered attention function, output, feed-forward chunk) on the
first token. It applies to the architectures listed in `ARCHITECTURES`, whose layer and head are
known to have this shape (tests/training/test_unread_positions.py checks each one's logits and
gradients against the unchanged model); any other model is left as it is. A layer called with a
cache (prefix tuning's virtual keys and values) runs its own forward.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from training.cpu_dropout import ATTENTION as CPU_DROPOUT_ATTENTION

# model_type → the head reads position 0 and the layer is BERT's (attention.self/.output, feed_forward_chunk)
ARCHITECTURES = frozenset({"bert", "roberta", "xlm-roberta", "electra", "camembert"})
# attention paths that take a query shorter than the keys with a 4-D mask (flash attention's varlen path is not tested)
_ATTENTION_PATHS = frozenset({"sdpa", "eager", CPU_DROPOUT_ATTENTION})


class FirstTokenLayer:
    """Mixed in front of a BERT-family layer's class: the layer's output at the first position only."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: Any,
                past_key_values: Any = None, **kwargs: Any) -> torch.Tensor:
        if past_key_values is not None or (args and args[0] is not None) or kwargs.get("encoder_hidden_states") is not None:
            return super().forward(hidden_states, attention_mask, *args, past_key_values=past_key_values, **kwargs)
        kwargs.pop("encoder_attention_mask", None)
        attention = self.attention.self
        batch, length, _ = hidden_states.shape
        first = hidden_states[:, :1]

        def heads(x: torch.Tensor, positions: int) -> torch.Tensor:
            return x.view(batch, positions, -1, attention.attention_head_size).transpose(1, 2)

        query = heads(attention.query(first), 1)
        key, value = heads(attention.key(hidden_states), length), heads(attention.value(hidden_states), length)
        if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] == length:
            attention_mask = attention_mask[:, :, :1, :]  # the first query's row
        attend = attention_function(attention)
        output, _ = attend(attention, query, key, value, attention_mask,
                           dropout=attention.dropout.p if attention.training else 0.0, scaling=attention.scaling,
                           **kwargs)
        output = self.attention.output(output.reshape(batch, 1, -1), first)
        return self.feed_forward_chunk(output)


def attention_function(attention: nn.Module):
    """The attention implementation ATTENTION's model is configured with (its own eager one as fallback)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = sys.modules[type(attention).__module__].eager_attention_forward  # the model's own
    return ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager)


def skip_unread_positions(model: nn.Module) -> dict[str, Any] | None:
    """Make the last encoder layer of MODEL's sequence classifier compute the first position only.

    MODEL may be wrapped (peft). Returns what was changed, for the run's start record; None when the
    model is not one of ARCHITECTURES' sequence classifiers (nothing changed)."""
    classifier = next((m for m in model.modules() if type(m).__name__.endswith("ForSequenceClassification")
                       and getattr(getattr(m, "config", None), "model_type", None) in ARCHITECTURES), None)
    if classifier is None or classifier.config.is_decoder or classifier.config._attn_implementation not in _ATTENTION_PATHS:
        return None
    base = getattr(classifier, classifier.base_model_prefix, None)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not layers:
        return None
    last = layers[-1]
    if not (hasattr(last, "feed_forward_chunk") and hasattr(getattr(last, "attention", None), "self")):
        return None
    if not isinstance(last, FirstTokenLayer):
        last.__class__ = type(f"FirstToken{type(last).__name__}", (FirstTokenLayer, type(last)), {})
    return {"model_type": classifier.config.model_type, "layer": len(layers) - 1}
