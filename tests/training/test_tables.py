"""Table loaders on the real files in ../shared/datasets and on small generated files.

The real files are what users bring: AG News (headerless CSV, integer labels 1..4 named
in classes.txt, title + description), SST-2 (TSV with a header), MRPC (TSV sentence pairs,
a UTF-8 BOM, double quotes that are text, not CSV quoting).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from cluster.spec import validate_job
from testdata import shared_file
from training.data.tables import DataError, Source, detect_format, load_table, read_columns, seeded_subset
from training.tasks import TASKS


def prepare(model: Path, seed: int = 42, **data):
    """The text-classification task's prepare on a job built from `data` keys."""
    spec = validate_job({"name": "t", "task": "text-classification", "model": str(model), "data": data,
                         "train": {"seed": seed}})
    return TASKS.get("text-classification").prepare(spec)


def tokens_of(model: Path, texts, pairs=None, max_length: int = 128) -> list[tuple[int, ...]]:
    tokenizer = AutoTokenizer.from_pretrained(model)
    encoded = tokenizer(list(texts), list(pairs) if pairs is not None else None, truncation=True, max_length=max_length)
    return [tuple(ids) for ids in encoded["input_ids"]]


def data_rows(path: Path) -> int:
    with path.open(encoding="utf-8-sig") as handle:
        return sum(1 for line in handle if line.strip())


# --- real files ----------------------------------------------------------------------------------

def test_ag_news_headerless_csv_by_index():
    path = shared_file("ag_news", "test.csv")
    source = Source(str(path), detect_format(str(path)), header=False)
    assert read_columns(source) == ["0", "1", "2"]
    table = load_table(source, ["0", "1", "2"])
    assert len(table) == data_rows(path) == 7600
    with path.open(encoding="utf-8", newline="") as handle:
        first = next(csv.reader(handle))
    assert table[0] == {"0": first[0], "1": first[1], "2": first[2]}  # quoted fields with commas intact
    assert set(table.unique("0")) == {"1", "2", "3", "4"}


def test_ag_news_prepare_joins_title_and_description_and_names_labels(tiny_text_model):
    path = shared_file("ag_news", "test.csv")
    classes = shared_file("ag_news", "classes.txt")
    prepared = prepare(tiny_text_model, train=str(path), columns={"text": [1, 2], "label": 0},
                       label_names=str(classes), label_base=1, limit={"train": 300, "validation": 50})
    assert prepared.labels == ["World", "Sports", "Business", "Sci/Tech"]
    assert prepared.train.num_rows == 300 and prepared.validation.num_rows == 50
    assert sum(prepared.label_counts) == 300 and all(c > 0 for c in prepared.label_counts)

    with path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.reader(handle))
    expected = dict(zip(tokens_of(tiny_text_model, (f"{t} {d}" for _, t, d in rows)), (int(c) - 1 for c, _, _ in rows)))
    train = prepared.train.to_pylist()
    for row in train:
        ids = tuple(row["input_ids"])
        assert ids in expected, "a prepared text is not title + ' ' + description of any row"
        assert row["labels"] == expected[ids]
        assert row["length"] == len(ids)
    # Validation is held out of train (validation_fraction split happens before the subsets).
    assert not {tuple(r["input_ids"]) for r in train} & {tuple(r["input_ids"]) for r in prepared.validation.to_pylist()}


def test_sst2_tsv_with_header(tiny_text_model):
    train, dev = shared_file("sst2", "train.tsv"), shared_file("sst2", "dev.tsv")
    source = Source(str(dev), detect_format(str(dev)))
    assert source.format == "tsv" and read_columns(source) == ["sentence", "label"]
    table = load_table(source, ["sentence", "label"])
    assert len(table) == data_rows(dev) - 1 == 872
    prepared = prepare(tiny_text_model, train=str(train), validation=str(dev), columns={"text": "sentence", "label": "label"},
                       label_names=["negative", "positive"], limit={"train": 200})
    assert prepared.labels == ["negative", "positive"]
    assert prepared.train.num_rows == 200 and prepared.validation.num_rows == 872
    assert set(prepared.validation.column("labels").to_pylist()) == {0, 1}
    # dev.tsv labels are 0/1 as written: the prepared labels follow the file, in the file's order.
    by_text = dict(zip(tokens_of(tiny_text_model, table["sentence"]), (int(v) for v in table["label"])))
    assert [by_text[tuple(r["input_ids"])] for r in prepared.validation.to_pylist()] == prepared.validation.column("labels").to_pylist()


def test_mrpc_bom_and_quotes_inside_text():
    path = shared_file("mrpc", "train.tsv")
    source = Source(str(path), detect_format(str(path)))
    columns = read_columns(source)
    assert columns[0] == "Quality" and "\ufeffQuality" not in columns
    table = load_table(source, ["Quality", "#1 String", "#2 String"])
    assert table.column_names == ["Quality", "#1 String", "#2 String"]
    assert len(table) == data_rows(path) - 1
    with path.open(encoding="utf-8-sig") as handle:
        raw = [line.rstrip("\n").split("\t") for line in handle][1:]
    # A sentence that opens with a quote is where CSV quoting would swallow tabs and lines.
    quoted = next(i for i, fields in enumerate(raw) if fields[3].startswith('"'))
    assert table[quoted] == {"Quality": raw[quoted][0], "#1 String": raw[quoted][3], "#2 String": raw[quoted][4]}
    assert table[quoted]["#1 String"].startswith('" ')


def test_mrpc_prepare_encodes_sentence_pairs(tiny_text_model):
    train, dev = shared_file("mrpc", "train.tsv"), shared_file("mrpc", "dev.tsv")
    prepared = prepare(tiny_text_model, train=str(train), validation=str(dev),
                       columns={"text": "#1 String", "text_pair": "#2 String", "label": "Quality"},
                       limit={"train": 100, "validation": 40})
    assert prepared.labels == ["0", "1"]
    assert prepared.train.num_rows == 100 and prepared.validation.num_rows == 40
    row = prepared.train.to_pylist()[0]
    assert set(row["token_type_ids"]) == {0, 1}  # two segments
    tokenizer = AutoTokenizer.from_pretrained(tiny_text_model)
    assert row["input_ids"].count(tokenizer.sep_token_id) == 2


# --- generated files: every format ----------------------------------------------------------------

ROWS = [("a quiet, \"sharp\" film", "positive"), ("NA", "negative"), ("dull, dull, dull", "negative"),
        ("warm and funny", "positive")] * 10


def write_csv(path: Path, header: bool = True) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if header:
            writer.writerow(["review", "sentiment"])
        writer.writerows(ROWS)
    return path


def test_csv_with_header_keeps_quoted_commas_and_na_text(tmp_path):
    path = write_csv(tmp_path / "reviews.csv")
    source = Source(str(path), detect_format(str(path)))
    assert source.format == "csv" and read_columns(source) == ["review", "sentiment"]
    table = load_table(source, ["review", "sentiment"])
    assert len(table) == len(ROWS)
    assert table[0] == {"review": 'a quiet, "sharp" film', "sentiment": "positive"}
    assert table[1]["review"] == "NA"  # a text, not a missing value


def test_headerless_csv_by_index(tmp_path, tiny_text_model):
    path = write_csv(tmp_path / "reviews.csv", header=False)
    prepared = prepare(tiny_text_model, train=str(path), columns={"text": 0, "label": 1}, validation_fraction=0.25)
    assert prepared.labels == ["negative", "positive"]
    assert prepared.train.num_rows + prepared.validation.num_rows == len(ROWS)
    assert prepared.validation.num_rows == 10


def test_missing_column_names_the_file_and_the_columns(tmp_path):
    path = write_csv(tmp_path / "reviews.csv")
    with pytest.raises(DataError, match=r"reviews.csv has no column text; columns: review, sentiment"):
        load_table(Source(str(path), "csv"), ["text", "sentiment"])


def test_jsonl_and_parquet_give_the_same_examples(tmp_path, tiny_text_model):
    jsonl = tmp_path / "reviews.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "label": l, "id": i}) + "\n" for i, (t, l) in enumerate(ROWS)))
    parquet = tmp_path / "reviews.parquet"
    pq.write_table(pa.table({"text": [t for t, _ in ROWS], "label": [l for _, l in ROWS]}), parquet)
    assert read_columns(Source(str(jsonl), "jsonl")) == ["text", "label", "id"]
    assert read_columns(Source(str(parquet), "parquet")) == ["text", "label"]
    results = [prepare(tiny_text_model, train=str(p), validation=str(p)) for p in (jsonl, parquet)]
    assert results[0].labels == results[1].labels == ["negative", "positive"]
    assert results[0].validation.to_pylist() == results[1].validation.to_pylist()
    assert [tuple(r["input_ids"]) for r in results[0].validation.to_pylist()] == tokens_of(tiny_text_model, [t for t, _ in ROWS])


def test_format_from_the_name_or_declared(tmp_path):
    assert detect_format("data/train.tsv") == "tsv"
    assert detect_format("data/train.jsonl") == "jsonl"
    assert detect_format("ag_news") == "hub"
    assert detect_format("anything", "parquet") == "parquet"
    odd = tmp_path / "train.data"
    odd.write_text("x\n")
    with pytest.raises(DataError, match="set data.format"):
        detect_format(str(odd))


# --- subsets and splits ---------------------------------------------------------------------------

def test_limit_is_a_seeded_subset(tmp_path, tiny_text_model):
    path = tmp_path / "numbers.jsonl"
    path.write_text("".join(json.dumps({"text": f"number {i}", "label": i % 2}) + "\n" for i in range(200)))

    def train_ids(seed):
        prepared = prepare(tiny_text_model, train=str(path), limit={"train": 30, "validation": 5}, seed=seed)
        assert prepared.train.num_rows == 30 and prepared.validation.num_rows == 5
        return sorted(tuple(ids) for ids in prepared.train.column("input_ids").to_pylist())

    assert train_ids(1) == train_ids(1)


def test_seeded_subset_as_the_tutorials_do():
    import datasets

    ds = datasets.Dataset.from_dict({"i": list(range(50))})
    assert seeded_subset(ds, 10, 42)["i"] == ds.shuffle(seed=42).select(range(10))["i"]
    assert seeded_subset(ds, None, 42)["i"] == ds["i"]
    assert seeded_subset(ds, 500, 42)["i"] == ds["i"]
    assert seeded_subset(ds, 10, 1)["i"] == seeded_subset(ds, 10, 1)["i"] != seeded_subset(ds, 10, 2)["i"]


def test_validation_fraction_holds_out_a_seeded_share(tmp_path, tiny_text_model):
    path = tmp_path / "numbers.jsonl"
    path.write_text("".join(json.dumps({"text": f"number {i}", "label": i % 2}) + "\n" for i in range(100)))

    def split(seed):
        prepared = prepare(tiny_text_model, train=str(path), validation_fraction=0.2, seed=seed)
        return ({tuple(x) for x in prepared.train.column("input_ids").to_pylist()},
                {tuple(x) for x in prepared.validation.column("input_ids").to_pylist()})

    train, validation = split(7)
    assert len(train) == 80 and len(validation) == 20
    assert not train & validation and train | validation == set(tokens_of(tiny_text_model, [f"number {i}" for i in range(100)]))
    assert split(8)[1] != validation  # the job's seed drives the split
