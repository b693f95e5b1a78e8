"""`head`: the pretrained backbone is frozen and only the task head trains (feature extraction).

With `cache_features: true` the frozen backbone's outputs are computed once per example (during
the first epoch) and later epochs run the head alone on them (training/feature_cache.py). A
cached feature is computed once, so caching needs a backbone whose output for an example never
changes during the run:

- dropout inside the backbone must be off: the backbone runs in eval mode (`backbone_dropout`);
  the head's own dropout (outside the backbone, e.g. BERT's classifier dropout) still applies;
- the backbone's input must not be augmented: image classification needs `data.augment: false`;
- plain DDP only (under DeepSpeed the engine owns the forward pass), and not with data.streaming.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from training.methods.base import MethodDefinition
from training.methods.registry import METHODS


class HeadOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    cache_features: bool = Field(
        False, description="Compute the frozen backbone's outputs once (during the first epoch) and train the head on "
        "them afterwards: later epochs cost only the head. Needs an unchanging backbone input and output: "
        "backbone_dropout off, data.augment: false for images, no scale.deepspeed. Cached features live in each "
        "worker's memory (a pooled vector per example for BERT-like heads; more when the head reads every token).")
    backbone_dropout: Literal["auto"] | bool = Field(
        "auto", description="Dropout stays active inside the frozen backbone while the head trains (as in a frozen "
        "model left in train mode). auto: on, and off with cache_features. Off: the backbone runs in eval mode, so "
        "the head trains on the features it sees at evaluation.")


def backbone_of(model):
    """The pretrained body of a Hugging Face task model (`model.bert`, `model.vit`, ...)."""
    prefix = getattr(model, "base_model_prefix", None)
    body = getattr(model, prefix, None) if prefix else None
    if body is None or body is model:
        raise ValueError(f"{type(model).__name__} has no separate backbone (base_model_prefix); use method full")
    return body


def backbone_dropout_on(options: HeadOptions) -> bool:
    return options.backbone_dropout is True or (options.backbone_dropout == "auto" and not options.cache_features)


def _stay_in_eval(module: torch.nn.Module, args: Any) -> None:
    """Forward pre-hook: the training loop's `model.train()` puts the backbone back in eval mode here."""
    if module.training:
        module.eval()


def _apply(model, options: HeadOptions, task):
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    backbone = backbone_of(model)
    for parameter in backbone.parameters():
        parameter.requires_grad_(False)
    if not backbone_dropout_on(options):
        backbone.register_forward_pre_hook(_stay_in_eval)
        backbone.eval()
    return model


def _check_spec(spec: Any, options: HeadOptions) -> list[tuple[str, str, Any]]:
    if not options.cache_features:
        return []
    problems = []
    if options.backbone_dropout is True:
        problems.append(("method.backbone_dropout", "cannot be true with method.cache_features: a cached feature is "
                         "computed once, so dropout inside the backbone cannot draw a new mask each epoch; "
                         "set it to auto or false", True))
    data = getattr(spec, "data", None)
    if spec.task == "image-classification" and data is not None and data.augment:
        problems.append(("data.augment", "must be false with method.cache_features: a random crop / flip gives the "
                         "backbone a new input every epoch, so its features cannot be computed once (or set "
                         "method.cache_features: false to keep augmenting)", True))
    if data is not None and getattr(data, "streaming", False):
        problems.append(("method.cache_features", "not with data.streaming: a streamed example has no stable id to "
                         "file its features under, and a stream too large for memory has features too large for it",
                         True))
    scale = getattr(spec, "scale", None)
    if scale is not None and scale.deepspeed is not None:
        problems.append(("method.cache_features", "not with scale.deepspeed (the DeepSpeed engine owns the forward "
                         "pass); a frozen backbone leaves little for ZeRO to partition: use plain DDP "
                         "(scale.deepspeed: null)", True))
    return problems


METHODS.register("head", MethodDefinition(
    name="head",
    description="Frozen backbone; only the task head trains. cache_features: the backbone runs once per example.",
    # A causal LM's head is tied to its embeddings: freezing the body leaves nothing sensible to train.
    tasks=frozenset({"text-classification", "token-classification", "image-classification"}),
    options=HeadOptions,
    apply=_apply,
    check_spec=_check_spec,
))
