"""`tunefleet k8s render`: KubeRay manifests for one job file, so the job file stays the one source of truth.

    <name>-rayjob.yaml       ConfigMap (the job file) + RayJob: `tunefleet train` on its own Ray cluster
    <name>-rayservice.yaml   RayService: the run's export behind Ray Serve, upgraded without downtime

Only where storage and the image live differ from a local run: the job's storage goes to the
shared volume (or stays an s3:// / gs:// URI), the image is given. Worker count, GPUs and
CPUs come from `scale:`, replicas and batching from `serve:`. A retried RayJob runs the same
run id, so it resumes from the last checkpoint; rendering the RayService again for a newer
run id and applying it swaps the model in place (Serve replaces replicas one by one; with
`serve.min_replicas` >= 2 requests keep flowing), and an image change brings up a new
cluster before the old one goes (upgradeStrategy NewCluster).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster.cluster_job import ClusterJob, dns_label
from cluster.k8s_pods import NodeShape, Storage, cluster_spec, head_group, labels, submitter_pod, worker_group

JOB_MOUNT = "/etc/tunefleet"  # the ConfigMap's job.yaml, mounted read-only on the head (where the driver runs)
SERVE_PORT = 8000
# Ray Serve application builders for `serve deploy` / RayService (`import_path` + `args`).
ROOT_APP_IMPORT = "serving.deploy:root_app"  # args: {models: [{name, export}]}
MODEL_APP_IMPORT = "serving.deploy:model_app"  # args: {name, export, serve: <the job's serve section>}


@dataclass(frozen=True)
class RenderOptions:
    image: str
    run_id: str
    storage: Storage = Storage()
    namespace: str | None = None
    gpu: bool | None = None  # None: from scale.use_gpu (auto counts as yes: Kubernetes schedules GPUs explicitly)
    worker_cpus: str | None = None
    worker_memory: str | None = None


def storage_for_cluster(job: ClusterJob, storage: Storage) -> tuple[ClusterJob, list[str]]:
    """The job with output.storage on the shared volume, unless it already names a URI or that volume."""
    current = job.spec.output.storage
    if "://" in current or current.startswith(storage.mount_path.rstrip("/") + "/"):
        return job, []
    target = f"{storage.mount_path.rstrip('/')}/runs"
    data = {**job.data, "output": {**job.data.get("output", {}), "storage": target}}
    spec = job.spec.model_copy(update={"output": job.spec.output.model_copy(update={"storage": target})})
    notes = [n for n in job.notes if not n.startswith("output.storage:")]
    return ClusterJob(spec=spec, data=data, notes=notes), [f"output.storage: {current!r} is not on the cluster's "
                                                           f"shared volume; runs go to {target}"]


def _metadata(name: str, component: str, options: RenderOptions) -> dict[str, Any]:
    meta = {"name": name, "labels": labels(component)}
    if options.namespace:
        meta["namespace"] = options.namespace
    return meta


def _worker_shape(job: ClusterJob, options: RenderOptions) -> NodeShape:
    gpu = options.gpu if options.gpu is not None else job.spec.scale.use_gpu is not False
    cpus = options.worker_cpus or str(math.ceil(job.spec.scale.cpus_per_worker or (8 if gpu else 2)))
    return NodeShape(cpus=cpus, memory=options.worker_memory or ("64Gi" if gpu else "8Gi"), gpus=1 if gpu else 0)


def render_training(job: ClusterJob, options: RenderOptions) -> list[dict[str, Any]]:
    """ConfigMap with the job file, and a RayJob that trains it on a cluster of `scale.workers` workers."""
    base = dns_label(job.spec.name, 40)
    name = dns_label(f"{base}-{options.run_id}", 47)  # KubeRay derives longer names from a RayJob's
    config_name = dns_label(f"{name}-job", 63)
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(config_name, "training", options),
                  "data": {"job.yaml": job.yaml()}}
    mount = {"extra_mounts": [{"name": "job", "mountPath": JOB_MOUNT, "readOnly": True}],
             "extra_volumes": [{"name": "job", "configMap": {"name": config_name}}]}
    workers = job.spec.scale.workers
    shape = _worker_shape(job, options)
    ray_job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(name, "training", options),
        "spec": {
            "entrypoint": f"python -m cluster.cli train {JOB_MOUNT}/job.yaml --run-id {options.run_id} --address auto",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 3600,
            # A retry is a new cluster running the same run id: it resumes from the last checkpoint.
            "backoffLimit": 2,
            "submitterPodTemplate": submitter_pod(options.image, "training"),
            "rayClusterSpec": cluster_spec(
                head_group(options.image, "training", options.storage, **mount),
                [worker_group("gpu" if shape.gpus else "cpu", options.image, "training", shape, options.storage,
                              replicas=workers, min_replicas=workers, max_replicas=workers)],
                autoscaling=False,
            ),
        },
    }
    return [config_map, ray_job]


def serve_config(job: ClusterJob, run_id: str) -> dict[str, Any]:
    """A standard Ray Serve config (what `serve deploy` takes): the root app and the model's app."""
    name = job.spec.name
    export = f"{job.run_dir(run_id)}/export"
    return {
        # 0.0.0.0 inside the pod: the serve Service and the NetworkPolicy decide who reaches it.
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": [
            {"name": "_root", "route_prefix": "/", "import_path": ROOT_APP_IMPORT,
             "args": {"models": [{"name": name, "export": export}]}},
            {"name": name, "route_prefix": f"/v1/models/{name}", "import_path": MODEL_APP_IMPORT,
             "args": {"name": name, "export": export, "serve": job.spec.serve.model_dump(mode="json")}},
        ],
    }


def render_serving(job: ClusterJob, options: RenderOptions) -> dict[str, Any]:
    """A RayService serving the run's export; one Serve replica per worker pod, autoscaled by `serve:`."""
    serve = job.spec.serve
    shape = NodeShape(cpus=str(math.ceil(serve.num_cpus) + 1), memory=options.worker_memory or "8Gi",
                      gpus=math.ceil(serve.num_gpus))
    read_only = Storage(options.storage.claim, options.storage.mount_path, read_only=True)
    minimum = max(1, serve.min_replicas)
    workers = worker_group("serve", options.image, "serving", shape, read_only, replicas=minimum,
                           min_replicas=minimum, max_replicas=max(minimum, serve.max_replicas), serve_probe=True)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _metadata(dns_label(job.spec.name, 40), "serving", options),
        "spec": {
            "upgradeStrategy": {"type": "NewCluster"},
            "excludeHeadPodFromServeSvc": True,
            "serveConfigV2": yaml.safe_dump(serve_config(job, options.run_id), sort_keys=False),
            "rayClusterConfig": cluster_spec(head_group(options.image, "serving", read_only), [workers], autoscaling=True),
        },
    }


def write_manifests(job: ClusterJob, options: RenderOptions, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    base = dns_label(job.spec.name, 40)
    training = out_dir / f"{base}-rayjob.yaml"
    serving = out_dir / f"{base}-rayservice.yaml"
    training.write_text(dump_yaml(*render_training(job, options)))
    serving.write_text(dump_yaml(render_serving(job, options)))
    return [training, serving]


class _Dumper(yaml.SafeDumper):
    pass


def _text(dumper: yaml.SafeDumper, value: str):
    # Multi-line strings (the job file, the Serve config) as readable `|` blocks.
    style = "|" if "\n" in value and not any(line != line.rstrip() for line in value.splitlines()) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def dump_yaml(*documents: dict[str, Any]) -> str:
    return yaml.dump_all(documents, Dumper=_Dumper, sort_keys=False, width=120)
