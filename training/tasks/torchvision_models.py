"""torchvision backbones (`model: torchvision://resnet18`) for image classification.

The classifier wraps a stock torchvision model: its last linear layer is taken out and a new
one sized to the labels sits beside the body, so the `head` method can freeze `backbone`
(`base_model_prefix`) and train `classifier` alone. The export puts the new layer back under
its torchvision name: `model.safetensors` is a plain state dict of
`torchvision.models.get_model(architecture, num_classes=N)`, loadable without tunefleet.

Pretrained weights come from a local file (.pth read with `weights_only=True`, or
.safetensors) or a URL through `torch.hub` (cached), not only torchvision's own downloader.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from training.data.image_transforms import Preprocessing
from training.layout import MODEL_WEIGHTS, TORCHVISION_CONFIG_FILE

SCHEME = "torchvision://"
# Auxiliary heads (train-mode tuples) or no linear head: not a plain backbone + linear classifier.
UNSUPPORTED = frozenset({"googlenet", "inception_v3", "squeezenet1_0", "squeezenet1_1"})
# Where the weights came from and whether the head is new: said as transformers says its load report
# (a logger, at INFO), so the worker that trains shows it (Ray Train sets its root logger to INFO on
# the console) and the export's rebuild of the same model can hold it back.
log = logging.getLogger(__name__)


def architecture_of(model_path: str) -> str | None:
    """`torchvision://resnet18` → `resnet18`; None for any other model path."""
    return model_path[len(SCHEME):].strip("/") if model_path.startswith(SCHEME) else None


def classification_architectures() -> list[str]:
    import torchvision.models

    return [name for name in torchvision.models.list_models(module=torchvision.models) if name not in UNSUPPORTED]


def _last_linear(net: nn.Module) -> tuple[str, nn.Linear]:
    found = [(name, module) for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not found:
        raise ValueError(f"{type(net).__name__} has no linear classifier to replace")
    return found[-1]


class TorchvisionClassifier(nn.Module):
    """`forward(pixel_values)` → logits; `backbone` is the torchvision model without its last layer."""

    base_model_prefix = "backbone"

    def __init__(self, architecture: str, labels: list[str]) -> None:
        super().__init__()
        import torchvision.models

        net = torchvision.models.get_model(architecture, weights=None)
        self.architecture = architecture
        self.labels = list(labels)
        self.head_name, head = _last_linear(net)
        net.set_submodule(self.head_name, nn.Identity())
        self.backbone = net
        self.classifier = nn.Linear(head.in_features, len(labels))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.backbone(pixel_values))

    def train(self, mode: bool = True) -> TorchvisionClassifier:
        """Frozen BatchNorm layers stay in eval mode: they keep the pretrained statistics, so the head
        trains on the features it will see at evaluation (not on small-batch statistics)."""
        super().train(mode)
        if mode:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                        p.requires_grad for p in module.parameters(recurse=False)):
                    module.eval()
        return self

    def torchvision_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict of `torchvision.models.get_model(architecture, num_classes=N)`."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.backbone.state_dict().items()}
        for key, value in self.classifier.state_dict().items():
            state[f"{self.head_name}.{key}"] = value.detach().cpu().contiguous()
        return state

    def load_torchvision_state_dict(self, state: dict[str, torch.Tensor], source: str) -> bool:
        """Load pretrained weights; the old head is kept only when it fits the labels. Returns whether it was."""
        prefix = self.head_name + "."
        body = {k: v for k, v in state.items() if not k.startswith(prefix)}
        missing, unexpected = self.backbone.load_state_dict(body, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{source} does not hold {self.architecture} weights: missing {missing[:4]}, unexpected {unexpected[:4]}; "
                f"point model.weights at a state dict of torchvision.models.{self.architecture}()")
        head = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        fits = set(head) == set(self.classifier.state_dict()) and all(
            v.shape == self.classifier.state_dict()[k].shape for k, v in head.items())
        if fits:
            self.classifier.load_state_dict(head)
        return fits


def read_weights(location: str) -> dict[str, torch.Tensor]:
    """A state dict from a URL (torch.hub cache), a .safetensors file or a .pth file (weights only)."""
    scheme = urlparse(location).scheme
    try:
        if scheme in ("http", "https", "file"):
            state = torch.hub.load_state_dict_from_url(location, map_location="cpu", progress=False, weights_only=True)
        elif location.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(location)
        else:
            state = torch.load(location, map_location="cpu", weights_only=True)
    except Exception as err:  # offline, 404, a pickle with code in it, a damaged file
        fix = ("download it where the internet is reachable and set model.weights to the local file"
               if scheme in ("http", "https") else "point model.weights at a torchvision state dict (.pth or .safetensors)")
        raise RuntimeError(f"cannot read weights from {location}: {type(err).__name__}: {err}; {fix}") from None
    for key in ("state_dict", "model"):  # training checkpoints often nest the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def build_torchvision_classifier(architecture: str, weights: str, labels: list[str]) -> TorchvisionClassifier:
    model = TorchvisionClassifier(architecture, labels)
    kept_head = model.load_torchvision_state_dict(read_weights(weights), weights)
    log.info(f"{architecture}: pretrained weights from {weights}; "
             + ("their head fits the labels and is kept" if kept_head else f"new head for {len(labels)} labels"))
    return model


def save_torchvision_export(model: TorchvisionClassifier, preprocessing: Preprocessing, export_dir: Path) -> None:
    """model.safetensors (torchvision state dict) + torchvision.json (architecture, labels, preprocessing)."""
    import torchvision
    from safetensors.torch import save_file

    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    save_file(model.torchvision_state_dict(), export_dir / MODEL_WEIGHTS, metadata={"format": "pt"})
    config = {
        "format": "torchvision",
        "architecture": model.architecture,
        "num_classes": model.classifier.out_features,
        "labels": model.labels,
        "weights_file": MODEL_WEIGHTS,
        "preprocessing": preprocessing.to_json(),
        "torchvision_version": torchvision.__version__.split("+")[0],
    }
    (export_dir / TORCHVISION_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
