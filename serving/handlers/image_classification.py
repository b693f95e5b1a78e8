"""Image classification: base64 images in JSON, or uploaded files, → labels with scores.

    POST /v1/models/{name}/predict          {"inputs": "<base64>" | ["<base64>", ...], "parameters": {"top_k": 1}}
    POST /v1/models/{name}/predict/upload   multipart/form-data files (any field name), or one raw image body

Bytes that are not an image answer 415, bad base64 422, an image past the size limits 413.
Exports of torchvision backbones (model.safetensors + torchvision.json) and Hugging Face image
models (config + image processor) are both served; the first through torchvision alone.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from pathlib import Path
from typing import Annotated, Any, Union

import torch
from PIL import Image, UnidentifiedImageError
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, field_validator

from serving.config import ServeSpec
from serving.errors import ServingError
from serving.handlers.base import TaskHandler, load_model, parse_request, ranked
from serving.handlers.registry import register_handler
from serving.placement import place, replica_device
from serving.schemas import ClassificationParameters, LabelScore, PredictResponse
from training.layout import MODEL_WEIGHTS, TORCHVISION_CONFIG_FILE, ExportInfo

# Past this many pixels an image answers 413 before it is decoded (a small file can hold a huge image).
MAX_IMAGE_PIXELS = 40_000_000
URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")  # ':' is not base64: never an image's base64
Logits = list[float]  # one image's logits, in label order


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a base64-encoded image, not an empty text")
    return value


Base64Image = Annotated[StrictStr, AfterValidator(_non_blank)]


class ImageClassificationRequest(BaseModel):
    """One base64-encoded image (JPEG, PNG, ...; a `data:image/...;base64,` prefix is allowed), or a list."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: Union[Base64Image, list[Base64Image]] = Field(description='"<base64 image>" or ["<base64>", ...]')
    parameters: ClassificationParameters = Field(default_factory=ClassificationParameters)

    @field_validator("inputs")
    @classmethod
    def _check_inputs(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("must hold at least one image")
        return value

    def input_list(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


class ImageClassificationResponse(PredictResponse):
    predictions: list[list[LabelScore]] = Field(description="Per image, labels sorted by score, best first.")


def decode_base64(text: str, index: int, max_bytes: int) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    elif URL.match(text.strip()):
        # What `pipeline(...)` takes. Not fetched: the server would reach, for any client, what only it can reach.
        raise ServingError(422, f"inputs[{index}] is a URL ({text[:80]}): the server does not fetch URLs; send "
                                "the image file's bytes base64-encoded, or POST the file itself to this model's "
                                "/predict/upload")
    text = "".join(text.split())  # line breaks of MIME-style base64
    if len(text) * 3 // 4 > max_bytes:
        raise ServingError(413, f"inputs[{index}] is too large: about {len(text) * 3 // 4} bytes, at most {max_bytes}",
                           {"max_image_bytes": max_bytes})
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ServingError(422, f"inputs[{index}] is not valid base64; send the image file's bytes base64-encoded") from None


def decode_image(data: bytes, index: int, max_bytes: int) -> Image.Image:
    """Bytes → RGB image, or 413 (too large) / 415 (not an image, or damaged) naming the input."""
    if len(data) > max_bytes:
        raise ServingError(413, f"inputs[{index}] is too large: {len(data)} bytes, at most {max_bytes}",
                           {"max_image_bytes": max_bytes})
    try:
        opened = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        opened = None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ServingError(415, f"inputs[{index}] is not an image: send JPEG, PNG, GIF, BMP, TIFF or WebP bytes",
                           {"input": index, "received_bytes": len(data)}) from None
    if opened is None or opened.width * opened.height > MAX_IMAGE_PIXELS:
        raise ServingError(413, f"inputs[{index}] has too many pixels, at most {MAX_IMAGE_PIXELS}",
                           {"max_image_pixels": MAX_IMAGE_PIXELS})
    try:
        return opened.convert("RGB")
    except (OSError, ValueError) as err:
        raise ServingError(415, f"inputs[{index}] is a damaged or truncated image: {err}", {"input": index}) from None


def _torchvision_transform(pre: dict[str, Any]):
    from torchvision import transforms as T

    mode = T.InterpolationMode(pre.get("interpolation", "bilinear"))
    crop = pre["crop_size"]
    resize = T.Resize(pre["resize_size"] or crop, mode)
    return T.Compose([resize, T.CenterCrop(crop), T.ToTensor(), T.Normalize(pre["mean"], pre["std"])])


@register_handler("image-classification")
class ImageClassificationHandler(TaskHandler):
    request_model = ImageClassificationRequest
    response_model = ImageClassificationResponse
    # float32 under serve.dtype auto: bfloat16 kept MobileNetV2's top-1 class for only 95.6% of images
    # (serving/placement.py); `dtype: bfloat16` opts in (3.1x the images/s on this CPU).
    auto_bfloat16 = False

    def __init__(self, info: ExportInfo, spec: ServeSpec, model, to_pixels, labels: list[str], device) -> None:
        super().__init__(info, spec)
        self.model, self.to_pixels, self.labels, self.device = model, to_pixels, labels, device
        self.dtype = next(model.parameters()).dtype  # pixels follow the weights (serve.dtype)
        # Hugging Face models take pixel_values= and return an output object; torchvision's a tensor.
        self.hf = hasattr(model, "config")

    @classmethod
    def load(cls, export_dir: Path, info: ExportInfo, spec: ServeSpec) -> ImageClassificationHandler:
        device = replica_device(spec)
        config_file = Path(export_dir) / TORCHVISION_CONFIG_FILE
        if config_file.is_file():
            import torchvision
            from safetensors.torch import load_file

            config = json.loads(config_file.read_text())
            model = torchvision.models.get_model(config["architecture"], num_classes=config["num_classes"])
            model.load_state_dict(load_file(Path(export_dir) / config.get("weights_file", MODEL_WEIGHTS)))
            transform = _torchvision_transform(config["preprocessing"])
            labels = list(config["labels"])

            def to_pixels(images):
                return torch.stack([transform(image) for image in images])
        else:
            from transformers import AutoImageProcessor, AutoModelForImageClassification

            processor = AutoImageProcessor.from_pretrained(export_dir, local_files_only=True)
            model, _ = load_model(AutoModelForImageClassification, export_dir, info)
            labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]

            def to_pixels(images):
                return processor(images, return_tensors="pt")["pixel_values"]
        return cls(info, spec, place(model, spec, device, cls.auto_bfloat16), to_pixels, labels, device)

    def prepare(self, request: ImageClassificationRequest) -> list[Image.Image]:
        inputs = request.input_list()
        self._check_count(len(inputs))
        limit = self.spec.max_image_bytes
        return [decode_image(decode_base64(text, i, limit), i, limit) for i, text in enumerate(inputs)]

    def prepare_upload(self, files: list[bytes], parameters: dict[str, Any]) -> tuple[list[Image.Image], Any]:
        """Uploaded files (multipart or a raw body) → items, and the request `format` reads its parameters from."""
        if not files:
            raise ServingError(422, "no image in the upload: send multipart/form-data with one or more files, "
                                    "or the image bytes as the request body")
        self._check_count(len(files))
        request = parse_request(self, {"inputs": "upload", "parameters": parameters})
        limit = self.spec.max_image_bytes
        return [decode_image(data, i, limit) for i, data in enumerate(files)], request

    def _check_count(self, count: int) -> None:
        limit = self.spec.max_inputs_per_request
        if count > limit:
            raise ServingError(413, f"too many inputs: {count} in one request, at most {limit}",
                               {"max_inputs_per_request": limit})

    @torch.inference_mode()
    def run_batch(self, items: list[Image.Image]) -> list[Logits]:
        pixels = self.to_pixels(items).to(self.device, self.dtype)
        return (self.model(pixel_values=pixels).logits if self.hf else self.model(pixels)).float().tolist()

    def format(self, output: Logits, request: ImageClassificationRequest) -> list[dict[str, float | str]]:
        p = request.parameters
        return ranked(self.labels, output, p.function_to_apply or "softmax", p.top_k)
