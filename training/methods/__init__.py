"""Fine-tuning methods. Each module registers itself; importing this package registers them all."""

from training.methods import adapter, full, gradual_unfreeze, head, ia3, lora, prompt, qlora  # noqa: F401  (registers)
from training.methods.base import MethodDefinition, NoOptions, count_parameters
from training.methods.registry import METHODS

__all__ = ["METHODS", "MethodDefinition", "NoOptions", "count_parameters"]
