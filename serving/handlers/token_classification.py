"""Token classification (NER): raw text or pre-split words → entities with character offsets.

Each word is tagged by its first sub-token, as training labelled it (or, asked for with the
pipeline's `aggregation_strategy`, by the mean of its sub-tokens' scores, or by its surest
sub-token); adjacent words then join into entities as `transformers.pipeline(...,
aggregation_strategy="simple")` joins them (B- starts an entity, I- of the same type continues
it; BIOES's E-/S- close it), and the entity's text is the input's own slice, `text[start:end]`.
Texts longer than the model's window are read in overlapping windows, each word taking the tag
from the window where it sits farthest from an edge.

Grouping is by word, never inside one: the pipeline's "simple" tags sub-tokens and may cut
"Blackburn" into "Black" (PER) and "##burn" (O); here "simple" is "first".
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator
from transformers import AutoModelForTokenClassification, AutoTokenizer

from serving.config import ServeSpec
from serving.errors import ServingError
from serving.handlers.base import TaskHandler, input_window, load_model
from serving.handlers.registry import register_handler
from serving.packed import skip_padding
from serving.placement import place, replica_device
from serving.schemas import PredictResponse, Text
from training.layout import ExportInfo


class Words(BaseModel):
    """Pre-split input: offsets then point into the words joined by single spaces."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: list[Text] = Field(min_length=1, description='["Peter", "Blackburn", "said"]')


def _kind(value: Any) -> str | None:
    return {str: "Text", list: "List", dict: "Words", Words: "Words"}.get(type(value))


NerInput = Annotated[
    Union[Annotated[Text, Tag("Text")], Annotated[Words, Tag("Words")]],
    Discriminator(_kind, custom_error_type="input_type",
                  custom_error_message='each input must be a text or an object {"tokens": ["word", ...]}'),
]
NerInputs = Annotated[
    Union[Annotated[Text, Tag("Text")], Annotated[Words, Tag("Words")], Annotated[list[NerInput], Tag("List")]],
    Discriminator(_kind, custom_error_type="inputs_type",
                  custom_error_message='inputs must be a text, {"tokens": [...]}, or a list of these'),
]


# How a word takes its tag from its sub-tokens' scores (the pipeline's word-level strategies).
WORD_TAGS = ("first", "average", "max")


class TokenClassificationParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # `aggregation_strategy` is the pipeline's name for it, and what Hugging Face clients send.
    aggregation: Literal["simple", "first", "average", "max", "none"] = Field(
        "simple", validation_alias=AliasChoices("aggregation", "aggregation_strategy"),
        description="simple or first: whole entities (B-/I- joined), each word tagged by its first sub-token; "
                    "average: by the mean of its sub-tokens' scores; max: by its surest sub-token; "
                    "none: one tag per word (first sub-token), not joined. Also read as aggregation_strategy.")
    ignore_labels: list[str] = Field(
        ["O"], description='Leave out entities of these types (PER), or words with these tags with "none" '
                           '(send [] to see the O words too).')
    min_score: float = Field(0.0, ge=0, le=1, description="Leave out entities whose mean score is lower.")

    @model_validator(mode="before")
    @classmethod
    def _one_name(cls, value: Any) -> Any:
        if isinstance(value, dict) and "aggregation" in value and "aggregation_strategy" in value:
            raise ValueError("aggregation and aggregation_strategy are one parameter under two names: send one")
        return value

    @property
    def word_tags(self) -> str:
        """Which of WORD_TAGS tags the words."""
        return self.aggregation if self.aggregation in WORD_TAGS else "first"


class TokenClassificationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: NerInputs = Field(description='"a text", ["t1", "t2"] or {"tokens": ["Peter", "Blackburn"]}')
    parameters: TokenClassificationParameters = Field(default_factory=TokenClassificationParameters)

    @field_validator("inputs")
    @classmethod
    def _check_inputs(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("must hold at least one input")
        return value

    def input_list(self) -> list[str | Words]:
        return list(self.inputs) if isinstance(self.inputs, list) else [self.inputs]


class Entity(BaseModel):
    entity: str = Field(description="Entity type (PER), or the word's tag (B-PER) with aggregation none.")
    word: str = Field(description="The input's text from start to end.")
    start: int
    end: int
    score: float
    token_start: int | None = Field(None, description="Pre-split input: index of the first word.")
    token_end: int | None = Field(None, description="Pre-split input: index after the last word.")


class TokenClassificationResponse(PredictResponse):
    predictions: list[list[Entity]] = Field(description="Per input, its entities in text order.")


def _split(tag: str) -> tuple[str, str | None]:
    """(prefix, type); a tag without a B-/I-/E-/S- prefix continues like I-, as the pipeline reads it."""
    if tag == "O":
        return "O", None
    if len(tag) > 2 and tag[1] == "-" and tag[0] in "BIES":
        return tag[0], tag[2:]
    return "I", tag


def group_entities(text: str, words: list[tuple[str, float, int, int]], pre_split: bool) -> list[dict[str, Any]]:
    """Tagged words (tag, score, start, end) → entities, as the pipeline's "simple" strategy joins them."""
    entities: list[dict[str, Any]] = []
    current: list[int] = []

    def close() -> None:
        if current:
            first, last = words[current[0]], words[current[-1]]
            entity = {"entity": _split(first[0])[1], "word": text[first[2]:last[3]], "start": first[2], "end": last[3],
                      "score": sum(words[i][1] for i in current) / len(current)}
            if pre_split:
                entity.update(token_start=current[0], token_end=current[-1] + 1)
            entities.append(entity)
            current.clear()

    for index, (tag, _, _, _) in enumerate(words):
        prefix, kind = _split(tag)
        if prefix == "O":
            close()
            continue
        if not (current and prefix in ("I", "E") and kind == _split(words[current[-1]][0])[1]):
            close()
        current.append(index)
        if prefix in ("E", "S"):
            close()
    close()
    return entities


@register_handler("token-classification")
class TokenClassificationHandler(TaskHandler):
    request_model = TokenClassificationRequest
    response_model = TokenClassificationResponse

    def __init__(self, info: ExportInfo, spec: ServeSpec, model, tokenizer, device: torch.device) -> None:
        super().__init__(info, spec)
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_length = input_window(info, tokenizer, model)
        self.stride = max(1, min(64, self.max_length // 4))
        # The export's tags: an adapter pool's base (serving/adapters.py) knows only how many there are.
        num_labels = model.config.num_labels
        self.labels = (list(info.labels) if len(info.labels) == num_labels
                       else [str(model.config.id2label[i]) for i in range(num_labels)])

    @classmethod
    def load(cls, export_dir: Path, info: ExportInfo, spec: ServeSpec) -> TokenClassificationHandler:
        device = replica_device(spec)
        tokenizer = AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
        model, plain = load_model(AutoModelForTokenClassification, export_dir, info)
        if plain:
            skip_padding(model)  # a BERT-family encoder's layers skip the batch's padding (serving/packed.py)
        return cls(info, spec, place(model, spec, device, cls.auto_bfloat16), tokenizer, device)

    def prepare(self, request: TokenClassificationRequest) -> list[str | list[str]]:
        inputs = request.input_list()
        limit = self.spec.max_inputs_per_request
        if len(inputs) > limit:
            raise ServingError(413, f"too many inputs: {len(inputs)} in one request, at most {limit}",
                               {"max_inputs_per_request": limit})
        items = [list(x.tokens) if isinstance(x, Words) else x for x in inputs]
        for i, item in enumerate(items):
            size = len(item) if isinstance(item, str) else sum(len(w) + 1 for w in item) - 1
            if size > self.spec.max_input_chars:
                raise ServingError(413, f"input {i} is too long: {size} characters, at most {self.spec.max_input_chars}",
                                   {"max_input_chars": self.spec.max_input_chars})
        return items

    @torch.inference_mode()
    def run_batch(self, items: list[str | list[str]]) -> list[dict[str, Any]]:
        outputs: list[dict[str, Any] | None] = [None] * len(items)
        for pre_split in (False, True):  # the tokenizer takes texts or word lists, not both at once
            index = [i for i, item in enumerate(items) if isinstance(item, list) == pre_split]
            if index:
                for i, output in zip(index, self._tag_words([items[i] for i in index], pre_split)):
                    outputs[i] = output
        return outputs  # type: ignore[return-value]

    def _tag_words(self, batch: list, pre_split: bool) -> list[dict[str, Any]]:
        encoded = self.tokenizer(batch, is_split_into_words=pre_split, truncation=True, max_length=self.max_length,
                                 stride=self.stride, return_overflowing_tokens=True, return_offsets_mapping=True,
                                 padding=True, return_tensors="pt")
        rows = encoded.pop("overflow_to_sample_mapping").tolist()
        offsets = encoded.pop("offset_mapping").tolist()
        probs = self.model(**encoded.to(self.device)).logits.float().softmax(-1)
        scores, tags = (t.cpu().tolist() for t in probs.max(-1))
        word_ids = [encoded.word_ids(row) for row in range(len(rows))]
        average, surest = self._word_scores(probs, word_ids)
        # Per input: word → [start, end, tag id, score, distance from the window's edge, row].
        found: list[dict[int, list]] = [{} for _ in batch]
        for row, sample in enumerate(rows):
            length = sum(w is not None for w in word_ids[row])
            for position, word in enumerate(word_ids[row]):
                if word is None:
                    continue
                start, end = offsets[row][position]
                edge = min(position, length - position)
                entry = found[sample].get(word)
                if entry is None:
                    found[sample][word] = [start, end, tags[row][position], scores[row][position], edge, row]
                    continue
                entry[0], entry[1] = min(entry[0], start), max(entry[1], end)
                first_subtoken = position == 0 or word_ids[row][position - 1] != word
                if first_subtoken and edge > entry[4]:
                    entry[2:] = [tags[row][position], scores[row][position], edge, row]
        return [self._words(item, found[sample], pre_split, average, surest) for sample, item in enumerate(batch)]

    @staticmethod
    def _word_scores(probs: torch.Tensor, word_ids: list[list[int | None]]) -> tuple[list[dict], list[dict]]:
        """Per window row, word → (tag id, score) by the mean of its sub-tokens' scores, and by its surest
        sub-token: two scatters over the batch, not a loop over words."""
        rows, length, labels = probs.shape
        words = 1 + max((w for ids in word_ids for w in ids if w is not None), default=0)
        # Each position's segment: row * words + word; special tokens and padding share a last, unread one.
        spare = rows * words
        segment = torch.tensor([[spare if w is None else row * words + w for w in ids] + [spare] * (length - len(ids))
                                for row, ids in enumerate(word_ids)], device=probs.device).flatten()
        flat = probs.flatten(0, 1)
        sums = flat.new_zeros(spare + 1, labels).index_add_(0, segment, flat)
        counts = torch.bincount(segment, minlength=spare + 1).clamp_(min=1).unsqueeze(1)
        # The surest sub-token's tag is the tag with the highest score over the word's sub-tokens.
        highest = flat.new_zeros(spare + 1, labels).scatter_reduce_(0, segment.unsqueeze(1).expand_as(flat), flat,
                                                                    "amax", include_self=False)
        tables = []
        for per_word in (sums / counts, highest):
            score, tag = (t.cpu().tolist() for t in per_word.max(-1))
            tables.append({(row, w): (tag[row * words + w], score[row * words + w])
                           for row, ids in enumerate(word_ids) for w in ids if w is not None})
        return tables[0], tables[1]

    def _words(self, item: str | list[str], found: dict[int, list], pre_split: bool, average: dict,
               surest: dict) -> dict[str, Any]:
        """The words of one input, tagged each of WORD_TAGS's ways: (tag, score, start, end) per word."""
        def tagged(word: int, entry: list) -> dict[str, tuple[str, float]]:
            row = entry[5]
            by = {"first": (entry[2], entry[3]), "average": average[row, word], "max": surest[row, word]}
            return {way: (self.labels[tag], score) for way, (tag, score) in by.items()}

        if not pre_split:
            spans = [(e[0], e[1], tagged(w, e)) for w, e in sorted(found.items())]
            text = item
        else:
            spans, position = [], 0
            untagged = {way: ("O", 1.0) for way in WORD_TAGS}  # a word the tokenizer made no token of
            for i, word in enumerate(item):  # offsets into the words joined by single spaces
                spans.append((position, position + len(word), tagged(i, found[i]) if i in found else untagged))
                position += len(word) + 1
            text = " ".join(item)
        words = {way: [(*by[way], start, end) for start, end, by in spans] for way in WORD_TAGS}
        return {"text": text, "words": words, "pre_split": pre_split}

    def hf_format(self, predictions: list[Any], request: TokenClassificationRequest, single: bool) -> Any:
        if request.parameters.aggregation != "none":  # the pipeline names a joined entity's type entity_group
            predictions = [[{"entity_group": e["entity"], **{k: v for k, v in e.items() if k != "entity"}}
                            for e in entities] for entities in predictions]
        return super().hf_format(predictions, request, single)

    def format(self, output: dict[str, Any], request: TokenClassificationRequest) -> list[dict[str, Any]]:
        parameters = request.parameters
        text, pre_split = output["text"], output["pre_split"]
        words = output["words"][parameters.word_tags]
        if parameters.aggregation == "none":
            entities = [{"entity": tag, "word": text[start:end], "start": start, "end": end, "score": score,
                         **({"token_start": i, "token_end": i + 1} if pre_split else {})}
                        for i, (tag, score, start, end) in enumerate(words)]
        else:
            entities = group_entities(text, words, pre_split)
        ignored = set(parameters.ignore_labels)
        return [e for e in entities if e["score"] >= parameters.min_score and e["entity"] not in ignored]
