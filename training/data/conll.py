"""Token-tagged data (NER) as a `datasets.Dataset` of `tokens` and `tags` (both lists of strings).

Formats, as the files really come:

- CoNLL: one token a line, columns split by tabs (when the line has one) or spaces; the
  token is the first column and the tag the last unless told otherwise (CoNLL-2003's
  `token POS chunk tag`); `-DOCSTART-` lines are skipped; a sentence ends at a line that
  is empty or holds only white space (WNUT17 has both, and a stray byte-order mark).
- JSONL or parquet with a list of tokens and a list of tags per row (tags as names, or
  integers with `data.label_names`).
- Hub datasets (`conll2003`, `wnut_17`): `tokens` and `ner_tags`, tag names from the
  dataset's ClassLabel feature.

A malformed line raises DataError naming the file and the line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import datasets
import fsspec

from training.data.tables import DataError

ColumnRef = Union[str, int]
DOCSTART = "-DOCSTART-"
# Characters that are not white space to Python but carry nothing (WNUT17's dev file ends in a BOM).
_INVISIBLE = "\ufeff\u200b\u200c\u200d\u2060"
_MAX_REPORTED = 5


@dataclass(frozen=True)
class TaggedSource:
    """One split of token-tagged data: where, in which format, which columns."""

    location: str
    format: str  # conll | jsonl | parquet | hub
    key: str = "data.train"  # the job-file key that named it, for error messages
    hub_config: str | None = None
    split: str = "train"
    tokens: ColumnRef | None = None  # None: 0 (CoNLL) / "tokens"
    tags: ColumnRef | None = None  # None: -1 (CoNLL) / "tags", else "ner_tags"


def detect_tagged_format(location: str, declared: str = "auto") -> str:
    """conll for any local text file, jsonl/parquet by suffix, a hub id otherwise."""
    if declared in ("csv", "tsv"):
        return "conll"  # a tab-separated token/tag file is what "tsv" means for tagged data
    if declared != "auto":
        return declared
    suffixes = [s.lower() for s in Path(location).suffixes]
    if any(s in (".jsonl", ".json") for s in suffixes):
        return "jsonl"
    if any(s in (".parquet", ".pq") for s in suffixes):
        return "parquet"
    if Path(location).exists() or "://" in location or suffixes:
        return "conll"
    return "hub"


def _is_blank(line: str) -> bool:
    return not line.strip().strip(_INVISIBLE)


def _fields(line: str) -> list[str]:
    line = line.rstrip()
    if "\t" in line:
        return [part.strip() for part in line.split("\t")]
    return line.split()


def read_conll(path: str, key: str = "data.train", token_column: int = 0, tag_column: int = -1) -> datasets.Dataset:
    """Sentences of a CoNLL-style file (plain or compressed: .gz, .bz2, .xz)."""
    tokens: list[list[str]] = []
    tags: list[list[str]] = []
    words: list[str] = []
    labels: list[str] = []
    problems: list[tuple[str, str, object]] = []
    width = None

    def end_sentence() -> None:
        if words:
            tokens.append(list(words))
            tags.append(list(labels))
            words.clear()
            labels.clear()

    with fsspec.open(str(path), "rt", encoding="utf-8-sig", compression="infer") as handle:
        for number, line in enumerate(handle, start=1):
            if _is_blank(line):
                end_sentence()
                continue
            fields = _fields(line)
            if fields[0] == DOCSTART:
                end_sentence()
                continue
            problem = None
            if len(fields) < 2:
                problem = "needs a token and a tag separated by a tab or a space"
            elif width is not None and len(fields) != width:
                problem = f"has {len(fields)} columns, earlier lines {width} (a token with a space in a space-separated file?)"
            else:
                try:
                    words.append(fields[token_column])
                    labels.append(fields[tag_column])
                except IndexError:
                    problem = f"has {len(fields)} columns; data.columns asks for {token_column} and {tag_column}"
            width = width or len(fields)
            if problem and len(problems) < _MAX_REPORTED:
                problems.append((key, f"{path}, line {number}: {problem}", line.rstrip("\r\n")[:80]))
            if problem:
                words[len(labels):] = []  # keep tokens and tags paired
    end_sentence()
    if problems:
        raise DataError(problems)
    if not tokens:
        raise DataError([(key, f"{path}: no sentences (expected token and tag columns, one token a line)", None)])
    return datasets.Dataset.from_dict({"tokens": tokens, "tags": tags})


def _tag_names_from_features(column: datasets.Dataset, name: str) -> list[str] | None:
    feature = column.features[name]
    inner = getattr(feature, "feature", None)
    return list(inner.names) if isinstance(inner, datasets.ClassLabel) else None


def _load_rows(source: TaggedSource) -> datasets.Dataset:
    if source.format == "hub":
        return datasets.load_dataset(source.location, source.hub_config, split=source.split)
    if source.format in ("jsonl", "parquet"):
        builder = "json" if source.format == "jsonl" else "parquet"
        return datasets.load_dataset(builder, data_files=source.location, split="train")
    raise DataError([("data.format", f"unknown format {source.format} for tagged data; use conll, jsonl, parquet or hub",
                      source.format)])


def tag_columns(available: list[str], source: TaggedSource) -> tuple[str, str]:
    """(tokens column, tags column) of a JSONL/parquet/hub source; DataError when one is missing."""
    tokens = str(source.tokens) if source.tokens is not None else "tokens"
    tags = str(source.tags) if source.tags is not None else ("tags" if "tags" in available else "ner_tags")
    missing = [(k, c) for k, c in (("tokens", tokens), ("tags", tags)) if c not in available]
    if missing:
        raise DataError([(f"data.columns.{k}", f"{source.location} has no column {c!r}; columns: {', '.join(available)}", c)
                         for k, c in missing])
    return tokens, tags


def read_tagged(source: TaggedSource, label_names: list[str] | None = None) -> datasets.Dataset:
    """`tokens` and `tags` (tag names) of one split, whatever the format."""
    if source.format == "conll":
        token_column = 0 if source.tokens is None else source.tokens
        tag_column = -1 if source.tags is None else source.tags
        if not isinstance(token_column, int) or not isinstance(tag_column, int):
            raise DataError([("data.columns", "CoNLL files have no header: give data.columns.tokens/tags as 0-based "
                              "indices (negative counts from the end)", None)])
        return read_conll(source.location, source.key, token_column, tag_column)
    ds = _load_rows(source)
    tokens_column, tags_column = tag_columns(ds.column_names, source)
    names = _tag_names_from_features(ds, tags_column) or label_names
    ds = ds.select_columns([tokens_column, tags_column])
    location = source.location

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out_tags = []
        for row, words, tags in zip(indices, batch[tokens_column], batch[tags_column]):
            if words is None or tags is None or len(words) != len(tags):
                raise DataError([(source.key, f"{location}: row {row + 1} has {len(words or [])} tokens but "
                                  f"{len(tags or [])} tags; every token needs one tag", None)])
            if tags and not isinstance(tags[0], str):
                if names is None:
                    raise DataError([("data.label_names", f"{location}: tags are integers; list the tag names "
                                      "in id order in data.label_names", None)])
                try:
                    tags = [names[int(t)] for t in tags]
                except IndexError:
                    raise DataError([("data.label_names", f"{location}: tag id out of range for "
                                      f"{len(names)} names", max(tags))]) from None
            out_tags.append([str(t) for t in tags])
        return {"tokens": [[str(w) for w in words] for words in batch[tokens_column]], "tags": out_tags}

    converted = ds.map(convert, batched=True, with_indices=True, remove_columns=ds.column_names, desc="reading tags")
    return converted.filter(lambda words: [len(w) > 0 for w in words], input_columns="tokens", batched=True)


def peek_problems(source: TaggedSource) -> list[tuple[str, str, object]]:
    """Cheap checks for `tunefleet validate`: the first lines of a CoNLL file, a row's columns otherwise."""
    try:
        if source.format == "conll":
            with fsspec.open(source.location, "rt", encoding="utf-8-sig", compression="infer") as handle:
                for number, line in enumerate(handle, start=1):
                    if _is_blank(line) or _fields(line)[0] == DOCSTART:
                        continue
                    if len(_fields(line)) < 2:
                        return [(source.key, f"{source.location}, line {number}: needs a token and a tag "
                                 "separated by a tab or a space", line.rstrip("\r\n")[:80])]
                    if number > 50:
                        break
            return []
        if source.format == "hub":
            builder = datasets.load_dataset_builder(source.location, source.hub_config)
            available = list(builder.info.features or {})
        elif source.format == "jsonl":
            import json

            with fsspec.open(source.location, "rt", encoding="utf-8-sig", compression="infer") as handle:
                first = next((line for line in handle if line.strip()), "{}")
            available = list(json.loads(first))
        else:
            import pyarrow.parquet as pq

            available = list(pq.read_schema(source.location).names)
        if available:
            tag_columns(available, source)
        return []
    except DataError as err:
        return list(err.problems)
    except Exception as err:  # unreadable file, unreachable hub id
        return [(source.key, f"cannot read {source.location}: {err}", None)]
