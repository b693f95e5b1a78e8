"""The models one server serves: names, export directories, cards; checked before Ray starts anything."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from serving.handlers import HANDLERS
from serving.schemas import ModelCard
from training.layout import EXPORT_INFO_FILE, ExportInfo, read_export_info, resolve_export_dir

# A name is one URL path segment (/v1/models/{name}/predict) and a Serve application name.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class ServedModel:
    name: str
    export_dir: str  # absolute, so replicas on this node resolve it alike
    info: ExportInfo
    version: str

    @property
    def route_prefix(self) -> str:
        return f"/v1/models/{self.name}"

    def card(self) -> ModelCard:
        return ModelCard(
            name=self.name,
            task=self.info.task,
            labels=list(self.info.labels),
            base_model=self.info.base_model,
            version=self.version,
        )


def load_served_model(export_dir: str | Path, name: str | None = None) -> ServedModel:
    path = resolve_export_dir(export_dir).resolve()
    info = read_export_info(path)
    version = hashlib.sha256((path / EXPORT_INFO_FILE).read_bytes()).hexdigest()[:12]
    return ServedModel(name=name or info.name, export_dir=str(path), info=info, version=version)


def resolve_models(export_dirs: list[str | Path], names: list[str] | None = None) -> list[ServedModel]:
    """Read every export, name it (its ExportInfo.name unless given) and check the set once.

    Raises ValueError listing every problem: a name count that does not match, a name
    that is not a URL segment, a duplicate name, a task no handler serves.
    """
    if not export_dirs:
        raise ValueError("no export directories given; pass at least one run's export/ directory")
    if names is not None and len(names) != len(export_dirs):
        raise ValueError(f"got {len(names)} names for {len(export_dirs)} export directories; give one name per export")
    models = [load_served_model(d, names[i] if names else None) for i, d in enumerate(export_dirs)]
    problems = []
    seen: dict[str, str] = {}
    for model in models:
        if not _NAME.match(model.name):
            problems.append(
                f"model name {model.name!r} ({model.export_dir}) must be letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if model.name in seen:
            problems.append(
                f"model name {model.name!r} is used twice ({seen[model.name]} and {model.export_dir}); "
                "pass distinct names"
            )
        seen.setdefault(model.name, model.export_dir)
        if model.info.task not in HANDLERS:
            problems.append(
                f"{model.export_dir}: task {model.info.task!r} has no serving handler; "
                f"servable tasks: {', '.join(HANDLERS.names())}"
            )
    if problems:
        raise ValueError("cannot serve these exports:\n  " + "\n  ".join(problems))
    return models
