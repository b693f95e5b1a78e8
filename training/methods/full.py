"""`full`: every parameter trains."""

from training.methods.base import MethodDefinition, NoOptions
from training.methods.registry import METHODS


def _apply(model, options, task):
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


METHODS.register("full", MethodDefinition(
    name="full",
    description="All parameters train.",
    tasks=frozenset({"text-classification", "token-classification", "causal-lm", "image-classification"}),
    options=NoOptions,
    apply=_apply,
))
