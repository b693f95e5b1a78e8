"""The NER handler: words → entities as the pipeline's "simple" strategy joins them, offsets into the input."""

from __future__ import annotations

from pathlib import Path

import pytest

from serving.errors import ServingError
from serving.handlers import load_handler, parse_request
from serving.handlers.token_classification import group_entities

LABELS = ["O", "B-LOC", "B-PER", "I-PER"]


def build_tagging_export(export_dir: Path, tag: str, max_length: int = 16) -> Path:
    """A tiny BERT token classifier (MiniLM tokenizer) that tags every sub-token `tag`, whatever it reads."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    from testdata import minilm_path
    from training.layout import ExportInfo, write_export_info

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=128, num_labels=len(LABELS),
                        id2label=dict(enumerate(LABELS)), label2id={t: i for i, t in enumerate(LABELS)})
    model = BertForTokenClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([5.0 if t == tag else 0.0 for t in LABELS]))
    model.save_pretrained(export_dir, safe_serialization=True)
    tokenizer.save_pretrained(export_dir)
    write_export_info(export_dir, ExportInfo(name="tagger", task="token-classification", labels=LABELS,
                                             base_model="tiny-bert", method="full", max_length=max_length))
    return export_dir


def _predict(handler, inputs, **parameters):
    return handler.predict(parse_request(handler, {"inputs": inputs, "parameters": parameters}))


def test_grouping_follows_simple_strategy_and_bioes():
    text = "Mr Peter Blackburn met Anna in Paris"
    spans = [(0, 2), (3, 8), (9, 18), (19, 22), (23, 27), (28, 30), (31, 36)]
    tags = ["O", "B-PER", "I-PER", "O", "I-PER", "O", "B-LOC"]
    words = [(t, 0.5 + i / 20, s, e) for i, (t, (s, e)) in enumerate(zip(tags, spans))]
    entities = group_entities(text, words, pre_split=False)
    assert [(e["entity"], e["word"], e["start"], e["end"]) for e in entities] == [
        ("PER", "Peter Blackburn", 3, 18), ("PER", "Anna", 23, 27), ("LOC", "Paris", 31, 36)]
    assert entities[0]["score"] == pytest.approx((0.55 + 0.6) / 2)
    # B- always starts a new entity; a type change too; BIOES's S-/E- close one.
    adjacent = [("B-PER", 1.0, 0, 1), ("B-PER", 1.0, 2, 3), ("I-LOC", 1.0, 4, 5), ("S-PER", 1.0, 6, 7),
                ("B-ORG", 1.0, 8, 9), ("E-ORG", 1.0, 10, 11), ("I-ORG", 1.0, 12, 13)]
    grouped = group_entities("a b c d e f g", adjacent, pre_split=True)
    assert [(e["entity"], e["token_start"], e["token_end"]) for e in grouped] == [
        ("PER", 0, 1), ("PER", 1, 2), ("LOC", 2, 3), ("PER", 3, 4), ("ORG", 4, 6), ("ORG", 6, 7)]


def test_offsets_point_into_the_input_across_windows(tmp_path):
    handler = load_handler(build_tagging_export(tmp_path / "b", "B-PER"))
    text = "  Peter   Blackburn's visit to Strasbourg,\tyesterday " + " ".join(f"w{i}" for i in range(40))
    [words] = _predict(handler, text, aggregation="none")
    # Every word the tokenizer splits off is tagged once, however many 16-token windows the text takes.
    expected = ["Peter", "Blackburn", "'", "s", "visit", "to", "Strasbourg", ",", "yesterday"] + [f"w{i}" for i in range(40)]
    assert [w["word"] for w in words] == expected
    assert all(text[w["start"]:w["end"]] == w["word"] and w["entity"] == "B-PER" for w in words)

    [[whole]] = _predict(load_handler(build_tagging_export(tmp_path / "i", "I-PER")), text)
    assert (whole["start"], whole["end"], whole["word"]) == (2, len(text), text.strip())

    [[first, second]] = _predict(handler, {"tokens": ["Peter", "Blackburn"]})
    assert first == {**first, "entity": "PER", "word": "Peter", "start": 0, "end": 5, "token_start": 0, "token_end": 1}
    assert (second["word"], second["start"], second["end"]) == ("Blackburn", 6, 15)
    assert _predict(handler, "Peter", min_score=0.999) == [[]]


def test_the_inference_api_shape_is_the_pipelines_entities(tmp_path):
    """As `pipeline(..., aggregation_strategy=...)` returns them: entity_group for joined entities, entity for
    tags; one text's list alone, a list per text for a list."""
    from testdata import hf_answer

    handler = load_handler(build_tagging_export(tmp_path / "b", "B-PER"))
    first, second, third = hf_answer(handler, {"inputs": "Peter met Anna"})
    assert first == {"entity_group": "PER", "word": "Peter", "start": 0, "end": 5, "score": first["score"]}
    assert [[e["entity_group"] for e in entities] for entities in hf_answer(handler, {"inputs": ["Peter", "Anna met"]})] \
        == [["PER"], ["PER", "PER"]]
    [word] = hf_answer(handler, {"inputs": "Peter", "parameters": {"aggregation_strategy": "none"}})
    assert word["entity"] == "B-PER" and "entity_group" not in word


def test_bad_requests_answer_4xx(tmp_path):
    handler = load_handler(build_tagging_export(tmp_path / "b", "B-PER"))
    for inputs, status in (("", 422), ([], 422), ({"tokens": []}, 422), ([["a", "b"]], 422), (["x"] * 300, 413)):
        with pytest.raises(ServingError) as err:
            _predict(handler, inputs)
        assert err.value.status == status, inputs


def test_predict_command_on_an_ner_export_prints_entities(tmp_path, capsys):
    """`tunefleet predict` sends no top_k unless asked: token classification has none to take."""
    import json

    from cluster.cli import main

    export = build_tagging_export(tmp_path / "export", "B-PER")
    capsys.readouterr()
    assert main(["predict", str(export), "Peter met Anna"]) == 0
    entities = json.loads(capsys.readouterr().out)[0]
    assert [(e["entity"], e["word"]) for e in entities] == [("PER", "Peter"), ("PER", "met"), ("PER", "Anna")]


def test_a_padded_batch_runs_packed_with_the_unchanged_models_tags_and_scores(tmp_path, monkeypatch):
    import torch

    import serving.packed

    export = build_tagging_export(tmp_path / "b", "B-PER", max_length=64)
    handler = load_handler(export)
    with torch.no_grad():  # a head that reads the encoder's output, so a wrong position would show
        torch.manual_seed(0)
        handler.model.classifier.weight.normal_(std=2.0)
    texts = ["Peter visited Strasbourg yesterday with friends from Lyon", "Anna", "Paris in May is crowded"]
    runs = []
    monkeypatch.setattr(serving.packed, "_layer", lambda *a, first_only, _layer=serving.packed._layer: (
        runs.append(first_only), _layer(*a, first_only=first_only))[1])
    packed = _predict(handler, texts, aggregation="none")
    assert runs == [False, False]  # both layers ran on the real tokens only
    with serving.packed.computing_padding(handler.model):  # the encoder's own forward: every position computed
        whole = _predict(handler, texts, aggregation="none")
    assert runs == [False, False]
    assert len({w["entity"] for words in whole for w in words}) > 1
    for got, want in zip(packed, whole):
        assert [(w["word"], w["entity"]) for w in got] == [(w["word"], w["entity"]) for w in want]
        assert [w["score"] for w in got] == pytest.approx([w["score"] for w in want], abs=1e-5)


def test_tags_come_from_the_export_when_the_model_knows_only_their_number(tmp_path):
    """An adapter pool's base is built with num_labels alone (LABEL_0, ...): a pooled WNUT17 adapter that tagged
    everything O answered one entity "LABEL_0" spanning the whole text."""
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from serving.config import ServeSpec
    from serving.handlers import HANDLERS
    from training.layout import read_export_info

    export = build_tagging_export(tmp_path, "O")
    base = AutoModelForTokenClassification.from_pretrained(export)
    base.config.id2label = {i: f"LABEL_{i}" for i in range(len(LABELS))}  # what a pool's base knows
    handler = HANDLERS.get("token-classification")(read_export_info(export), ServeSpec(dtype="float32"), base.eval(),
                                                   AutoTokenizer.from_pretrained(export), torch.device("cpu"))
    assert handler.labels == LABELS
    assert _predict(handler, "I flew to London with Ryanair") == [[]]


def _scrambled_tagger(tmp_path: Path):
    """A tagger whose head reads the encoder, so a word's sub-tokens get different scores (and tags)."""
    import torch

    handler = load_handler(build_tagging_export(tmp_path / "scrambled", "B-PER", max_length=64))
    with torch.no_grad():
        torch.manual_seed(0)
        handler.model.classifier.weight.normal_(std=4.0)
        handler.model.classifier.bias.zero_()
    return handler


def test_words_take_their_tag_from_the_first_the_mean_or_the_surest_sub_token(tmp_path):
    """The pipeline's word-level strategies, recomputed here from the model's own scores."""
    import torch

    handler = _scrambled_tagger(tmp_path)
    text = "Blackburn visited Strasbourg with Okafor"
    [output] = handler.run_batch([text])
    encoded = handler.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        probs = handler.model(**encoded).logits.softmax(-1)[0]
    word_ids = encoded.word_ids(0)
    expected = {"first": [], "average": [], "max": []}
    for word in sorted({w for w in word_ids if w is not None}):
        sub = probs[[i for i, w in enumerate(word_ids) if w == word]]
        for way, scores in (("first", sub[0]), ("average", sub.mean(0)), ("max", sub.max(0).values)):
            expected[way].append((LABELS[int(scores.argmax())], float(scores.max())))
    assert len({w for w in word_ids if w is not None}) == 5 and len(word_ids) > 7  # some words are split
    for way, tagged in expected.items():
        got = [(tag, score) for tag, score, _, _ in output["words"][way]]
        assert [t for t, _ in got] == [t for t, _ in tagged], way
        assert [s for _, s in got] == pytest.approx([s for _, s in tagged], abs=1e-5), way
    assert expected["first"] != expected["average"] != expected["max"]  # the three ways differ on these words


def test_aggregation_strategy_and_ignore_labels_as_the_pipeline_names_them(tmp_path):
    handler = _scrambled_tagger(tmp_path)
    text = "Blackburn visited Strasbourg with Okafor"
    for way in ("simple", "first", "average", "max", "none"):
        assert _predict(handler, text, aggregation_strategy=way) == _predict(handler, text, aggregation=way)
    assert _predict(handler, text, aggregation="simple") == _predict(handler, text, aggregation="first")

    tagger = load_handler(build_tagging_export(tmp_path / "b", "B-PER"))
    assert [e["entity"] for e in _predict(tagger, "Peter met Anna")[0]] == ["PER"] * 3
    assert _predict(tagger, "Peter met Anna", ignore_labels=["PER"]) == [[]]
    outside = load_handler(build_tagging_export(tmp_path / "o", "O"))
    assert _predict(outside, "Peter met Anna", aggregation="none") == [[]]  # O is left out by default
    every = _predict(outside, "Peter met Anna", aggregation="none", ignore_labels=[])[0]
    assert [(w["entity"], w["word"]) for w in every] == [("O", "Peter"), ("O", "met"), ("O", "Anna")]

    for parameters, message in (({"aggregation_strategy": "longest"}, "parameters.aggregation_strategy: Input should be"),
                                ({"aggregation": "max", "aggregation_strategy": "max"}, "under two names: send one")):
        with pytest.raises(ServingError) as err:
            _predict(tagger, "Peter", **parameters)
        assert err.value.status == 422 and message in err.value.error, err.value.error
