"""Every method on a tiny model: the right parameters train, the rest do not change, the export
reloads and predicts what the trained model predicted, merged and unmerged LoRA agree, and
combinations that make no sense are refused at validation with the methods that fit."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, get_scheduler

from cluster.spec import JobSpecError, validate_job
from training.checkpoint import TrainState, save_shard
from training.export import export_checkpoint
from training.methods import METHODS
from training.model_builder import build_training_model
from training.optim import parameter_groups
from training.tasks import TASKS

LABELS = ["neg", "pos"]
TEXT_METHODS = sorted(m for m in METHODS.names() if "text-classification" in METHODS.get(m).tasks)


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory):
    """Hidden 64: bitsandbytes' 4-bit blocks are 64 wide, so QLoRA needs at least that."""
    from testdata import minilm_path

    directory = tmp_path_factory.mktemp("tiny64")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    data = directory / "data.tsv"
    data.write_text("sentence\tlabel\ngood film\tpos\nbad film\tneg\n")
    return directory, data, tokenizer


def _spec(model_dir, data, tmp_path, method: dict, task: str = "text-classification"):
    return validate_job({
        "name": "methods", "task": task, "model": str(model_dir),
        "data": {"train": str(data), "validation": str(data), "columns": {"text": "sentence"}},
        "method": method, "output": {"storage": str(tmp_path)},
    })


def _train_steps(model, batch, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-2, 0.0), lr=1e-2)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, torch.tensor([1, 0]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def _float_params(model) -> dict[str, torch.Tensor]:
    # 4-bit weights are uint8 storage that bitsandbytes repacks on first use: not training.
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype.is_floating_point}


def _reload_logits(export, info_method: str, model_dir, batch) -> torch.Tensor:
    """Load the export the way a user would, without tunefleet's training code."""
    from transformers import AutoModelForSequenceClassification

    if info_method == "adapter":
        from training import bottleneck

        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
        model = bottleneck.load_bottleneck_export(export, base)
    elif METHODS.get(info_method).export_kind == "adapter":
        from peft import AutoPeftModelForSequenceClassification

        model = AutoPeftModelForSequenceClassification.from_pretrained(export, num_labels=2)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(export)
    with torch.no_grad():
        return model.eval()(**batch).logits


@pytest.mark.parametrize("method", TEXT_METHODS)
def test_method_trains_the_right_parameters_and_exports(method, tiny64, tmp_path):
    model_dir, data, tokenizer = tiny64
    spec = _spec(model_dir, data, tmp_path, {"name": method})
    torch.manual_seed(0)
    model = build_training_model(spec, LABELS)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    total = sum(1 for _ in model.parameters())
    assert trainable, f"{method} trains nothing"
    if method != "full":
        assert len(trainable) < total, f"{method} should freeze part of the model"
    batch = tokenizer(["good film", "bad film"], return_tensors="pt", padding=True)
    before = _float_params(model)
    optimizer = _train_steps(model, batch)
    after = _float_params(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed <= trainable, f"frozen parameters changed: {sorted(changed - trainable)[:3]}"
    assert len(changed) >= 0.5 * len(trainable & set(before)), "most trainable parameters should move"

    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    scheduler = get_scheduler("constant", optimizer)
    save_shard(tmp_path / "ckpt", 0, 1, model, optimizer, scheduler, TrainState(step=3), {"accuracy": 1.0},
               extra={"labels": LABELS})
    export = export_checkpoint(tmp_path / "ckpt", spec, tmp_path / "export")
    info = (export / "tunefleet.json").read_text()
    assert f'"method": "{method}"' in info and '"trainable_parameters"' in info
    if METHODS.get(method).export_kind == "adapter":
        assert (export / "adapter_config.json").is_file() and (export / "adapter_model.safetensors").is_file()
        assert not (export / "model.safetensors").exists()
    reloaded = _reload_logits(export, method, model_dir, batch)
    # QLoRA's export is the adapter over the full-precision base: close to, not equal to, the 4-bit model.
    tolerance = 5e-2 if method == "qlora" else 1e-4
    torch.testing.assert_close(reloaded, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("method", [m for m in TEXT_METHODS if METHODS.get(m).mergeable])
def test_merged_and_unmerged_agree(method, tiny64, tmp_path):
    model_dir, data, tokenizer = tiny64
    spec = _spec(model_dir, data, tmp_path, {"name": method})
    torch.manual_seed(0)
    model = build_training_model(spec, LABELS)
    batch = tokenizer(["good film", "bad film"], return_tensors="pt", padding=True)
    optimizer = _train_steps(model, batch)
    save_shard(tmp_path / "ckpt", 0, 1, model, optimizer, get_scheduler("constant", optimizer), TrainState(step=3),
               {"accuracy": 1.0}, extra={"labels": LABELS})
    unmerged = _reload_logits(export_checkpoint(tmp_path / "ckpt", spec, tmp_path / "a"), method, model_dir, batch)
    merged_dir = export_checkpoint(tmp_path / "ckpt", spec, tmp_path / "b", merge=True)
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    merged = _reload_logits(merged_dir, "full", model_dir, batch)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-4)


def test_export_command_merges_a_runs_adapter(tiny64, tmp_path, capsys):
    """`tunefleet export RUN --merge`: the run's LoRA folded into a plain model the standard pipeline loads."""
    import yaml
    from transformers import pipeline

    from cluster.cli import main
    from training.layout import CHECKPOINTS_DIR, JOB_FILE

    model_dir, data, tokenizer = tiny64
    for method, step in (({"name": "lora"}, 3), ({"name": "prompt-tuning", "num_virtual_tokens": 4}, 0)):
        run = tmp_path / method["name"]
        spec = _spec(model_dir, data, tmp_path, method)
        run.mkdir()
        (run / JOB_FILE).write_text(yaml.safe_dump(spec.dump()))
        torch.manual_seed(0)
        model = build_training_model(spec, LABELS)
        optimizer = _train_steps(model, tokenizer(["good film", "bad film"], return_tensors="pt", padding=True))
        save_shard(run / CHECKPOINTS_DIR / "checkpoint_1", 0, 1, model, optimizer, get_scheduler("constant", optimizer),
                   TrainState(step=step), {"accuracy": 1.0}, extra={"labels": LABELS})
    assert main(["export", str(tmp_path / "lora"), "--merge"]) == 0
    export = tmp_path / "lora" / "export"
    assert capsys.readouterr().out.splitlines()[-1].endswith(str(export))
    assert (export / "model.safetensors").is_file() and not (export / "adapter_config.json").exists()
    assert pipeline("text-classification", model=str(export))("good film")[0]["label"] in LABELS
    assert main(["export", str(tmp_path / "prompt-tuning"), "--merge"]) == 2
    assert "error: method prompt-tuning cannot be merged into its base" in capsys.readouterr().err
    # A run stopped before its first checkpoint: one line, what to do
    shutil.rmtree(tmp_path / "prompt-tuning" / CHECKPOINTS_DIR)
    assert main(["export", str(tmp_path / "prompt-tuning")]) == 2
    assert capsys.readouterr().err.endswith("no complete checkpoint to export; train the run first "
                                            "(`tunefleet train JOB --run-id prompt-tuning` resumes it)\n")


def test_merge_refused_where_undefined(tiny64, tmp_path):
    model_dir, data, tokenizer = tiny64
    spec = _spec(model_dir, data, tmp_path, {"name": "prompt-tuning", "num_virtual_tokens": 4})
    model = build_training_model(spec, LABELS)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    save_shard(tmp_path / "ckpt", 0, 1, model, optimizer, get_scheduler("constant", optimizer), TrainState(),
               {"accuracy": 0.5}, extra={"labels": LABELS})
    with pytest.raises(ValueError, match="cannot be merged.*mergeable: .*lora"):
        export_checkpoint(tmp_path / "ckpt", spec, tmp_path / "m", merge=True)


def test_refused_combinations_name_the_methods_that_fit(tiny64, tmp_path):
    model_dir, data, _ = tiny64
    refused = [(m, t) for m in METHODS.names() for t in TASKS.names() if t not in METHODS.get(m).tasks]
    if not refused:
        pytest.skip("every registered method fits every registered task")
    method, task = refused[0]
    with pytest.raises(JobSpecError) as err:
        _spec(model_dir, data, tmp_path, {"name": method}, task=task)
    fitting = [m for m in METHODS.names() if task in METHODS.get(m).tasks]
    assert f"{method} does not fit task {task}" in str(err.value)
    assert ", ".join(fitting) in str(err.value)


def test_method_options_are_validated(tiny64, tmp_path):
    model_dir, data, _ = tiny64
    with pytest.raises(JobSpecError) as err:
        _spec(model_dir, data, tmp_path, {"name": "lora", "r": 0, "alpah": 16})
    message = str(err.value)
    assert "method.r" in message and "method.alpah: unknown key" in message


def test_gradual_unfreeze_opens_blocks_from_the_top(tiny64, tmp_path):
    model_dir, data, _ = tiny64
    spec = _spec(model_dir, data, tmp_path, {"name": "gradual-unfreeze", "every": 1, "unit": "steps"})
    model = build_training_model(spec, LABELS)
    schedule, options = METHODS.get("gradual-unfreeze").schedule, spec.method_options()

    def open_layers():
        return sorted({n.split(".")[3] for n, p in model.named_parameters() if p.requires_grad and ".layer." in n})

    assert open_layers() == [] and model.classifier.weight.requires_grad
    assert schedule(model, options, step=1, epoch=0) and open_layers() == ["1"]
    assert not schedule(model, options, step=1, epoch=0)  # no change, no DDP rebuild
    assert schedule(model, options, step=2, epoch=0) and open_layers() == ["0", "1"]
    assert model.bert.embeddings.word_embeddings.weight.requires_grad


def test_layer_lr_decay_gives_lower_layers_smaller_rates(tiny64):
    model_dir, _, _ = tiny64
    model = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    groups = parameter_groups(model, 1e-3, 0.01, layer_lr_decay=0.5)
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    lr = {n: by_param[id(p)] for n, p in model.named_parameters()}
    assert lr["classifier.weight"] == pytest.approx(1e-3)
    assert lr["bert.encoder.layer.1.output.dense.weight"] > lr["bert.encoder.layer.0.output.dense.weight"]
    assert lr["bert.encoder.layer.0.output.dense.weight"] > lr["bert.embeddings.word_embeddings.weight"]


LM_METHODS = sorted(m for m in METHODS.names() if "causal-lm" in METHODS.get(m).tasks and m != "qlora")


@pytest.mark.parametrize("method", LM_METHODS)
def test_causal_lm_loss_matches_the_models_own(method, tiny_causal_lm, tmp_path):
    """The task's loss on each method's model is the model's own (prompt tuning's virtual tokens included)."""
    from testdata import lm_sentences

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(lm_sentences(40)))
    spec = validate_job({"name": "lm", "task": "causal-lm", "model": str(tiny_causal_lm),
                         "data": {"train": str(corpus), "lm_format": "text", "max_length": 32},
                         "method": {"name": method}, "output": {"storage": str(tmp_path)}})
    task = TASKS.get("causal-lm")
    prepared = task.prepare(spec)
    torch.manual_seed(0)
    model = build_training_model(spec, prepared.labels).eval()
    batch = task.build_collator(task.build_processor(spec), True)(prepared.train.to_pylist()[:3])
    labels = batch.pop("labels")
    with torch.no_grad():
        ours = task.build_loss(None, 0.0, "cpu")(model(**batch).logits, labels)
        theirs = model(**batch, labels=labels).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_export_does_not_repeat_the_base_models_load_report(tiny64, tmp_path):
    """The export rebuilds the base under the trained weights: the base's missing head is not news then."""
    import logging

    from transformers import BertModel

    model_dir, data, _ = tiny64
    headless = tmp_path / "headless"
    BertModel(BertConfig.from_pretrained(model_dir)).save_pretrained(headless)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(headless)
    spec = _spec(headless, data, tmp_path, {"name": "full"})
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("transformers").addHandler(handler)  # transformers' loggers do not propagate to root
    try:
        model = build_training_model(spec, LABELS)
        assert any("LOAD REPORT" in line and "MISSING" in line for line in said), said  # as the worker says it
        optimizer = torch.optim.AdamW(model.parameters())
        save_shard(tmp_path / "ckpt", 0, 1, model, optimizer, get_scheduler("constant", optimizer),
                   TrainState(step=1), {"accuracy": 1.0}, extra={"labels": LABELS})
        said.clear()
        export = export_checkpoint(tmp_path / "ckpt", spec, tmp_path / "export")
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [line for line in said if "LOAD REPORT" in line], said
    torch.testing.assert_close(load_file(export / "model.safetensors")["classifier.weight"],
                               model.classifier.weight.detach())
