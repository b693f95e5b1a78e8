"""Text classification: single texts and sentence pairs → one label."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

from training.data.labels import build_label_map, declared_label_names
from training.data.tables import DataError, Source, detect_format, load_table, read_columns, seeded_subset
from training.tasks.base import PreparedData, TaskDefinition
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


def check_columns(spec: Any) -> list[tuple[str, str, Any]]:
    """Every named column exists in every source: read from headers only, before any work."""
    problems = []
    try:
        sources = [s for s in _sources(spec) if s is not None]
    except DataError as err:
        return list(err.problems)
    for source in sources:
        try:
            available = read_columns(source)
        except Exception as err:  # an unreadable file or an unreachable hub id
            problems.append(("data.train" if source.location == spec.data.train else "data.validation",
                             f"cannot read {source.location}: {err}", None))
            continue
        for key, ref in spec.data.columns.refs():
            if str(ref) not in available:
                headerless = not source.header and source.format in ("csv", "tsv")
                hint = "a 0-based index" if headerless else "one of " + ", ".join(available)
                problems.append((f"data.columns.{key}", f"{source.location} has no column {ref!r}; use {hint}", ref))
    return problems


def _prepare(spec: Any) -> PreparedData:
    problems = check_columns(spec)
    if problems:
        raise DataError(problems)
    data, seed = spec.data, spec.train.seed
    train_source, validation_source = _sources(spec)
    text_refs = data.columns.text if isinstance(data.columns.text, list) else [data.columns.text]
    text_cols = [str(r) for r in text_refs]
    pair_col = None if data.columns.text_pair is None else str(data.columns.text_pair)
    label_col = str(data.columns.label)
    wanted = list(dict.fromkeys(text_cols + ([pair_col] if pair_col else []) + [label_col]))

    train = load_table(train_source, wanted)
    if validation_source is None:
        split = train.train_test_split(test_size=data.validation_fraction, seed=seed)
        train, validation = split["train"], split["test"]
    else:
        validation = load_table(validation_source, wanted)
    drop = data.unknown_labels == "drop"
    given, base = declared_label_names(data.label_names, data.label_base, train.features.get(label_col))
    names, mapping = build_label_map(train.unique(label_col), given, base,
                                     train_source.location, drop_unknown=drop)
    unseen = sorted({v for v in validation.unique(label_col) if v not in mapping and v not in (None, "")}, key=str)
    if unseen and given:
        mapping.update(build_label_map(unseen, names, base, "validation", drop_unknown=drop)[1])
    elif unseen:
        raise DataError([("data.validation", f"validation labels {unseen[:5]} never occur in the training data; "
                          "list every label in data.label_names", None)])

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

    processor = _build_processor(spec)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [data.text_separator.join((row or "") for row in parts) for parts in zip(*(batch[c] for c in text_cols))]
        pairs = [p or "" for p in batch[pair_col]] if pair_col else None
        out = processor(texts, pairs, truncation=True, max_length=data.max_length)
        out["labels"] = [mapping[v] for v in batch[label_col]]
        out["length"] = [len(ids) for ids in out["input_ids"]]
        return dict(out)

    def tokenize(ds):
        ds = ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="tokenizing")
        return ds.flatten_indices().data.table.combine_chunks()

    train_table, validation_table = tokenize(train), tokenize(validation)
    counts = np.bincount(np.asarray(train_table.column("labels").to_numpy()), minlength=len(names)).tolist()
    return PreparedData(train=train_table, validation=validation_table, labels=names, label_counts=counts)


def _build_processor(spec: Any):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.model.path, revision=spec.model.revision,
                                         trust_remote_code=spec.model.trust_remote_code)


def _build_model(spec: Any, labels: list[str], **load_kwargs):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        spec.model.path,
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
))
