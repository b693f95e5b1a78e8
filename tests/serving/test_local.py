"""Serving without Ray: predict_local, the handler registry, request validation, model naming."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from serving import HANDLERS, ServeSpec, ServingError, predict_local, resolve_models
from serving.handlers import load_handler, parse_request
from serving.handlers.registry import HandlerRegistry, UnknownTaskError
from training.layout import ExportInfo, read_export_info, write_export_info

LABELS = ["negative", "positive"]  # the tiny export's labels (conftest.py)


def _assert_ranked(prediction: list[dict], k: int) -> None:
    assert len(prediction) == k
    assert [p["label"] for p in prediction] == [p["label"] for p in prediction if p["label"] in LABELS]
    scores = [p["score"] for p in prediction]
    assert scores == sorted(scores, reverse=True)
    assert all(0 <= s <= 1 for s in scores) and sum(scores) <= 1 + 1e-6


def test_single_text_gives_one_prediction_with_the_top_label(tiny_export: Path) -> None:
    predictions = predict_local(tiny_export, "a wonderful film")
    assert len(predictions) == 1
    _assert_ranked(predictions[0], 1)


def test_batch_pairs_and_top_k(tiny_export: Path) -> None:
    everything = predict_local(tiny_export, ["good", "bad", {"text": "a", "text_pair": "b"}], top_k=None)
    assert len(everything) == 3
    for prediction in everything:
        _assert_ranked(prediction, 2)
        assert sum(p["score"] for p in prediction) == pytest.approx(1, abs=1e-5)
    assert len(predict_local(tiny_export, ["good"], top_k=5)[0]) == 2  # more than there are: all
    # {"text": ...} alone is a single text, as transformers' pipeline takes it
    assert predict_local(tiny_export, [{"text": "good"}], top_k=None) == predict_local(tiny_export, "good", top_k=None)
    # ... and so is one pair object as the whole of `inputs` (pipeline({"text": ..., "text_pair": ...})).
    pair = {"text": "a", "text_pair": "b"}
    assert predict_local(tiny_export, pair, top_k=None) == predict_local(tiny_export, [pair], top_k=None)
    # A run directory works too (its export/ is found), and agrees with the export itself.
    run_dir = tiny_export.parent / "run"
    if not run_dir.exists():
        shutil.copytree(tiny_export, run_dir / "export")
    assert predict_local(run_dir, "good", top_k=None) == predict_local(tiny_export, "good", top_k=None)


def _scored(handler, items) -> list[dict[str, float]]:
    """Each item's {label: score}, as a request with every label (top_k null) gets them."""
    request = parse_request(handler, {"inputs": "x", "parameters": {"top_k": None}})
    return [{p["label"]: p["score"] for p in handler.format(o, request)} for o in handler.run_batch(items)]


def test_function_to_apply_scores_the_logits_as_the_pipeline_does(tiny_export: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    text = "a wonderful film"
    with torch.inference_mode():
        encoded = AutoTokenizer.from_pretrained(tiny_export)(text, return_tensors="pt")
        logits = AutoModelForSequenceClassification.from_pretrained(tiny_export).eval()(**encoded).logits[0]

    def scores(export: Path, **parameters) -> dict[str, float]:
        [ranked] = predict_local(export, text, top_k=None, parameters=parameters, spec=ServeSpec(dtype="float32"))
        assert [p["score"] for p in ranked] == sorted((p["score"] for p in ranked), reverse=True)
        return {p["label"]: p["score"] for p in ranked}

    for function, want in (("softmax", logits.softmax(-1)), ("sigmoid", logits.sigmoid()), ("none", logits)):
        got = scores(tiny_export, function_to_apply=function)
        assert [got[label] for label in LABELS] == pytest.approx(want.tolist(), abs=1e-5), function
    assert scores(tiny_export) == scores(tiny_export, function_to_apply="softmax")  # a single-label model's own
    multi = tmp_path / "multi"  # a multi-label model's own is sigmoid, as the pipeline's
    shutil.copytree(tiny_export, multi)
    config = json.loads((multi / "config.json").read_text())
    (multi / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    assert scores(multi) == scores(multi, function_to_apply="sigmoid") != scores(multi, function_to_apply="softmax")
    with pytest.raises(ServingError) as caught:
        scores(tiny_export, function_to_apply="tanh")
    assert caught.value.status == 422 and "parameters.function_to_apply" in caught.value.error


def test_the_inference_api_shape_nests_each_inputs_labels(tiny_export: Path) -> None:
    """Hugging Face's InferenceClient.text_classification reads `answer[0]`: a list of labels, even for one text."""
    from testdata import hf_answer

    handler = load_handler(tiny_export)
    for body, count in (({"inputs": "good"}, 1), ({"inputs": ["good", "bad"], "parameters": {"top_k": 2}}, 2),
                        ({"inputs": {"text": "a", "text_pair": "b"}, "stream": False}, 1)):
        answer = hf_answer(handler, body)
        assert len(answer) == count and all(isinstance(ranked, list) for ranked in answer), answer
        assert answer == predict_local(tiny_export, body["inputs"], parameters=body.get("parameters"))


def test_batched_and_single_scores_agree(tiny_export: Path) -> None:
    handler = load_handler(tiny_export)
    texts = ["short", "a much longer text that needs padding in a batch with the short one", "mid length text"]
    batched = handler.run_batch([(t, None) for t in texts])
    for text, logits in zip(texts, batched):
        (alone,) = handler.run_batch([(text, None)])
        assert alone == pytest.approx(logits, abs=1e-5)


@pytest.mark.parametrize(
    ("inputs", "top_k", "status", "message"),
    [
        ("", 1, 422, "inputs: must be a non-empty text"),
        ([], 1, 422, "at least one input"),
        ([1], 1, 422, "inputs[0]: each input must be a text"),
        (5, 1, 422, 'inputs must be a text, an object {"text": ..., "text_pair": ...}, or a list of these'),
        ({"text_pair": "b"}, 1, 422, "inputs.text: Field required"),
        ([{"text_pair": "b"}], 1, 422, "inputs[0].text: Field required"),
        (["ok", "  "], 1, 422, "inputs[1]: must be a non-empty text"),
        ("fine", 0, 422, "parameters.top_k"),
        (["x" * 100_001], 1, 413, "too long"),
    ],
)
def test_bad_inputs_raise_the_http_status_they_would_answer(tiny_export, inputs, top_k, status, message) -> None:
    with pytest.raises(ServingError) as caught:
        predict_local(tiny_export, inputs, top_k=top_k)
    assert caught.value.status == status
    assert message in caught.value.error


@pytest.mark.parametrize("pairs", [True, False])
def test_a_model_trained_on_pairs_refuses_a_lone_text_and_the_other_way_round(tiny_export, tmp_path, capsys,
                                                                              pairs) -> None:
    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    write_export_info(export, read_export_info(export).model_copy(update={"text_pairs": pairs}))
    right, wrong = {"text": "a", "text_pair": "b"}, "a lone text"
    if not pairs:
        right, wrong = wrong, right
    assert len(predict_local(export, [right, right])) == 2
    for other in (wrong, {"text": "a"}) if pairs else (wrong,):  # an object without text_pair is a single text
        with pytest.raises(ServingError) as caught:
            predict_local(export, [right, other])
    assert caught.value.status == 422
    assert caught.value.error == (
        'input 1 is a single text, but this model was trained on sentence pairs: send {"text": ..., "text_pair": ...}'
        if pairs else "input 1 is a text pair, but this model was trained on single texts: send a text")
    assert caught.value.detail == {"field": "inputs[1]", "text_pairs": pairs}
    if pairs:  # `tunefleet predict` says it too, and how its command line writes a pair
        from cluster.cli import main

        assert main(["predict", str(export), "first ||| second"]) == 0 and len(json.loads(capsys.readouterr().out)) == 1
        assert main(["predict", str(export), "a lone text"]) == 2
        assert capsys.readouterr().err.splitlines()[-2:] == [f"error: {caught.value.error.replace('1', '0', 1)}",
                                                             "  (here, 'first ||| second' is one sentence pair)"]


def test_malformed_input_is_refused_before_the_model_loads(tiny_export: Path, monkeypatch) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded for a request that cannot be answered")

    monkeypatch.setattr("serving.local.load_handler", no_loading)
    with pytest.raises(ServingError) as caught:
        predict_local(tiny_export, [1])
    assert caught.value.status == 422


def test_too_many_inputs_is_413(tiny_export: Path) -> None:
    with pytest.raises(ServingError) as caught:
        predict_local(tiny_export, ["a", "b", "c"], spec=ServeSpec(max_inputs_per_request=2))
    assert caught.value.status == 413 and "too many inputs: 3" in caught.value.error


def test_resolve_models_names_every_problem(tiny_export: Path, tmp_path: Path) -> None:
    (model,) = resolve_models([tiny_export])
    assert model.name == "tiny-sentiment" and model.route_prefix == "/v1/models/tiny-sentiment"
    assert len(model.version) == 12 and model.card().labels == LABELS

    other = tmp_path / "other"
    shutil.copytree(tiny_export, other)
    info = read_export_info(other)
    write_export_info(other, ExportInfo(**{**info.model_dump(), "task": "speech-recognition"}))
    with pytest.raises(ValueError) as caught:
        resolve_models([tiny_export, other])
    message = str(caught.value)
    assert "'tiny-sentiment' is used twice" in message
    assert "task 'speech-recognition' has no serving handler" in message and "text-classification" in message

    with pytest.raises(ValueError, match="must be letters, digits"):
        resolve_models([tiny_export], names=["bad/name"])
    with pytest.raises(ValueError, match="2 names for 1 export"):
        resolve_models([tiny_export], names=["a", "b"])
    with pytest.raises(FileNotFoundError, match="tunefleet.json"):
        resolve_models([tmp_path])


def test_handler_registry_rejects_duplicates_and_lists_known_tasks() -> None:
    assert "text-classification" in HANDLERS.names()
    registry = HandlerRegistry()
    registry.register("x", HANDLERS.get("text-classification"))
    with pytest.raises(ValueError, match="already registered"):
        registry.register("x", HANDLERS.get("text-classification"))
    with pytest.raises(UnknownTaskError, match="servable tasks: x"):
        registry.get("y")


def test_serve_spec_cross_field_rules() -> None:
    with pytest.raises(ValueError) as caught:
        ServeSpec(max_batch_size=64, max_ongoing_requests=64, min_replicas=3, max_replicas=2)
    assert "max_ongoing_requests (64) must be > max_batch_size (64)" in str(caught.value)
    assert "min_replicas (3) must be <= max_replicas (2)" in str(caught.value)
    assert ServeSpec(num_cpus=0.5).torch_threads == 1 and ServeSpec(num_cpus=2).torch_threads == 2
    with pytest.raises(ValueError, match=r"dtype \(float16\) with num_gpus 0: .*use bfloat16, float32 or auto"):
        ServeSpec(dtype="float16")
    assert ServeSpec(dtype="float16", num_gpus=1).dtype == "float16"


def test_auto_dtype_is_bfloat16_where_the_cpu_multiplies_it_and_answers_as_float32_does(tiny_export: Path) -> None:
    import torch

    from serving.placement import cpu_has_native_bf16

    exact, default = load_handler(tiny_export, ServeSpec(dtype="float32")), load_handler(tiny_export)
    assert next(exact.model.parameters()).dtype == torch.float32
    assert next(default.model.parameters()).dtype == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert next(load_handler(tiny_export, ServeSpec(dtype="bfloat16")).model.parameters()).dtype == torch.bfloat16
    items = [(t, None) for t in ("a wonderful film", "dull and far too long", "fine", "a terrible waste of time")]
    assert all(isinstance(x, float) for row in default.run_batch(items) for x in row)  # whatever the weights' dtype
    for want, got in zip(_scored(exact, items), _scored(default, items)):
        assert got == pytest.approx(want, abs=2e-2)
        (first, p1), (second, p2) = sorted(want.items(), key=lambda pair: -pair[1])
        if p1 - p2 > 0.05:  # a clear answer stays the same answer
            assert max(got, key=got.__getitem__) == first


def test_served_classifier_skips_padding_and_unread_positions_with_the_full_models_scores(
    tiny_export: Path, monkeypatch,
) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import serving.packed

    handler = load_handler(tiny_export, ServeSpec(dtype="float32"))
    layers = handler.model.bert.encoder.layer
    assert type(layers[-1]).__name__.startswith("FirstToken") and not type(layers[0]).__name__.startswith("FirstToken")
    packed_layers = []
    monkeypatch.setattr(serving.packed, "_layer", lambda *a, first_only, _layer=serving.packed._layer: (
        packed_layers.append(first_only), _layer(*a, first_only=first_only))[1])
    texts = ["a wonderful film", "dull and far too long, with a plot nobody could follow", "fine"]  # padded batch
    full = AutoModelForSequenceClassification.from_pretrained(tiny_export).eval()
    with torch.inference_mode():
        encoded = AutoTokenizer.from_pretrained(tiny_export)(texts, padding=True, return_tensors="pt")
        want = full(**encoded).logits.softmax(-1)
    for row, scored in enumerate(_scored(handler, [(t, None) for t in texts])):
        assert [scored[label] for label in LABELS] == pytest.approx(want[row].tolist(), abs=1e-6)
    assert packed_layers == [False] * (len(layers) - 1) + [True]  # the padded batch ran packed


def test_int8_quantizes_the_linear_layers_on_the_cpu_and_is_refused_where_it_cannot_run(tiny_export: Path) -> None:
    from serving.plan import PlanError, PoolRequest, make_plan
    from serving.pools import PoolKey

    handler = load_handler(tiny_export, ServeSpec(dtype="int8"))  # fails if torch drops dynamic quantization
    import torch

    kinds = {type(m) for m in handler.model.modules()}
    assert torch.ao.nn.quantized.dynamic.Linear in kinds and torch.nn.Linear not in kinds
    exact = load_handler(tiny_export, ServeSpec(dtype="float32"))
    items = [(t, None) for t in ("a wonderful film", "dull and far too long", "a terrible waste of time")]
    for want, got in zip(_scored(exact, items), _scored(handler, items)):
        assert got == pytest.approx(want, abs=5e-2)
    with pytest.raises(ValueError, match=r"dtype \(int8\) with num_gpus 1: .*runs on CPUs only"):
        ServeSpec(dtype="int8", num_gpus=1)
    key = PoolKey(base_model="some/base", task="text-classification", num_labels=2, kind="LORA")
    with pytest.raises(PlanError, match="serve.dtype int8 is for full models"):
        make_plan([], pools=[PoolRequest(key, where="pools[0]")], spec=ServeSpec(dtype="int8"))


def test_reading_the_serve_spec_does_not_import_torch_or_ray() -> None:
    code = "import sys; from serving.config import ServeSpec; print('torch' in sys.modules or 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False"


def test_predict_cli_takes_the_dtype(tiny_export: Path, capsys) -> None:
    from cluster.cli import main

    assert main(["predict", str(tiny_export), "a wonderful film", "--top-k", "2", "--dtype", "float32"]) == 0
    exact = predict_local(tiny_export, "a wonderful film", top_k=2, spec=ServeSpec(dtype="float32"))
    assert json.loads(capsys.readouterr().out) == exact
    assert main(["predict", str(tiny_export), "a wonderful film", "--dtype", "float16"]) == 2
    error = capsys.readouterr().err
    assert "--dtype" in error and "use bfloat16, float32 or auto" in error
    assert main(["predict", str(tiny_export), "a wonderful film", "--dtype", "int8", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)[0][0]["label"] in LABELS  # int8 on the CPU answers
    assert main(["predict", str(tiny_export / "nope"), "text"]) == 2  # one line naming the path, no traceback
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "nope" in error and "Traceback" not in error
    import torch

    if not torch.cuda.is_available():
        assert main(["predict", str(tiny_export), "a wonderful film", "--device", "cuda"]) == 2
        error = capsys.readouterr().err
        assert "--device cuda" in error and "no CUDA GPU" in error
    assert main(["predict", str(tiny_export), "a wonderful film", "--top-k", "2", "--dtype", "float32",
                 "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out) == exact


def test_predict_cli_passes_request_parameters(tiny_export: Path, capsys) -> None:
    from cluster.cli import main

    assert main(["predict", str(tiny_export), "a wonderful film", "--param", "top_k=null"]) == 0
    assert len(json.loads(capsys.readouterr().out)[0]) == len(LABELS)  # YAML-typed: null is every label
    assert main(["predict", str(tiny_export), "a wonderful film", "--param", "max_new_tokens=8"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: invalid request: parameters.max_new_tokens: Extra inputs are not permitted")
    assert main(["predict", str(tiny_export), "a wonderful film", "--param", "top_k"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: --param top_k: expected KEY=VALUE"


@pytest.mark.gpu
def test_predict_runs_on_the_gpu_when_there_is_one(tiny_export: Path, capsys) -> None:
    from cluster.cli import main
    from serving.handlers import load_handler, parse_request

    assert next(load_handler(tiny_export, ServeSpec(num_gpus=1)).model.parameters()).device.type == "cuda"
    assert main(["predict", str(tiny_export), "a wonderful film", "--top-k", "2", "--dtype", "float32"]) == 0
    on_gpu = json.loads(capsys.readouterr().out)
    on_cpu = predict_local(tiny_export, "a wonderful film", top_k=2, spec=ServeSpec(dtype="float32"))
    assert [p["label"] for p in on_gpu[0]] == [p["label"] for p in on_cpu[0]]
    assert [p["score"] for p in on_gpu[0]] == pytest.approx([p["score"] for p in on_cpu[0]], abs=1e-4)


@pytest.mark.parametrize(("body", "status", "message"), [
    (b'{"inputs": ', 400, "malformed JSON body"),
    (b'["a"]', 422, "body: a JSON object is required"),
    (b'{"inputs": "a", "stream": true}', 422, "stream: not offered on this route"),
    (b'{"inputs": "a", "details": true}', 422, "details: Extra inputs are not permitted"),
    (b'{"inputs": "a", "options": {"wait_for_model": "yes"}}', 422, "options.wait_for_model"),
    (b'{"parameters": {}}', 422, "invalid request: inputs: Field required"),
])
def test_the_inference_api_envelope_refuses_what_it_cannot_honour(body, status, message) -> None:
    from serving.hf_compat import hf_request

    with pytest.raises(ServingError) as caught:
        hf_request(body)
    assert caught.value.status == status and message in caught.value.error, caught.value.error
    payload, single = hf_request(b'{"inputs": ["a"], "options": {"wait_for_model": true, "use_cache": false}}')
    assert (payload, single) == ({"inputs": ["a"]}, False)
