"""train.optimizer: torch AdamW or bitsandbytes' 8-bit / paged AdamW; what each device can run, checked at
validation when the job says which device, and at worker start when it does not (use_gpu: auto)."""

from __future__ import annotations

import pytest
import torch

from cluster.spec import JobSpecError, validate_job
from training.optim import build_optimizer, parameter_groups


def _job(tmp_path, train: dict, scale: dict) -> dict:
    data = tmp_path / "data.tsv"
    data.write_text("sentence\tlabel\ngood film\tpos\nbad film\tneg\n")
    return {"name": "opt", "task": "text-classification", "model": str(tmp_path),
            "data": {"train": str(data), "columns": {"text": "sentence"}}, "train": train, "scale": scale,
            "output": {"storage": str(tmp_path)}}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 2))


def _train(optimizer, model, steps: int = 30) -> list[float]:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(64, 64, generator=generator)
    targets = (inputs[:, 0] > 0).long()
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_paged_optimizers_are_refused_where_the_job_has_no_gpu(tmp_path):
    with pytest.raises(JobSpecError) as err:
        validate_job(_job(tmp_path, {"optimizer": "paged-adamw-8bit"}, {"use_gpu": False}), check_data=False)
    assert "train.optimizer: paged-adamw-8bit needs a GPU" in str(err.value)
    assert "use adamw-8bit" in str(err.value)
    with pytest.raises(JobSpecError) as err:
        validate_job(_job(tmp_path, {"optimizer": "adamw-8bit"}, {"deepspeed": {"stage": 2}}), check_data=False)
    assert "train.optimizer: bitsandbytes optimizers are not used under scale.deepspeed" in str(err.value)
    # auto: the worker decides; CPU-only: 8-bit runs on the CPU too.
    assert validate_job(_job(tmp_path, {"optimizer": "paged-adamw"}, {}), check_data=False).train.optimizer == "paged-adamw"
    assert validate_job(_job(tmp_path, {"optimizer": "adamw-8bit"}, {"use_gpu": False}), check_data=False)


def test_8bit_adamw_trains_on_the_cpu_with_8bit_state():
    model = _model()
    optimizer, name = build_optimizer("adamw-8bit", parameter_groups(model, 1e-2, 0.0), 1e-2, torch.device("cpu"))
    losses = _train(optimizer, model)
    assert name == "adamw-8bit" and losses[-1] < 0.5 * losses[0]
    # Tensors of 4,096 elements or more keep their moments in 8 bits (bitsandbytes' min_8bit_size).
    assert optimizer.state[model[0].weight]["state1"].dtype == torch.uint8
    # ... and follow torch's AdamW closely.
    reference = _model()
    torch_losses = _train(torch.optim.AdamW(parameter_groups(reference, 1e-2, 0.0), lr=1e-2), reference)
    assert abs(losses[-1] - torch_losses[-1]) < 0.05


def test_paged_optimizer_on_a_cpu_worker_falls_back_with_a_warning(capsys):
    model = _model()
    optimizer, name = build_optimizer("paged-adamw-8bit", parameter_groups(model, 1e-2, 0.0), 1e-2, torch.device("cpu"))
    assert name == "adamw-8bit" and not getattr(optimizer, "is_paged", False)
    assert "paged-adamw-8bit needs a GPU" in capsys.readouterr().out
    optimizer, name = build_optimizer("paged-adamw", parameter_groups(model, 1e-2, 0.0), 1e-2, torch.device("cpu"))
    assert name == "adamw" and type(optimizer) is torch.optim.AdamW


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_paged_8bit_adamw_trains_on_cuda():
    model = _model().cuda()
    optimizer, name = build_optimizer("paged-adamw-8bit", parameter_groups(model, 1e-2, 0.0), 1e-2, torch.device("cuda"))
    assert name == "paged-adamw-8bit" and optimizer.is_paged
    inputs = torch.randn(64, 64, device="cuda")
    targets = (inputs[:, 0] > 0).long()
    first = None
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("name", ["linear", "cosine", "constant"])
@pytest.mark.parametrize("warmup,total", [(0, 10), (3, 20), (6, 100)])
def test_lr_schedule_matches_transformers_at_every_step(name: str, warmup: int, total: int) -> None:
    from transformers import get_scheduler

    from training.optim import lr_schedule

    def rates(make) -> list[float]:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        scheduler = make(optimizer)
        seen = []
        for _ in range(total + 2):
            seen.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return seen

    ours = rates(lambda o: lr_schedule(name, o, warmup, total))
    theirs = rates(lambda o: get_scheduler(name, o, num_warmup_steps=warmup, num_training_steps=total))
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_lr_schedule_state_resumes_across_implementations() -> None:
    """A checkpoint's scheduler state (LambdaLR) loads into either implementation at the same step."""
    from transformers import get_scheduler

    from training.optim import lr_schedule

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    old = get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=10)
    for _ in range(4):
        optimizer.step()
        old.step()
    fresh = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    new = lr_schedule("linear", fresh, 2, 10)
    new.load_state_dict(old.state_dict())
    fresh.load_state_dict(optimizer.state_dict())
    assert new.last_epoch == 4 and new.get_last_lr() == pytest.approx(old.get_last_lr())
    fresh.step()
    new.step()
    assert fresh.param_groups[0]["lr"] == pytest.approx(1e-3 * (10 - 5) / (10 - 2))  # step 5 of 10, warmup 2
