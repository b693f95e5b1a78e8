"""`tunefleet k8s render`: KubeRay manifests (RayJob, RayService) for a job file."""

from __future__ import annotations

import sys
from pathlib import Path


def register(commands) -> None:
    k8s = commands.add_parser("k8s", help="KubeRay manifests for a job file")
    actions = k8s.add_subparsers(dest="action", required=True)
    render = actions.add_parser("render", help="write <name>-rayjob.yaml (ConfigMap + RayJob) and <name>-rayservice.yaml")
    render.add_argument("job", help="job file (YAML); its paths must be valid inside the pods")
    render.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a job-file value (YAML syntax)")
    render.add_argument("--image", default="tunefleet:0.1.0", help="container image with tunefleet installed")
    render.add_argument("--out", type=Path, default=Path("k8s-out"), help="output directory (default: ./k8s-out)")
    render.add_argument("--run-id", help="run id the RayJob trains and the RayService serves (default: a timestamp)")
    render.add_argument("--namespace", help="metadata.namespace of every resource (default: none, kubectl's)")
    render.add_argument("--pvc", default="tunefleet-storage", help="shared ReadWriteMany claim (default: tunefleet-storage)")
    render.add_argument("--mount-path", default="/mnt/tunefleet", help="where pods mount it (default: /mnt/tunefleet)")
    gpu = render.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", dest="gpu", action="store_true", default=None, help="GPU workers (default: scale.use_gpu)")
    gpu.add_argument("--cpu", dest="gpu", action="store_false", help="CPU-only workers")
    render.add_argument("--worker-cpus", help="CPUs per worker pod (default: scale.cpus_per_worker, else 8 GPU / 2 CPU)")
    render.add_argument("--worker-memory", help="memory per worker pod (default: 64Gi GPU / 8Gi CPU)")
    render.set_defaults(handler=_render)


def _render(args) -> int:
    from cluster.cluster_job import prepare_cluster_job
    from cluster.k8s import RenderOptions, storage_for_cluster, write_manifests
    from cluster.k8s_pods import Storage
    from training.run import new_run_id

    storage = Storage(claim=args.pvc, mount_path=args.mount_path)
    # The job's paths name files inside the pods: everything but their existence is checked here.
    job = prepare_cluster_job(args.job, args.overrides, cluster_paths=True)
    job, storage_notes = storage_for_cluster(job, storage)
    options = RenderOptions(image=args.image, run_id=args.run_id or new_run_id(), storage=storage,
                            namespace=args.namespace, gpu=args.gpu, worker_cpus=args.worker_cpus,
                            worker_memory=args.worker_memory)
    if job.spec.serve.min_replicas < 2:
        storage_notes.append(f"serve.min_replicas is {job.spec.serve.min_replicas}: swapping in a new model leaves a "
                             "gap without a second replica; set serve.min_replicas: 2 for zero-downtime upgrades")
    for note in [*job.notes, *storage_notes]:
        print(f"note: {note}", file=sys.stderr)
    for path in write_manifests(job, options, args.out):
        print(path)
    print(f"run directory in the pods: {job.run_dir(options.run_id)}", file=sys.stderr)
    return 0
