"""What Ray Train runs in each worker, kept light to import.

Ray Train's controller deserializes the training function and its config before it starts any
worker. Handing it `training.loop.train_loop_per_worker` with the spec and the data made the
controller import the whole stack (torch, transformers, peft, sklearn: several seconds on the
path to the first step) only to pass them on. It gets this function and an object reference
instead; each worker imports the loop and resolves the reference itself.
"""

from __future__ import annotations

from typing import Any


def train_worker(config: dict[str, Any]) -> None:
    import ray

    from training.loop import train_loop_per_worker

    train_loop_per_worker(ray.get(config["payload"]))
