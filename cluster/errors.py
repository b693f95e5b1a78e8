"""A job file's problems, as every command reports them. Light to import (no job spec, no torch):
the CLI catches these before it knows which command will need the spec."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class Problem(BaseModel):
    path: str
    message: str
    value: Any = None

    def __str__(self) -> str:
        shown = "" if self.value is None else f" (got {self.value!r})"
        return f"{self.path}: {self.message}{shown}"


class JobSpecError(ValueError):
    """Every problem found in a job file, raised once."""

    def __init__(self, problems: list[Problem], source: str = "job file") -> None:
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem{'s' if len(problems) != 1 else ''}\n{lines}")
