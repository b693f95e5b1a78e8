"""A checkpoint counts only when its manifest lists every file at the size it was written; the newest
complete checkpoint is what a restart continues from."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from training.checkpoint import IncompleteCheckpointError, TrainState, newest_complete, read_manifest, save_shard
from training.loop import judge
from training.run import best_checkpoint, complete_checkpoints, incomplete_checkpoints


def _save(directory, step, accuracy=0.5):
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    save_shard(directory, 0, 1, model, optimizer, get_scheduler("constant", optimizer), TrainState(step=step),
               {"accuracy": accuracy}, extra={"labels": ["a", "b"]})


def test_manifest_lists_every_file_with_its_size(tmp_path):
    _save(tmp_path / "checkpoint_1", 3)
    manifest = read_manifest(tmp_path / "checkpoint_1")
    assert set(manifest["files"]) == {"rank_00000/model.safetensors", "rank_00000/optimizer.pt",
                                      "rank_00000/trainer_state.pt"}
    assert manifest["weights"] == "safetensors" and manifest["deepspeed"] is None


def test_cut_short_or_missing_files_make_a_checkpoint_incomplete(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4, 5):
        _save(checkpoints / f"checkpoint_{step}", step)
    optimizer = checkpoints / "checkpoint_3" / "rank_00000" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # an upload cut short
    (checkpoints / "checkpoint_2" / "manifest.json").unlink()  # the writer died before the manifest
    (checkpoints / "checkpoint_4" / "manifest.json").write_text("")  # the copy to storage stopped: created, empty
    manifest = checkpoints / "checkpoint_5" / "manifest.json"
    manifest.write_text(manifest.read_text()[:-40])  # ... or part-way through
    for cut in ("checkpoint_3", "checkpoint_4", "checkpoint_5"):
        with pytest.raises(IncompleteCheckpointError, match="cut short"):
            read_manifest(checkpoints / cut)
    assert [m["step"] for _, m in complete_checkpoints(checkpoints)] == [1]
    assert sorted(d.name for d in incomplete_checkpoints(checkpoints)) == ["checkpoint_2", "checkpoint_3", "checkpoint_4",
                                                                             "checkpoint_5"]
    directory, manifest = newest_complete(checkpoints)
    assert directory.name == "checkpoint_1" and manifest["step"] == 1


def test_the_evaluation_marked_best_last_is_the_checkpoint_exported(tmp_path):
    """A tie with the best (a model stuck at the majority class scores the same accuracy twice) is marked best
    so far, because the export takes the later of equals; only a strict improvement resets early stopping."""
    accuracies = [0.5, 0.75, 0.75, 0.625]
    marked, best_before, improvements = [], None, []
    for step, accuracy in enumerate(accuracies, start=1):
        _save(tmp_path / f"checkpoint_{step}", step, accuracy)
        improved, best = judge(accuracy, best_before, higher_is_better=True)
        improvements.append(improved)
        if best:
            marked.append(step)
        if improved:
            best_before = accuracy
    assert marked == [1, 2, 3] and improvements == [True, True, False, False]
    directory, manifest = best_checkpoint(tmp_path, "accuracy", higher_is_better=True)
    assert directory.name == "checkpoint_3" and manifest["step"] == marked[-1]
    assert judge(0.2, 0.3, higher_is_better=False) == (True, True) and judge(0.3, 0.3, higher_is_better=False) == (False, True)
