"""On a Ray the command started, Ray Train runs without its cluster housekeeping (training/run.py)."""

from __future__ import annotations


def test_own_ray_trainer_drops_only_ray_trains_cluster_housekeeping(tmp_path) -> None:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from training.run import OwnRayTrainer

    def kwargs() -> dict:
        return dict(train_loop_per_worker=lambda: None, scaling_config=ScalingConfig(num_workers=1),
                    run_config=RunConfig(storage_path=str(tmp_path)))

    stock = [type(c).__name__ for c in TorchTrainer(**kwargs())._create_default_callbacks()]
    own = [type(c).__name__ for c in OwnRayTrainer(**kwargs())._create_default_callbacks()]
    # Fails when a Ray upgrade renames or drops these: look again at what OwnRayTrainer filters.
    assert set(stock) - set(own) == {"PlacementGroupCleanerCallback", "ControllerMetricsCallback",
                                     "WorkerMetricsCallback"}
    assert [name for name in stock if name in own] == own and "BackendSetupCallback" in own


def test_a_ray_started_by_this_process_is_told_from_one_it_joined(local_ray) -> None:
    import subprocess
    import sys
    from pathlib import Path

    import ray

    from training.run import _ray_started_here

    assert _ray_started_here()  # tests/conftest.py's local_ray: cluster.runtime's private Ray, started here
    address = ray.get_runtime_context().gcs_address
    code = (f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
            "from training.run import _ray_started_here; print(_ray_started_here())")
    joined = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[2])
    assert joined.stdout.strip().splitlines()[-1] == "False", joined.stderr[-2000:]
