"""Causal-LM data: plain text packed into blocks, instruction and chat JSONL with response-only loss.

Three formats (`data.lm_format`), tokenized with `datasets.map(batched=True)`:

- text: a `.txt` corpus (read by paragraph, rejoined with blank lines) or a text
  column (one document a row, an EOS token after each), concatenated and cut into
  blocks of `data.max_length` tokens; the tail shorter than a block is dropped, as
  Hugging Face's run_clm does. Every token is a target. Without a validation file,
  a seeded share of the blocks is held out.
- instruction: `instruction`, optional `input`, `output` columns.
- chat: a `messages` column of [{role, content}].
  Both render through `training.data.prompts`; labels are -100 outside the
  responses, examples are truncated to `data.max_length` tokens, and examples left
  without a response token are dropped (counted). Without a validation file a
  seeded share of the rows is held out.

Tables hold `input_ids`, `length` and, for the last two, `labels`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

from training.data.prompts import (
    instruction_prompt, normalize_messages, render_chat, render_instruction, special_prefix, token_labels,
)
from training.data.tables import DataError, Source, detect_format, load_table, read_columns, seeded_subset

TEXT_SUFFIXES = (".txt", ".text", ".md")
INSTRUCTION_COLUMNS = ("instruction", "input", "output")
CHAT_COLUMN = "messages"


def sources(spec: Any) -> tuple[Source, Source | None]:
    data = spec.data

    def source(location: str, split: str) -> Source:
        if data.format == "auto" and Path(location).suffix.lower() in TEXT_SUFFIXES:
            return Source(location, "text")
        return Source(location, detect_format(location, data.format), data.header is not False, data.hub_config, split)

    train = source(data.train, data.train_split)
    validation = None
    if data.validation is not None:
        validation = source(data.validation, data.validation_split or "validation")
    elif train.is_hub and data.validation_split:
        validation = Source(data.train, "hub", True, data.hub_config, data.validation_split)
    return train, validation


def _text_column(spec: Any) -> str:
    ref = spec.data.columns.text
    return str(ref[0] if isinstance(ref, list) else ref)


def resolve_format(spec: Any, source: Source, columns: list[str]) -> str:
    """text | instruction | chat for one source, from data.lm_format or the columns it has."""
    wanted = spec.data.lm_format
    if wanted != "auto":
        return wanted
    if source.format == "text":
        return "text"
    if CHAT_COLUMN in columns:
        return "chat"
    if "instruction" in columns and "output" in columns:
        return "instruction"
    return "text"


def _columns(source: Source) -> list[str]:
    return ["text"] if source.format == "text" else read_columns(source)


def check_lm_data(spec: Any) -> list[tuple[str, str, Any]]:
    """Every source can be read and has the columns its format needs (headers only, before any work)."""
    problems = []
    try:
        train, validation = sources(spec)
    except DataError as err:
        return list(err.problems)
    formats, unreadable = set(), set()
    for key, source in (("data.train", train), ("data.validation", validation)):
        if source is None or source.location in unreadable:  # a hub id's other split: said once, not retried
            continue
        try:
            available = _columns(source)
        except Exception as err:  # an unreadable file or an unreachable hub id
            unreadable.add(source.location)
            problems.append((key, f"cannot read {source.location}: {err}", None))
            continue
        kind = resolve_format(spec, source, available)
        formats.add(kind)
        needed = {"text": [_text_column(spec)] if source.format != "text" else [],
                  "instruction": ["instruction", "output"], "chat": [CHAT_COLUMN]}[kind]
        for column in needed:
            if column not in available:
                where = "data.columns.text" if kind == "text" else "data.lm_format"
                problems.append((where, f"{source.location} has no column {column!r} for lm_format {kind}; "
                                 f"columns: {', '.join(available)}", column))
    if len(formats) > 1:
        problems.append(("data.validation", f"train and validation have different formats ({', '.join(sorted(formats))}); "
                         "set data.lm_format", None))
    return problems


def load_rows(source: Source, spec: Any, kind: str) -> datasets.Dataset:
    if source.format == "text":
        ds = datasets.load_dataset("text", data_files=source.location, sample_by="paragraph", split="train")
        return ds.map(lambda b: {"text": [t + "\n\n" for t in b["text"]]}, batched=True, desc="reading paragraphs")
    available = read_columns(source)
    if kind == "text":
        column = _text_column(spec)
        table = load_table(source, [column])
        return table if column == "text" else table.rename_column(column, "text")
    if kind == "instruction":
        return load_table(source, [c for c in INSTRUCTION_COLUMNS if c in available])
    return load_table(source, [CHAT_COLUMN])


def pack_blocks(ds: datasets.Dataset, tokenizer: Any, block_size: int, separator_ids: list[int]) -> datasets.Dataset:
    """Tokenize every text, append the separator, concatenate, cut into blocks of `block_size` tokens."""
    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        texts = [t for t in batch["text"] if t and t.strip()]
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]  # long paragraphs are fine here
        return {"ids": [row + separator_ids for row in ids]}

    def group(batch: dict[str, list]) -> dict[str, list]:
        stream = [token for row in batch["ids"] for token in row]
        usable = len(stream) // block_size * block_size
        blocks = [stream[i:i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "length": [block_size] * len(blocks)}

    tokens = ds.map(tokenize, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="tokenizing")
    # 1000 rows at a time, as run_clm: memory stays bounded; each batch drops its own short tail.
    return tokens.map(group, batched=True, batch_size=1000, remove_columns=["ids"], desc=f"packing {block_size}-token blocks")


def encode_supervised(ds: datasets.Dataset, tokenizer: Any, kind: str, max_length: int) -> datasets.Dataset:
    """Render, tokenize with offsets, label the response tokens; drop examples left without one."""
    prefix = special_prefix(tokenizer) if kind == "instruction" else []

    def render(row: dict[str, Any]) -> tuple[str, list]:
        if kind == "chat":
            return render_chat(tokenizer, normalize_messages(row[CHAT_COLUMN]))
        instruction, output = row.get("instruction"), row.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise ValueError("instruction and output must be texts")
        return render_instruction(tokenizer, instruction, row.get("input") or None, output)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        rendered = []
        for row in rows:
            try:
                rendered.append(render(row))
            except ValueError as err:
                raise DataError([("data.train", f"cannot render example {row!r:.200}: {err}", None)]) from None
        encoded = tokenizer([text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True,
                            truncation=True, max_length=max_length - len(prefix))
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": []}
        for (_, spans), ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
            labels = [-100] * len(prefix) + token_labels(ids, offsets, spans)
            out["input_ids"].append(prefix + list(ids))
            out["labels"].append(labels)
            out["length"].append(len(prefix) + len(ids))
        return out

    encoded = ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="tokenizing")
    # The first token is never a target (nothing predicts it).
    return encoded.filter(lambda rows: [any(l != -100 for l in labels[1:]) for labels in rows], input_columns="labels",
                          batched=True, desc="dropping examples without a response token")


def prepare_lm(spec: Any, tokenizer: Any):
    """(train, validation) Arrow tables: input_ids, length, and labels for instruction and chat data."""
    problems = check_lm_data(spec)
    if problems:
        raise DataError(problems)
    data, seed = spec.data, spec.train.seed
    train_source, validation_source = sources(spec)
    kind = resolve_format(spec, train_source, _columns(train_source))
    train_rows = load_rows(train_source, spec, kind)
    validation_rows = load_rows(validation_source, spec, kind) if validation_source else None

    if kind == "text":
        separator = [] if train_source.format == "text" else [tokenizer.eos_token_id]
        train = pack_blocks(train_rows, tokenizer, data.max_length, separator)
        if validation_rows is None:
            split = _split(train, data.validation_fraction, seed, "blocks")
            train, validation = split["train"], split["test"]
        else:
            validation = pack_blocks(validation_rows, tokenizer, data.max_length, separator)
    else:
        if validation_rows is None:
            split = _split(train_rows, data.validation_fraction, seed, "rows")
            train_rows, validation_rows = split["train"], split["test"]
        train = encode_supervised(train_rows, tokenizer, kind, data.max_length)
        validation = encode_supervised(validation_rows, tokenizer, kind, data.max_length)
        dropped = len(train_rows) - len(train)
        if dropped:
            print(f"data: dropped {dropped} training examples whose response lies past max_length {data.max_length}")
    train, validation = seeded_subset(train, data.limit.train, seed), seeded_subset(validation, data.limit.validation, seed)
    for key, table, source in (("data.train", train, train_source), ("data.validation", validation, validation_source)):
        if len(table) == 0:
            what, fix = (f"{data.max_length}-token blocks", "use more text or a smaller data.max_length") if kind == "text" \
                else ("examples with a response token", "raise data.max_length: longer prompts leave no response")
            raise DataError([(key, f"{(source or train_source).location}: no {what}; {fix}", data.max_length)])
    return _table(train), _table(validation)


def _table(ds: datasets.Dataset):
    """The rows as one Arrow table (a split or a subset leaves an indices mapping to apply first)."""
    return ds.flatten_indices().data.table.combine_chunks()


def _split(ds: datasets.Dataset, fraction: float, seed: int, what: str) -> datasets.DatasetDict:
    if len(ds) < 2:
        raise DataError([("data.validation", f"only {len(ds)} {what}: too few to hold some out; give data.validation "
                          "or more data", None)])
    return ds.train_test_split(test_size=fraction if fraction * len(ds) >= 1 else 1, seed=seed)


def sample_prompts(spec: Any, tokenizer: Any, n: int = 3, words: int = 8) -> list[str]:
    """Prompts for sample generations, from the validation data (else train): a text's first words,
    or an instruction's / a conversation's prompt up to its last response."""
    train_source, validation_source = sources(spec)
    source = validation_source or train_source
    kind = resolve_format(spec, source, _columns(source))
    rows = load_rows(source, spec, kind)
    prompts: list[str] = []
    for row in rows.select(range(min(len(rows), 50 * n))):
        if kind == "text":
            head = " ".join((row["text"] or "").split()[:words])
            prompt = head if head else None
        elif kind == "instruction":
            ok = isinstance(row.get("instruction"), str)
            prompt = instruction_prompt(tokenizer, row["instruction"], row.get("input") or None) if ok else None
        else:
            try:
                messages = normalize_messages(row[CHAT_COLUMN])
            except ValueError:
                continue
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
            prompt = tokenizer.apply_chat_template(messages[:turns[-1]], add_generation_prompt=True, tokenize=False) \
                if turns and turns[-1] > 0 else None
        if prompt and prompt not in prompts:
            prompts.append(prompt)
        if len(prompts) == n:
            break
    return prompts
