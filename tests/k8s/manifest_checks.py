"""Offline manifest checks: KubeRay kinds against the v1.7.0 CRD schemas (made strict), built-in kinds
against the upstream Kubernetes schemas (kubernetes-validate), and the subset of kustomize that
k8s/ uses (resources, namespace, images, JSON 6902 patches) to build overlays.

No API server or kustomize binary runs here; this is a lint, stricter than the API server's pruning.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
CRDS = REPO.parent / "shared" / "kuberay" / "crds"
KUBERAY_KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
                 "RayService": "ray.io_rayservices.yaml"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding",
                  "CustomResourceDefinition", "PriorityClass"}
KUBERNETES_VERSION = "1.37.0"


# ---- validation -------------------------------------------------------------------------------
def strict(schema: Any) -> Any:
    """additionalProperties: false wherever a schema lists properties and does not keep unknown fields."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are large: libyaml is ~10x faster
    crd = yaml.load((CRDS / KUBERAY_KINDS[kind]).read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def _where(error: jsonschema.ValidationError) -> str:
    return "/".join(str(p) for p in error.absolute_path) or "(top)"


def builtin_errors(doc: dict[str, Any]) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        return [f"{'/'.join(str(p) for p in err.path) or '(top)'}: {err.message}"]
    except kubernetes_validate.SchemaNotFoundError as err:
        return [f"no upstream schema for {doc.get('apiVersion')} {doc.get('kind')}: {err}"]
    return []


def pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) of every pod a KubeRay resource creates."""
    spec = doc.get("spec", {})
    clusters = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}
    cluster = clusters.get(doc["kind"]) or {}
    if "headGroupSpec" in cluster:
        yield "head", cluster["headGroupSpec"].get("template", {})
    for group in cluster.get("workerGroupSpecs", []):
        yield f"worker group {group.get('groupName')}", group.get("template", {})
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in spec:
        yield "submitter", spec["submitterPodTemplate"]


def errors(doc: dict[str, Any]) -> list[str]:
    """Every schema problem in one manifest, each naming its path."""
    kind = doc.get("kind")
    if kind in KUBERAY_KINDS:
        found = []
        if doc.get("apiVersion") != "ray.io/v1":
            found.append(f"apiVersion: expected ray.io/v1 (got {doc.get('apiVersion')!r})")
        found += [f"{_where(e)}: {e.message}" for e in crd_validator(kind).iter_errors(doc)]
        # The pods it creates, against the upstream PodTemplate schema too.
        for where, template in pod_templates(doc):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
            found += [f"{where}: {problem}" for problem in builtin_errors(wrapped)]
        return found
    return builtin_errors(doc)


# ---- files and kustomize ---------------------------------------------------------------------------
def load_manifests(path: Path) -> list[dict[str, Any]]:
    """Kubernetes objects in a YAML file (skips kustomizations, kustomize configurations and patch lists)."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return [d for d in docs if isinstance(d, dict) and "apiVersion" in d and "kind" in d and d["kind"] != "Kustomization"]


_KNOWN_KEYS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}


def build(directory: Path) -> list[dict[str, Any]]:
    """`kustomize build` for the features k8s/ uses; anything else is an error, not silently ignored."""
    config = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(config) - _KNOWN_KEYS
    if unknown:
        raise ValueError(f"{directory}/kustomization.yaml: unsupported by this checker: {sorted(unknown)}")
    resources: list[dict[str, Any]] = []
    for entry in config.get("resources", []):
        path = directory / entry
        resources += build(path) if path.is_dir() else copy.deepcopy(load_manifests(path))
    for patch in config.get("patches", []):
        operations = yaml.safe_load((directory / patch["path"]).read_text())
        if not isinstance(operations, list):
            raise ValueError(f"{patch['path']}: only JSON 6902 patches (a list of operations) are supported")
        targets = [r for r in resources if _matches(r, patch.get("target", {}))]
        if not targets:
            raise ValueError(f"{patch['path']}: target {patch.get('target')} matches no resource")
        for resource in targets:
            apply_json_patch(resource, operations)
    for image in config.get("images", []):
        for resource in resources:
            _set_images(resource, image)
    if "namespace" in config:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource.setdefault("metadata", {})["namespace"] = config["namespace"]
    return resources


def _matches(resource: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = resource["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": resource["kind"], "name": resource["metadata"]["name"]}
    return all(wanted[key] == value for key, value in target.items())


def _set_images(node: Any, image: dict[str, str]) -> None:
    """As kustomize's images transformer: the image of every `containers` / `initContainers` entry, at any depth."""
    if isinstance(node, list):
        for item in node:
            _set_images(item, image)
        return
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key in ("containers", "initContainers") and isinstance(value, list):
            for container in value:
                name, _, tag = container.get("image", "").partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
        else:
            _set_images(value, image)


def _pointer(path: str) -> list[str]:
    return [part.replace("~1", "/").replace("~0", "~") for part in path.lstrip("/").split("/")]


def apply_json_patch(doc: dict[str, Any], operations: list[dict[str, Any]]) -> None:
    """RFC 6902 add / replace / remove (what the overlays use)."""
    for op in operations:
        *parents, last = _pointer(op["path"])
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            index = len(node) if last == "-" else int(last)
            if op["op"] == "add":
                node.insert(index, op["value"])
            elif op["op"] == "replace":
                node[index] = op["value"]
            elif op["op"] == "remove":
                del node[index]
            else:
                raise ValueError(f"unsupported patch op {op['op']}")
            continue
        if op["op"] in ("replace", "remove") and last not in node:
            raise ValueError(f"patch {op['op']} {op['path']}: no such field")
        if op["op"] in ("add", "replace"):
            node[last] = op["value"]
        elif op["op"] == "remove":
            del node[last]
        else:
            raise ValueError(f"unsupported patch op {op['op']}")
