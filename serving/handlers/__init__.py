"""Task handlers: one module per task, each registered once in `HANDLERS` by task name.

Adding a task to serving = one module here + its import line below.
"""

from serving.handlers.base import TaskHandler, load_handler, parse_request
from serving.handlers.registry import HANDLERS, UnknownTaskError, register_handler

# Each import registers its task's handler.
from serving.handlers import causal_lm  # noqa: E402,F401  (causal-lm)
from serving.handlers import image_classification  # noqa: E402,F401  (image-classification)
from serving.handlers import text_classification  # noqa: E402,F401  (text-classification)
from serving.handlers import token_classification  # noqa: E402,F401  (token-classification)

__all__ = ["HANDLERS", "TaskHandler", "UnknownTaskError", "load_handler", "parse_request", "register_handler"]
