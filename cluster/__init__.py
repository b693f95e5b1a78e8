"""The control plane: the job spec, the CLI, Ray connection, storage."""

from cluster.spec import JobSpec, JobSpecError, load_job, validate_job

__all__ = ["JobSpec", "JobSpecError", "load_job", "validate_job"]
