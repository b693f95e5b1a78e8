"""Tabular training data (CSV/TSV, JSONL, parquet, hub datasets) as `datasets.Dataset`.

`datasets.load_dataset` does the reading: it memory-maps Arrow files, so a
dataset larger than memory still loads, and the hub path users expect is the
same call. What is added here is what real files need and the library leaves
to the caller: headerless files addressed by column index, TSV without quote
processing (MRPC quotes are text, not CSV quoting), a UTF-8 BOM on the first
line, and errors that name the file, the column and the columns that exist.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import datasets
import fsspec

SUFFIX_FORMATS = {
    ".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
}


class DataError(ValueError):
    """A data problem the user must fix; the message names the cause and the fix."""

    def __init__(self, problems: list[tuple[str, str, object]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{path}: {msg}" + ("" if value is None else f" (got {value!r})") for path, msg, value in problems))


@dataclass(frozen=True)
class Source:
    """Where one split comes from: a local file or a hub dataset split."""

    location: str
    format: str  # csv | tsv | jsonl | parquet | hub
    header: bool = True
    hub_config: str | None = None
    split: str = "train"

    @property
    def is_hub(self) -> bool:
        return self.format == "hub"


def detect_format(location: str, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    suffixes = Path(location).suffixes
    for suffix in reversed(suffixes):
        if suffix.lower() in SUFFIX_FORMATS:
            return SUFFIX_FORMATS[suffix.lower()]
    if Path(location).exists() or "://" in location:
        raise DataError([("data.format", f"cannot tell the format of {location} from its name; set data.format", "auto")])
    return "hub"


def read_columns(source: Source) -> list[str]:
    """The column names a source has, read cheaply (first lines / schema only)."""
    if source.is_hub:
        builder = datasets.load_dataset_builder(source.location, source.hub_config)
        return list(builder.info.features or {})
    path = Path(source.location)
    if source.format in ("csv", "tsv"):
        # fsspec infers compression from the suffix (.gz, .bz2, .xz, .zst), as load_dataset does.
        with fsspec.open(str(path), "rt", encoding="utf-8-sig", newline="", compression="infer") as handle:
            first = handle.readline()
        row = _split_line(first, source.format)
        return row if source.header else [str(i) for i in range(len(row))]
    if source.format == "jsonl":
        import json

        with path.open(encoding="utf-8-sig") as handle:
            for line in handle:
                if line.strip():
                    return list(json.loads(line))
        return []
    if source.format == "parquet":
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    raise DataError([("data.format", f"unknown format {source.format}", source.format)])


def _split_line(line: str, fmt: str) -> list[str]:
    if fmt == "tsv":
        return line.rstrip("\r\n").split("\t")
    return next(csv.reader(io.StringIO(line)), [])


def load_table(source: Source, columns: list[str]) -> datasets.Dataset:
    """Load the named columns of one split as a Dataset (names are strings, indices as '0', '1', ...)."""
    if source.is_hub:
        ds = datasets.load_dataset(source.location, source.hub_config, split=source.split)
    elif source.format in ("csv", "tsv"):
        all_columns = read_columns(source)
        ds = datasets.load_dataset(
            "csv",
            data_files=source.location,
            split="train",
            sep="\t" if source.format == "tsv" else ",",
            # TSV has no quoting convention: MRPC's quotes are part of the text.
            quoting=csv.QUOTE_NONE if source.format == "tsv" else csv.QUOTE_MINIMAL,
            encoding="utf-8-sig",
            header=0 if source.header else None,
            names=None if source.header else all_columns,
            # Every column as text: labels are parsed by the task, not guessed by pandas,
            # and a text that reads "NA" stays a text.
            features=datasets.Features({name: datasets.Value("string") for name in all_columns}),
            keep_default_na=False,
        )
    elif source.format == "jsonl":
        ds = datasets.load_dataset("json", data_files=source.location, split="train")
    elif source.format == "parquet":
        ds = datasets.load_dataset("parquet", data_files=source.location, split="train")
    else:
        raise DataError([("data.format", f"unknown format {source.format}", source.format)])
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError([("data.columns", f"{source.location} has no column {', '.join(missing)}; columns: {', '.join(ds.column_names)}", None)])
    return ds.select_columns(columns)


def seeded_subset(ds: datasets.Dataset, limit: int | None, seed: int) -> datasets.Dataset:
    """shuffle(seed).select(range(limit)), as the tutorials do; the whole set when limit is None or larger."""
    if limit is None or limit >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(limit)).flatten_indices()
