"""Training data streamed to the workers through Ray Data (`data.streaming: true`).

Without streaming the driver tokenizes the training split into one Arrow table and every worker
receives it whole: exact length grouping, an exact resume position, but each worker holds the
whole split. With streaming Ray Data reads and tokenizes the files in blocks on the cluster, and
Ray Train gives each worker its equal share of the stream (`get_dataset_shard`), so a worker holds
one window of batches at a time, never the dataset. The price, and why:

- `train.max_steps` is required: the length of a stream is not known before it is read (the HF
  Trainer asks the same of an IterableDataset), and the LR schedule needs a length.
- `data.limit.train` takes the first N rows: a seeded subset of a stream needs a pass over all of it.
- `data.validation` is required, and read whole (it is evaluated every time; keep it small).
- Shuffling is Ray Data's local shuffle buffer, seeded per epoch; length grouping sorts within a
  window of `data.streaming_window` batches (the in-memory path groups over the whole split).
- Every rank reads the same number of rows (Ray's equal split) and drops the last partial batch
  and the last partial accumulation group, so ranks always step together.
- A resume mid-epoch re-reads that epoch's stream (in order: `preserve_order`) and skips the
  batches already trained on; with the same files and worker count they are the same batches.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable, Iterator

import pyarrow as pa

from training.data.tables import DataError, Source

# Ray Data's read and tokenize tasks take a quarter CPU each, so they run beside training workers
# that reserved the rest (run.py leaves them room).
DATA_CPUS = 0.25


def read_stream(source: Source, columns: list[str]) -> Any:
    """A lazy Ray Dataset of `columns` (names, or "0", "1"... for headerless files) from one source."""
    import pyarrow.csv as pacsv
    import ray.data

    from training.data.tables import read_columns

    # A line per operator every few seconds is noise in a training log; errors still surface.
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)

    if source.format in ("csv", "tsv"):
        names = None if source.header else read_columns(source)
        tsv = source.format == "tsv"
        return ray.data.read_csv(
            source.location,
            # TSV without quote processing, as the in-memory reader: quotes in MRPC-style files are text.
            parse_options=pacsv.ParseOptions(delimiter="\t" if tsv else ",", quote_char=False if tsv else '"'),
            read_options=pacsv.ReadOptions(column_names=names),
            # Every column as text, as the in-memory reader gives them (labels "1", not 1).
            convert_options=pacsv.ConvertOptions(include_columns=columns,
                                                 column_types={c: pa.string() for c in columns}),
            num_cpus=DATA_CPUS,
        )
    if source.format == "jsonl":
        return ray.data.read_json(source.location, lines=True, num_cpus=DATA_CPUS).select_columns(columns)
    if source.format == "parquet":
        return ray.data.read_parquet(source.location, columns=columns, num_cpus=DATA_CPUS)
    raise DataError([("data.streaming", f"streams read CSV/TSV, JSONL and parquet files; {source.location} is "
                      f"{source.format}: write it to parquet first, or set data.streaming: false", source.format)])


def label_counts(dataset: Any, label_column: str) -> dict[Any, int]:
    """{label value: rows} in one streaming pass (a groupby; nothing is held but the counts)."""
    return {row[label_column]: row["count()"] for row in dataset.groupby(label_column).count().take_all()}


def tokenize_stream(dataset: Any, encode: Callable[[dict[str, list]], dict[str, list]]) -> Any:
    """`encode` (a batch of column lists → a batch of token columns; it may drop rows) over the stream."""

    def encode_block(table: pa.Table) -> pa.Table:
        return pa.table(encode(table.to_pydict()))

    return dataset.map_batches(encode_block, batch_format="pyarrow", batch_size=1000, num_cpus=DATA_CPUS)


def ingest_options() -> Any:
    """Ray Train's ingest options with the order kept: a resume skips the same batches it trained on."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def stream_epoch(shard: Any, *, batch_size: int, accumulation: int, seed: int, epoch: int, group_by_length: bool,
                 window: int, length_column: str, skip: int = 0) -> Iterator[list[dict]]:
    """One epoch of this worker's shard as lists of rows, in whole accumulation groups, the first `skip`
    batches left out."""
    rng = random.Random(seed * 1_000_003 + epoch)
    group: list[list[dict]] = []
    produced = 0
    windows = shard.iter_batches(batch_size=batch_size * window, batch_format="pyarrow", prefetch_batches=1,
                                 local_shuffle_buffer_size=batch_size * window, local_shuffle_seed=seed + epoch)
    for table in windows:
        rows = table.to_pylist()
        if group_by_length:
            rows.sort(key=lambda row: row[length_column])
        batches = [rows[i:i + batch_size] for i in range(0, len(rows) - batch_size + 1, batch_size)]
        if group_by_length:
            rng.shuffle(batches)  # sorted within the window, but not longest-last
        for batch in batches:
            group.append(batch)
            if len(group) < accumulation:
                continue
            for whole in group:
                if produced >= skip:
                    yield whole
                produced += 1
            group = []
