"""Causal LM: text generation for `/predict` and the OpenAI-compatible routes (serving/openai_compat.py).

One item is one prompt's token ids with its generation settings. A batch groups
items with equal settings and generates them together, left-padded; stop texts end
a sequence where they first appear (the text before them is returned). Limits, each
a 4xx: prompts per request and characters per prompt (ServeSpec), new tokens per
request (`MAX_NEW_TOKENS`, at most the context window), and prompt plus new tokens
within the model's context window.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, TextIteratorStreamer

from serving.config import ServeSpec
from serving.errors import ServingError
from serving.handlers.base import TaskHandler, load_model
from serving.handlers.registry import register_handler
from serving.openai_compat import CHAT, COMPLETIONS, response_body, stream_events
from serving.placement import place, replica_device
from serving.schemas import PredictResponse, StopTexts, Text
from training.layout import ExportInfo

MAX_NEW_TOKENS = 1024  # per request; bounds how long one request holds a replica


class GenerationParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: StrictInt = Field(64, ge=1, description=f"Tokens generated at most (server limit {MAX_NEW_TOKENS}).")
    temperature: float = Field(0.0, ge=0, le=2, description="0: greedy, deterministic (default); higher: sampling.")
    top_p: float = Field(1.0, gt=0, le=1, description="Sampling: the smallest token set with this probability.")
    top_k: StrictInt | None = Field(None, ge=1, description="Sampling: only the k likeliest tokens; null: no limit.")
    stop: StopTexts = Field(
        None, description="Up to 4 texts; generation ends before the first one.")
    return_full_text: bool = Field(False, description="Prepend the prompt to the generated text.")
    do_sample: StrictBool | None = Field(
        None, description="As in `generate`: false is greedy whatever the temperature; true samples, at temperature "
                          "1 unless one is given; null: the temperature decides (0 greedy).")
    repetition_penalty: float = Field(
        1.0, gt=0, le=10, description="As in `generate`: above 1 discourages repeating a token already in the text; "
                                      "1: none.")

    @model_validator(mode="after")
    def _sampling_has_a_temperature(self) -> "GenerationParameters":
        if self.do_sample and "temperature" in self.model_fields_set and self.temperature == 0:
            raise ValueError("do_sample true with temperature 0: sampling needs a temperature above 0 (send none "
                             "for 1), or send do_sample false for greedy")
        return self

    def sampling_temperature(self) -> float:
        """The temperature generation uses: 0 (greedy) or the sampling one."""
        if self.do_sample is None:
            return self.temperature
        if not self.do_sample:
            return 0.0
        return self.temperature if "temperature" in self.model_fields_set else 1.0


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    inputs: Union[Text, list[Text]] = Field(description='A prompt or a list of prompts: "Once upon a time"')
    parameters: GenerationParameters = Field(default_factory=GenerationParameters)

    @field_validator("inputs")
    @classmethod
    def _check_inputs(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("must hold at least one prompt")
        return value

    def input_list(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)


class Generated(BaseModel):
    generated_text: str
    finish_reason: Literal["stop", "length"] = Field(description="stop: EOS or a stop text; length: max_new_tokens.")
    prompt_tokens: int
    completion_tokens: int


class GenerationResponse(PredictResponse):
    predictions: list[Generated] = Field(description="One generation per prompt, in input order.")


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int | None
    stop: tuple[str, ...]
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class Item:
    prompt: str
    ids: tuple[int, ...]
    settings: Settings


@dataclass(frozen=True)
class Output:
    prompt: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class _Cancelled(StoppingCriteria):
    """Stops a streamed generation once its consumer has what it needs (a stop text) or went away.
    Called after every generated token, it also gives the handler's `between_steps` its turn."""

    def __init__(self, between_steps: Callable[[], None]) -> None:
        self.event = threading.Event()
        self.between_steps = between_steps

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        if not self.event.is_set():
            self.between_steps()
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _context_window(model) -> int:
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048)


@register_handler("causal-lm")
class CausalLMHandler(TaskHandler):
    request_model = GenerationRequest
    response_model = GenerationResponse

    def __init__(self, info: ExportInfo, spec: ServeSpec, model, tokenizer, device: torch.device) -> None:
        super().__init__(info, spec)
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.context = _context_window(model)
        self.max_new_tokens = min(MAX_NEW_TOKENS, self.context - 1)
        eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
            else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        self.pad_id = int(pad)

    @classmethod
    def load(cls, export_dir: Path, info: ExportInfo, spec: ServeSpec) -> CausalLMHandler:
        device = replica_device(spec)
        tokenizer = AutoTokenizer.from_pretrained(export_dir, local_files_only=True)
        model, _ = load_model(AutoModelForCausalLM, export_dir, info)
        return cls(info, spec, place(model, spec, device, cls.auto_bfloat16), tokenizer, device)

    # ---- requests → items ------------------------------------------------------------------

    def _items(self, prompts: list[str], settings: Settings, special_tokens: bool) -> list[Item]:
        limit = self.spec.max_inputs_per_request
        if len(prompts) > limit:
            raise ServingError(413, f"too many prompts: {len(prompts)} in one request, at most {limit}",
                               {"max_inputs_per_request": limit})
        if settings.max_new_tokens > self.max_new_tokens:
            raise ServingError(422, f"max new tokens: {settings.max_new_tokens} asked, this server allows at most "
                               f"{self.max_new_tokens}", {"max_new_tokens": self.max_new_tokens})
        items = []
        for i, prompt in enumerate(prompts):
            if len(prompt) > self.spec.max_input_chars:
                raise ServingError(413, f"prompt {i} is too long: {len(prompt)} characters, at most "
                                   f"{self.spec.max_input_chars}", {"max_input_chars": self.spec.max_input_chars})
            ids = self.tokenizer(prompt, add_special_tokens=special_tokens)["input_ids"]
            room = self.context - settings.max_new_tokens
            if len(ids) > room:
                raise ServingError(413, f"prompt {i} is {len(ids)} tokens; with {settings.max_new_tokens} new tokens "
                                   f"it exceeds the model's context of {self.context} tokens: shorten the prompt or "
                                   "ask for fewer tokens", {"prompt_tokens": len(ids), "context": self.context})
            items.append(Item(prompt, tuple(ids), settings))
        return items

    def prepare(self, request: GenerationRequest) -> list[Item]:
        p = request.parameters
        stop = (p.stop,) if isinstance(p.stop, str) else tuple(p.stop or ())
        settings = Settings(p.max_new_tokens, p.sampling_temperature(), p.top_p, p.top_k, stop, p.repetition_penalty)
        return self._items(request.input_list(), settings, True)

    def openai_prepare(self, route: str, request: Any) -> list[Item]:
        if route == CHAT:
            if not self.tokenizer.chat_template:
                raise ServingError(400, f"model {self.info.name!r} has no chat template; use /v1/completions")
            prompts = [self.tokenizer.apply_chat_template(request.conversation(), add_generation_prompt=True,
                                                          tokenize=False)]
            limit = request.token_limit() or min(self.max_new_tokens, 256)
        else:
            prompts, limit = request.prompts(), request.max_tokens
        settings = Settings(limit, request.temperature, request.top_p, None, tuple(request.stop_list()))
        # A chat template writes its own special tokens (BOS and turn markers).
        return self._items(prompts, settings, special_tokens=route == COMPLETIONS)

    # ---- generation ------------------------------------------------------------------------

    def _generate_kwargs(self, settings: Settings) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": settings.max_new_tokens, "pad_token_id": self.pad_id,
                                  "eos_token_id": sorted(self.eos_ids) or None}
        if settings.temperature > 0:
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                          top_k=settings.top_k or 0)
        else:
            kwargs.update(do_sample=False)
        if settings.repetition_penalty != 1.0:
            kwargs.update(repetition_penalty=settings.repetition_penalty)
        if settings.stop:
            kwargs.update(stop_strings=list(settings.stop), tokenizer=self.tokenizer)
        return kwargs

    def _batch_tensors(self, items: list[Item]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(item.ids) for item in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):  # left padding: every prompt ends where generation starts
            ids[row, width - len(item.ids):] = torch.tensor(item.ids, dtype=torch.long)
            mask[row, width - len(item.ids):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _finish(self, item: Item, new_ids: list[int]) -> Output:
        ended = next((i for i, t in enumerate(new_ids) if t in self.eos_ids), None)
        tokens = new_ids[:ended] if ended is not None else new_ids
        while ended is None and tokens and tokens[-1] == self.pad_id:  # rows stopped early are padded
            tokens = tokens[:-1]
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in item.settings.stop) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        stopped = ended is not None or cut >= 0 or len(tokens) < item.settings.max_new_tokens
        used = len(tokens) + (1 if ended is not None else 0)
        return Output(item.prompt, text, "stop" if stopped else "length", len(item.ids), used)

    @torch.inference_mode()
    def run_batch(self, items: list[Item]) -> list[Output]:
        outputs: list[Output | None] = [None] * len(items)
        groups: dict[Settings, list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault(item.settings, []).append(index)
        for settings, indices in groups.items():
            ids, mask = self._batch_tensors([items[i] for i in indices])
            generated = self.model.generate(input_ids=ids, attention_mask=mask, **self._generate_kwargs(settings))
            for row, index in enumerate(indices):
                outputs[index] = self._finish(items[index], generated[row, ids.shape[1]:].tolist())
        return outputs  # type: ignore[return-value]

    def hf_format(self, predictions: list[Any], request: GenerationRequest, single: bool) -> Any:
        # The pipeline's shape: a list of generations per prompt (one each here), the list alone for one prompt.
        return predictions if single else [[p] for p in predictions]

    def format(self, output: Output, request: GenerationRequest) -> dict[str, Any]:
        text = output.prompt + output.text if request.parameters.return_full_text else output.text
        return {"generated_text": text, "finish_reason": output.finish_reason,
                "prompt_tokens": output.prompt_tokens, "completion_tokens": output.completion_tokens}

    def stream(self, item: Item) -> Iterator[str | Output]:
        """Text deltas as they are generated, then the final Output; text past a stop is never sent."""
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = _Cancelled(self.between_steps)
        result: dict[str, Any] = {}
        ids, mask = self._batch_tensors([item])
        kwargs = self._generate_kwargs(item.settings)
        kwargs.pop("stop_strings", None), kwargs.pop("tokenizer", None)  # stops are found in the text below

        def work() -> None:
            try:
                with torch.inference_mode():
                    out = self.exclusive(lambda: self.model.generate(
                        input_ids=ids, attention_mask=mask, streamer=streamer, stopping_criteria=[cancel], **kwargs))
                result["new_ids"] = out[0, ids.shape[1]:].tolist()
            except BaseException as exc:  # surfaced to the consumer below
                result["error"] = exc
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        stops, hold = item.settings.stop, max((len(s) for s in item.settings.stop), default=1) - 1
        text, sent = "", 0
        try:
            for piece in streamer:
                text += piece
                cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    text = text[:cut]
                    cancel.event.set()
                    break
                if len(text) - hold > sent:  # keep back what could be the start of a stop text
                    yield text[sent:len(text) - hold]
                    sent = len(text) - hold
        finally:
            cancel.event.set()
            thread.join()
        if "error" in result:
            raise result["error"]
        final = self._finish(item, result.get("new_ids", []))
        if len(final.text) > sent and final.text.startswith(text[:sent]):
            yield final.text[sent:]
        yield final

    def openai_format(self, route: str, request: Any, outputs: list[Output]) -> dict[str, Any]:
        return response_body(route, request, outputs)

    def openai_stream(self, route: str, request: Any) -> Iterator[str]:
        """Server-sent events for one request; limits are checked before the first event."""
        items = self.openai_prepare(route, request)
        yield from stream_events(route, request, ((i, event) for i, item in enumerate(items) for event in self.stream(item)))
