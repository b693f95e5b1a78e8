"""Per-model serving settings: replicas, autoscaling, batching, resources, limits.

The job file's `serve:` section is this model, so a job and a serve file share
one definition (cluster imports it; serving never imports cluster).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

_ORIGIN = re.compile(r"^https?://[^/\s]+$")  # what a browser sends in Origin


class ServeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_replicas: int = Field(1, ge=0, description="Replicas kept even when idle.")
    max_replicas: int = Field(2, ge=1, description="Autoscaling ceiling.")
    target_ongoing_requests: float = Field(4, gt=0, description="Autoscaler target of in-flight requests per replica.")
    max_ongoing_requests: int = Field(
        64, gt=0, description="In-flight requests a replica accepts; must exceed max_batch_size or batching starves."
    )
    max_batch_size: int = Field(32, gt=0, description="Dynamic batching: most sequences run together.")
    batch_wait_ms: float = Field(5, ge=0, description="Dynamic batching: longest wait for a batch to fill.")
    num_cpus: float = Field(1, gt=0, description="CPUs each replica reserves; torch uses as many threads.")
    num_gpus: float = Field(0, ge=0, description="GPUs each replica reserves.")
    dtype: Literal["auto", "float32", "bfloat16", "float16", "int8"] = Field(
        "auto", description="The model's dtype on each replica. auto: bfloat16 where the hardware multiplies it "
        "natively (CUDA GPUs that support it; CPUs with AVX512-BF16 or AMX: ~3x the float32 throughput there), "
        "else float32; image classification stays float32 under auto. int8 (never picked by auto): int8 weights in "
        "every Linear layer (torch's dynamic quantization, CPU only): ~1.4x float32's throughput on an AVX2 CPU, "
        "but labels can differ from float32's and with the batch a text shares (docs/serving.md#precision). "
        "float32 gives the training run's exact scores."
    )
    upscale_delay_s: float = Field(
        10, ge=0, description="Load must stay above target this long before a replica is added (Serve's default 30 s reacts late)."
    )
    downscale_delay_s: float = Field(
        300, ge=0, description="Load must stay below target this long before a replica is removed (avoids flapping)."
    )
    graceful_shutdown_timeout_s: float = Field(
        30, ge=0, description="A stopping replica waits this long for in-flight requests before it is killed."
    )
    health_check_period_s: float = Field(
        2, gt=0, description="How often Serve checks each replica: a crashed replica is noticed, and replaced, "
        "within this long (Serve's default, 10 s, leaves a dead replica's share of capacity missing longer)."
    )
    max_inputs_per_request: int = Field(
        256, gt=0, description="More inputs in one request answer 413; bounds one request's share of a replica."
    )
    max_input_chars: int = Field(
        100_000, gt=0, description="A longer text answers 413; tokens past max_length are truncated anyway."
    )
    max_image_bytes: int = Field(
        10 * 1024 * 1024, gt=0, description="Image classification: a larger image file (decoded from base64 or uploaded) answers 413."
    )

    # Backpressure, limits, auth, CORS and logs: serving/middleware.py applies them to every route.
    max_queued_requests: int = Field(
        128, ge=0, description="Requests a replica holds waiting once max_ongoing_requests run; "
        "more answer 503 with Retry-After (a bounded queue sheds load instead of timing out)."
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After (seconds) sent with a 503 from a full replica.")
    request_timeout_s: float | None = Field(
        60, gt=0, description="A request not answered within this long (body upload and queueing included) "
        "answers 504; null: no limit."
    )
    max_body_bytes: int = Field(
        16 * 1024 * 1024, gt=0, description="A larger request body answers 413 before it is parsed "
        "(from Content-Length, or counted as it arrives); room for one max_image_bytes image in base64."
    )
    auth_token_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Name of an environment variable (in the "
        "replicas' environment) holding the bearer token every request but /healthz must send; null: no auth."
    )
    auth_token_file: str | None = Field(
        None, min_length=1, description="A file holding the bearer token (a mounted Kubernetes secret); "
        "re-read when it changes, so a rotated secret applies without a redeploy."
    )
    cors_origins: tuple[str, ...] = Field(
        (), description='Origins browsers may call from, e.g. ["https://app.example.com"] or ["*"]; empty: CORS off.'
    )
    register_with: str | None = Field(
        None, pattern=r"^https?://", description="`tunefleet train`: once the export is written, register it with "
        "this running endpoint (its URL), as `tunefleet serve add` does; null: don't."
    )
    register_token_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="With register_with: the environment variable "
        "holding the endpoint's bearer token, if it has auth."
    )
    access_log: bool = Field(
        True, description="One JSON line per request on the replica's stderr: method, path, model, status, "
        "latency, request id."
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> ServeSpec:
        problems = []
        if self.min_replicas > self.max_replicas:
            problems.append(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        if self.max_ongoing_requests <= self.max_batch_size:
            problems.append(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be > max_batch_size "
                f"({self.max_batch_size}), or a replica never holds enough requests to fill a batch"
            )
        if self.dtype == "float16" and self.num_gpus == 0:
            problems.append(
                "dtype (float16) with num_gpus 0: CPUs multiply float16 hundreds of times slower than float32; "
                "use bfloat16, float32 or auto"
            )
        if self.dtype == "int8" and self.num_gpus > 0:
            problems.append(
                f"dtype (int8) with num_gpus {self.num_gpus:g}: int8 is torch's dynamic quantization, which runs on "
                "CPUs only; on a GPU use bfloat16, float16 or auto"
            )
        if self.auth_token_env and self.auth_token_file:
            problems.append(
                f"auth_token_env ({self.auth_token_env}) and auth_token_file ({self.auth_token_file}): "
                "give one token source, not both"
            )
        if self.max_body_bytes < self.max_image_bytes:
            problems.append(
                f"max_body_bytes ({self.max_body_bytes}) must be >= max_image_bytes ({self.max_image_bytes}), "
                "or an image within the limit can never arrive"
            )
        problems += [
            f"cors_origins: {origin!r} must be '*' or scheme://host[:port] (no path)"
            for origin in self.cors_origins if origin != "*" and not _ORIGIN.match(origin)
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def torch_threads(self) -> int:
        """Threads for torch inside one replica: its reserved CPUs, at least one."""
        return max(1, int(self.num_cpus))
