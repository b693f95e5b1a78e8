"""Every manifest in k8s/, every overlay as kustomize builds it, and every rendered manifest validate against
the KubeRay v1.7.0 CRD schemas (strict: a misspelt key fails) and the upstream Kubernetes schemas."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from manifest_checks import CRDS, K8S, KUBERAY_KINDS, build, errors, load_manifests, pod_templates

pytest.importorskip("kubernetes_validate")

MANIFEST_FILES = sorted(p for p in K8S.rglob("*.yaml") if load_manifests(p))
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))


def _needs_crds(docs: list[dict]) -> None:
    if any(d["kind"] in KUBERAY_KINDS for d in docs) and not CRDS.is_dir():
        pytest.skip(f"{CRDS} not present (../shared/kuberay is only beside a checkout)")


def _assert_valid(docs: list[dict], source: str) -> None:
    _needs_crds(docs)
    problems = [f"{d['kind']}/{d['metadata']['name']}: {e}" for d in docs for e in errors(d)]
    assert not problems, f"{source}:\n  " + "\n  ".join(problems)


def test_k8s_dir_has_the_pieces():
    kinds = {d["kind"] for p in MANIFEST_FILES for d in load_manifests(p)}
    assert {"RayCluster", "RayJob", "RayService", "PersistentVolumeClaim", "NetworkPolicy", "ConfigMap",
            "Secret", "Namespace"} <= kinds
    assert {p.name for p in OVERLAYS} == {"cpu-dev", "gpu-prod"}


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_file_is_valid(path: Path):
    _assert_valid(load_manifests(path), str(path))


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_overlay_builds_valid_and_secure(overlay: Path):
    resources = build(overlay)
    _assert_valid(resources, f"kustomize build {overlay}")
    namespace = yaml.safe_load((overlay / "kustomization.yaml").read_text())["namespace"]
    for resource in resources:
        if resource["kind"] != "Namespace":
            assert resource["metadata"]["namespace"] == namespace
        for where, template in pod_templates(resource) if resource["kind"] in KUBERAY_KINDS else []:
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, (resource["kind"], where)
            for container in pod["containers"]:
                security = container["securityContext"]
                assert security["allowPrivilegeEscalation"] is False and security["capabilities"]["drop"] == ["ALL"]
                assert security["readOnlyRootFilesystem"] is True, (resource["kind"], where)
                assert container["image"] != "tunefleet:0.1.0", "the overlay's image did not reach every pod"
                assert container["resources"]["requests"] and container["resources"]["limits"]


def _worker_pods(resources: list[dict]) -> list[dict]:
    return [t["spec"] for r in resources if r["kind"] in ("RayCluster", "RayJob")
            for where, t in pod_templates(r) if where.startswith("worker")]


def test_gpu_prod_schedules_on_gpus_and_cpu_dev_does_not():
    prod = build(K8S / "overlays" / "gpu-prod")
    for pod in _worker_pods(prod):
        assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    (cluster,) = [r for r in prod if r["kind"] == "RayCluster"]
    assert cluster["spec"]["enableInTreeAutoscaling"] and cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"] == 8
    (claim,) = [r for r in prod if r["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"] and claim["spec"]["storageClassName"]

    dev = build(K8S / "overlays" / "cpu-dev")
    for pod in _worker_pods(dev):
        assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
        assert "tolerations" not in pod and "nodeSelector" not in pod


def _render(tmp_path: Path, job: dict, *args: str) -> list[dict]:
    from cluster.cli import main

    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    out = tmp_path / "out"
    assert main(["k8s", "render", str(path), "--out", str(out), "--run-id", "r7", *args]) == 0
    return [d for p in sorted(out.glob("*.yaml")) for d in load_manifests(p)]


JOB = {"name": "Tiny_Sentiment", "task": "text-classification", "model": "/mnt/tunefleet/models/tiny-bert",
       "data": {"train": "/mnt/tunefleet/data/train.tsv", "validation": "/mnt/tunefleet/data/dev.tsv",
                "columns": {"text": "sentence", "label": "label"}},
       "scale": {"workers": 3, "use_gpu": True}, "serve": {"min_replicas": 2, "max_replicas": 5}}


def test_rendered_manifests_are_valid_and_carry_the_job(tmp_path, capsys):
    docs = _render(tmp_path, JOB, "--image", "registry.example.com/tunefleet:1.2", "--namespace", "ml")
    _assert_valid(docs, "tunefleet k8s render")
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"ConfigMap", "RayJob", "RayService"}
    assert all(d["metadata"]["namespace"] == "ml" for d in docs)
    assert "not on this machine; it must exist on the cluster" in capsys.readouterr().err

    # The ConfigMap holds the job as written, with storage moved to the shared volume; it validates as a job.
    from cluster.spec import JobSpec

    shipped = JobSpec.model_validate(yaml.safe_load(by_kind["ConfigMap"]["data"]["job.yaml"]))
    assert shipped.output.storage == "/mnt/tunefleet/runs" and shipped.data.train == JOB["data"]["train"]

    job = by_kind["RayJob"]
    assert job["metadata"]["name"] == "tiny-sentiment-r7"
    assert job["spec"]["entrypoint"] == "python -m cluster.cli train /etc/tunefleet/job.yaml --run-id r7 --address auto"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "job", "configMap": {"name": by_kind["ConfigMap"]["metadata"]["name"]}} in head["volumes"]
    (workers,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == 3 and workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1

    service = by_kind["RayService"]
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    model_app = config["applications"][1]
    assert model_app["args"]["export"] == "/mnt/tunefleet/runs/Tiny_Sentiment/r7/export"
    assert model_app["route_prefix"] == "/v1/models/Tiny_Sentiment"
    (serve_workers,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert (serve_workers["minReplicas"], serve_workers["maxReplicas"]) == (2, 5)
    assert service["spec"]["upgradeStrategy"]["type"] == "NewCluster"


def test_render_keeps_s3_storage_and_cpu_workers(tmp_path):
    job = {**JOB, "output": {"storage": "s3://bucket/runs"}}
    docs = _render(tmp_path, job, "--cpu")
    _assert_valid(docs, "tunefleet k8s render --cpu")
    by_kind = {d["kind"]: d for d in docs}
    assert "s3://bucket/runs" in by_kind["ConfigMap"]["data"]["job.yaml"]
    (workers,) = by_kind["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert "nvidia.com/gpu" not in workers["template"]["spec"]["containers"][0]["resources"]["limits"]


def _base(kind: str) -> dict:
    docs = [d for p in MANIFEST_FILES for d in load_manifests(p) if d["kind"] == kind and "base" in p.parts]
    return copy.deepcopy(docs[0])


def _break(kind: str, change) -> dict:
    doc = _base(kind)
    change(doc)
    return doc


def _worker(doc: dict) -> dict:
    return doc["spec"]["workerGroupSpecs"][0]


BROKEN = {
    "misspelt RayCluster key": (lambda: _break("RayCluster", lambda d: _worker(d).update(maxReplica=_worker(d).pop("maxReplicas"))),
                                "'maxReplica' was unexpected"),
    "wrong type for replicas": (lambda: _break("RayCluster", lambda d: _worker(d).update(replicas="two")),
                                "'two' is not of type 'integer'"),
    "misspelt key in a pod template": (lambda: _break("RayJob", lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagePulPolicy="Always")),
                                       "'imagePulPolicy' was unexpected"),
    "misspelt RayService field": (lambda: _break("RayService", lambda d: d["spec"].update(serveConfig=d["spec"].pop("serveConfigV2"))),
                                  "'serveConfig' was unexpected"),
    "bad resource quantity": (lambda: _break("RayCluster", lambda d: _worker(d)["template"]["spec"]["containers"][0]["resources"]["limits"].update(memory="lots")),
                              "does not match"),
    "misspelt NetworkPolicy key": (lambda: _break("NetworkPolicy", lambda d: d["spec"].update(podSelectr=d["spec"].pop("podSelector"))),
                                   "'podSelectr' was unexpected"),
    "wrong type in a claim": (lambda: _break("PersistentVolumeClaim", lambda d: d["spec"].update(accessModes="ReadWriteMany")),
                              "is not of type 'array'"),
    "wrong apiVersion": (lambda: _break("RayJob", lambda d: d.update(apiVersion="ray.io/v2")), "expected ray.io/v1"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_manifests_are_caught(case):
    make, expected = BROKEN[case]
    doc = make()
    _needs_crds([doc])
    problems = errors(doc)
    assert any(expected in p for p in problems), problems


def test_dockerfile_matches_the_pods():
    """No container engine runs here: the image recipe is checked by reading it against what the pods assume."""
    import re

    from cluster.k8s_pods import CACHE_DIR, USER_ID
    from manifest_checks import REPO

    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(rf"^USER {USER_ID}:{USER_ID}$", dockerfile, re.M), "pods run as uid/gid 1000"
    assert f"useradd --uid {USER_ID} --gid {USER_ID}" in dockerfile
    assert "HOME=/home/tunefleet" in dockerfile and CACHE_DIR.startswith("/home/tunefleet/")
    assert "pip install ." in dockerfile  # pyproject's pinned dependencies, not a hand-kept list
    import torch

    cuda = re.search(r"nvidia/cuda:(\d+\.\d+)\.\d+-", dockerfile).group(1)
    if torch.version.cuda:  # the CUDA toolkit DeepSpeed compiles with matches torch's
        assert cuda == torch.version.cuda, (cuda, torch.version.cuda)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert "*" in ignored and {"!cluster/", "!training/", "!serving/", "!pyproject.toml"} <= set(ignored)
