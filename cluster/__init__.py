"""The control plane: the job spec, the CLI, Ray connection, storage.

The names below load on first use: every Ray worker process of a local run imports
`cluster.runtime` (its worker_process_setup_hook), and importing the job spec here
(pydantic models, the training registries) cost each of them ~2.2 s of CPU on the way
to the first training step (docs/performance.md).
"""

from __future__ import annotations

from typing import Any

__all__ = ["JobSpec", "JobSpecError", "load_job", "validate_job"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from cluster import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")
