"""DeepSpeed ZeRO inside 2 Ray Train workers: every rank writes its own shard, a resumed run retraces the
uninterrupted one step for step, a run saved by 2 workers continues on 1, and the export (consolidated
from the partitions) reloads with the metric the run reported; a LoRA adapter trained under ZeRO-3
exports non-empty."""

from __future__ import annotations

import json

import pytest
import torch

from tests.integration.scale_jobs import JOB_NAME, TOTAL_STEPS, final_eval, fit, job_data, losses, records
from training.run import complete_checkpoints

pytestmark = pytest.mark.integration


def _shard_files(stage: int, rank: int) -> list[str]:
    files = [f"zero/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", f"rank_{rank:05d}/trainer_state.pt"]
    if stage == 3:  # ZeRO-3 partitions the weights too: each rank writes its own model states
        files.append(f"zero/zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
    return files


@pytest.fixture(scope="module")
def zero_runs(local_ray, deepspeed_ops, tiny_text_model, sentiment_tsv, tmp_path_factory):
    """stage -> run directory: trained to step 20, then resumed (same run id) to step 40."""
    runs = {}

    def run(stage: int):
        if stage not in runs:
            storage = tmp_path_factory.mktemp(f"zero{stage}")
            data = job_data(tiny_text_model, *sentiment_tsv, storage, **{"scale.deepspeed": {"stage": stage}})
            fit({**data, "train": {**data["train"], "max_steps": 20}}, "r")
            run_dir = storage / JOB_NAME / "r"
            runs[stage] = (run_dir, data, [m for _, m in complete_checkpoints(run_dir / "checkpoints")])
            fit(data, "r")
        return runs[stage]

    return run


# Stage 2 is in the slow run only (its ~80 s is the suite's largest overlap): stage 2 partitions what stage 1
# does (the optimizer state, with the same DeepSpeed optimizer class and checkpoint files), and stage 1 writes,
# loses and resumes from its partitions in test_fault_tolerance; stage 3, which also partitions the weights,
# retraces here in the default run.
@pytest.mark.parametrize("stage", [pytest.param(2, marks=pytest.mark.slow), 3])
def test_zero_resume_retraces_the_uninterrupted_run(stage, zero_runs, reference):
    run_dir, _, first_manifests = zero_runs(stage)
    assert [m["step"] for m in first_manifests] == [20]
    for rank in (0, 1):  # each rank's own ZeRO partition is in the checkpoint, listed with its size
        for name in _shard_files(stage, rank):
            assert first_manifests[0]["files"].get(name, 0) > 0, name
    assert first_manifests[0]["weights"] == "zero" and first_manifests[0]["deepspeed"] == {"stage": stage}

    metrics = records(run_dir / "metrics.jsonl")
    resumes = [r for r in metrics if r["event"] == "resume"]
    assert [(r["step"], r["optimizer"], r["world_size"]) for r in resumes] == [(20, "restored", 2)]
    assert metrics[-1]["event"] == "end" and metrics[-1]["step"] == TOTAL_STEPS
    # Weights, AdamW moments, schedule, RNG and data position all came back: the curve is the same curve.
    ours, theirs = losses(metrics), losses(reference)
    assert sorted(ours) == sorted(theirs)
    for step in sorted(theirs):
        assert ours[step] == pytest.approx(theirs[step], rel=1e-4, abs=1e-5), f"step {step}"
    assert final_eval(metrics)["eval_loss"] == pytest.approx(final_eval(reference)["eval_loss"], rel=1e-3)
    assert final_eval(metrics)["accuracy"] == final_eval(reference)["accuracy"] == 1.0

    # The export is consolidated from both ranks' partitions and classifies as the run said it would.
    from transformers import pipeline

    export = run_dir / "export"
    assert (export / "model.safetensors").is_file() and not list(export.glob("*.pt"))
    classify = pipeline("text-classification", model=str(export))
    assert classify("the movie was wonderful")[0]["label"] == "positive"
    assert classify("the movie was terrible")[0]["label"] == "negative"


def test_zero3_run_continues_on_one_worker(zero_runs, tmp_path):
    """Saved by 2 workers, resumed by 1: fp32 weights consolidated exactly, schedule continues,
    AdamW moments restart. A model that lost its weights would be back at chance after 10 steps."""
    run_dir, data, _ = zero_runs(3)
    one = {**data, "scale": {**data["scale"], "workers": 1, "cpus_per_worker": 2},
           "train": {**data["train"], "max_steps": TOTAL_STEPS + 10, "eval_every_steps": 10}}
    fit(one, "r")
    metrics = records(run_dir / "metrics.jsonl")
    resume = [r for r in metrics if r["event"] == "resume"][-1]
    assert (resume["step"], resume["from_world_size"], resume["world_size"], resume["optimizer"]) == (TOTAL_STEPS, 2, 1, "reset")
    assert [r["world_size"] for r in metrics if r["event"] == "start"] == [2, 2, 1]
    after = final_eval(metrics)
    assert after["step"] == TOTAL_STEPS + 10
    assert after["accuracy"] == 1.0 and after["eval_loss"] < 0.2


def test_lora_under_zero3_exports_a_trained_adapter(local_ray, deepspeed_ops, tiny_text_model, sentiment_tsv, tmp_path):
    """The known failure elsewhere: ZeRO-3 adapters saved as empty tensors. Here the adapter is gathered
    from both partitions, non-empty, trained, and reloads to the validation loss the run reported."""
    from peft import AutoPeftModelForSequenceClassification
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    data = job_data(tiny_text_model, *sentiment_tsv, tmp_path, **{
        "scale.deepspeed": {"stage": 3}, "method": {"name": "lora", "r": 4}, "train.max_steps": 20,
        "train.eval_every_steps": 10, "train.learning_rate": 1.0e-2})
    result = fit(data, "lora")
    export = tmp_path / JOB_NAME / "lora" / "export"
    adapter = load_file(str(export / "adapter_model.safetensors"))
    assert adapter and all(t.numel() > 0 for t in adapter.values())
    assert any("lora_B" in name and t.abs().sum() > 0 for name, t in adapter.items()), "lora_B never trained"
    info = json.loads((export / "tunefleet.json").read_text())
    assert info["adapter"] and info["trainable_parameters"] > 0

    model = AutoPeftModelForSequenceClassification.from_pretrained(str(export), num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(export))
    rows = [line.split("\t") for line in sentiment_tsv[1].read_text().splitlines()[1:]]
    batch = tokenizer([text for text, _ in rows], padding=True, truncation=True, max_length=32, return_tensors="pt")
    gold = torch.tensor([info["labels"].index(label) for _, label in rows])
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, gold).item()
    assert loss == pytest.approx(result.metrics["eval_loss"], abs=2e-4)


class _RunsCode:
    """What a tampered checkpoint file could hold: unpickling it calls a function of its choosing."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def test_a_tampered_zero_file_is_refused_before_anything_unpickles_it(zero_runs, tmp_path):
    """DeepSpeed asks for torch's full unpickler; tunefleet checks its files first and forces its loads
    weights-only, so a checkpoint on shared storage cannot run code in a worker or in the export."""
    import pickle
    import shutil

    from training import deepspeed_engine
    from training.checkpoint import load_model_weights

    run_dir, _, _ = zero_runs(3)  # the default run's ZeRO run (stage 2's is in the slow run)
    saved = complete_checkpoints(run_dir / "checkpoints")[0][0].local_path
    deepspeed_engine.check_pickles(saved)  # DeepSpeed's own files pass as they are

    copy = tmp_path / "checkpoint"
    shutil.copytree(saved, copy)
    target = sorted((copy / "zero").glob("*optim_states.pt"))[0]
    marker = tmp_path / "ran"
    torch.save({"optimizer_state_dict": _RunsCode(marker)}, target)
    manifest = json.loads((copy / "manifest.json").read_text())  # tampered consistently: sizes match
    manifest["files"][f"zero/{target.name}"] = target.stat().st_size
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"{target.name}: refusing to unpickle posix\.mkdir"):
        load_model_weights(copy, torch.nn.Linear(1, 1))
    # Past the check, DeepSpeed's own loads are weights-only whatever they ask for.
    with deepspeed_engine._weights_only_loads(), pytest.raises(pickle.UnpicklingError, match="posix.mkdir"):
        torch.load(target, weights_only=False)
    target.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=rf"{target.name}: not a readable DeepSpeed checkpoint file"):
        deepspeed_engine.check_pickles(copy)
    assert not marker.exists()
