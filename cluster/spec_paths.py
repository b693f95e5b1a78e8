"""The local paths a job file names: which values are paths (not hub ids), whether they exist, and
the spec with them made absolute (the run directory keeps that one)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any


def looks_like_local_path(value: str) -> bool:
    """A hub id is `name` or `org/name`; anything with a file suffix, a leading ./ or /, or that exists is a path."""
    if "://" in value:
        return False
    return (
        value.startswith((".", "/", "~"))
        or bool(re.search(r"\.(csv|tsv|txt|jsonl|json|parquet|conll|gz|bz2)$", value))
        or Path(value).exists()
        or value.count("/") > 1
    )


def local_paths(spec: Any) -> list[tuple[str, str]]:
    """(key path, value) of every field that may name a local file that must exist."""
    fields = []
    if spec.model is not None:
        fields.append(("model", spec.model.path))
    if spec.data is not None:
        fields += [("data.train", spec.data.train), ("data.validation", spec.data.validation)]
        if isinstance(spec.data.label_names, str):
            fields.append(("data.label_names", spec.data.label_names))
    if spec.scale is not None and spec.scale.deepspeed is not None and spec.scale.deepspeed.config is not None:
        fields.append(("scale.deepspeed.config", spec.scale.deepspeed.config))
    local = [(k, v) for k, v in fields if v is not None and (looks_like_local_path(v) or k == "scale.deepspeed.config")]
    weights = spec.model.weights if spec.model is not None else None
    if weights and "://" not in weights:  # a weights file: a URL, else always a local path
        local.append(("model.weights", weights))
    return local


def absolute(base: Path, value: str) -> str:
    return str((base / Path(value).expanduser()).resolve())


def path_problems(spec: Any, base: Path) -> list[tuple[str, str, Any]]:
    """(key path, message, value) of every local path in the job that does not exist."""
    return [
        (key, f"no such file or directory: {absolute(base, value)}", value)
        for key, value in local_paths(spec)
        if not Path(absolute(base, value)).exists()
    ]


def resolve_paths(spec: Any, base: Path) -> Any:
    """The same spec with absolute local paths (the run directory keeps this one)."""
    made_absolute = {key: absolute(base, value) for key, value in local_paths(spec)}
    data = spec.data.model_copy(update={
        "train": made_absolute.get("data.train", spec.data.train),
        "validation": made_absolute.get("data.validation", spec.data.validation),
        "label_names": made_absolute.get("data.label_names", spec.data.label_names),
    })
    model = spec.model.model_copy(update={"path": made_absolute.get("model", spec.model.path),
                                          "weights": made_absolute.get("model.weights", spec.model.weights)})
    storage = spec.output.storage
    if "://" not in storage:
        storage = absolute(base, storage)
    scale = spec.scale
    if "scale.deepspeed.config" in made_absolute:
        zero = scale.deepspeed.model_copy(update={"config": made_absolute["scale.deepspeed.config"]})
        scale = scale.model_copy(update={"deepspeed": zero})
    return spec.model_copy(update={"data": data, "model": model, "scale": scale,
                                   "output": spec.output.model_copy(update={"storage": storage})})
