"""Checks on a job's `model` section that need more than its own fields: a model named by a storage URI
(resolved and, with check_data, looked into before any cluster time) and the rules a GGUF base sets on the
task and the method. cluster/spec.py calls them while validating a job."""

from __future__ import annotations

from typing import Any

from cluster.errors import Problem
from training.methods import METHODS


def model_storage_of(uri: str, check: bool, gguf_file: str | None) -> tuple[Any, Problem | None]:
    """The StorageDir of a model named by a storage URI; with `check`, a folder without config.json (or
    without its `gguf_file`, which stands in for config.json), or one that cannot be read, is a problem here,
    before any cluster time."""
    from cluster.storage import StorageError, resolve_storage

    try:
        storage = resolve_storage(uri)
    except StorageError as err:
        return None, Problem(path="model", message=str(err).removeprefix("output.storage: "), value=uri)
    if check:
        try:
            found = storage.exists(gguf_file or "config.json")
        except OSError as err:
            return None, Problem(path="model", message=f"cannot read {uri}: {err}; check the credentials and "
                                 "endpoint (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS)",
                                 value=uri)
        if not found and gguf_file:
            return None, Problem(path="model", message=f"no {gguf_file} (model.gguf_file) in {uri}: give the "
                                 "folder that holds the GGUF file, or correct gguf_file", value=uri)
        if not found:
            return None, Problem(path="model", message=f"no config.json in {uri}: give the folder that "
                                 "save_pretrained() wrote", value=uri)
    return storage, None


def gguf_problems(spec: Any, task_known: bool) -> list[Problem]:
    """A GGUF base is read only by tunefleet (from_pretrained with gguf_file): an adapter export names its base in
    adapter_config.json, which has no gguf_file, so the export merges the adapter; one that cannot merge is refused."""
    if spec.model is None or not spec.model.gguf_file:
        return []
    if task_known and spec.task != "causal-lm":
        return [Problem(path="model.gguf_file", message=f"GGUF files hold causal language models; task {spec.task} "
                        "loads a Hugging Face folder: remove gguf_file", value=spec.model.gguf_file)]
    method = METHODS.get(spec.method.name) if spec.method is not None and spec.method.name in METHODS else None
    if method is not None and method.export_kind == "adapter" and not method.mergeable:
        mergeable = [m for m in METHODS.names() if METHODS.get(m).mergeable]
        return [Problem(path="method.name", message="cannot merge into a GGUF base, and its export could not name "
                        f"that base (adapter_config.json has no gguf_file): use full or {', '.join(mergeable)}, or "
                        "convert the GGUF once to a Hugging Face folder (training.gguf.convert_gguf, as "
                        "benchmarks/prepare_smollm2.py does) and name that folder in model", value=spec.method.name)]
    return []
