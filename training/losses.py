"""Classification loss with optional class weights and label smoothing."""

from __future__ import annotations

import torch


def class_weights_for(setting: str | list[float], label_counts: list[int]) -> list[float] | None:
    """none → None; auto → inverse label frequency (mean 1, as scikit-learn's 'balanced'); a list as given."""
    if isinstance(setting, list):
        return setting
    if setting == "none" or not label_counts:
        return None
    total, classes = sum(label_counts), len(label_counts)
    return [total / (classes * count) if count else 1.0 for count in label_counts]


def build_loss(weights: list[float] | None, label_smoothing: float, device: torch.device):
    weight = torch.tensor(weights, dtype=torch.float32, device=device) if weights else None
    criterion = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing, ignore_index=-100)

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return criterion(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))

    return loss


def sequence_argmax(logits: torch.Tensor, labels: torch.Tensor) -> tuple[list, list]:
    """One predicted class id per example (sequence or image classification)."""
    return logits.argmax(-1).tolist(), labels.tolist()


def count_targets(labels: torch.Tensor) -> int:
    """How many targets a batch's mean loss averaged over (labels of -100 are ignored)."""
    return int((labels != -100).sum().item())
