"""Text classification: single texts and sentence pairs → one label."""

from __future__ import annotations

from typing import Any

import numpy as np

from training.data.labels import build_label_map, declared_label_names
from training.data.tables import DataError, Source, detect_format, load_table, read_columns, seeded_subset
from training.storage import model_location
from training.tasks.base import PreparedData, TaskDefinition, reads_the_model
from training.tasks.registry import TASKS

NAME = "text-classification"


def _check_spec(spec: Any) -> list[tuple[str, str, Any]]:
    problems = []
    if spec.data.columns.text is None or spec.data.columns.text == []:
        problems.append(("data.columns.text", "text-classification needs the column that holds the text", None))
    return problems


def _sources(spec: Any) -> tuple[Source, Source | None]:
    data = spec.data
    fmt = detect_format(data.train, data.format)
    refs = [ref for _, ref in data.columns.refs()]
    header = data.header if data.header is not None else not all(isinstance(r, int) for r in refs)
    train = Source(data.train, fmt, header, data.hub_config, data.train_split)
    validation = None
    if data.validation is not None:
        validation = Source(data.validation, detect_format(data.validation, data.format), header, data.hub_config,
                            data.validation_split or "validation")
    elif fmt == "hub" and data.validation_split:
        validation = Source(data.train, "hub", header, data.hub_config, data.validation_split)
    return train, validation


def _column_hint(source: Source, available: list[str]) -> str:
    """What a column reference may be in this source. A CSV/TSV whose header "names" look like data
    (a number, or a sentence: AG News has no header row) also gets the headerless way, indices."""
    if source.format in ("csv", "tsv") and not source.header:
        return f"a 0-based index (0 to {len(available) - 1})"
    shown = ", ".join(name if len(name) <= 40 else name[:39] + "…" for name in available)
    if source.format in ("csv", "tsv") and any(name.strip().isdigit() or len(name) > 40 for name in available):
        return (f"one of {shown}; or, as this first row looks like data, not a header, 0-based indices "
                f"(0 to {len(available) - 1}), e.g. columns: {{text: 1, label: 0}}")
    return "one of " + shown


def check_columns(spec: Any) -> list[tuple[str, str, Any]]:
    """Every named column exists in every source: read from headers only, before any work."""
    problems = []
    try:
        sources = [s for s in _sources(spec) if s is not None]
    except DataError as err:
        return list(err.problems)
    unreadable = set()
    for source in sources:
        if source.location in unreadable:  # a hub id's other split: said once, not retried (~25 s each)
            continue
        try:
            available = read_columns(source)
        except Exception as err:  # an unreadable file or an unreachable hub id
            unreadable.add(source.location)
            problems.append(("data.train" if source.location == spec.data.train else "data.validation",
                             f"cannot read {source.location}: {err}", None))
            continue
        for key, ref in spec.data.columns.refs():
            if str(ref) not in available:
                problems.append((f"data.columns.{key}",
                                 f"{source.location} has no column {ref!r}; use {_column_hint(source, available)}", ref))
    return problems


def _columns(spec: Any) -> tuple[list[str], str | None, str]:
    """(text columns, text-pair column or None, label column) as the readers name them."""
    columns = spec.data.columns
    text_refs = columns.text if isinstance(columns.text, list) else [columns.text]
    return [str(r) for r in text_refs], None if columns.text_pair is None else str(columns.text_pair), str(columns.label)


def _encoder(spec: Any, mapping: dict[Any, int]):
    """A batch of raw columns → token ids, labels and lengths; rows without a usable label dropped."""
    data = spec.data
    text_cols, pair_col, label_col = _columns(spec)
    processor = _build_processor(spec)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        keep = [i for i, v in enumerate(batch[label_col]) if mapping.get(v, -1) >= 0]
        texts = [data.text_separator.join((batch[c][i] or "") for c in text_cols) for i in keep]
        pairs = [batch[pair_col][i] or "" for i in keep] if pair_col else None
        out = dict(processor(texts, pairs, truncation=True, max_length=data.max_length))
        out["labels"] = [mapping[batch[label_col][i]] for i in keep]
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return out

    return encode


def _label_map(spec: Any, train_values: list, validation_values: list, features: Any, location: str):
    """(label names, raw value → id) from the values seen in each split and what the job declares."""
    data = spec.data
    drop = data.unknown_labels == "drop"
    given, base = declared_label_names(data.label_names, data.label_base, features)
    names, mapping = build_label_map(train_values, given, base, location, drop_unknown=drop)
    unseen = sorted({v for v in validation_values if v not in mapping and v not in (None, "")}, key=str)
    if unseen and given:
        mapping.update(build_label_map(unseen, names, base, "validation", drop_unknown=drop)[1])
    elif unseen:
        raise DataError([("data.validation", f"validation labels {unseen[:5]} never occur in the training data; "
                          "list every label in data.label_names", None)])
    return names, mapping


def _tokenize(ds, encode):
    ds = ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="tokenizing")
    return ds.flatten_indices().data.table.combine_chunks()


def _prepare(spec: Any) -> PreparedData:
    problems = check_columns(spec)
    if problems:
        raise DataError(problems)
    if spec.data.streaming:
        return _prepare_streaming(spec)
    data, seed = spec.data, spec.train.seed
    train_source, validation_source = _sources(spec)
    text_cols, pair_col, label_col = _columns(spec)
    wanted = list(dict.fromkeys(text_cols + ([pair_col] if pair_col else []) + [label_col]))

    train = load_table(train_source, wanted)
    if validation_source is None:
        split = train.train_test_split(test_size=data.validation_fraction, seed=seed)
        train, validation = split["train"], split["test"]
    else:
        validation = load_table(validation_source, wanted)
    names, mapping = _label_map(spec, train.unique(label_col), validation.unique(label_col),
                                train.features.get(label_col), train_source.location)

    # Rows without a usable label (empty, or dropped by data.unknown_labels) go before the
    # subset is drawn, so `limit` counts rows that train.
    def usable(values: list) -> list[bool]:
        return [mapping.get(v, -1) >= 0 for v in values]

    kept = [ds.filter(usable, input_columns=label_col, batched=True) for ds in (train, validation)]
    dropped = len(train) + len(validation) - sum(len(ds) for ds in kept)
    if dropped:
        print(f"data: dropped {dropped} rows without a usable label")
    train = seeded_subset(kept[0], data.limit.train, seed)
    validation = seeded_subset(kept[1], data.limit.validation, seed)
    if len(train) == 0:
        raise DataError([("data.train", f"{train_source.location}: no labeled rows", None)])

    encode = _encoder(spec, mapping)
    train_table, validation_table = _tokenize(train, encode), _tokenize(validation, encode)
    counts = np.bincount(np.asarray(train_table.column("labels").to_numpy()), minlength=len(names)).tolist()
    return PreparedData(train=train_table, validation=validation_table, labels=names, label_counts=counts)


def _prepare_streaming(spec: Any) -> PreparedData:
    """The training split as a lazy Ray Dataset (training/streaming.py); validation read whole."""
    from training import streaming

    data, seed = spec.data, spec.train.seed
    train_source, validation_source = _sources(spec)
    text_cols, pair_col, label_col = _columns(spec)
    wanted = list(dict.fromkeys(text_cols + ([pair_col] if pair_col else []) + [label_col]))
    stream = streaming.read_stream(train_source, wanted)
    if data.limit.train is not None:
        stream = stream.limit(data.limit.train)
    seen = streaming.label_counts(stream, label_col)  # one pass over the stream: labels and their counts
    validation = load_table(validation_source, wanted)
    names, mapping = _label_map(spec, list(seen), validation.unique(label_col), None, train_source.location)
    counts = [0] * len(names)
    for value, n in seen.items():
        if mapping.get(value, -1) >= 0:
            counts[mapping[value]] += n
    if not sum(counts):
        raise DataError([("data.train", f"{train_source.location}: no labeled rows", None)])
    encode = _encoder(spec, mapping)
    validation = seeded_subset(validation.filter(lambda v: [mapping.get(x, -1) >= 0 for x in v],
                                                 input_columns=label_col, batched=True), data.limit.validation, seed)
    validation_table = _tokenize(validation, encode)
    return PreparedData(train=validation_table.slice(0, 0), validation=validation_table, labels=names,
                        label_counts=counts, train_stream=streaming.tokenize_stream(stream, encode),
                        notes={"train_rows": sum(counts), "streaming": True})


@reads_the_model
def _build_processor(spec: Any):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_location(spec.model), revision=spec.model.revision,
                                         trust_remote_code=spec.model.trust_remote_code)


def _build_model(spec: Any, labels: list[str], **load_kwargs):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        model_location(spec.model),
        revision=spec.model.revision,
        trust_remote_code=spec.model.trust_remote_code,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        # A pretrained checkpoint's own head (another label set) is replaced, not an error.
        ignore_mismatched_sizes=True,
        **load_kwargs,
    )


def _build_collator(processor, training: bool):
    from transformers import DataCollatorWithPadding

    collate = DataCollatorWithPadding(processor, return_tensors="pt")

    def collate_rows(rows: list[dict]) -> dict:
        return collate([{k: v for k, v in row.items() if k != "length"} for row in rows])

    return collate_rows


def _compute_metrics(predictions, references, labels: list[str], eval_loss: float) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score  # here: the CLI need not import sklearn

    predictions, references = np.asarray(predictions), np.asarray(references)
    ids = list(range(len(labels)))
    per_class = f1_score(references, predictions, labels=ids, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(references, predictions)),
        "macro_f1": float(f1_score(references, predictions, labels=ids, average="macro", zero_division=0)),
        "per_class_f1": {labels[i]: float(f) for i, f in enumerate(per_class)},
        "confusion_matrix": confusion_matrix(references, predictions, labels=ids).tolist(),
    }


TASKS.register(NAME, TaskDefinition(
    name=NAME,
    pipeline_tag="text-classification",
    default_metric="accuracy",
    greater_is_better=True,
    check_spec=_check_spec,
    check_data=check_columns,
    prepare=_prepare,
    build_model=_build_model,
    build_processor=_build_processor,
    build_collator=_build_collator,
    compute_metrics=_compute_metrics,
    supports_streaming=True,
))
