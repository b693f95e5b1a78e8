"""The job-file reference (Markdown), generated from the schema.

Every key, type, default and description comes from the pydantic models in
`cluster.spec` (and `serving.config.ServeSpec` for `serve:`), the method list
from the METHODS registry with each method's options model, the task list from
the TASKS registry. Nothing here names a field, a task or a method, so a new
one shows up in `tunefleet docs` (and docs/job-reference.md) by itself.
"""

from __future__ import annotations

import enum
import inspect
import sys
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from cluster.spec import JobSpec
from training.methods import METHODS
from training.tasks import TASKS

REGENERATE = "tunefleet docs > docs/job-reference.md"

_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))


def job_reference() -> str:
    """The whole reference as Markdown, ending in a newline."""
    lines = [
        "# Job-file reference",
        "",
        f"Generated from the schema by `tunefleet docs`; do not edit by hand (regenerate: `{REGENERATE}`).",
        "",
        "A job file is YAML. Unknown keys are errors; every problem is reported at once with its key path.",
        "Any key can be overridden on the command line: `--set train.learning_rate=3e-5` (values are YAML).",
        "Relative paths are resolved against the current directory.",
        "",
    ]
    lines += _section("Top-level keys", JobSpec, "")
    for name, field in JobSpec.model_fields.items():
        for path, model in _nested_models(name, field.annotation):
            lines += _model_sections(path, model, field)
    lines += _methods()
    lines += _tasks()
    return "\n".join(lines).rstrip("\n") + "\n"


def _model_sections(path: str, model: type[BaseModel], field: FieldInfo | None) -> list[str]:
    """`path`'s table, then one section per nested model, depth first."""
    lines = _section(f"`{path}`", model, path, intro=field.description if field else None)
    for name, sub in model.model_fields.items():
        for sub_path, sub_model in _nested_models(f"{path}.{name}", sub.annotation):
            lines += _model_sections(sub_path, sub_model, sub)
    return lines


def _section(title: str, model: type[BaseModel], prefix: str, intro: str | None = None) -> list[str]:
    lines = [f"## {title}", ""]
    if intro:
        lines += [_one_line(intro), ""]
    lines += _table(model, prefix)
    return lines


def _table(model: type[BaseModel], prefix: str) -> list[str]:
    if not model.model_fields:
        return ["No keys.", ""]
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        description = field.description or ""
        if _nested_models(key, field.annotation) and not description:
            description = f"See `{key}` below."
        lines.append("| " + " | ".join(_cell(c) for c in (
            f"`{key}`", _type_name(field.annotation, field.metadata), _default(field), description)) + " |")
    return lines + [""]


def _nested_models(path: str, annotation: Any) -> list[tuple[str, type[BaseModel]]]:
    """(key path, model) for each pydantic model inside an annotation (`X | None`, `list[X]`)."""
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return [(path, annotation)]
    found = []
    for arg in get_args(annotation):
        suffix = "[]" if get_origin(annotation) in (list, tuple, set, frozenset) else ""
        found += _nested_models(path + suffix, arg)
    return list(dict.fromkeys(found))


def _type_name(annotation: Any, metadata: list | tuple = ()) -> str:
    name = _plain_type(annotation)
    bounds = [f"{sign} {getattr(m, attr)}" for m in metadata for attr, sign in _BOUNDS if getattr(m, attr, None) is not None]
    return name + (", " + ", ".join(bounds) if bounds else "")


def _plain_type(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None) or annotation is None:
        return "null"
    if annotation is Any:
        return "any"
    if origin is Literal:
        choices = ", ".join(f"`{_yaml(a)}`" for a in args)
        return choices if len(args) == 1 else "one of " + choices
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(_plain_type(a) for a in args))
    if origin in (list, tuple, set, frozenset):
        item = _plain_type(args[0]) if args else ""
        return f"list of ({item})" if " or " in item else f"list of {item}" if item else "list"
    if origin is dict:
        return "mapping"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return "mapping"
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(f"`{m.value}`" for m in annotation)
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "see below"
    return f"`{_yaml(value)}`"


def _yaml(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return _yaml(value.value)
    if isinstance(value, str):
        return repr(value) if value.strip() != value or value == "" else value
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml(v)}" for k, v in value.items()) + "}"
    return str(value)


def _cell(text: str) -> str:
    return _one_line(text).replace("|", "\\|")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _methods() -> list[str]:
    lines = ["## Methods", "",
             "`method.name` picks which parameters train; the method's options sit beside it "
             "(`method: {name: NAME, option: value}`).", ""]
    for name in METHODS.names():
        method = METHODS.get(name)
        lines += [f"### `{name}`", "", _one_line(method.description), "",
                  f"Tasks: {', '.join(f'`{t}`' for t in sorted(method.tasks))}. Export: {method.export_kind}.", ""]
        if method.options.model_fields:
            lines += _table(method.options, "method")
            for field_name, field in method.options.model_fields.items():
                for path, model in _nested_models(f"method.{field_name}", field.annotation):
                    lines += _model_sections(path, model, field)
        else:
            lines += ["No options.", ""]
    return lines


def _tasks() -> list[str]:
    lines = ["## Tasks", "", "`task` names what the model predicts.", "",
             "| task | description | pipeline | default metric | fitting methods |", "|---|---|---|---|---|"]
    for name in TASKS.names():
        task = TASKS.get(name)
        methods = ", ".join(f"`{m}`" for m in METHODS.names() if name in METHODS.get(m).tasks) or "(none)"
        metric = f"{task.default_metric} ({'higher' if task.greater_is_better else 'lower'} is better)"
        lines.append("| " + " | ".join(_cell(c) for c in (
            f"`{name}`", _task_summary(task), f"`{task.pipeline_tag}`", metric, methods)) + " |")
    return lines + [""]


def _task_summary(task: Any) -> str:
    """First line of the docstring of the module that registered the task."""
    module = sys.modules.get(getattr(task.prepare, "__module__", ""), None)
    doc = (module.__doc__ or "").strip() if module else ""
    return doc.splitlines()[0] if doc else ""
