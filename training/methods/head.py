"""`head`: the pretrained backbone is frozen and only the task head trains (feature extraction)."""

from training.methods.base import MethodDefinition, NoOptions
from training.methods.registry import METHODS


def backbone_of(model):
    """The pretrained body of a Hugging Face task model (`model.bert`, `model.vit`, ...)."""
    prefix = getattr(model, "base_model_prefix", None)
    body = getattr(model, prefix, None) if prefix else None
    if body is None or body is model:
        raise ValueError(f"{type(model).__name__} has no separate backbone (base_model_prefix); use method full")
    return body


def _apply(model, options, task):
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    for parameter in backbone_of(model).parameters():
        parameter.requires_grad_(False)
    return model


METHODS.register("head", MethodDefinition(
    name="head",
    description="Frozen backbone; only the task head trains.",
    # A causal LM's head is tied to its embeddings: freezing the body leaves nothing sensible to train.
    tasks=frozenset({"text-classification", "token-classification", "image-classification"}),
    options=NoOptions,
    apply=_apply,
))
