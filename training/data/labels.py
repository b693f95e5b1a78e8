"""Label values (names or integers) → class ids, with names kept for the export."""

from __future__ import annotations

import re
from pathlib import Path

import datasets

from training.data.tables import DataError

_INT = re.compile(r"^[+-]?\d+$")


def read_label_names(label_names: list[str] | str | None) -> list[str] | None:
    """A list as given, or a file with one name per line (blank lines ignored)."""
    if label_names is None or isinstance(label_names, list):
        return label_names
    lines = Path(label_names).read_text(encoding="utf-8-sig").splitlines()
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise DataError([("data.label_names", f"{label_names} holds no label names (one per line)", label_names)])
    return names


def declared_label_names(
    label_names: list[str] | str | None, label_base: int, feature: object = None
) -> tuple[list[str] | None, int]:
    """(names, first label's integer) the job declares (a list or a file), else those a
    `datasets.ClassLabel` column carries (hub datasets: ag_news → World, Sports, ...; ids from 0)."""
    names = read_label_names(label_names)
    if names is None and isinstance(feature, datasets.ClassLabel):
        return list(feature.names), 0
    return names, label_base


def _is_int(value: object) -> bool:
    return isinstance(value, int) or (isinstance(value, str) and bool(_INT.match(value.strip())))


def build_label_map(
    values: list[object], given_names: list[str] | None, label_base: int, source: str, drop_unknown: bool = False
) -> tuple[list[str], dict[object, int]]:
    """Names in id order and a map from each raw value seen to its id.

    Integer labels with names: id = value - label_base (AG News: 1..4 → 0..3).
    Integer labels without names: the sorted distinct integers, named as written.
    Text labels: positions in the given names, or the sorted distinct texts.
    With drop_unknown, text labels outside the given names map to -1 (the caller drops those rows).
    """
    values = [v for v in values if v is not None and v != ""]
    if not values:
        raise DataError([("data.columns.label", f"{source}: the label column is empty", None)])
    all_int = all(_is_int(v) for v in values)
    problems = []
    if given_names is not None:
        if all_int:
            mapping = {v: int(v) - label_base for v in values}
            bad = sorted({v for v, i in mapping.items() if not 0 <= i < len(given_names)}, key=str)
            if bad:
                problems.append(("data.label_base", (
                    f"{source}: integer labels {bad[:5]} fall outside {label_base}..{label_base + len(given_names) - 1} "
                    f"for {len(given_names)} label names; set data.label_base to the first label's integer"), label_base))
        else:
            index = {name: i for i, name in enumerate(given_names)}
            mapping = {v: index.get(str(v).strip(), -1) for v in values}
            bad = sorted({v for v, i in mapping.items() if i < 0}, key=str)
            if bad and not drop_unknown:
                problems.append(("data.label_names", f"{source}: labels {bad[:5]} are not in data.label_names {given_names}; "
                                 "add them, or set data.unknown_labels: drop", None))
        if problems:
            raise DataError(problems)
        return list(given_names), mapping
    if all_int:
        distinct = sorted({int(v) for v in values})
        names = [str(i) for i in distinct]
        position = {i: n for n, i in enumerate(distinct)}
        return names, {v: position[int(v)] for v in values}
    names = sorted({str(v).strip() for v in values})
    position = {name: i for i, name in enumerate(names)}
    return names, {v: position[str(v).strip()] for v in values}
