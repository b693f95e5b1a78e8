"""Per-model serving settings: replicas, autoscaling, batching, resources.

The job file's `serve:` section is this model, so a job and a serve file share
one definition (cluster imports it; serving never imports cluster).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ServeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(1, ge=0, description="Replicas kept even when idle.")
    max_replicas: int = Field(2, ge=1, description="Autoscaling ceiling.")
    target_ongoing_requests: float = Field(4, gt=0, description="Autoscaler target of in-flight requests per replica.")
    max_ongoing_requests: int = Field(
        64, gt=0, description="In-flight requests a replica accepts; must exceed max_batch_size or batching starves."
    )
    max_batch_size: int = Field(32, gt=0, description="Dynamic batching: most requests run together.")
    batch_wait_ms: float = Field(5, ge=0, description="Dynamic batching: longest wait for a batch to fill.")
    num_cpus: float = Field(1, gt=0, description="CPUs each replica reserves; torch uses as many threads.")
    num_gpus: float = Field(0, ge=0, description="GPUs each replica reserves.")
