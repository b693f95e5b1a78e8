"""Image classification data and models: ImageFolder (hymenoptera and generated), CSV/JSONL of paths,
parquet with an Image column (what hub datasets hold), unreadable files skipped or refused,
torchvision weights from a file or a URL, and an export a plain torchvision user loads."""

from __future__ import annotations

import io
import json

import pytest
import torch

from cluster.spec import JobSpecError, validate_job
from testdata import colour_images, shared_file
from training.data.tables import DataError
from training.tasks import TASKS

TASK = TASKS.get("image-classification")


def job(model: str = "torchvision://mobilenet_v3_small", weights: str | None = None, method: str = "full", **data):
    model_spec = {"path": model, **({"weights": weights} if weights else {})}
    return validate_job({"name": "img", "task": "image-classification", "model": model_spec, "data": data,
                         "method": {"name": method}, "train": {"seed": 3}})


def rows(table) -> list[dict]:
    return table.to_pylist()


@pytest.fixture()
def squares(tmp_path):
    """Train and validation ImageFolders of 40-px coloured squares, with the odd files real folders hold."""
    train, val = colour_images(tmp_path / "train", 6, seed=1), colour_images(tmp_path / "val", 3, seed=2)
    (train / "red" / "broken.jpg").write_bytes(b"this is not a JPEG")  # an image by name only
    png = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 0, 0)).save(png, format="PNG")
    (train / "blue" / "truncated.png").write_bytes(png.getvalue()[:60])  # cut off mid-file
    (train / "red" / "notes.txt").write_text("not an image suffix: ignored, as torchvision's ImageFolder does")
    (train / ".DS_Store").write_bytes(b"\0\0")
    return train, val


def test_hymenoptera_image_folder():
    train, val = shared_file("hymenoptera", "train"), shared_file("hymenoptera", "val")
    prepared = TASK.prepare(job(train=str(train), validation=str(val)))
    assert prepared.labels == ["ants", "bees"]
    assert (prepared.train.num_rows, prepared.validation.num_rows) == (245, 153)
    assert prepared.summary()["skipped_images"] == 0
    assert sum(prepared.label_counts) == 245 and min(prepared.label_counts) > 100
    first = rows(prepared.train)[0]
    assert first["image"].startswith(str(train.resolve())) and first["length"] == 1


def test_dataset_root_instead_of_a_split_is_named():
    root = shared_file("hymenoptera")
    with pytest.raises(JobSpecError, match="data.train: .* holds split folders .*data.validation"):
        job(train=str(root))  # caught by `tunefleet validate`, before any cluster time


def test_unreadable_images_are_skipped_and_counted(squares, capsys):
    train, val = squares
    prepared = TASK.prepare(job(train=str(train), validation=str(val)))
    assert prepared.labels == ["blue", "red"]
    assert prepared.train.num_rows == 12 and prepared.summary()["skipped_images"] == 2
    assert prepared.summary()["ignored_non_image_files"] == 1
    out = capsys.readouterr().out
    assert "skipping 2 unreadable images" in out and "broken.jpg" in out and "truncated.png" in out
    assert not any("broken" in r["image"] or "truncated" in r["image"] for r in rows(prepared.train))


def test_unreadable_images_refused_when_asked(squares):
    train, val = squares
    with pytest.raises(DataError) as caught:
        TASK.prepare(job(train=str(train), validation=str(val), bad_images="error"))
    message = str(caught.value)
    assert "2 of 14 images cannot be read" in message and "broken.jpg" in message and "bad_images: skip" in message


def test_csv_and_jsonl_of_relative_paths(tmp_path):
    colour_images(tmp_path / "pics", 4)
    lines = [(f"pics/{c}/{i:03d}.png", c) for c in ("red", "blue") for i in range(4)]
    (tmp_path / "train.csv").write_text("file,colour\n" + "".join(f"{p},{c}\n" for p, c in lines)
                                        + "pics/missing.png,red\n")
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"file": p, "colour": c}) + "\n" for p, c in lines[::2]))
    prepared = TASK.prepare(job(train=str(tmp_path / "train.csv"), validation=str(tmp_path / "val.jsonl"),
                                columns={"image": "file", "label": "colour"}, label_names=["red", "blue"]))
    assert prepared.labels == ["red", "blue"] and prepared.label_counts == [4, 4]
    assert prepared.summary()["skipped_images"] == 1  # the missing file
    assert {r["image"] for r in rows(prepared.train)} == {str(tmp_path / p) for p, _ in lines}
    assert prepared.validation.num_rows == 4

    with pytest.raises(JobSpecError, match="data.columns.image: .*train.csv has no column 'path'; columns: file, colour"):
        job(train=str(tmp_path / "train.csv"), columns={"image": "path", "label": "colour"})


def test_parquet_with_image_feature_keeps_bytes_and_class_names(tmp_path):
    import datasets

    colour_images(tmp_path / "pics", 5)
    files = sorted((tmp_path / "pics").rglob("*.png"))
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["red", "blue"])})
    ds = datasets.Dataset.from_dict({"img": [str(f) for f in files],
                                     "label": [0 if f.parent.name == "red" else 1 for f in files]}, features=features)
    ds.to_parquet(str(tmp_path / "train.parquet"))
    prepared = TASK.prepare(job(train=str(tmp_path / "train.parquet"), validation_fraction=0.2))
    assert prepared.labels == ["red", "blue"]  # the ClassLabel's order, not sorted
    assert prepared.train.num_rows == 8 and prepared.validation.num_rows == 2
    image = rows(prepared.train)[0]["image"]
    assert isinstance(image, bytes) and image.startswith(b"\x89PNG")


def test_collator_augments_in_training_only(tmp_path):
    train = colour_images(tmp_path / "train", 4)
    spec = job(train=str(train), image_size=32)
    prepared = TASK.prepare(spec)
    processing = TASK.build_processor(spec)
    assert processing.preprocessing.crop_size == (32, 32) and processing.preprocessing.resize_size == 37
    batch = rows(prepared.train)[:4]
    evaluate, augment = TASK.build_collator(processing, False), TASK.build_collator(processing, True)
    first, second = evaluate(batch), evaluate(batch)
    assert first["pixel_values"].shape == (4, 3, 32, 32) and first["labels"].tolist() == [r["labels"] for r in batch]
    assert torch.equal(first["pixel_values"], second["pixel_values"])
    torch.manual_seed(0)
    assert not torch.equal(augment(batch)["pixel_values"], augment(batch)["pixel_values"])


def test_torchvision_weights_from_file_and_url_export_loads_in_plain_torchvision(tmp_path, monkeypatch):
    import torchvision
    from safetensors.torch import load_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # torch.hub's download cache
    torch.manual_seed(0)
    pretrained = torchvision.models.mobilenet_v3_small()
    weights = tmp_path / "mobilenet_v3_small-047dcff4.pth"  # torchvision's file name: its metadata applies
    torch.save({"state_dict": pretrained.state_dict()}, weights)
    train = colour_images(tmp_path / "train", 2)
    labels = ["blue", "red"]

    for location in (str(weights), weights.as_uri()):
        spec = job(weights=location, method="head", train=str(train))
        model = TASK.build_model(spec, labels)
        body = model.backbone.features[0][0].weight
        assert torch.equal(body, pretrained.features[0][0].weight)
        assert model.classifier.out_features == 2 and model.head_name == "classifier.3"
    from training.methods import METHODS

    model = METHODS.get("head").apply(model, spec.method_options(), spec.task).train()
    assert not any(p.requires_grad for p in model.backbone.parameters()) and model.classifier.weight.requires_grad
    norms = [m for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert model.training and not any(m.training for m in norms)  # frozen: keeps the pretrained statistics
    assert all(m.training for m in METHODS.get("full").apply(model, None, spec.task).train().modules())
    processing = TASK.build_processor(spec)
    assert processing.preprocessing.resize_size == 256 and processing.preprocessing.crop_size == (224, 224)

    export = tmp_path / "export"
    TASK.save_export(model, processing, export)
    config = json.loads((export / "torchvision.json").read_text())
    assert config["architecture"] == "mobilenet_v3_small" and config["labels"] == labels
    plain = torchvision.models.get_model(config["architecture"], num_classes=config["num_classes"])
    plain.load_state_dict(load_file(export / "model.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    model.eval(), plain.eval()
    assert torch.allclose(plain(x), model(x), atol=1e-5)


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    import torchvision

    weights = tmp_path / "resnet.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    with pytest.raises(ValueError, match="does not hold mobilenet_v3_small weights"):
        TASK.build_model(job(weights=str(weights), train=str(colour_images(tmp_path / "t", 1))), ["a", "b"])
    with pytest.raises(RuntimeError, match="cannot read weights from .*junk.pth.*model.weights"):
        (tmp_path / "junk.pth").write_bytes(b"junk")
        TASK.build_model(job(weights=str(tmp_path / "junk.pth"), train=str(tmp_path / "t")), ["a", "b"])


def test_job_rules(tmp_path, tiny_vit):
    train = str(colour_images(tmp_path / "train", 1))
    with pytest.raises(JobSpecError) as caught:
        job(model="torchvision://resnet19", train=train)
    assert "unknown torchvision classification model 'resnet19'" in str(caught.value)
    with pytest.raises(JobSpecError) as caught:
        job(model=str(tiny_vit), weights="https://example.com/w.pth", train=train, image_size=64)
    assert "model.weights: applies to torchvision" in str(caught.value) and "data.image_size" in str(caught.value)
    with pytest.raises(JobSpecError, match="model.weights: no such file"):
        job(weights="missing/weights.pth", train=train)


def test_hugging_face_model_evaluates_with_its_image_processor(tmp_path, tiny_vit):
    train = colour_images(tmp_path / "train", 3)
    spec = job(model=str(tiny_vit), method="head", train=str(train))
    prepared = TASK.prepare(spec)
    model = TASK.build_model(spec, prepared.labels)
    assert model.config.id2label == {0: "blue", 1: "red"} and model.classifier.out_features == 2
    processing = TASK.build_processor(spec)
    batch = TASK.build_collator(processing, False)(rows(prepared.validation))
    assert batch["pixel_values"].shape[1:] == (3, 32, 32)
    assert TASK.build_collator(processing, True)(rows(prepared.train))["pixel_values"].shape[1:] == (3, 32, 32)
    assert model(pixel_values=batch["pixel_values"]).logits.shape == (len(batch["labels"]), 2)


def test_torchvision_export_does_not_repeat_new_head(tmp_path):
    """The worker says the head is new; the export, rebuilding the same model under trained weights, does not."""
    import logging

    import torchvision
    from transformers import get_scheduler

    from training.checkpoint import TrainState, save_shard
    from training.export import export_checkpoint
    from training.model_builder import build_training_model

    weights = tmp_path / "mobilenet_v3_small-047dcff4.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), weights)
    spec = job(weights=str(weights), train=str(colour_images(tmp_path / "train", 2)))
    said = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: said.append(record.getMessage())
    ours = logging.getLogger("training")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)  # as on a Ray Train worker, whose root logger Ray sets to INFO
    try:
        model = build_training_model(spec, ["blue", "red"])
        assert [line for line in said if line.endswith("new head for 2 labels")], said
        optimizer = torch.optim.AdamW(model.parameters())
        save_shard(tmp_path / "ckpt", 0, 1, model, optimizer, get_scheduler("constant", optimizer), TrainState(step=1),
                   {"accuracy": 1.0}, extra={"labels": ["blue", "red"]})
        said.clear()
        export = export_checkpoint(tmp_path / "ckpt", spec, tmp_path / "export")
    finally:
        ours.removeHandler(handler)
        ours.setLevel(logging.NOTSET)
    assert said == [] and (export / "torchvision.json").is_file()


def test_lora_on_a_torchvision_cnn_trains_and_exports_merged_torchvision_weights(tmp_path):
    """LoRA on MobileNet failed in the worker: PEFT matched leaf names "0"/"1" to whole blocks it cannot adapt,
    and a depthwise conv's groups did not divide the rank. The export is plain torchvision weights, merged."""
    import torchvision
    from safetensors.torch import load_file
    from transformers import get_scheduler

    from training.checkpoint import TrainState, save_shard
    from training.export import export_checkpoint
    from training.model_builder import build_training_model

    weights = tmp_path / "mobilenet_v3_small-047dcff4.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), weights)
    spec = job(weights=str(weights), method="lora", train=str(colour_images(tmp_path / "train", 2)))
    torch.manual_seed(0)
    model = build_training_model(spec, ["blue", "red"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and len(trainable) < len(list(model.parameters()))
    x = torch.randn(2, 3, 64, 64)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
        optimizer.step(), optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(x)
    save_shard(tmp_path / "ckpt", 0, 1, model, optimizer, get_scheduler("constant", optimizer), TrainState(step=2),
               {"accuracy": 1.0}, extra={"labels": ["blue", "red"]})
    export = export_checkpoint(tmp_path / "ckpt", spec, tmp_path / "export")
    info = json.loads((export / "tunefleet.json").read_text())
    assert info["merged"] and not info["adapter"] and not (export / "adapter_config.json").exists()
    config = json.loads((export / "torchvision.json").read_text())
    plain = torchvision.models.get_model(config["architecture"], num_classes=config["num_classes"])
    plain.load_state_dict(load_file(export / "model.safetensors"))
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), expected, atol=1e-4)


@pytest.mark.parametrize("method", ["prompt-tuning", "ia3"])
def test_methods_that_cannot_merge_do_not_fit_torchvision_models(tmp_path, method):
    with pytest.raises(JobSpecError) as caught:
        job(method=method, train=str(colour_images(tmp_path / "train", 1)))
    assert "method.name: does not fit torchvision:// models" in str(caught.value)
