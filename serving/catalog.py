"""The models one server serves: names, export directories, cards; checked before Ray starts anything."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from serving import model_store
from serving.errors import ServingError
from serving.pools import MODEL_NAME, NAME_RULE  # a name is one URL path segment and a Serve application name
from serving.schemas import ModelCard
from training.layout import ExportInfo


@dataclass(frozen=True)
class ServedModel:
    name: str
    export_dir: str  # absolute, so replicas on this node resolve it alike (a URI's export: its local copy)
    info: ExportInfo
    version: str
    route: str | None = None  # its own route prefix (a serve file's `route`); default /v1/models/<name>
    source: str | None = None  # the storage URI it came from, when not a local path

    @property
    def route_prefix(self) -> str:
        return self.route or f"/v1/models/{self.name}"

    def served_elsewhere(self) -> ServingError:
        """The 404 for /v1/models/<name>/... when this model has a route of its own: where to send it instead."""
        return ServingError(404, f"model {self.name!r} is served at {self.route_prefix}: POST {self.route_prefix}"
                                 "/predict", {"route": self.route_prefix})

    def card(self) -> ModelCard:
        return ModelCard(
            name=self.name,
            task=self.info.task,
            labels=list(self.info.labels),
            base_model=self.info.base_model,
            version=self.version,
        )


def load_served_model(export_dir: str | Path, name: str | None = None, route: str | None = None,
                      fetch: bool = True) -> ServedModel:
    """An export (or run directory) by local path or storage URI; a URI's export is fetched to this node
    (with `fetch=False` its tunefleet.json alone is read, and export_dir stays the URI)."""
    info, version = model_store.read_info(export_dir)
    path = model_store.fetch(export_dir) if fetch or not model_store.is_uri(export_dir) else export_dir
    source = str(export_dir) if model_store.is_uri(export_dir) else None
    return ServedModel(name=name or info.name, export_dir=str(path), info=info, version=version, route=route,
                       source=source)


def resolve_models(export_dirs: list[str | Path], names: list[str] | None = None) -> list[ServedModel]:
    """Read every export, name it (its ExportInfo.name unless given) and check the set once.

    Raises ValueError listing every problem: a name count that does not match, a name
    that is not a URL segment, a duplicate name, a task no handler serves.
    """
    if not export_dirs:
        raise ValueError("no export directories given; pass at least one run's export/ directory")
    if names is not None and len(names) != len(export_dirs):
        raise ValueError(f"got {len(names)} names for {len(export_dirs)} export directories; give one name per export")
    from serving.handlers import HANDLERS  # here: a ServedModel travels to the root replica, which needs no torch

    models = [load_served_model(d, names[i] if names else None) for i, d in enumerate(export_dirs)]
    problems = []
    seen: dict[str, str] = {}
    for model in models:
        if not MODEL_NAME.match(model.name):
            problems.append(f"model name {model.name!r} ({model.export_dir}) {NAME_RULE}")
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
