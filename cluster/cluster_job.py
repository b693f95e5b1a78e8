"""A job file made ready to run somewhere else: a Ray cluster (`tunefleet submit`) or Kubernetes.

It is validated here, before anything is sent. Paths are the catch: the job runs
on the cluster, so its data, model and storage paths must be valid *there*.

- Default: the job is validated fully on this machine (files exist, columns are
  read) and shipped with absolute paths. Right for a local cluster, or when this
  machine mounts the same shared volume at the same path as the cluster nodes.
- `cluster_paths=True`: paths name files on the cluster only. Everything else is
  validated here; a missing local path becomes a note, and the job is shipped with
  its paths as written (overrides applied, defaults filled in). The cluster validates
  the data again before training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import yaml

from cluster.spec import JobSpec, JobSpecError, apply_overrides, load_job, looks_like_local_path, read_job_data, validate_job

# Problems that only say a local path is missing (cluster/spec.py's wording).
_MISSING_PATH = "no such file or directory"


@dataclass(frozen=True)
class ClusterJob:
    spec: JobSpec
    data: dict[str, Any]  # what is shipped (YAML-able)
    notes: list[str] = field(default_factory=list)

    def yaml(self) -> str:
        return yaml.safe_dump(self.data, sort_keys=False)

    def run_dir(self, run_id: str) -> str:
        return f"{self.spec.output.storage.rstrip('/')}/{self.spec.name}/{run_id}"


def prepare_cluster_job(path: str, overrides: list[str] = (), cluster_paths: bool = False) -> ClusterJob:
    """Validate a job file for a cluster; raise JobSpecError with every problem."""
    if not cluster_paths:
        spec = load_job(path, list(overrides))
        return ClusterJob(spec=spec, data=spec.dump())
    data = apply_overrides(read_job_data(path), list(overrides))
    notes: list[str] = []
    try:
        validate_job(data, source=str(path), check_data=False)
    except JobSpecError as err:
        remaining = [p for p in err.problems if not p.message.startswith(_MISSING_PATH)]
        if remaining:
            raise JobSpecError(remaining, err.source) from None
        notes += [f"{p.path}: {p.value} is not on this machine; it must exist on the cluster" for p in err.problems]
    spec = JobSpec.model_validate(data)  # typed (`3e-5` is a number), paths left as written
    notes += [f"{key}: relative path {value!r} resolves against the job's working directory on the cluster; "
              "prefer an absolute path on shared storage or a storage URI" for key, value in relative_paths(spec)]
    return ClusterJob(spec=spec, data=spec.dump(), notes=notes)


def relative_paths(spec: JobSpec) -> list[tuple[str, str]]:
    """(key path, value) of local paths in the job that are not absolute."""
    fields = [("model", spec.model.path), ("data.train", spec.data.train), ("data.validation", spec.data.validation),
              ("output.storage", spec.output.storage)]
    if isinstance(spec.data.label_names, str):
        fields.append(("data.label_names", spec.data.label_names))
    return [(k, v) for k, v in fields
            if v and "://" not in v and not PurePosixPath(v).is_absolute()
            and (k == "output.storage" or looks_like_local_path(v))]


def dns_label(text: str, limit: int = 63) -> str:
    """A Kubernetes / Ray-friendly name: lowercase letters, digits and '-', at most `limit` long."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return re.sub(r"-{2,}", "-", label)[:limit].rstrip("-") or "job"
