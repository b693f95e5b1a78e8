"""Token-tagged data: CoNLL files as they really come, JSONL, tag schemes, sub-token alignment, entity metrics."""

from __future__ import annotations

import gzip
import json

import pytest

from testdata import minilm_path, shared_file
from training.data.conll import TaggedSource, detect_tagged_format, peek_problems, read_conll, read_tagged
from training.data.tables import DataError
from training.data.tagging import detect_scheme, iob1_to_iob2, label_list, subtoken_tags
from training.tasks import TASKS
from training.tasks.token_classification import align_labels, token_argmax

CONLL2003_TAGS = ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC", "I-ORG", "I-PER"]


# ---- the real files ------------------------------------------------------------------------

def test_conll2003_space_separated_with_pos_column():
    ds = read_conll(str(shared_file("conll2003", "train.txt")))
    assert len(ds) == 14039
    assert ds[0] == {"tokens": ["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."],
                     "tags": ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]}
    assert detect_scheme(ds["tags"]) == "iob2"
    assert label_list({t for tags in ds["tags"] for t in tags}, None, "iob2", False, "train") == CONLL2003_TAGS
    assert len(read_conll(str(shared_file("conll2003", "test.txt")))) == 3453


def test_wnut17_tabs_whitespace_only_separators_and_stray_bom():
    train = read_conll(str(shared_file("wnut17", "train.conll")))
    dev = read_conll(str(shared_file("wnut17", "dev.conll")))
    assert (len(train), len(dev)) == (3394, 1009)  # lines of a lone tab (and dev's final BOM) end sentences
    assert train[0]["tokens"][:3] == ["@paulwalk", "It", "'s"]
    assert "B-location" in train[0]["tags"]
    tags = {t for ds in (train, dev) for row in ds["tags"] for t in row}
    assert len(tags) == 13 and all(t == "O" or t[:2] in ("B-", "I-") for t in tags)
    # One stray I- start in dev is an annotation slip, not IOB1: B- tags start entities after O.
    assert detect_scheme(dev["tags"]) == "iob2"


# ---- small files with the odd cases -----------------------------------------------------------

def test_generated_conll_odd_cases(tmp_path):
    path = tmp_path / "odd.conll"
    path.write_bytes((
        "\ufeff-DOCSTART- -X- -X- O\r\n\r\n"
        "Peter\tNNP\tB-NP\tB-PER\r\n"
        "Blackburn\tNNP\tI-NP\tI-PER  \r\n"        # trailing blanks after the tag
        " \t \r\n"                                 # white space only: ends the sentence
        "-DOCSTART-\t-X-\t-X-\tO\n"
        "BRUSSELS\tNNP\tB-NP\tB-LOC\n"
        "1996-08-22\tCD\tI-NP\tO\n"
        "\n\n\n"
    ).encode("utf-8"))
    ds = read_conll(str(path))
    assert ds["tokens"] == [["Peter", "Blackburn"], ["BRUSSELS", "1996-08-22"]]
    assert ds["tags"] == [["B-PER", "I-PER"], ["B-LOC", "O"]]
    gz = tmp_path / "odd.conll.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert read_conll(str(gz))["tokens"] == ds["tokens"]


def test_malformed_lines_name_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("Peter B-PER\nBlackburn\n\nNew York B-LOC\n")
    with pytest.raises(DataError) as err:
        read_conll(str(path))
    message = str(err.value)
    assert f"{path}, line 2: needs a token and a tag" in message
    assert f"{path}, line 4: has 3 columns, earlier lines 2" in message
    assert peek_problems(TaggedSource(str(path), "conll"))[0][1].startswith(f"{path}, line 2")


def test_iob1_is_trained_as_iob2():
    iob1 = [["I-PER", "I-PER", "B-PER", "O", "I-LOC"], ["O", "I-ORG", "I-LOC"]]
    assert detect_scheme(iob1) == "iob1"
    assert [iob1_to_iob2(t) for t in iob1] == [["B-PER", "I-PER", "B-PER", "O", "B-LOC"], ["O", "B-ORG", "B-LOC"]]
    valid_iob2 = ["B-PER", "I-PER", "O", "B-LOC"]
    assert iob1_to_iob2(valid_iob2) == valid_iob2


def test_bioes_detection_labels_and_subtoken_spreading():
    assert detect_scheme([["B-PER", "E-PER", "O", "S-LOC"]]) == "bioes"
    assert subtoken_tags("S-LOC", 3, "bioes") == ["B-LOC", "I-LOC", "E-LOC"]
    assert subtoken_tags("E-PER", 2, "bioes") == ["I-PER", "E-PER"]
    assert subtoken_tags("B-PER", 3, "iob2") == ["B-PER", "I-PER", "I-PER"]
    # Only S-LOC seen, but spreading over sub-tokens needs every LOC tag.
    assert label_list({"O", "S-LOC"}, None, "bioes", True, "f") == ["O", "B-LOC", "E-LOC", "I-LOC", "S-LOC"]
    with pytest.raises(DataError, match="not in data.label_names"):
        label_list({"O", "B-PER", "B-LOC"}, ["O", "B-PER"], "iob2", False, "f")


def test_jsonl_tokens_and_tags_names_or_ids(tmp_path):
    path = tmp_path / "ner.jsonl"
    rows = [{"tokens": ["Peter", "Blackburn"], "tags": ["B-PER", "I-PER"]}, {"tokens": ["in", "Paris"], "tags": ["O", "B-LOC"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert detect_tagged_format(str(path)) == "jsonl"
    assert read_tagged(TaggedSource(str(path), "jsonl")).to_list() == rows

    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"words": ["in", "Paris"], "ner_tags": [0, 1]}) + "\n")
    source = TaggedSource(str(ids), "jsonl", tokens="words")
    assert read_tagged(source, ["O", "B-LOC"])["tags"] == [["O", "B-LOC"]]
    with pytest.raises(DataError, match="tags are integers; list the tag names"):
        read_tagged(source)

    uneven = tmp_path / "uneven.jsonl"
    uneven.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"tokens": ["a", "b"], "tags": ["O"]}) + "\n")
    with pytest.raises(DataError, match="row 2 has 2 tokens but 1 tags"):
        read_tagged(TaggedSource(str(uneven), "jsonl"))
    assert peek_problems(TaggedSource(str(path), "jsonl", tags="labels"))[0][0] == "data.columns.tags"


# ---- alignment and metrics -------------------------------------------------------------------

def test_first_subtoken_carries_the_tag():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    words, tags = ["Mr", "Quenwick", "visited", "Valdoria"], ["O", "B-PER", "O", "B-LOC"]
    label2id = {t: i for i, t in enumerate(["O", "B-LOC", "B-PER", "I-LOC", "I-PER"])}
    encoded = tokenizer(words, is_split_into_words=True)
    pieces = tokenizer.convert_ids_to_tokens(encoded["input_ids"])
    assert pieces == ["[CLS]", "mr", "que", "##n", "##wick", "visited", "val", "##dor", "##ia", "[SEP]"]
    first = align_labels(encoded.word_ids(), tags, label2id, "iob2", False)
    assert first == [-100, 0, 2, -100, -100, 0, 1, -100, -100, -100]
    every = align_labels(encoded.word_ids(), tags, label2id, "iob2", True)
    assert every == [-100, 0, 2, 4, 4, 0, 1, 3, 3, -100]


def test_entity_metrics_per_type():
    import torch

    labels = ["O", "B-LOC", "B-PER", "I-PER"]
    gold = torch.tensor([[-100, 2, 3, 0, 1, -100], [-100, 0, 2, -100, -100, -100]])
    logits = torch.nn.functional.one_hot(torch.tensor([[0, 2, 3, 0, 0, 0], [0, 0, 2, 0, 0, 0]]), 4).float()
    predictions, references = token_argmax(logits, gold)
    assert references == [[2, 3, 0, 1], [0, 2]] and predictions == [[2, 3, 0, 0], [0, 2]]
    metrics = TASKS.get("token-classification").compute_metrics(predictions, references, labels, 0.0)
    assert metrics["precision"] == 1.0 and metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(0.8)
    assert metrics["per_type"]["PER"]["f1"] == 1.0 and metrics["per_type"]["LOC"] == {
        "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # conlleval counts an I- start as an entity; strict IOB2 does not.
    loose = TASKS.get("token-classification").compute_metrics([[3, 0]], [[2, 0]], labels, 0.0)
    assert loose["f1"] == 1.0 and loose["strict_f1"] == 0.0


def _ner_job(tmp_path, train, **data):
    from cluster.spec import validate_job

    return validate_job({"name": "ner", "task": "token-classification", "model": str(minilm_path()),
                         "data": {"train": str(train), "validation": str(train), **data},
                         "output": {"storage": str(tmp_path / "runs")}})


def test_prepare_iob1_file_trains_iob2_tags(tmp_path):
    path = tmp_path / "iob1.txt"
    path.write_text("-DOCSTART- -X- O O\n\nMr NNP O\nQuenwick NNP I-PER\nvisited VBD O\nValdoria NNP I-LOC\n\n"
                    "Ana NNP I-PER\nB. NNP I-PER\nBen NNP B-PER\n")
    prepared = TASKS.get("token-classification").prepare(_ner_job(tmp_path, path))
    assert prepared.labels == ["O", "B-LOC", "B-PER", "I-PER"]
    first = prepared.train.column("labels").to_pylist()
    rows = sorted(first, key=len)
    assert [l for l in rows[0] if l != -100] == [2, 3, 2]  # Ana B. | Ben: two entities
    assert [l for l in rows[1] if l != -100] == [0, 2, 0, 1]


def test_job_rules_for_tagged_data(tmp_path):
    from cluster.spec import JobSpecError

    path = tmp_path / "ner.conll"
    path.write_text("Peter\tB-PER\nsaid\n")
    with pytest.raises(JobSpecError) as err:
        _ner_job(tmp_path, path, columns={"tags": "ner"})
    message = str(err.value)
    assert "data.columns.tags: CoNLL files have no header" in message
    with pytest.raises(JobSpecError, match=r"line 2: needs a token and a tag"):
        _ner_job(tmp_path, path)


def test_hub_style_class_label_tags(tmp_path):
    """Hub datasets (conll2003, wnut_17) carry `ner_tags` as ids with a ClassLabel feature; parquet keeps it too."""
    import datasets

    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    features = datasets.Features({"id": datasets.Value("string"), "tokens": datasets.List(datasets.Value("string")),
                                  "ner_tags": datasets.List(datasets.ClassLabel(names=names))})
    ds = datasets.Dataset.from_dict({"id": ["0"], "tokens": [["Peter", "Blackburn", "in", "Paris"]],
                                     "ner_tags": [[1, 2, 0, 3]]}, features=features)
    path = tmp_path / "train.parquet"
    ds.to_parquet(str(path))
    source = TaggedSource(str(path), detect_tagged_format(str(path)))
    assert read_tagged(source).to_list() == [{"tokens": ["Peter", "Blackburn", "in", "Paris"],
                                              "tags": ["B-PER", "I-PER", "O", "B-LOC"]}]
    assert peek_problems(source) == []
