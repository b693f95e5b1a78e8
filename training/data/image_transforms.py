"""Image preprocessing: evaluation resize + centre crop, training random resized crop + flip.

`Preprocessing` is the few numbers that define it (sizes, mean, std, interpolation). They come
from the pretrained weights' own metadata (torchvision's Weights enums, a Hugging Face image
processor), may be overridden in the job file, and are written into a torchvision export so
serving and a plain Python user apply exactly the same evaluation transform.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class Preprocessing:
    crop_size: tuple[int, int]  # (height, width) the model sees
    resize_size: int | None  # shorter side before the centre crop; None: resize straight to crop_size
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "crop_size": list(self.crop_size), "mean": list(self.mean), "std": list(self.std)}

    def overridden(self, image_size: int | None, mean: list[float] | None, std: list[float] | None) -> Preprocessing:
        """Job-file overrides: a new crop keeps the weights' resize/crop ratio (256/224 for ImageNet)."""
        out = self
        if image_size is not None:
            ratio = (self.resize_size / min(self.crop_size)) if self.resize_size else None
            out = replace(out, crop_size=(image_size, image_size),
                          resize_size=round(image_size * ratio) if ratio else None)
        if mean is not None:
            out = replace(out, mean=tuple(mean))
        if std is not None:
            out = replace(out, std=tuple(std))
        return out

    def eval_transform(self):
        from torchvision import transforms as T

        mode = T.InterpolationMode(self.interpolation)
        resize = T.Resize(self.resize_size, mode) if self.resize_size else T.Resize(self.crop_size, mode)
        return T.Compose([resize, T.CenterCrop(self.crop_size), T.ToTensor(), T.Normalize(self.mean, self.std)])

    def train_transform(self):
        from torchvision import transforms as T

        mode = T.InterpolationMode(self.interpolation)
        return T.Compose([T.RandomResizedCrop(self.crop_size, interpolation=mode), T.RandomHorizontalFlip(),
                          T.ToTensor(), T.Normalize(self.mean, self.std)])


def from_torchvision_weights(architecture: str, weights_location: str | None) -> Preprocessing:
    """The evaluation transform torchvision publishes with the weights (`Weights.transforms()`).

    A weights file or URL is matched to torchvision's entries by file name
    (`mobilenet_v2-b0353104.pth` is IMAGENET1K_V1); anything else gets the DEFAULT entry's.
    """
    from torchvision.models import get_model_weights

    enum = get_model_weights(architecture)
    name = (weights_location or "").rstrip("/").rsplit("/", 1)[-1]
    entry = next((w for w in enum if w.url.rsplit("/", 1)[-1] == name), enum.DEFAULT)
    t = entry.transforms()
    crop = t.crop_size[0]
    return Preprocessing(crop_size=(crop, crop), resize_size=t.resize_size[0], mean=tuple(t.mean), std=tuple(t.std),
                         interpolation=t.interpolation.value)


def default_weights_url(architecture: str) -> str:
    from torchvision.models import get_model_weights

    return get_model_weights(architecture).DEFAULT.url


def from_hf_processor(processor: Any) -> Preprocessing:
    """Crop size, mean and std of a Hugging Face image processor (for training augmentation)."""
    size = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = size or getattr(processor, "size", None) or {}
    height, width = _size_value(size, "height"), _size_value(size, "width")
    if height and width:
        crop = (int(height), int(width))
    else:
        edge = int(_size_value(size, "shortest_edge") or _size_value(size, "longest_edge") or 224)
        crop = (edge, edge)
    normalize = getattr(processor, "do_normalize", True)
    mean = tuple(processor.image_mean) if normalize and getattr(processor, "image_mean", None) else (0.0, 0.0, 0.0)
    std = tuple(processor.image_std) if normalize and getattr(processor, "image_std", None) else (1.0, 1.0, 1.0)
    resample = getattr(processor, "resample", 2)
    return Preprocessing(crop_size=crop, resize_size=None, mean=mean, std=std,
                         interpolation=_PIL_RESAMPLE.get(int(resample) if resample is not None else 2, "bilinear"))


def _size_value(size: Any, key: str) -> Any:
    """A key of a processor's size: a dict in older transformers, a SizeDict in newer ones."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)
