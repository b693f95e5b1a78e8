"""The job-file reference is generated from the schema and the registries, and the committed copy matches it."""

from __future__ import annotations

import inspect
from pathlib import Path

from pydantic import BaseModel

from cluster.cli import main
from cluster.docs import REGENERATE, job_reference
from cluster.spec import JobSpec
from training.methods import METHODS
from training.tasks import TASKS

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "docs" / "job-reference.md"


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key path of a model, nested models included (walked here independently of cluster.docs)."""
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        keys.append(key)
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        for candidate in candidates:
            if inspect.isclass(candidate) and issubclass(candidate, BaseModel):
                keys += _leaf_keys(candidate, key)
    return keys


def test_committed_reference_is_up_to_date():
    assert COMMITTED.exists(), f"docs/job-reference.md is missing; generate it: {REGENERATE}"
    assert COMMITTED.read_text(encoding="utf-8") == job_reference(), (
        f"docs/job-reference.md is out of date with the job-file schema; regenerate it: {REGENERATE}"
    )


def test_every_key_method_and_task_is_documented():
    text = job_reference()
    for key in _leaf_keys(JobSpec):
        assert f"| `{key}` |" in text, f"{key} missing from the reference"
    for name in METHODS.names():
        method = METHODS.get(name)
        assert f"### `{name}`" in text
        for option in method.options.model_fields:
            assert f"| `method.{option}` |" in text, f"option {option} of method {name} missing"
    for name in TASKS.names():
        assert f"| `{name}` |" in text


def test_reference_shows_descriptions_defaults_and_bounds():
    text = job_reference()
    epochs = JobSpec.model_fields["train"].annotation.model_fields["epochs"]
    row = next(line for line in text.splitlines() if line.startswith("| `train.epochs` |"))
    assert epochs.description in row and "`1`" in row and "≥ 1" in row
    assert "| `name` | string | required |" in text
    # Markdown tables survive types written with a pipe.
    assert all(line.count(" | ") == 3 for line in text.splitlines() if line.startswith("| `data."))


def test_docs_command_prints_the_reference(capsys):
    assert main(["docs"]) == 0
    assert capsys.readouterr().out == job_reference()
