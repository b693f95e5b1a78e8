"""Token classification (NER): words → one tag each, scored as entities (seqeval).

Words come pre-split (CoNLL, JSONL, hub); a fast tokenizer splits them into
sub-tokens and `word_ids()` aligns the tags: the first sub-token of a word carries
its tag and the rest are ignored by the loss (-100), or, with
`data.label_all_subtokens`, every sub-token carries the word's tag spread so the
scheme stays valid (B-X → B-X I-X). Evaluation always scores one tag per word.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from training.data.conll import TaggedSource, detect_tagged_format, peek_problems, read_tagged
from training.data.labels import read_label_names
from training.data.tables import DataError, seeded_subset
from training.data.tagging import OUTSIDE, check_scheme, detect_scheme, iob1_to_iob2, label_list, split_tag, subtoken_tags, training_scheme
from training.layout import ENTITY_REPORT_FILE
from training.storage import model_location
from training.tasks.base import PreparedData, TaskDefinition, reads_the_model
from training.tasks.registry import TASKS

NAME = "token-classification"
IGNORE = -100


def _sources(spec: Any) -> tuple[TaggedSource, TaggedSource | None]:
    data, columns = spec.data, spec.data.columns
    fmt = detect_tagged_format(data.train, data.format)
    train = TaggedSource(data.train, fmt, "data.train", data.hub_config, data.train_split, columns.tokens, columns.tags)
    if data.validation is not None:
        return train, TaggedSource(data.validation, detect_tagged_format(data.validation, data.format), "data.validation",
                                   data.hub_config, data.validation_split or "validation", columns.tokens, columns.tags)
    if fmt == "hub" and data.validation_split:
        return train, TaggedSource(data.train, "hub", "data.validation", data.hub_config, data.validation_split,
                                   columns.tokens, columns.tags)
    return train, None


def _check_spec(spec: Any) -> list[tuple[str, str, Any]]:
    problems = []
    try:
        fmt = detect_tagged_format(spec.data.train, spec.data.format)
    except DataError as err:
        return list(err.problems)
    for key in ("tokens", "tags"):
        ref = getattr(spec.data.columns, key)
        if fmt == "conll" and isinstance(ref, str):
            problems.append((f"data.columns.{key}", "CoNLL files have no header; give a 0-based column index "
                             "(negative counts from the end) or leave it null", ref))
    return problems


def _check_data(spec: Any) -> list[tuple[str, str, Any]]:
    train, validation = _sources(spec)
    same_hub_dataset = validation is not None and validation.format == "hub" and validation.location == train.location
    return peek_problems(train) + ([] if validation is None or same_hub_dataset else peek_problems(validation))


def _normalise(ds, scheme: str, source: TaggedSource):
    """Check every tag against the scheme; IOB1 becomes IOB2."""
    for index, tags in enumerate(ds["tags"]):
        try:
            check_scheme(tags, scheme)
        except ValueError as err:
            raise DataError([(source.key, f"{source.location}, sentence {index + 1}: {err}", None)]) from None
    if scheme != "iob1":
        return ds
    return ds.map(lambda tags: {"tags": iob1_to_iob2(tags)}, input_columns="tags", desc="IOB1 → IOB2")


def _resolve_scheme(declared: str, splits: list, sources: list[TaggedSource]) -> str:
    for ds, source in zip(splits, sources):
        for index, tags in enumerate(ds["tags"]):
            for tag in tags:
                try:
                    split_tag(tag)
                except ValueError as err:
                    raise DataError([(source.key, f"{source.location}, sentence {index + 1}: {err} "
                                      "(token classification reads entity tags: O, B-X, I-X, E-X, S-X)", None)]) from None
    if declared != "auto":
        return declared
    return detect_scheme(tags for ds in splits for tags in ds["tags"])


def align_labels(word_ids: list[int | None], tags: list[str], label2id: dict[str, int], scheme: str,
                 label_all_subtokens: bool) -> list[int]:
    """One label per sub-token: the word's tag on its first sub-token, -100 elsewhere (or spread over all)."""
    counts = Counter(w for w in word_ids if w is not None)
    seen: Counter = Counter()
    out = []
    for word in word_ids:
        if word is None:
            out.append(IGNORE)
            continue
        position = seen[word]
        seen[word] += 1
        if position == 0 and not label_all_subtokens:
            out.append(label2id[tags[word]])
        elif not label_all_subtokens:
            out.append(IGNORE)
        else:
            out.append(label2id[subtoken_tags(tags[word], counts[word], scheme)[position]])
    return out


def _prepare(spec: Any) -> PreparedData:
    data, seed = spec.data, spec.train.seed
    train_source, validation_source = _sources(spec)
    given = read_label_names(data.label_names)
    train = read_tagged(train_source, given)
    if validation_source is None:
        split = train.train_test_split(test_size=data.validation_fraction, seed=seed)
        train, validation = split["train"], split["test"]
        validation_source = train_source
    else:
        validation = read_tagged(validation_source, given)
    train = seeded_subset(train, data.limit.train, seed)
    validation = seeded_subset(validation, data.limit.validation, seed)
    scheme = _resolve_scheme(data.tag_scheme, [train, validation], [train_source, validation_source])
    train, validation = _normalise(train, scheme, train_source), _normalise(validation, scheme, validation_source)
    scheme = training_scheme(scheme)
    seen = {t for ds in (train, validation) for tags in ds["tags"] for t in tags}
    labels = label_list(seen, given, scheme, data.label_all_subtokens, train_source.location)
    label2id = {name: i for i, name in enumerate(labels)}
    print(f"token-classification: tag scheme {data.tag_scheme} → trained as {scheme}; {len(labels)} tags")

    processor = _build_processor(spec)

    def encoder(label_all: bool):
        def encode(batch: dict[str, list]) -> dict[str, list]:
            out = processor(batch["tokens"], is_split_into_words=True, truncation=True, max_length=data.max_length)
            out["labels"] = [align_labels(out.word_ids(i), tags, label2id, scheme, label_all)
                             for i, tags in enumerate(batch["tags"])]
            out["length"] = [len(ids) for ids in out["input_ids"]]
            return dict(out)
        return encode

    def tokenize(ds, label_all: bool):
        encoded = ds.map(encoder(label_all), batched=True, batch_size=1000, remove_columns=ds.column_names,
                         desc="tokenizing")
        # A sentence whose words all fell past max_length has no target: its loss would be NaN.
        return encoded.filter(lambda rows: [any(l != IGNORE for l in r) for r in rows], input_columns="labels",
                              batched=True)

    # Evaluation scores one tag per word (the first sub-token), whatever training labels.
    train_tok, validation_tok = tokenize(train, data.label_all_subtokens), tokenize(validation, False)
    if len(train_tok) == 0:
        raise DataError([("data.train", f"{train_source.location}: no tagged sentences left", None)])
    flat = np.concatenate([np.asarray(r) for r in train_tok["labels"]])
    counts = np.bincount(flat[flat != IGNORE], minlength=len(labels)).tolist()
    return PreparedData(train=train_tok.data.table.combine_chunks(), validation=validation_tok.data.table.combine_chunks(),
                        labels=labels, label_counts=counts)


@reads_the_model
def _build_processor(spec: Any):
    from transformers import AutoTokenizer

    options = dict(revision=spec.model.revision, trust_remote_code=spec.model.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(model_location(spec.model), **options)
    if getattr(tokenizer, "add_prefix_space", None) is False:
        # Byte-level BPE (RoBERTa, GPT-2) needs it to take pre-split words.
        tokenizer = AutoTokenizer.from_pretrained(model_location(spec.model), add_prefix_space=True, **options)
    if not tokenizer.is_fast:
        raise DataError([("model", f"{spec.model.path} has no fast tokenizer; token classification needs one "
                          "(word_ids to align tags); pick a model with tokenizer.json", None)])
    return tokenizer


def _build_model(spec: Any, labels: list[str]):
    from transformers import AutoModelForTokenClassification

    return AutoModelForTokenClassification.from_pretrained(
        model_location(spec.model),
        revision=spec.model.revision,
        trust_remote_code=spec.model.trust_remote_code,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        ignore_mismatched_sizes=True,  # a checkpoint's own head (another tag set) is replaced
    )


def _build_collator(processor, training: bool):
    from transformers import DataCollatorForTokenClassification

    collate = DataCollatorForTokenClassification(processor, label_pad_token_id=IGNORE, return_tensors="pt")

    def collate_rows(rows: list[dict]) -> dict:
        return collate([{k: v for k, v in row.items() if k != "length"} for row in rows])

    return collate_rows


def token_argmax(logits, labels) -> tuple[list, list]:
    """Per example, predicted and gold tag ids at the positions that carry a label."""
    predicted = logits.argmax(-1)
    predictions, references = [], []
    for row_pred, row_gold in zip(predicted, labels):
        keep = row_gold != IGNORE
        predictions.append(row_pred[keep].tolist())
        references.append(row_gold[keep].tolist())
    return predictions, references


def _compute_metrics(predictions, references, labels: list[str], eval_loss: float) -> dict[str, Any]:
    from seqeval.metrics import classification_report, f1_score
    from seqeval.scheme import IOB2, IOBES

    y_pred = [[labels[i] for i in row] for row in predictions]
    y_true = [[labels[i] for i in row] for row in references]
    report = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    overall = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    bioes = any(t.startswith(("E-", "S-")) for t in labels)
    tokens = sum(len(r) for r in y_true)
    correct = sum(p == g for pr, gr in zip(y_pred, y_true) for p, g in zip(pr, gr))
    per_type = {
        kind: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1-score"]),
               "support": int(v["support"])}
        for kind, v in report.items() if not kind.endswith(" avg")
    }
    return {
        # conlleval semantics (seqeval's default): the figures CoNLL papers and HF's run_ner report.
        "precision": float(overall["precision"]),
        "recall": float(overall["recall"]),
        "f1": float(overall["f1-score"]),
        # Strict: an entity counts only when its tags are valid in the scheme (no I- without B-).
        "strict_f1": float(f1_score(y_true, y_pred, mode="strict", scheme=IOBES if bioes else IOB2, zero_division=0)),
        "accuracy": correct / max(tokens, 1),
        "per_type": per_type,
    }


def _report_extras(spec: Any, export_dir, report_dir, manifest: dict) -> dict[str, Any]:
    """report/entities.md: precision, recall, F1 and support per entity type, then overall."""
    per_type = manifest.get("details", {}).get("per_type", {})
    metrics = manifest.get("metrics", {})
    lines = ["| type | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for kind in sorted(per_type):
        v = per_type[kind]
        lines.append(f"| {kind} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |")
    support = sum(v["support"] for v in per_type.values())
    lines.append(f"| **overall** | {metrics.get('precision', 0):.4f} | {metrics.get('recall', 0):.4f} | "
                 f"{metrics.get('f1', 0):.4f} | {support} |")
    text = f"# Entity-level scores ({spec.name}, step {manifest.get('step')})\n\n" + "\n".join(lines) + "\n"
    (report_dir / ENTITY_REPORT_FILE).write_text(text)
    return {"entity_report": ENTITY_REPORT_FILE, "per_type": per_type}


TASKS.register(NAME, TaskDefinition(
    name=NAME,
    pipeline_tag="token-classification",
    default_metric="f1",
    greater_is_better=True,
    check_spec=_check_spec,
    check_data=_check_data,
    prepare=_prepare,
    build_model=_build_model,
    build_processor=_build_processor,
    build_collator=_build_collator,
    compute_metrics=_compute_metrics,
    eval_outputs=token_argmax,
    report_extras=_report_extras,
))
