"""Image classification: one label per image, on torchvision backbones or Hugging Face image models.

    model: torchvision://mobilenet_v2         weights from model.weights (file or URL), or torchvision's default
    model: google/vit-base-patch16-224        AutoModelForImageClassification + AutoImageProcessor

Training augments (random resized crop, horizontal flip; `data.augment: false` turns it off);
evaluation resizes and centre-crops with the weights' own normalisation. The export loads without
tunefleet: torchvision backbones as `model.safetensors` + `torchvision.json`, Hugging Face models in
`pipeline("image-classification")`. A torchvision backbone trains with full, head, gradual-unfreeze or
lora; a LoRA run's export is merged, since torchvision weights have no adapter format.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from training.data.image_transforms import Preprocessing, default_weights_url, from_hf_processor, from_torchvision_weights
from training.data.images import (BadImageError, ImageExamples, find_bad_images, open_image, read_image_folder,
                                  read_image_table)
from training.data.labels import build_label_map, read_label_names
from training.data.tables import DataError, Source, detect_format
from training.storage import model_location
from training.tasks.base import PreparedData, TaskDefinition, reads_the_model, save_pretrained
from training.tasks.registry import TASKS
from training.tasks.text_classification import _compute_metrics as classification_metrics
from training.tasks.torchvision_models import (TorchvisionClassifier, architecture_of, build_torchvision_classifier,
                                               classification_architectures, save_torchvision_export)

NAME = "image-classification"
SHOWN_BAD = 5  # bad files named in a message; the rest are counted


@dataclass(frozen=True)
class ImageProcessing:
    """The task's processor: preprocessing numbers, the Hugging Face image processor (if any), the bad-image policy."""

    preprocessing: Preprocessing
    hf_processor: Any = None
    bad_images: str = "skip"
    augment: bool = True  # data.augment: random crop and flip on training images


# Methods whose adapter cannot merge into a torchvision model: prompts and bottleneck modules have no weights
# to merge into, and PEFT's IA3 unload fails on the wrapped head (peft 0.21, seen on MobileNetV3).
TORCHVISION_UNFIT_METHODS = ("prompt-tuning", "prefix-tuning", "adapter", "ia3")


def _check_spec(spec: Any) -> list[tuple[str, str, Any]]:
    problems = []
    arch = architecture_of(spec.model.path) if spec.model is not None else None
    data = spec.data
    if arch is not None and arch not in classification_architectures():
        problems.append(("model", f"unknown torchvision classification model {arch!r}; known: "
                         f"{', '.join(classification_architectures())}", spec.model.path))
    if arch is None and spec.model is not None:
        if spec.model.weights is not None:
            problems.append(("model.weights", "applies to torchvision://<architecture> models; a Hugging Face model "
                             "carries its weights in model.path", spec.model.weights))
        for key in ("image_size", "image_mean", "image_std"):
            if getattr(data, key) is not None:
                problems.append((f"data.{key}", "applies to torchvision:// models; a Hugging Face model's image "
                                 "processor sets its own", getattr(data, key)))
    if arch is not None and spec.method is not None and spec.method.name in TORCHVISION_UNFIT_METHODS:
        problems.append(("method.name", "does not fit torchvision:// models: their export is plain torchvision "
                         "weights, so an adapter must merge into them; use full, head, gradual-unfreeze or lora, "
                         "or a Hugging Face image model", spec.method.name))
    if data.image_mean is not None and data.image_std is not None and len(data.image_mean) != len(data.image_std):
        problems.append(("data.image_std", f"needs one value per channel, as data.image_mean ({len(data.image_mean)})",
                         data.image_std))
    return problems


def _sources(spec: Any) -> tuple[Source | str, Source | str | None]:
    """A directory stays a path (ImageFolder); anything else is a Source read as a table."""
    data = spec.data

    def source(location: str, split: str) -> Source | str:
        if Path(location).is_dir():
            return location
        refs = [r for r in (data.columns.image, data.columns.label) if r is not None]
        header = data.header if data.header is not None else not all(isinstance(r, int) for r in refs)
        return Source(location, detect_format(location, data.format), header, data.hub_config, split)

    train = source(data.train, data.train_split)
    validation = None
    if data.validation is not None:
        validation = source(data.validation, data.validation_split or "validation")
    elif isinstance(train, Source) and train.is_hub and data.validation_split:
        validation = Source(data.train, "hub", True, data.hub_config, data.validation_split)
    return train, validation


def _read(source: Source | str, spec: Any) -> ImageExamples:
    if isinstance(source, str):
        return read_image_folder(source)
    return read_image_table(source, spec.data.columns.image, spec.data.columns.label)


def _check_data(spec: Any) -> list[tuple[str, str, Any]]:
    """Sources can be read and hold images and labels (`tunefleet validate`); images are decoded in prepare."""
    try:
        for source in _sources(spec):
            if source is not None:
                _read(source, spec)
    except DataError as err:
        return list(err.problems)
    except Exception as err:  # an unreadable file or an unreachable hub id
        return [("data.train", f"cannot read the image data: {err}", None)]
    return []


def _drop_bad(examples: ImageExamples, policy: str, key: str) -> tuple[ImageExamples, list[str]]:
    bad = find_bad_images(examples)
    if not bad:
        return examples, []
    named = "; ".join(reason for _, reason in bad[:SHOWN_BAD]) + (f"; and {len(bad) - SHOWN_BAD} more" if len(bad) > SHOWN_BAD else "")
    if policy == "error":
        raise DataError([(key, f"{len(bad)} of {len(examples.images)} images cannot be read: {named}; remove them, "
                          "or set data.bad_images: skip", None)])
    print(f"data: skipping {len(bad)} unreadable images in {examples.source}: {named}")
    dropped = {i for i, _ in bad}
    return examples.select([i for i in range(len(examples.images)) if i not in dropped]), [r for _, r in bad]


def _prepare(spec: Any) -> PreparedData:
    data, seed = spec.data, spec.train.seed
    train_source, validation_source = _sources(spec)
    train = _read(train_source, spec)
    if validation_source is None:
        order = np.random.default_rng(seed).permutation(len(train.images)).tolist()
        held = max(1, round(len(order) * data.validation_fraction))
        train, validation = train.select(sorted(order[held:])), train.select(sorted(order[:held]))
    else:
        validation = _read(validation_source, spec)

    given = read_label_names(data.label_names) or train.names
    drop = data.unknown_labels == "drop"
    names, mapping = build_label_map(train.labels, given, data.label_base, train.source, drop_unknown=drop)
    unseen = sorted({v for v in validation.labels if v not in mapping and v not in (None, "")}, key=str)
    if unseen and given:
        mapping.update(build_label_map(unseen, names, data.label_base, validation.source, drop_unknown=drop)[1])
    elif unseen:
        raise DataError([("data.validation", f"validation labels {unseen[:5]} never occur in the training data; "
                          "list every label in data.label_names", None)])

    def labeled(ex: ImageExamples, limit: int | None) -> ImageExamples:
        ex = ex.select([i for i, v in enumerate(ex.labels) if mapping.get(v, -1) >= 0])
        if limit is not None and limit < len(ex.images):
            ex = ex.select(sorted(np.random.default_rng(seed).permutation(len(ex.images))[:limit].tolist()))
        return ex

    train, validation = labeled(train, data.limit.train), labeled(validation, data.limit.validation)
    train, bad_train = _drop_bad(train, data.bad_images, "data.train")
    validation, bad_validation = _drop_bad(validation, data.bad_images, "data.validation")
    if not train.images:
        raise DataError([("data.train", f"{train.source}: no labeled, readable images", None)])
    if not validation.images:
        raise DataError([("data.validation", f"{validation.source}: no labeled, readable images", None)])

    def table(ex: ImageExamples) -> pa.Table:
        ids = [mapping[v] for v in ex.labels]
        return pa.table({"image": ex.images, "labels": pa.array(ids, pa.int64()),
                         "length": pa.array([1] * len(ids), pa.int32())})  # one image = one unit of work

    counts = np.bincount([mapping[v] for v in train.labels], minlength=len(names)).tolist()
    notes = {"skipped_images": len(bad_train) + len(bad_validation)}
    if train.ignored_files or validation.ignored_files:
        notes["ignored_non_image_files"] = train.ignored_files + validation.ignored_files
    return PreparedData(train=table(train), validation=table(validation), labels=names, label_counts=counts, notes=notes)


def _weights(spec: Any, arch: str) -> str:
    return spec.model.weights or default_weights_url(arch)


@reads_the_model
def _build_processor(spec: Any) -> ImageProcessing:
    arch = architecture_of(spec.model.path)
    if arch is not None:
        base = from_torchvision_weights(arch, _weights(spec, arch))
        preprocessing = base.overridden(spec.data.image_size, spec.data.image_mean, spec.data.image_std)
        return ImageProcessing(preprocessing, None, spec.data.bad_images, spec.data.augment)
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model_location(spec.model), revision=spec.model.revision,
                                                   trust_remote_code=spec.model.trust_remote_code)
    return ImageProcessing(from_hf_processor(processor), processor, spec.data.bad_images, spec.data.augment)


def _build_model(spec: Any, labels: list[str], **load_kwargs):
    arch = architecture_of(spec.model.path)
    if arch is not None:
        if load_kwargs:
            raise ValueError(f"torchvision models take no loading options from the method (got {sorted(load_kwargs)})")
        return build_torchvision_classifier(arch, _weights(spec, arch), labels)
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(
        model_location(spec.model), revision=spec.model.revision, trust_remote_code=spec.model.trust_remote_code,
        num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
        ignore_mismatched_sizes=True,  # the pretrained head (ImageNet's 1000 classes) is replaced
        **load_kwargs)


def _build_collator(processing: ImageProcessing, training: bool):
    import torch

    augment = training and processing.augment
    # Without augmentation a Hugging Face model runs its own image processor: what pipeline() and serving do.
    use_hf = processing.hf_processor is not None and not augment
    transform = None if use_hf else (processing.preprocessing.train_transform() if augment
                                     else processing.preprocessing.eval_transform())

    def collate(rows: list[dict]) -> dict:
        images, labels = [], []
        for row in rows:
            try:
                images.append(open_image(row["image"]))
            except BadImageError as err:  # passed the check on the driver, then changed or vanished
                if processing.bad_images == "error":
                    raise
                print(f"skipping unreadable image: {err}")
                continue
            labels.append(row["labels"])
        if not images:
            raise BadImageError(f"no image of this batch of {len(rows)} could be read")
        pixels = (processing.hf_processor(images, return_tensors="pt")["pixel_values"] if use_hf
                  else torch.stack([transform(image) for image in images]))
        return {"pixel_values": pixels, "labels": torch.tensor(labels, dtype=torch.long)}

    return collate


def _save_export(model: Any, processing: ImageProcessing, export_dir: Any) -> None:
    if isinstance(model, TorchvisionClassifier):
        save_torchvision_export(model, processing.preprocessing, Path(export_dir))
    else:
        save_pretrained(model, processing.hf_processor, export_dir)


TASKS.register(NAME, TaskDefinition(
    name=NAME,
    pipeline_tag="image-classification",
    default_metric="accuracy",
    greater_is_better=True,
    check_spec=_check_spec,
    check_data=_check_data,
    prepare=_prepare,
    build_model=_build_model,
    build_processor=_build_processor,
    build_collator=_build_collator,
    compute_metrics=classification_metrics,
    save_export=_save_export,
))
