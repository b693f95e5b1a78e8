"""Task name → handler class: each task's module registers its handler once.

    @register_handler("text-classification")
    class TextClassificationHandler(TaskHandler): ...

A duplicate or unknown task fails with the list of known ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:
    from serving.handlers.base import TaskHandler

H = TypeVar("H", bound="type[TaskHandler]")


class UnknownTaskError(KeyError):
    """An export whose task no serving handler registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class HandlerRegistry:
    def __init__(self) -> None:
        self._handlers: dict[str, type[TaskHandler]] = {}

    def register(self, task: str, handler: type[TaskHandler]) -> type[TaskHandler]:
        if task in self._handlers:
            raise ValueError(f"a serving handler for task {task!r} is already registered")
        self._handlers[task] = handler
        return handler

    def get(self, task: str) -> type[TaskHandler]:
        try:
            return self._handlers[task]
        except KeyError:
            raise UnknownTaskError(
                f"no serving handler for task {task!r}; servable tasks: {', '.join(self.names()) or '(none)'}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._handlers)

    def generative_tasks(self) -> frozenset[str]:
        """The tasks whose handler answers the OpenAI-compatible routes (serving/openai_compat.py)."""
        return frozenset(task for task, handler in self._handlers.items() if hasattr(handler, "openai_prepare"))

    def __contains__(self, task: object) -> bool:
        return task in self._handlers


HANDLERS = HandlerRegistry()


def register_handler(task: str) -> Callable[[H], H]:
    def decorate(handler: H) -> H:
        handler.task = task  # here, not in register: another registry holding the class must not rename it
        HANDLERS.register(task, handler)
        return handler

    return decorate
