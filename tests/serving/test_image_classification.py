"""The image handler without Ray: torchvision and Hugging Face exports, base64 inputs, uploads, 4xx answers."""

from __future__ import annotations

import base64
import io
import math
import shutil
from pathlib import Path

import pytest
from PIL import Image

from serving import ServeSpec, ServingError, predict_local
from serving.handlers import load_handler
from training.layout import ExportInfo, write_export_info

LABELS = ["blue", "green", "red"]


def _png(colour=(200, 20, 20), size=(48, 40), fmt="PNG") -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format=fmt)
    return out.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def torchvision_export(tmp_path_factory) -> Path:
    """mobilenet_v3_small (random weights) exported the way training exports it."""
    import torch
    import torchvision

    from training.data.image_transforms import Preprocessing
    from training.tasks.torchvision_models import TorchvisionClassifier, save_torchvision_export

    directory = tmp_path_factory.mktemp("tv-export")
    torch.manual_seed(0)
    model = TorchvisionClassifier("mobilenet_v3_small", LABELS)
    model.load_torchvision_state_dict(torchvision.models.mobilenet_v3_small().state_dict(), "random")
    save_torchvision_export(model, Preprocessing(crop_size=(32, 32), resize_size=36), directory)
    write_export_info(directory, ExportInfo(name="tv", task="image-classification", labels=LABELS,
                                            base_model="torchvision://mobilenet_v3_small", method="full"))
    return directory


@pytest.fixture(scope="module")
def vit_export(tiny_vit, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("vit-export") / "export"
    shutil.copytree(tiny_vit, directory)
    write_export_info(directory, ExportInfo(name="vit", task="image-classification", labels=["0", "1", "2"],
                                            base_model="tiny-vit", method="full"))
    return directory


@pytest.mark.parametrize("which", ["torchvision_export", "vit_export"])
def test_base64_inputs_ranked_labels(which, request):
    export = request.getfixturevalue(which)
    one = predict_local(export, _b64(_png()))
    assert len(one) == 1 and len(one[0]) == 1
    everything = predict_local(export, [_b64(_png()), "data:image/jpeg;base64," + _b64(_png(fmt="JPEG"))], top_k=None)
    assert len(everything) == 2
    for ranked in everything:
        scores = [p["score"] for p in ranked]
        assert len(ranked) == 3 and scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1, abs=1e-5)
    assert one[0][0]["label"] == everything[0][0]["label"]  # the same image, alone or in a batch


@pytest.mark.parametrize("which", ["torchvision_export", "vit_export"])
def test_auto_dtype_keeps_images_in_float32_and_bfloat16_is_an_opt_in(which, request):
    import torch

    export = request.getfixturevalue(which)
    assert next(load_handler(export).model.parameters()).dtype == torch.float32  # auto, even with native bf16
    opted = load_handler(export, ServeSpec(dtype="bfloat16"))
    assert next(opted.model.parameters()).dtype == torch.bfloat16
    (logits,) = opted.run_batch([Image.open(io.BytesIO(_png()))])  # pixels follow the weights' dtype
    assert len(logits) == 3 and all(math.isfinite(x) for x in logits)


def test_the_inference_api_shape_is_one_images_labels(torchvision_export):
    from testdata import hf_answer

    handler = load_handler(torchvision_export)
    ranked = hf_answer(handler, {"inputs": _b64(_png()), "parameters": {"top_k": 2}})
    assert [set(p) for p in ranked] == [{"label", "score"}] * 2
    assert hf_answer(handler, {"inputs": [_b64(_png())] * 2}) == predict_local(torchvision_export, [_b64(_png())] * 2)


def test_grey_and_transparent_images_are_converted(torchvision_export):
    grey, rgba = io.BytesIO(), io.BytesIO()
    Image.new("L", (20, 30), 128).save(grey, format="PNG")
    Image.new("RGBA", (30, 20), (0, 0, 255, 100)).save(rgba, format="PNG")
    assert len(predict_local(torchvision_export, [_b64(grey.getvalue()), _b64(rgba.getvalue())])) == 2


def test_bad_inputs_get_their_4xx(torchvision_export, monkeypatch):
    jpeg = _png(size=(200, 200), fmt="JPEG")
    cases = [
        ("not base64 at all!", 422, "inputs[0] is not valid base64"),
        ("https://example.com/ant.jpg", 422, "inputs[0] is a URL (https://example.com/ant.jpg): the server does not fetch"),
        (_b64(b"%PDF-1.7 a document"), 415, "inputs[0] is not an image"),
        ([_b64(_png()), _b64(jpeg[: len(jpeg) // 2])], 415, "inputs[1] is a damaged or truncated image"),
        ([], 422, "must hold at least one image"),
        ("  ", 422, "must be a base64-encoded image"),
        (42, 422, "inputs"),
    ]
    for inputs, status, message in cases:
        with pytest.raises(ServingError) as caught:
            predict_local(torchvision_export, inputs)
        assert caught.value.status == status and message in caught.value.error, (inputs, caught.value.error)

    small = ServeSpec(max_image_bytes=500, max_inputs_per_request=2)
    for inputs, message in ((_b64(jpeg), "inputs[0] is too large"), ([_b64(_png())] * 3, "too many inputs: 3")):
        with pytest.raises(ServingError) as caught:
            predict_local(torchvision_export, inputs, spec=small)
        assert caught.value.status == 413 and message in caught.value.error

    import serving.handlers.image_classification as module

    monkeypatch.setattr(module, "MAX_IMAGE_PIXELS", 1000)  # 48 x 40 = 1920 pixels
    with pytest.raises(ServingError) as caught:
        predict_local(torchvision_export, _b64(_png()))
    assert caught.value.status == 413 and "too many pixels" in caught.value.error


def test_function_to_apply_and_top_k_as_the_pipeline_takes_them(torchvision_export):
    [soft] = predict_local(torchvision_export, _b64(_png()), top_k=None)
    assert sum(p["score"] for p in soft) == pytest.approx(1, abs=1e-5)
    [raw] = predict_local(torchvision_export, _b64(_png()), top_k=2, parameters={"function_to_apply": "none"})
    assert [p["label"] for p in raw] == [p["label"] for p in soft[:2]]
    # The logits themselves: softmax over all three gives the default scores back.
    [logits] = predict_local(torchvision_export, _b64(_png()), top_k=None, parameters={"function_to_apply": "none"})
    exps = {p["label"]: math.exp(p["score"]) for p in logits}
    assert {p["label"]: p["score"] for p in soft} == pytest.approx({k: v / sum(exps.values()) for k, v in exps.items()})


def test_uploads_use_the_same_steps(torchvision_export):
    handler = load_handler(torchvision_export)
    items, request = handler.prepare_upload([_png(), _png((0, 0, 250))], {"top_k": 2})
    outputs = [handler.format(o, request) for o in handler.run_batch(items)]
    assert [len(o) for o in outputs] == [2, 2]
    assert outputs == [p for p in predict_local(torchvision_export, [_b64(_png()), _b64(_png((0, 0, 250)))], top_k=2)]
    for files, parameters, status in (([], {}, 422), ([b"hello"], {}, 415), ([_png()], {"top_k": "two"}, 422)):
        with pytest.raises(ServingError) as caught:
            handler.prepare_upload(files, parameters)
        assert caught.value.status == status


def test_predict_command_reads_image_files(torchvision_export, tmp_path, capsys):
    import json

    from cluster.cli import main

    picture = tmp_path / "red.png"
    picture.write_bytes(_png())
    assert main(["predict", str(torchvision_export), str(picture), "--top-k", "2"]) == 0
    ranked = json.loads(capsys.readouterr().out)
    assert len(ranked) == 1 and len(ranked[0]) == 2 and {p["label"] for p in ranked[0]} <= set(LABELS)
    # A text or a folder given to an image model: one line naming the input and what to give instead.
    for wrong, why in (("a red square", "is not a file"), (str(tmp_path), "is a directory")):
        assert main(["predict", str(torchvision_export), str(picture), wrong]) == 2
        assert f"inputs[1] {wrong!r} {why}: this export classifies images" in capsys.readouterr().err
