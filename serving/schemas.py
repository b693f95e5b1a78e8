"""The HTTP API's request and response bodies (Hugging Face inference convention).

    POST /v1/models/{name}/predict  {"inputs": ..., "parameters": {...}}
    GET  /v1/models                 {"models": [ModelCard, ...]}
    GET  /healthz                   {"status": "ok"}

Every error is `ErrorBody`: what was wrong in `error`, specifics in `detail`.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, StrictInt, StrictStr, Tag, field_validator


def _valid_unicode(value: str) -> str:
    if not value.isascii():
        try:  # JSON may escape a lone surrogate ("\ud800"): valid JSON, not valid Unicode, and tokenizers fail on it
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"must be valid Unicode: a lone surrogate at character {exc.start}") from None
    return value


def _non_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must be a non-empty text")
    return _valid_unicode(value)


def _non_empty(value: str) -> str:
    if not value:
        raise ValueError("must be a non-empty text")
    return _valid_unicode(value)


UnicodeText = Annotated[StrictStr, AfterValidator(_valid_unicode)]  # may be empty (a chat turn)
Text = Annotated[StrictStr, AfterValidator(_non_blank)]
# A causal LM's stop texts: whitespace is a text here ("\n\n", the usual one); only "" (found everywhere) is not.
StopText = Annotated[StrictStr, AfterValidator(_non_empty)]
StopTexts = Union[StopText, Annotated[list[StopText], Field(min_length=1, max_length=4)], None]


class TextPair(BaseModel):
    """One input as an object: `text`, and `text_pair` for a sentence-pair task (NLI, paraphrase).

    `{"text": "..."}` alone is a single text, as `transformers.pipeline("text-classification")` takes it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    text: Text
    text_pair: Text | None = None


def _kind(value: Any) -> str | None:
    """Which union member a JSON value is meant as, so an error names that member's problem only."""
    if isinstance(value, str):
        return "Text"
    if isinstance(value, list):
        return "List"
    if isinstance(value, (dict, TextPair)):
        return "TextPair"
    return None


# Tags start upper-case: serving.errors leaves them out of a field path (`inputs[0].text_pair`).
TextInput = Annotated[
    Union[Annotated[Text, Tag("Text")], Annotated[TextPair, Tag("TextPair")]],
    Discriminator(
        _kind,
        custom_error_type="input_type",
        custom_error_message='each input must be a text or an object {"text": ..., "text_pair": ...}',
    ),
]
# One object alone is one input, as `pipeline("text-classification")({"text": ..., "text_pair": ...})` takes it.
TextInputs = Annotated[
    Union[Annotated[Text, Tag("Text")], Annotated[TextPair, Tag("TextPair")], Annotated[list[TextInput], Tag("List")]],
    Discriminator(
        _kind,
        custom_error_type="inputs_type",
        custom_error_message='inputs must be a text, an object {"text": ..., "text_pair": ...}, or a list of these',
    ),
]


class ClassificationParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    top_k: StrictInt | None = Field(
        1, ge=1, description="Labels returned per input, best first; null (or more than there are) returns all."
    )
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="Scores from the logits, as the pipeline's parameter: softmax, sigmoid, or none (the "
                          "logits themselves); null: the model's own (sigmoid for a multi-label model, else softmax).",
    )


class TextClassificationRequest(BaseModel):
    """A text, a text pair, or a list of these."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: TextInputs = Field(
        description='"a text", ["t1", "t2"], {"text": "...", "text_pair": "..."} or a list of such objects'
    )
    parameters: ClassificationParameters = Field(default_factory=ClassificationParameters)

    @field_validator("inputs")
    @classmethod
    def _check_inputs(cls, value: str | list[str | TextPair]) -> str | list[str | TextPair]:
        if isinstance(value, list) and not value:
            raise ValueError("must hold at least one input")
        return value

    def input_list(self) -> list[str | TextPair]:
        return list(self.inputs) if isinstance(self.inputs, list) else [self.inputs]


class LabelScore(BaseModel):
    label: str
    score: float


class PredictResponse(BaseModel):
    model: str
    predictions: list[Any] = Field(description="One entry per input, in input order.")


class TextClassificationResponse(PredictResponse):
    predictions: list[list[LabelScore]] = Field(description="Per input, labels sorted by score, best first.")


class ModelCard(BaseModel):
    name: str
    task: str
    labels: list[str]
    base_model: str
    version: str = Field(description="Digest of the export's tunefleet.json: changes with every export.")


class OpenAIModel(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "tunefleet"


class ModelList(BaseModel):
    models: list[ModelCard]
    # OpenAI's shape of the list beside tunefleet's: OpenAI clients (`client.models.list()`, chat UIs) read `data`.
    object: Literal["list"] = "list"
    data: list[OpenAIModel] = Field(
        default_factory=list,
        description="The models /v1/completions and /v1/chat/completions serve, as OpenAI lists them.",
    )

    @classmethod
    def of(cls, cards: list[ModelCard], generative_tasks: Collection[str]) -> "ModelList":
        """`generative_tasks`: the tasks whose models answer the OpenAI routes."""
        return cls(models=cards, data=[OpenAIModel(id=card.name) for card in cards if card.task in generative_tasks])


class Health(BaseModel):
    status: str = "ok"


class ErrorBody(BaseModel):
    error: str
    detail: Any = None
