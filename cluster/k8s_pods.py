"""Pod templates and Ray node groups for KubeRay resources, with tunefleet's pod security.

Every Ray container runs as the image's non-root user (uid 1000), without privilege
escalation or Linux capabilities, with a read-only root filesystem: Ray, Hugging Face
and torch write only to the emptyDir volumes mounted at /tmp, the user's cache and
/dev/shm (Ray's object store), and runs go to the shared volume or S3.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PART_OF = {"app.kubernetes.io/part-of": "tunefleet"}
USER_ID = 1000  # the Dockerfile's `tunefleet` user
CACHE_DIR = "/home/tunefleet/.cache"
RAY_VERSION = "2.60.0"
# Optional Secrets, picked up when they exist: S3 credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
# AWS_ENDPOINT_URL for S3-compatible stores) and a Hugging Face token (HF_TOKEN) for gated models.
OPTIONAL_SECRETS = ("tunefleet-s3", "tunefleet-hf")


@dataclass(frozen=True)
class NodeShape:
    cpus: str
    memory: str
    gpus: int = 0


@dataclass(frozen=True)
class Storage:
    claim: str = "tunefleet-storage"  # a ReadWriteMany PersistentVolumeClaim (k8s/base/storage.yaml)
    mount_path: str = "/mnt/tunefleet"
    read_only: bool = False


def labels(component: str) -> dict[str, str]:
    return {**PART_OF, "app.kubernetes.io/component": component}


def container_security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}}


def pod_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID, "fsGroup": USER_ID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _http_probe(path: str, port: int, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "initialDelaySeconds": 10, "periodSeconds": period,
            "timeoutSeconds": 5, "failureThreshold": failures}


def ray_pod(role: str, image: str, component: str, shape: NodeShape, storage: Storage | None,
            extra_mounts: list[dict] = (), extra_volumes: list[dict] = (), serve_probe: bool = False) -> dict[str, Any]:
    """A Ray head or worker pod template. Health endpoints answer without Ray's auth token."""
    resources = {"cpu": shape.cpus, "memory": shape.memory, **({"nvidia.com/gpu": shape.gpus} if shape.gpus else {})}
    if role == "head":
        ports = [{"containerPort": 6379, "name": "gcs-server"}, {"containerPort": 8265, "name": "dashboard"},
                 {"containerPort": 10001, "name": "client"}]
        probe_path, probe_port = "/api/gcs_healthz", 8265
    else:
        ports, probe_path, probe_port = [], "/api/local_raylet_healthz", 52365
    if serve_probe:
        ports.append({"containerPort": 8000, "name": "serve"})
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": CACHE_DIR},
              {"name": "dshm", "mountPath": "/dev/shm"}, *extra_mounts]
    volumes = [{"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}},
               {"name": "dshm", "emptyDir": {"medium": "Memory"}}, *extra_volumes]
    if storage is not None:
        mounts.append({"name": "storage", "mountPath": storage.mount_path, **({"readOnly": True} if storage.read_only else {})})
        volumes.append({"name": "storage", "persistentVolumeClaim": {"claimName": storage.claim}})
    container = {
        "name": f"ray-{role}",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "ports": ports,
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "env": [{"name": "TUNEFLEET_PROGRESS", "value": "lines"}],  # a line per logged step in pod logs
        "envFrom": [{"secretRef": {"name": name, "optional": True}} for name in OPTIONAL_SECRETS],
        "securityContext": container_security(),
        "readinessProbe": _http_probe("/-/healthz" if serve_probe else probe_path,
                                      8000 if serve_probe else probe_port, 5, 12),
        "livenessProbe": _http_probe(probe_path, probe_port, 10, 30),
        "volumeMounts": mounts,
    }
    if not ports:
        del container["ports"]
    spec: dict[str, Any] = {"securityContext": pod_security(), "containers": [container], "volumes": volumes}
    if shape.gpus:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        spec["nodeSelector"] = {"nvidia.com/gpu.present": "true"}
    return {"metadata": {"labels": labels(component)}, "spec": spec}


def head_group(image: str, component: str, storage: Storage | None, shape: NodeShape = NodeShape("2", "8Gi"),
               **pod: Any) -> dict[str, Any]:
    # num-cpus 0: no training or serving replica lands on the head; it runs Ray's control plane and the driver.
    return {"rayStartParams": {"num-cpus": "0"}, "template": ray_pod("head", image, component, shape, storage, **pod)}


def worker_group(name: str, image: str, component: str, shape: NodeShape, storage: Storage | None,
                 replicas: int, min_replicas: int, max_replicas: int, **pod: Any) -> dict[str, Any]:
    return {"groupName": name, "replicas": replicas, "minReplicas": min_replicas, "maxReplicas": max_replicas,
            "rayStartParams": {}, "template": ray_pod("worker", image, component, shape, storage, **pod)}


def cluster_spec(head: dict[str, Any], workers: list[dict[str, Any]], autoscaling: bool) -> dict[str, Any]:
    spec: dict[str, Any] = {"rayVersion": RAY_VERSION, "authOptions": {"mode": "token"}, "headGroupSpec": head,
                            "workerGroupSpecs": workers}
    if autoscaling:
        spec["enableInTreeAutoscaling"] = True
        spec["autoscalerOptions"] = {
            "upscalingMode": "Default", "idleTimeoutSeconds": 300,
            "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}},
            # The autoscaler writes its logs beside Ray's; its root filesystem stays writable.
            "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}},
        }
    return spec


def submitter_pod(image: str, component: str) -> dict[str, Any]:
    """The pod that runs `ray job submit` for a RayJob (KubeRay supplies its command)."""
    return {
        "metadata": {"labels": labels(component)},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": pod_security(),
            "containers": [{
                "name": "ray-job-submitter",
                "image": image,
                "resources": {"requests": {"cpu": "200m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
                "securityContext": container_security(),
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }
