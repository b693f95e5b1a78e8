"""Labels as names or integers → class ids, with the names kept for the export; label errors name the fix."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from cluster.spec import validate_job
from training.data.labels import build_label_map, declared_label_names, read_label_names
from training.data.tables import DataError
from training.tasks import TASKS


def prepare(model: Path, **data):
    spec = validate_job({"name": "t", "task": "text-classification", "model": str(model), "data": data})
    return TASKS.get("text-classification").prepare(spec)


def write_tsv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("text\tlabel\n" + "".join(f"{t}\t{l}\n" for t, l in rows))
    return path


# --- build_label_map ----------------------------------------------------------------------------

def test_text_labels_without_names_are_sorted():
    names, mapping = build_label_map(["pos", "neg", "pos", " neutral "], None, 0, "f")
    assert names == ["neg", "neutral", "pos"]
    assert mapping == {"pos": 2, "neg": 0, " neutral ": 1}


def test_integer_labels_without_names_keep_their_values_as_names():
    names, mapping = build_label_map(["2", "0", "10", 2], None, 0, "f")
    assert names == ["0", "2", "10"]  # numeric order, not text order
    assert mapping == {"2": 1, "0": 0, "10": 2, 2: 1}


def test_integer_labels_with_names_and_a_base():
    names, mapping = build_label_map(["1", "4", "2"], ["World", "Sports", "Business", "Sci/Tech"], 1, "f")
    assert names == ["World", "Sports", "Business", "Sci/Tech"]
    assert mapping == {"1": 0, "4": 3, "2": 1}


def test_integers_outside_the_names_say_to_set_label_base():
    with pytest.raises(DataError) as raised:
        build_label_map(["1", "4"], ["a", "b", "c", "d"], 0, "ag.csv")
    [(path, message, value)] = raised.value.problems
    assert path == "data.label_base" and value == 0
    assert "['4']" in message and "set data.label_base" in message


def test_text_labels_outside_the_names_say_to_add_them():
    with pytest.raises(DataError) as raised:
        build_label_map(["pos", "neg", "meh"], ["neg", "pos"], 0, "train.tsv")
    [(path, message, _)] = raised.value.problems
    assert path == "data.label_names" and "['meh']" in message and "train.tsv" in message


def test_names_in_the_given_order_not_sorted():
    names, mapping = build_label_map(["neg", "pos"], ["pos", "neg"], 0, "f")
    assert names == ["pos", "neg"] and mapping == {"neg": 1, "pos": 0}


def test_empty_label_column():
    with pytest.raises(DataError, match="label column is empty") as raised:
        build_label_map(["", None, ""], None, 0, "train.tsv")
    assert raised.value.problems[0][0] == "data.columns.label"


# --- label name files and ClassLabel -------------------------------------------------------------

def test_label_names_file_one_per_line(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("\ufeffWorld\nSports\n\nBusiness\r\nSci/Tech\n\n", encoding="utf-8")
    assert read_label_names(str(path)) == ["World", "Sports", "Business", "Sci/Tech"]
    assert read_label_names(["a", "b"]) == ["a", "b"] and read_label_names(None) is None
    path.write_text("\n\n")
    with pytest.raises(DataError, match="holds no label names"):
        read_label_names(str(path))


def test_class_label_names_when_the_job_gives_none():
    feature = datasets.ClassLabel(names=["World", "Sports"])
    assert declared_label_names(None, 1, feature) == (["World", "Sports"], 0)
    assert declared_label_names(["a", "b"], 1, feature) == (["a", "b"], 1)  # the job wins
    assert declared_label_names(None, 0, datasets.Value("string")) == (None, 0)


# --- through the task's prepare -------------------------------------------------------------------

def test_names_kept_for_text_labels(tmp_path, tiny_text_model):
    train = write_tsv(tmp_path / "train.tsv", [("good", "positive"), ("bad", "negative")] * 5)
    prepared = prepare(tiny_text_model, train=str(train), validation=str(train))
    assert prepared.labels == ["negative", "positive"]
    assert prepared.validation.column("labels").to_pylist() == [1, 0] * 5
    assert prepared.label_counts == [5, 5]


def test_integer_labels_with_names(tmp_path, tiny_text_model):
    train = write_tsv(tmp_path / "train.tsv", [("good", "1"), ("bad", "0"), ("so so", "2")] * 4)
    prepared = prepare(tiny_text_model, train=str(train), validation=str(train), label_names=["neg", "pos", "mixed"])
    assert prepared.labels == ["neg", "pos", "mixed"]
    assert prepared.validation.column("labels").to_pylist() == [1, 0, 2] * 4


def test_hub_style_class_label_names_reach_the_export(tmp_path, tiny_text_model):
    """Hub datasets (ag_news, imdb, glue) store integer labels with their names in a ClassLabel feature."""
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    path = tmp_path / "reviews.parquet"
    datasets.Dataset.from_dict({"text": ["good", "bad"] * 5, "label": [1, 0] * 5}, features=features).to_parquet(path)
    prepared = prepare(tiny_text_model, train=str(path), validation=str(path))
    assert prepared.labels == ["neg", "pos"]
    assert prepared.validation.column("labels").to_pylist() == [1, 0] * 5


def test_unknown_validation_label_names_the_fix(tmp_path, tiny_text_model):
    train = write_tsv(tmp_path / "train.tsv", [("good", "positive"), ("bad", "negative")] * 3)
    dev = write_tsv(tmp_path / "dev.tsv", [("fine", "positive"), ("meh", "neutral")])
    with pytest.raises(DataError) as raised:
        prepare(tiny_text_model, train=str(train), validation=str(dev))
    [(path, message, _)] = raised.value.problems
    assert path == "data.validation"
    assert "['neutral']" in message and "list every label in data.label_names" in message

    # Named up front, the label is a class even though train never shows it.
    prepared = prepare(tiny_text_model, train=str(train), validation=str(dev), label_names=["negative", "neutral", "positive"])
    assert prepared.labels == ["negative", "neutral", "positive"]
    assert prepared.validation.column("labels").to_pylist() == [2, 1]


def test_validation_label_outside_the_given_names(tmp_path, tiny_text_model):
    train = write_tsv(tmp_path / "train.tsv", [("good", "positive"), ("bad", "negative")] * 3)
    dev = write_tsv(tmp_path / "dev.tsv", [("meh", "neutral")])
    with pytest.raises(DataError, match=r"labels \['neutral'\] are not in data.label_names"):
        prepare(tiny_text_model, train=str(train), validation=str(dev), label_names=["negative", "positive"])


def test_unknown_labels_drop(tmp_path, tiny_text_model):
    train = write_tsv(tmp_path / "train.tsv", [("good", "positive"), ("bad", "negative"), ("meh", "neutral")] * 3)
    prepared = prepare(tiny_text_model, train=str(train), validation=str(train), label_names=["negative", "positive"],
                       unknown_labels="drop")
    assert prepared.labels == ["negative", "positive"]
    assert prepared.train.num_rows == 6 and prepared.label_counts == [3, 3]


def test_empty_label_column_fails_before_tokenizing(tmp_path, tiny_text_model):
    train = write_tsv(tmp_path / "train.tsv", [("good", ""), ("bad", "")] * 3)
    with pytest.raises(DataError, match="the label column is empty") as raised:
        prepare(tiny_text_model, train=str(train))
    assert raised.value.problems[0][0] == "data.columns.label"


def test_rows_without_a_label_are_left_out(tmp_path, tiny_text_model):
    rows = [{"text": "good", "label": "positive"}, {"text": "bad", "label": "negative"}, {"text": "unlabeled", "label": None}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    prepared = prepare(tiny_text_model, train=str(path), validation=str(path))
    assert prepared.labels == ["negative", "positive"]
    assert prepared.train.num_rows == prepared.validation.num_rows == 8
    assert set(prepared.train.column("labels").to_pylist()) == {0, 1}
