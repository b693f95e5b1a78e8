"""Entity tag schemes (IOB1, IOB2, BIOES): detection, normalisation, label lists, sub-token tags.

Training runs on IOB2 or BIOES tags. IOB1 (CoNLL-2003's original files: `I-` starts
an entity, `B-` only separates two adjacent entities of one type) is rewritten to
IOB2 once, here; the rewrite leaves valid IOB2 unchanged.
"""

from __future__ import annotations

import re
from typing import Iterable

from training.data.tables import DataError

SCHEMES = ("iob1", "iob2", "bioes")
OUTSIDE = "O"
_TAG = re.compile(r"^([BIES])-(.+)$")


def split_tag(tag: str) -> tuple[str, str | None]:
    """`B-PER` → ("B", "PER"); `O` → ("O", None); anything else raises ValueError."""
    if tag == OUTSIDE:
        return OUTSIDE, None
    match = _TAG.match(tag)
    if not match:
        raise ValueError(f"tag {tag!r} is neither O nor B-/I-/E-/S- followed by a type")
    return match.group(1), match.group(2)


def detect_scheme(sequences: Iterable[list[str]]) -> str:
    """bioes when E-/S- tags occur; iob1 when `I-` starts entities and `B-` never does; else iob2.

    An IOB2 file with a stray `I-` start (WNUT17's dev set has one) stays iob2: its `B-`
    tags start entities after O, which IOB1 never does.
    """
    i_starts = b_starts = False
    for tags in sequences:
        previous = None
        for tag in tags:
            prefix, kind = split_tag(tag)
            if prefix in ("E", "S"):
                return "bioes"
            if previous != kind:
                i_starts |= prefix == "I"
                b_starts |= prefix == "B"
            previous = kind
    return "iob1" if i_starts and not b_starts else "iob2"


def iob1_to_iob2(tags: list[str]) -> list[str]:
    """Every entity starts with B-: an I-X after O or after another type becomes B-X."""
    out, previous = [], None
    for tag in tags:
        prefix, kind = split_tag(tag)
        out.append(f"B-{kind}" if prefix == "I" and previous != kind else tag)
        previous = kind
    return out


def check_scheme(tags: list[str], scheme: str) -> None:
    """Tags a scheme does not have (E-/S- in IOB files) raise ValueError."""
    for tag in tags:
        prefix, _ = split_tag(tag)
        if scheme != "bioes" and prefix in ("E", "S"):
            raise ValueError(f"tag {tag!r} is BIOES, but data.tag_scheme is {scheme}; set data.tag_scheme: bioes (or auto)")


def training_scheme(scheme: str) -> str:
    """The scheme the model is trained and evaluated in: IOB1 is trained as IOB2."""
    return "iob2" if scheme == "iob1" else scheme


def subtoken_tags(tag: str, count: int, scheme: str) -> list[str]:
    """A word's tag spread over its `count` sub-tokens, so each stays valid in the scheme.

    IOB2: B-X → B-X I-X ...; BIOES: S-X → B-X I-X ... E-X, E-X → I-X ... E-X.
    """
    prefix, kind = split_tag(tag)
    if count <= 1 or prefix in (OUTSIDE, "I"):
        return [tag] * count
    if prefix == "B":
        return [tag] + [f"I-{kind}"] * (count - 1)
    if prefix == "E":
        return [f"I-{kind}"] * (count - 1) + [tag]
    return [f"B-{kind}"] + [f"I-{kind}"] * (count - 2) + [f"E-{kind}"]  # S-X


def scheme_tags(kinds: Iterable[str], scheme: str) -> set[str]:
    """Every tag a scheme uses for these entity types."""
    prefixes = ("B", "I", "E", "S") if scheme == "bioes" else ("B", "I")
    return {f"{p}-{k}" for k in kinds for p in prefixes}


def label_list(seen: Iterable[str], given: list[str] | None, scheme: str, label_all_subtokens: bool,
               source: str) -> list[str]:
    """Tag names in id order: as given, or "O" then the sorted tags seen.

    With `label_all_subtokens` the tags that spreading over sub-tokens creates are added
    (a type seen only as S-X also needs B-X, I-X and E-X).
    """
    seen = set(seen)
    needed = set(seen)
    if label_all_subtokens:
        needed |= scheme_tags({split_tag(t)[1] for t in seen if t != OUTSIDE}, scheme)
    if given is not None:
        missing = sorted(needed - set(given))
        if missing:
            raise DataError([("data.label_names", f"{source}: tags {missing[:8]} are not in data.label_names; "
                              "add them (label_all_subtokens needs I-/E- tags for every type)", None)])
        return list(given)
    return [OUTSIDE] + sorted(needed - {OUTSIDE})
