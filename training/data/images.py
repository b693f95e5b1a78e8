"""Image classification data: ImageFolder directories, CSV/JSONL of (path, label), parquet or hub
datasets with an Image column.

One split becomes `ImageExamples`: per example an image reference and a raw label. Files stay
files (the reference is the absolute path: workers read them from the same or shared storage);
parquet and hub data carry the encoded image bytes (nothing to read on a worker).

Every image is decoded once on the driver before training, so a file that is not an image,
or is truncated, is named before any cluster time: skipped and counted (`data.bad_images:
skip`) or an error listing the files (`error`).
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import datasets
from PIL import Image, UnidentifiedImageError

from training.data.tables import DataError, Source, load_table, read_columns

# What torchvision's ImageFolder reads (IMG_EXTENSIONS); other files in class folders are ignored.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif"})
# Folder names that mean "a dataset root", not a class: pointing data.train at one is a mistake.
SPLIT_NAMES = frozenset({"train", "val", "valid", "validation", "test"})


class BadImageError(ValueError):
    """An image that cannot be decoded; the message names it."""


@dataclass(frozen=True)
class ImageExamples:
    images: list  # absolute paths (str) or encoded bytes
    labels: list  # raw label values (class-folder names, CSV strings, ints)
    source: str
    names: list[str] | None = None  # label names the source itself defines (hub ClassLabel)
    ignored_files: int = 0  # non-image files skipped in an ImageFolder

    def select(self, indices: list[int]) -> ImageExamples:
        return ImageExamples([self.images[i] for i in indices], [self.labels[i] for i in indices], self.source,
                             self.names, self.ignored_files)


def describe(image: str | bytes, index: int | None = None) -> str:
    """How an image is named in messages: its path, or its row for in-memory data."""
    if isinstance(image, str):
        return image
    return f"row {index}" if index is not None else f"{len(image)} bytes of image data"


def open_image(image: str | bytes) -> Image.Image:
    """Decode an image (path or bytes) to RGB, or raise BadImageError naming it and why."""
    try:
        with Image.open(image if isinstance(image, str) else io.BytesIO(image)) as opened:
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        raise BadImageError(f"{describe(image)}: {_reason(err)}") from None


def _reason(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):
        return "not an image file PIL can read"
    if isinstance(err, FileNotFoundError):
        return "no such file"
    return str(err)


def _check_one(image: str | bytes) -> str | None:
    """None when the image decodes fully (truncated files fail here), else the reason."""
    try:
        with Image.open(image if isinstance(image, str) else io.BytesIO(image)) as opened:
            opened.draft("RGB", (max(1, opened.width // 8), max(1, opened.height // 8)))  # JPEG: decode at 1/8 scale
            opened.load()
        return None
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
        return _reason(err)


def find_bad_images(examples: ImageExamples) -> list[tuple[int, str]]:
    """(index, "name: reason") of every example whose image does not decode."""
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:  # PIL decodes off the GIL
        reasons = list(pool.map(_check_one, examples.images, chunksize=16))
    return [(i, f"{describe(examples.images[i], i)}: {r}") for i, r in enumerate(reasons) if r is not None]


def read_image_folder(root: str | Path) -> ImageExamples:
    """root/<class>/**/<image>: one class per sub-folder, as torchvision's ImageFolder."""
    root = Path(root)
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError([("data.train", f"{root} holds no class folders; an ImageFolder is <root>/<label>/<image files>", None)])
    names = {d.name.lower() for d in classes}
    if "train" in names and names <= SPLIT_NAMES:
        raise DataError([("data.train", f"{root} holds split folders ({', '.join(sorted(names))}), not class folders; "
                          f"set data.train: {root / classes[0].name} and data.validation to the other split", None)])
    images, labels, ignored = [], [], 0
    for directory in classes:
        for path in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(str(path.resolve()))
                labels.append(directory.name)
            else:
                ignored += 1
    if not images:
        raise DataError([("data.train", f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders", None)])
    return ImageExamples(images, labels, str(root), None, ignored)


def default_image_column(columns: list[str], given: str | int | None) -> str:
    if given is not None:
        return str(given)
    return "img" if "image" not in columns and "img" in columns else "image"


def read_image_table(source: Source, image_column: str | int | None, label_column: str | int) -> ImageExamples:
    """CSV/JSONL of (path, label) with paths relative to the file; parquet/hub with an Image column."""
    available = read_columns(source)
    image_col, label_col = default_image_column(available, image_column), str(label_column)
    missing = [(f"data.columns.{key}", f"{source.location} has no column {col!r}; columns: {', '.join(available)}", None)
               for key, col in (("image", image_col), ("label", label_col)) if col not in available]
    if missing:
        raise DataError(missing)
    ds = load_table(source, [image_col, label_col])
    names = None
    feature = ds.features[label_col]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        labels = [feature.int2str(v) if v is not None and v >= 0 else None for v in ds[label_col]]
    else:
        labels = ds[label_col]
    if isinstance(ds.features[image_col], datasets.Image):
        ds = ds.cast_column(image_col, datasets.Image(decode=False))
        images = [_image_bytes(v, source.location, i) for i, v in enumerate(ds[image_col])]
    else:
        base = Path(source.location).parent
        images = [_resolve(value, base, source.location, i) for i, value in enumerate(ds[image_col])]
    return ImageExamples(images, labels, source.location, names)


def _image_bytes(value: dict | None, location: str, row: int) -> bytes:
    if value and value.get("bytes"):
        return value["bytes"]
    if value and value.get("path") and Path(value["path"]).is_file():
        return Path(value["path"]).read_bytes()
    raise DataError([("data.train", f"{location} row {row}: the image column holds neither bytes nor a readable file", None)])


def _resolve(value: object, base: Path, location: str, row: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DataError([("data.columns.image", f"{location} row {row}: expected an image path, got {value!r}", None)])
    if "://" in value:
        raise DataError([("data.columns.image", f"{location} row {row}: {value} is a URL; image paths must be local "
                          "files (download them first)", None)])
    return str((base / Path(value).expanduser()).resolve())
