"""The method registry: `METHODS.register(name, MethodDefinition(...))` in each method's module."""

from training.methods.base import MethodDefinition
from training.registry import Registry

METHODS: Registry[MethodDefinition] = Registry("method")
